"""The pipeline stage: corrupt -> train-classifier -> annotate -> train -> sample -> evaluate, from one config.

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
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import Field

from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError, Strict, flag
from ambient_ray.data import shards
from ambient_ray.io import storage, tracking
from ambient_ray.io.tracking import MlflowConfig
from ambient_ray.stages.results import StageFailed

STAGES = ("corrupt", "classifier", "annotate", "train", "sample", "evaluate")
FOLDERS = {
    "corrupt": "corrupt",
    "classifier": "classifier",
    "annotate": "annotated",
    "train": "train",
    "sample": "samples",
    "evaluate": "eval",
}
MARKER = "pipeline_stage.json"  # a done-marker of ambient_ray.data.shards
_MARKER_NAME = MARKER.removesuffix(".json")


class PipelineConfig(Strict):
    """Config of ``ambient-ray pipeline``; each stage section holds keys of that stage's config."""

    out: str = Field(
        ...,
        description="output URI (local folder or s3://bucket/prefix); one folder per stage under it",
        json_schema_extra=flag("--out"),
    )
    corrupt: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray corrupt'")
    classifier: dict[str, Any] = Field(
        default_factory=dict, description="keys of 'ambient-ray train-classifier' (the noise classifier)"
    )
    annotate: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray annotate'")
    train: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray train'")
    sample: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray sample'")
    evaluate: dict[str, Any] = Field(
        default_factory=dict,
        description="keys of 'ambient-ray evaluate' (default reference: the clean rows of the corrupt output)",
    )
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


_OWNED = {  # keys the pipeline sets itself in each section
    "corrupt": {"out"},
    "classifier": {"data", "out", "kind", "resume", "mlflow"},
    "annotate": {"data", "out", "classifier", "mlflow"},
    "train": {"data", "out", "resume", "mlflow"},
    "sample": {"checkpoint", "out", "mlflow"},
    "evaluate": {"samples", "out", "mlflow"},
}


def _models() -> dict[str, type]:
    from ambient_ray.stages import annotate, corrupt, evaluate, sample, train, train_classifier

    return {
        "corrupt": corrupt.CorruptConfig,
        "classifier": train_classifier.ClassifierTrainConfig,
        "annotate": annotate.AnnotateConfig,
        "train": train.TrainConfig,
        "sample": sample.SampleConfig,
        "evaluate": evaluate.EvaluateConfig,
    }


def stage_configs(cfg: PipelineConfig, parent_run: str | None = None) -> dict[str, Any]:
    """Every stage's validated config, wired together under ``cfg.out``; a ConfigError names the key.

    This is the whole check of a pipeline: it runs before the first stage does any work."""
    from ambient_ray.corruptions import parse

    out = storage.normalize(cfg.out)
    dirs = {s: storage.join(out, FOLDERS[s]) for s in STAGES}
    for spec in cfg.corrupt.get("corruptions") or []:
        try:
            parse(spec)
        except Exception as e:
            raise ConfigError(f"config key 'corrupt.corruptions': {e}") from None

    def mlflow(name: str) -> dict:  # the pipeline's trained denoiser is its product: registered
        return tracking.child(cfg.mlflow, name, parent_run, register=name == "train")

    wiring = {
        "corrupt": {"out": dirs["corrupt"]},
        "classifier": {
            "data": dirs["corrupt"],
            "out": dirs["classifier"],
            "kind": "noise",
            "mlflow": mlflow("train-classifier"),
        },
        "annotate": {
            "data": dirs["corrupt"],
            "classifier": dirs["classifier"],
            "out": dirs["annotate"],
            "mlflow": mlflow("annotate"),
        },
        "train": {"data": dirs["annotate"], "out": dirs["train"], "mlflow": mlflow("train")},
        "sample": {"checkpoint": dirs["train"], "out": dirs["sample"], "mlflow": mlflow("sample")},
        "evaluate": {"samples": dirs["sample"], "out": dirs["evaluate"], "mlflow": mlflow("evaluate")},
    }
    if "reference" not in cfg.evaluate:  # the clean rows of the mixed data: the distribution the pipeline aims at
        wiring["evaluate"].update(reference=dirs["corrupt"], reference_where="quality=clean")
    if "train" not in cfg.evaluate:
        wiring["evaluate"]["train"] = dirs["annotate"]
    owner = "the pipeline itself (it wires the stages together)"
    return {
        s: cfgmod.build_section(m, s, getattr(cfg, s), owned=_OWNED[s], owner=owner, fill=wiring[s])
        for s, m in _models().items()
    }


def fingerprints(stages: dict[str, Any]) -> dict[str, str]:
    """Per stage: a hash of its resolved config (less MLflow and resume switches) chained with the stage before it."""
    prints, prev = {}, ""
    for name in STAGES:
        prev = prints[name] = shards.chain(prev, stages[name].model_dump(mode="json", exclude=set(shards.NOT_WORK)))
    return prints


def _marker(stage_out: str) -> dict | None:
    return shards.read_marker(stage_out, _MARKER_NAME)


def _prepare(name: str, scfg, fingerprint: str) -> Any:
    """Make a stage's folder ready to (re)run: clear a finished run of another config, set the resume switches."""
    from ambient_ray.train import engine

    out = storage.normalize(scfg.out)
    old = _marker(out)
    if old is not None:  # finished, but with another config (or after a changed earlier stage)
        print(
            f"pipeline: {name}: its config or an earlier stage changed since it finished "
            f"({old['fingerprint']} -> {fingerprint}); redoing it"
        )
        storage.delete(out)
        return scfg
    if not storage.exists(out):
        return scfg
    if name in ("classifier", "train"):
        if engine.latest_checkpoint(out):
            print(f"pipeline: {name}: continuing the unfinished run in {out} from its latest checkpoint")
            return scfg.model_copy(update={"resume": True})
        storage.delete(out)  # started, no checkpoint yet: nothing to keep
    elif name in ("sample", "evaluate"):
        storage.delete(out)
    # corrupt and annotate resume shard by shard on their own
    return scfg


def _run_stage(name: str, scfg, progress: bool) -> dict:
    """Run one stage; returns the JSON-safe summary kept in its marker."""
    from ambient_ray.stages import annotate, corrupt, evaluate, sample, train, train_classifier

    if name == "corrupt":
        r = corrupt.run(scfg, progress=progress)
        print(r.summary())
        return {
            "out": r.out,
            "figures": {"rows_in": r.rows_in, "rows_out": r.rows_out, "rows_quarantined": r.rows_quarantined},
        }
    if name == "classifier":
        r = train_classifier.run(scfg)
        return {
            "out": r["out"],
            "mlflow_run_id": r["mlflow_run_id"],
            "figures": {k: r["metrics"][k] for k in ("loss", "accuracy") if k in r["metrics"]},
        }
    if name == "annotate":
        r = annotate.run(scfg, progress=progress)
        figs = {
            "rows_out": r["rows_out"],
            "rows_quarantined": r["rows_quarantined"],
            "mean_sigma_min": r["mean_sigma_min"],
        }
        return {"out": r["out"], "mlflow_run_id": r.get("mlflow_run_id"), "figures": figs}
    if name == "train":
        r = train.run(scfg)
        return {
            "out": r["out"],
            "mlflow_run_id": r["mlflow_run_id"],
            "checkpoint": r["checkpoint"],
            "figures": {k: r["metrics"][k] for k in ("loss",) if k in r["metrics"]},
        }
    if name == "sample":
        r = sample.run(scfg, progress=progress)
        return {"out": r["out"], "mlflow_run_id": r["mlflow_run_id"], "figures": {"num": scfg.num}}
    r = evaluate.run(scfg, progress=progress)
    return {"out": r["out"], "mlflow_run_id": r["mlflow_run_id"], "figures": dict(r["metrics"])}


def _input_of(name: str, scfg) -> str:
    if name == "corrupt":
        return str(scfg.source.dataset)
    return str(getattr(scfg, {"sample": "checkpoint", "evaluate": "samples"}.get(name, "data")))


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
        print(f"pipeline: {' -> '.join(STAGES)} -> {out}" + (f"; MLflow run {parent} at {uri}" if parent else ""))
        done: dict[str, dict] = {}
        for i, name in enumerate(STAGES, 1):
            scfg = stages[name]
            head = f"pipeline: [{i}/{len(STAGES)}] {name}"
            kept = shards.done(scfg.out, _MARKER_NAME, prints[name])
            if kept is not None:
                done[name] = kept
                print(f"{head}: finished earlier, skipped ({kept['out']})")
                continue
            scfg = _prepare(name, scfg, prints[name])
            print(f"{head}: {_input_of(name, scfg)} -> {scfg.out}")
            s0 = time.perf_counter()
            try:
                summary = _run_stage(name, scfg, progress)
            except (ConfigError, StageFailed):
                raise
            except Exception as e:
                raise StageFailed(
                    f"stage '{name}' failed on input {_input_of(name, scfg)} (output {scfg.out}): "
                    f"{type(e).__name__}: {e}"
                ) from e
            summary["seconds"] = round(time.perf_counter() - s0, 1)
            shards.mark_done(scfg.out, _MARKER_NAME, prints[name], summary)
            done[name] = summary
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
