"""The pipeline stage: corrupt -> train-classifier -> annotate -> train -> sample [-> inpaint] -> evaluate, from one
config (``inpaint`` only when its section is given: a model of ``train.objective: masked`` restores the training
data's masked rows).

``ambient-ray pipeline --config jobs/configs/pipeline.yaml --set out=s3://bucket/run`` (or, on a
cluster, ``ray job submit ... -- python -m jobs.pipeline --config ...``).

The config has one section per stage holding that stage's own keys (``corrupt``, ``classifier``,
``annotate``, ``train``, ``sample``, ``evaluate``); the pipeline sets the keys that wire the stages
together (each stage's ``data``/``out``/``checkpoint``/``samples`` and its MLflow parent) and refuses
them in a section. Every section is validated against its stage's config model before the first
stage starts, so a bad key fails the job in seconds, naming the key.

Outputs, under OUT: ``corrupt/``, ``classifier/``, ``annotated/``, ``train/``, ``samples/``, ``eval/``
(each the stage's usual output), ``config.yaml`` (the resolved pipeline config) and
``pipeline.json`` (per stage: its output URI, MLflow run and headline figures).

Resuming: a finished stage leaves ``OUT/<stage>/pipeline_stage.json`` holding the fingerprint of
its resolved config and of every stage before it. A re-submitted pipeline skips each stage whose
marker matches, and redoes a stage (and so everything after it) whose config changed. A stage that
did not finish resumes by its own means: corrupt and annotate skip the shards they already wrote,
the two training stages continue from their latest checkpoint; sample and evaluate start over.

MLflow: one parent run for the pipeline (reopened when resumed), with each stage's run nested under it.

Starting from a dataset: with a top-level ``data`` (precomputed latents, or any data the train stage reads),
corrupt, classifier and annotate are not run (their sections must be empty) and train reads ``data``; a
``precompute`` section then runs ``ambient-ray precompute`` on it first (``OUT/precomputed/``) and train reads
its latents. Evaluate runs there only when its section is given (it has no default reference).

Multi-phase schedules (docs/workflows/phases.md): ``train.phases`` is a list of ``{name, <train keys>}``;
phase i trains with the train section deep-merged with its keys (nested sections merge key by key, lists and
values replace; dotted keys such as ``optim.lr`` are nested first), starts from phase i-1's weights
(``init_from``, set by the pipeline; the first phase from ``train.init_from`` if given), and writes
``OUT/train/<name>/``, with its own marker, fingerprint and MLflow child run ``train/<name>``; sample and
evaluate use the last phase. A phase may set its own ``data`` (e.g. latents at a higher resolution).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any

from pydantic import Field

from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError, Strict, flag
from ambient_ray.io import shards, storage, tracking
from ambient_ray.io.tracking import MlflowConfig
from ambient_ray.stages import registry, reports
from ambient_ray.stages.results import StageFailed
from ambient_ray.workflows import chain
from ambient_ray.workflows import steps as stepsmod

STAGES = ("corrupt", "classifier", "annotate", "train", "sample", "evaluate")  # the whole pipeline
SECTIONS = {  # each section of the config: the registered stage it configures (its folder under OUT is the stage's)
    "precompute": "precompute",
    "corrupt": "corrupt",
    "classifier": "train-classifier",
    "annotate": "annotate",
    "train": "train",
    "sample": "sample",
    "inpaint": "inpaint",
    "evaluate": "evaluate",
}
MARKER = "pipeline_stage.json"  # a done-marker of ambient_ray.io.shards
_MARKER_NAME = MARKER.removesuffix(".json")


class PipelineConfig(Strict):
    """Config of ``ambient-ray pipeline``; each stage section holds keys of that stage's config."""

    out: str = Field(
        ...,
        description="output URI (local folder or s3://bucket/prefix); one folder per stage under it",
        json_schema_extra=flag("--out"),
    )
    data: str | None = Field(
        None,
        description="start from this dataset (e.g. precomputed latents with per-source sigma_min): corrupt, "
        "classifier and annotate are not run and train reads it (or, with a precompute section, its latents)",
    )
    precompute: dict[str, Any] = Field(
        default_factory=dict,
        description="keys of 'ambient-ray precompute', run first on 'data' (needs 'data'); empty: not run",
    )
    corrupt: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray corrupt'")
    classifier: dict[str, Any] = Field(
        default_factory=dict, description="keys of 'ambient-ray train-classifier' (the noise classifier)"
    )
    annotate: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray annotate'")
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="keys of 'ambient-ray train'; 'phases': a list of {name, <train keys>} trained one after "
        "the other, each from the previous one's weights",
    )
    sample: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray sample'")
    inpaint: dict[str, Any] = Field(
        default_factory=dict,
        description="keys of 'ambient-ray inpaint', run after sample on the training data's masked rows with the "
        "trained model (a model of train.objective masked); empty: not run",
    )
    evaluate: dict[str, Any] = Field(
        default_factory=dict,
        description="keys of 'ambient-ray evaluate' (default reference: the clean rows of the corrupt output)",
    )
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


def _owned(section: str) -> set[str]:
    """Keys the pipeline sets itself in a section: the stage's links, and ``resume`` where it continues a run."""
    stage = registry.get(SECTIONS[section])
    return registry.owned(SECTIONS[section], *(("resume",) if stage.resume == "checkpoint" else ()))


_PHASE_OWNED = {"out", "resume", "mlflow"}  # a phase may set its own data; init_from only the first
_PHASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def stage_of(step: str) -> str:
    """The stage a step of the pipeline runs: ``train/<phase>`` -> ``train``."""
    return step.split("/", 1)[0]


def phases(cfg: PipelineConfig) -> list[dict]:
    """``train.phases``, checked: a non-empty list of mappings, each with a unique folder-safe ``name``."""
    raw = cfg.train.get("phases")
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        raise ConfigError("config key 'train.phases': a non-empty list of {name: ..., <train keys>} expected")
    seen: set[str] = set()
    for i, ph in enumerate(raw):
        key = f"train.phases[{i}]"
        if not isinstance(ph, dict):
            raise ConfigError(f"config key '{key}': a mapping of train keys with a 'name' expected, got {ph!r}")
        name = ph.get("name")
        if not isinstance(name, str) or not _PHASE_NAME.fullmatch(name):
            raise ConfigError(f"config key '{key}.name': a folder name (letters, digits, '_', '.', '-') expected")
        if name in seen:
            raise ConfigError(f"config key '{key}.name': {name!r} names two phases")
        seen.add(name)
    return raw


def steps(cfg: PipelineConfig) -> list[str]:
    """The pipeline's steps in order: stage names, with one ``train/<name>`` per phase of ``train.phases``."""
    if cfg.data is None:
        head = ["corrupt", "classifier", "annotate"]
    else:
        head = ["precompute"] if cfg.precompute else []
    trains = [f"train/{ph['name']}" for ph in phases(cfg)] or ["train"]
    tail = (
        ["sample"] + (["inpaint"] if cfg.inpaint else []) + (["evaluate"] if cfg.data is None or cfg.evaluate else [])
    )
    return head + trains + tail


def _nest(keys: dict) -> dict:
    """Dotted keys as nested sections: ``{'optim.lr': 1}`` -> ``{'optim': {'lr': 1}}``."""
    out: dict = {}
    for k, v in keys.items():
        *parents, last = k.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = cfgmod.merge(node[last], v) if isinstance(node.get(last), dict) and isinstance(v, dict) else v
    return out


def _check_sections(cfg: PipelineConfig) -> None:
    if cfg.data is not None:
        for s in ("corrupt", "classifier", "annotate"):
            if getattr(cfg, s):
                raise ConfigError(f"config key '{s}': not run when 'data' is given (the pipeline starts from it)")
    elif cfg.precompute:
        raise ConfigError("config key 'precompute': runs on the top-level 'data'; set 'data' to precompute it")


def stage_configs(cfg: PipelineConfig, parent_run: str | None = None) -> dict[str, Any]:
    """Every step's validated config (by step, in order: :func:`steps`), wired together under ``cfg.out``; a
    ConfigError names the key (``train.phases[2].optim.lr``).

    This is the whole check of a pipeline: it runs before the first stage does any work."""
    from ambient_ray.corruptions import parse

    _check_sections(cfg)
    order = steps(cfg)
    out = storage.normalize(cfg.out)
    dirs = {s: storage.join(out, _folder(stage_of(s)) + s[len(stage_of(s)) :]) for s in order}
    for spec in cfg.corrupt.get("corruptions") or []:
        try:
            parse(spec)
        except Exception as e:
            raise ConfigError(f"config key 'corrupt.corruptions': {e}") from None
    trains = [s for s in order if stage_of(s) == "train"]

    def mlflow(name: str) -> dict:  # the pipeline's trained denoiser (its last phase) is its product: registered
        return tracking.child(cfg.mlflow, name, parent_run, register=name == trains[-1])

    if cfg.data is None:
        data = dirs["annotate"]
    else:
        data = storage.normalize(cfg.data)
    train_data = dirs["precompute"] if cfg.precompute else data
    wiring = {
        "precompute": {
            "data": data if cfg.precompute else None,
            "out": dirs.get("precompute"),
            "mlflow": mlflow("precompute"),
        },
        "corrupt": {"out": dirs.get("corrupt")},
        "classifier": {
            "data": dirs.get("corrupt"),
            "out": dirs.get("classifier"),
            "kind": "noise",
            "mlflow": mlflow("train-classifier"),
        },
    }
    # annotate -> train -> sample -> evaluate: train's output is its last phase's (a single train: "train")
    outs = {s: dirs[s] for s in ("annotate",) if s in dirs}
    outs.update(train=dirs[trains[-1]], sample=dirs["sample"])
    if "evaluate" in dirs:
        outs["evaluate"] = dirs["evaluate"]
    if "inpaint" in dirs:  # the trained model restores the rows it was trained on
        fill = {"data": dirs["annotate"] if cfg.data is None else train_data, "model": outs["train"]}
        wiring["inpaint"] = {**fill, "out": dirs["inpaint"], "mlflow": mlflow("inpaint")}
    source = dirs["corrupt"] if cfg.data is None else train_data
    wiring.update(chain.wire(source, outs, classifier=dirs.get("classifier"), mlflow=mlflow))
    if cfg.data is None:
        if "reference" not in cfg.evaluate:  # the clean rows of the mixed data: the distribution the pipeline aims at
            wiring["evaluate"].update(reference=dirs["corrupt"], reference_where="quality=clean")
        if "train" not in cfg.evaluate:
            wiring["evaluate"]["train"] = dirs["annotate"]
    owner = "the pipeline itself (it wires the stages together)"
    built: dict[str, Any] = {}
    for s in order:
        stage = stage_of(s)
        if s != stage:  # a phase: train/<name>
            continue
        keys = {k: v for k, v in getattr(cfg, stage).items() if not (stage == "train" and k == "phases")}
        model = registry.get(SECTIONS[stage]).model()
        built[s] = cfgmod.build_section(model, stage, keys, owned=_owned(stage), owner=owner, fill=wiring[s])
    if len(trains) > 1 or trains[0] != "train":
        built.update(_phase_configs(cfg, trains, train_data, dirs, mlflow, owner))
    return {s: built[s] for s in order}


def _phase_configs(cfg: PipelineConfig, trains: list[str], data: str, dirs: dict, mlflow, owner: str) -> dict:
    """Each phase's TrainConfig: the train section deep-merged with the phase's keys, from the previous phase."""
    model = registry.get(SECTIONS["train"]).model()
    base = {k: v for k, v in cfg.train.items() if k != "phases"}
    clash = sorted(_owned("train") & set(base))
    if clash:
        raise ConfigError(f"config key 'train.{clash[0]}': set by {owner}")
    built = {}
    for i, (step, ph) in enumerate(zip(trains, phases(cfg))):
        label = f"train.phases[{i}]"
        over = _nest({k: v for k, v in ph.items() if k != "name"})
        owned = _PHASE_OWNED | ({"init_from"} if i else set())
        clash = sorted(owned & set(over))
        if clash:
            why = "; each phase starts from the previous one's output" if clash[0] == "init_from" else ""
            raise ConfigError(f"config key '{label}.{clash[0]}': set by {owner}{why}")
        own = over.pop("data", None)
        fill = {"data": data if own is None else storage.normalize(own), "out": dirs[step], "mlflow": mlflow(step)}
        if i:
            fill["init_from"] = dirs[trains[i - 1]]
        try:
            built[step] = cfgmod.build_section(
                model, label, cfgmod.merge(base, over), owned=set(), owner=owner, fill=fill
            )
        except ConfigError:
            # a bad key of the train section itself is named as train.KEY, not as the phase's
            fill0 = {"data": data, "out": dirs[step], "mlflow": fill["mlflow"]}
            cfgmod.build_section(model, "train", base, owned=set(), owner=owner, fill=fill0)
            raise
    return built


def fingerprints(stages: dict[str, Any]) -> dict[str, str]:
    """Per step: a hash of its resolved config (less MLflow and resume switches) chained with the step before it."""
    prints, prev = {}, ""
    for name, scfg in stages.items():
        prev = prints[name] = shards.chain(prev, scfg.model_dump(mode="json", exclude=set(shards.NOT_WORK)))
    return prints


def _folder(section: str) -> str:
    """A section's folder under OUT: its stage's (``annotated``, ``samples``, ...)."""
    return registry.get(SECTIONS[section]).folder


def _prepare(step: str, scfg, fingerprint: str) -> Any:
    """Make a step's folder ready to (re)run: clear a finished run of another config, set the resume switches
    (the stage's resume policy, :func:`ambient_ray.workflows.steps.prepare`)."""
    stage = SECTIONS[stage_of(step)]
    return stepsmod.prepare(stage, scfg, fingerprint, marker=_MARKER_NAME, label=f"pipeline: {step}")


def _run_stage(name: str, scfg, progress: bool) -> dict:
    """Run one stage; returns the JSON-safe summary kept in its marker: its output, its MLflow run (for a stage
    that tracks one), the keys the stage keeps (train's checkpoint) and its headline figures."""
    stage = registry.get(SECTIONS[name])
    r = stage.call(scfg, progress=progress)
    if dataclasses.is_dataclass(r):  # corrupt's result says what it did in a line
        print(r.summary())
        r = dataclasses.asdict(r)
    summary = {"out": r["out"]}
    if "mlflow" in type(scfg).model_fields:
        summary["mlflow_run_id"] = r.get("mlflow_run_id")
    summary.update({k: r[k] for k in stage.keep})
    summary["figures"] = stage.figures(scfg, r) if stage.figures else {}
    return summary


def _input_of(name: str, scfg) -> str:
    if name == "train" and scfg.init_from:
        return f"{scfg.data} (from the weights of {scfg.init_from})"
    return str(cfgmod.get_key(scfg, registry.get(SECTIONS[name]).input))


def _step(head: str, name: str, scfg, fingerprint: str, progress: bool) -> dict:
    """One step that has not finished: its folder made ready, the stage run; its summary (with its seconds).
    A failure names the step and its input (a ConfigError, or a stage's own StageFailed, as it is)."""
    scfg = _prepare(name, scfg, fingerprint)
    print(f"{head}: {_input_of(stage_of(name), scfg)} -> {scfg.out}")
    s0 = time.perf_counter()
    try:
        summary = _run_stage(stage_of(name), scfg, progress)
    except (ConfigError, StageFailed):
        raise
    except Exception as e:
        raise StageFailed(
            f"stage '{name}' failed on input {_input_of(stage_of(name), scfg)} (output {scfg.out}): "
            f"{type(e).__name__}: {e}"
        ) from e
    summary["seconds"] = round(time.perf_counter() - s0, 1)
    return summary


def run(cfg: PipelineConfig, progress: bool = True) -> dict:
    """Run (or resume) the pipeline; returns {"out", "stages": {name: summary}, "mlflow_run_id", "mlflow_uri",
    "minutes"}."""
    stages = stage_configs(cfg)  # every key checked before anything is written
    out = storage.normalize(cfg.out)
    storage.check_reachable(out)
    cfgmod.save_resolved(cfg, out)
    prints = fingerprints(stages)
    t0 = time.perf_counter()
    params = {k: v for k, v in cfgmod.flatten(cfg).items() if not k.startswith("mlflow.")}
    with tracking.run(
        cfg.mlflow, out, name=cfg.mlflow.run_name or "pipeline", params=params, tags={"stage": "pipeline"}
    ) as (parent, uri):
        stages = stage_configs(cfg, parent)
        print(
            f"pipeline: {' -> '.join(stages)} -> {out}"
            + (f"; MLflow run {parent}{reports.mlflow_where(parent, uri, tree=True)}" if parent else "")
        )
        done: dict[str, dict] = {}
        for i, (name, scfg) in enumerate(stages.items(), 1):
            head = f"pipeline: [{i}/{len(stages)}] {name}"
            summary, ran = stepsmod.run(
                scfg.out, prints[name], lambda: _step(head, name, scfg, prints[name], progress), marker=_MARKER_NAME
            )
            done[name] = summary
            if not ran:
                print(f"{head}: finished earlier, skipped ({summary['out']})")
                continue
            figs = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.get("figures", {}).items()
            )
            print(
                f"{head}: done in {summary['seconds']:.0f}s"
                + (f"; {figs}" if figs else "")
                + (f"; MLflow run {summary['mlflow_run_id']}" if summary.get("mlflow_run_id") else "")
            )
        minutes = (time.perf_counter() - t0) / 60
        report = {"out": out, "stages": done, "mlflow_run_id": parent, "mlflow_uri": uri, "fingerprints": prints}
        report_json = json.dumps(report, indent=1).encode()
        storage.write_bytes(storage.join(out, "pipeline.json"), report_json)
        metrics = {
            f"{n}.{k}": float(v)
            for n, s in done.items()
            for k, v in s.get("figures", {}).items()
            if isinstance(v, (int, float))
        }
        tracking.log_metrics(parent, uri, metrics)
        tracking.log_files(parent, uri, {"pipeline.json": report_json})
    return {**report, "minutes": minutes}
