"""The ``ambient-ray`` command line: one sub-command per pipeline stage, its flags built from the stage's config.

Every stage takes ``--config FILE`` (local path or S3 URI, YAML) and ``--set key=value`` overrides
(dotted keys; values parsed as YAML), plus flags for its most used keys. A flag is declared once, beside
its config field (``Field(..., json_schema_extra=flag("--steps"))``, see :func:`ambient_ray.config.flag`);
this module turns those declarations into argparse sub-parsers. Precedence: ``--set`` > flags > config
file > defaults. ``python -m jobs.<stage>`` runs the same code (for ``ray job submit``).

Exit codes: 0 done; 2 a usage or config error (the message names the key or the input); 1 anything
else, with its traceback (a bug, or a stage that failed part-way and says what it kept).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ambient_ray import config as cfgmod

FLAG = "flag:"  # argparse dest prefix of a config flag: 'flag:source.dataset'


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input (exit 2, message only): a config error, a bad corruption spec, an
    unreachable or refused storage URI, a missing input file. Any other exception is a failure (exit 1)."""
    from ambient_ray.corruptions import CorruptionError
    from ambient_ray.io.storage import StorageError

    return (cfgmod.ConfigError, CorruptionError, StorageError, FileNotFoundError)


@dataclass(frozen=True)
class Stage:
    """A sub-command: ``main(args)`` runs it; ``model()`` gives its config model (imported only when the
    sub-command is used); ``extra`` adds flags that are not config keys."""

    help: str
    main: Callable[[argparse.Namespace], int]
    model: Callable[[], type[BaseModel]] | None = None
    extra: Callable[[argparse.ArgumentParser], None] | None = None


# ------------------------------------------------------------------------------ flags from the config models


def _help(field: FieldInfo, fl: cfgmod.Flag) -> str:
    text = fl.help or field.description or ""
    if field.is_required():
        text += " (required)"
    else:
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(map(str, default))
        if default not in (None, "", {}, False):
            text += f" (default {default})"
    return text.strip().replace("%", "%%")


def argparse_kwargs(key: str, field: FieldInfo, fl: cfgmod.Flag) -> dict[str, Any]:
    """How argparse reads the flag of config key ``key``: its type, action and choices from the field."""
    kw: dict[str, Any] = {"dest": FLAG + key, "default": None, "help": _help(field, fl)}
    metavar = fl.metavar or fl.name[2:].upper().replace("-", "_")
    ann = cfgmod.unwrap_optional(field.annotation)
    if fl.parse is not None:  # the flag's own conversion takes the raw string (or the list of them)
        return {**kw, "type": str, "action": "append" if fl.repeat else "store", "metavar": metavar}
    if ann is bool:
        return {**kw, "action": argparse.BooleanOptionalAction if field.default is True else "store_true"}
    repeat = get_origin(ann) is list
    if repeat:
        (ann,) = get_args(ann)
    choices = fl.choices
    if get_origin(ann) is Literal:
        choices = choices or get_args(ann)
        ann = type(choices[0])
    if ann not in (int, float, str):
        raise TypeError(
            f"flag {fl.name} (config key '{key}'): no command-line type for {field.annotation}; give parse="
        )
    kw.update(type=ann, action="append" if repeat else "store")
    if choices:
        kw["choices"] = choices
        if fl.metavar:
            kw["metavar"] = fl.metavar
    else:
        kw["metavar"] = metavar
    return kw


def add_flags(p: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One argparse option per flag declared in ``model`` (and its nested sections)."""
    seen: dict[str, str] = {}
    for key, field, fl in cfgmod.declared_flags(model):
        if fl.name in seen:
            raise TypeError(f"{model.__name__}: flag {fl.name} declared for both '{seen[fl.name]}' and '{key}'")
        seen[fl.name] = key
        p.add_argument(fl.name, **argparse_kwargs(key, field, fl))


def flag_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """``{dotted config key: value}`` of the flags given on the command line (converted by their ``parse``)."""
    values: dict[str, Any] = {}
    for key, _, fl in cfgmod.declared_flags(model):
        value = getattr(args, FLAG + key, None)
        if value is None:
            continue
        if fl.parse is not None:
            try:
                value = fl.parse(value)
            except cfgmod.ConfigError:
                raise
            except (ValueError, TypeError) as e:  # only the user's text for this flag was converted here
                raise cfgmod.ConfigError(f"config key '{key}': {fl.name} {value!r}: {e}") from None
        values[key] = value
    return values


def config(args: argparse.Namespace, model: type[BaseModel] | None = None) -> Any:
    """The stage's validated config from ``--config``, the flags and ``--set`` (a ConfigError names the key)."""
    model = model or STAGES[args.stage].model()
    return cfgmod.build(model, args.config, args.sets, flag_values(args, model))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (local path or s3:// URI)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable; dotted keys, YAML values)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _populate(p: argparse.ArgumentParser, stage: Stage) -> None:
    if stage.model is not None:
        _common(p)
        add_flags(p, stage.model())
    if stage.extra is not None:
        stage.extra(p)


# ------------------------------------------------------------------------------ the stages


def _corrupt_extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list-corruptions", action="store_true", help="list the known corruptions and exit")


def _corrupt(args) -> int:
    from ambient_ray import corruptions
    from ambient_ray.stages import corrupt

    if args.list_corruptions:
        corrupt.load_plugins(getattr(args, FLAG + "plugins") or [])
        for name, ct in sorted(corruptions.registered().items()):
            params = ", ".join(
                f"{k}: {p.describe()}" + ("" if p.default is None else f" = {p.default}") for k, p in ct.params.items()
            )
            print(f"{name:14s} {params}")
        return 0
    r = corrupt.run(config(args), progress=not args.no_progress)
    print(r.summary())
    if r.rows_quarantined:
        print(f"  quarantined rows (with reasons): {r.out}/quarantine/")
    print(f"  data: {r.out}/data/   preview: {r.out}/preview.png   config: {r.out}/config.yaml")
    return 0


def _mlflow_line(s: dict) -> None:
    if s.get("mlflow_run_id"):
        print(f"  MLflow run {s['mlflow_run_id']} at {s.get('mlflow_uri')}")


def _train(args) -> int:
    from ambient_ray.stages import train

    s = train.run(config(args))
    print(f"train: done in {s['seconds']:.0f}s; final loss {s['metrics'].get('loss', float('nan')):.4f}")
    print(f"  weights (safetensors): {s['out']}/model/   checkpoint: {s['checkpoint']}")
    print(f"  σ coverage: {s['out']}/coverage.png   samples: {s['out']}/samples.png")
    _mlflow_line(s)
    return 0


def _sample(args) -> int:
    from ambient_ray.stages import sample

    cfg = config(args)
    s = sample.run(cfg, progress=not args.no_progress)
    print(f"sample: {cfg.num} images -> {s['samples']}  grid: {s['grid']}")
    return 0


def _phema(args) -> int:
    from ambient_ray.stages import phema

    s = phema.run(config(args))
    print(
        f"phema: σ_rel {s['std']} (γ {s['gamma']:.3f}) at step {s['at']} from {len(s['weights'])} snapshots; "
        f"relative residual of the profile fit {s['residual']:.2e}"
    )
    for w in s["weights"]:
        print(f"  {w['weight']:+.6f}  σ_rel {w['std']:g} at step {w['step']}")
    print(f"  weights: {s['out']}/ema.safetensors  (ambient-ray sample --checkpoint {s['out']})")
    return 0


def _classifier(args) -> int:
    from ambient_ray.stages import train_classifier

    s = train_classifier.run(config(args))
    m = s["metrics"]
    loss, acc = m.get("loss", float("nan")), m.get("accuracy", float("nan"))
    print(f"train-classifier: done in {s['seconds']:.0f}s; final loss {loss:.4f}, accuracy {acc:.3f}")
    print(f"  classifier (safetensors): {s['out']}/model/   probability curves: {s['out']}/curves.png")
    _mlflow_line(s)
    return 0


def _locality(args) -> int:
    from ambient_ray.stages import locality

    s = locality.run(config(args))
    t = s["table"]
    print("locality: crop(σ) = " + ", ".join(f"{c}px@σ≤{x:.3g}" for x, c in zip(t["sigmas"], t["crop"])))
    print(f"  table: {s['out']}/locality.json   plot: {s['out']}/locality.png")
    return 0


def _annotate(args) -> int:
    from ambient_ray.stages import annotate

    cfg = config(args)
    s = annotate.run(cfg, progress=not args.no_progress)
    print(
        f"annotate: {s['rows_in']} rows in, {s['rows_out']} out, {s['rows_quarantined']} quarantined; "
        f"{s['shards_run']} shards run, {s['shards_skipped']} already done; mean σ_min {s['mean_sigma_min']:.3f}"
    )
    for g, v in s["mean_sigma_min_by_group"].items():
        print(f"  mean σ_min {g}: {v:.3f}")
    if s["never_crossed"]:
        print(
            f"  {s['never_crossed']} rows never crossed τ={cfg.tau}: σ_min = top of the grid (classifier:never-crossed)"
        )
    print(f"  data: {s['out']}/data/   report: {s['out']}/annotation.json   plots: sigma_min.png, curves.png")
    return 0


def _precompute(args) -> int:
    from ambient_ray.stages import precompute

    s = precompute.run(config(args), progress=not args.no_progress)
    lat = s["latents"]
    print(
        f"precompute: {s['rows_in']} rows in, {s['rows_out']} out, {s['rows_quarantined']} quarantined; "
        f"{s['shards_run']} shards run, {s['shards_skipped']} already done; {s['images_per_s']:.1f} images/s"
    )
    print(
        f"  latents {'x'.join(map(str, lat['latent_shape']))} (mean, std) at {lat['resolution']}px; "
        f"normalisation {lat['how']}" + (f"; caption embeddings {lat['emb_shape']}" if lat["emb_shape"] else "")
    )
    print(f"  data: {s['out']}/data/   report: {s['out']}/latents.json")
    return 0


def _features(args) -> int:
    from ambient_ray.stages import features

    s = features.run(config(args), progress=not args.no_progress)
    print(f"features: trained on {s['task']}, held-out accuracy {s['accuracy']:.3f}; use --features {s['spec']}")
    return 0


def _evaluate(args) -> int:
    from ambient_ray.stages import evaluate

    s = evaluate.run(config(args), progress=not args.no_progress)
    d = s["details"]
    print(
        f"evaluate: {d['samples']} samples vs {d['reference']} reference images, "
        f"features {d['features']} ({d['dim']}-d)"
    )
    for k, v in s["metrics"].items():
        print(f"  {k:14s} {v:.4f}")
    print(f"  report: {s['out']}/metrics.json")
    _mlflow_line(s)
    return 0


def _experiment(args) -> int:
    from ambient_ray.workflows import experiment

    s = experiment.run(config(args), progress=not args.no_progress)
    print(f"experiment: {s['minutes']:.0f} min; table: {s['out']}/results.md, results.json, results.png")
    _mlflow_line(s)
    return 0


def _tune_extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", help="search config with the space (e.g. tuning/ambient_o.yaml); same as --config")
    p.add_argument(
        "--resume", metavar="URI", help="continue the interrupted search in URI (its --out); finished trials are kept"
    )


def _tune(args) -> int:
    from tuning import search

    if args.resume:
        given = [name for name, v in (("--space", args.space), ("--config", args.config), ("--set", args.sets)) if v]
        given += [fl.name for key, _, fl in cfgmod.declared_flags(search.TuneConfig) if getattr(args, FLAG + key)]
        if given:
            raise cfgmod.ConfigError(f"--resume takes the search's own config (URI/tune.yaml); drop {', '.join(given)}")
        s = search.run(resume=args.resume)
    else:
        if args.space and args.config:
            raise cfgmod.ConfigError("give the search config once: --space or --config")
        s = search.run(search.load(args.space or args.config, args.sets, flag_values(args, search.TuneConfig)))
    print(
        f"tune: {s['trials']} trials ({s['completed']} completed, {s['stopped_early']} stopped early, "
        f"{s['errors']} failed, {s['unfinished']} unfinished) in {s['minutes']:.0f} min; {s['out']}/results.md"
        + (", best.yaml" if s["best"] else "")
    )
    return 1 if s["errors"] or s["unfinished"] else 0


def _pipeline(args) -> int:
    from ambient_ray.workflows import pipeline

    s = pipeline.run(config(args), progress=not args.no_progress)
    print(f"pipeline: done in {s['minutes']:.1f} min; report {s['out']}/pipeline.json")
    for name, st in s["stages"].items():
        print(f"  {name:10s} {st['out']}" + (f"   MLflow run {st['mlflow_run_id']}" if st.get("mlflow_run_id") else ""))
    if s["mlflow_run_id"]:
        print(f"  MLflow: pipeline run {s['mlflow_run_id']} at {s['mlflow_uri']}")
    return 0


def _plan(args) -> int:
    from ambient_ray.train import planner

    print(planner.format_plan(planner.plan(config(args))))
    return 0


def _jobs_extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("list", "logs", "stop", "runs"))
    p.add_argument(
        "job_id", nargs="?", help="the job's submission id (from 'ray job submit' or 'ambient-ray jobs list')"
    )
    p.add_argument("--address", help="the cluster's dashboard URL (default: RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="logs: follow until the job ends; exits 1 unless it succeeded")
    p.add_argument("--tracking-uri", help="runs: the MLflow server (default: MLFLOW_TRACKING_URI)")


def _jobs(args) -> int:
    from ambient_ray.workflows import ops

    if args.action != "list" and not args.job_id:
        raise cfgmod.ConfigError(f"jobs {args.action} needs a job id")
    if args.action == "list":
        return ops.list_jobs(args.address)
    if args.action == "logs":
        return ops.logs(args.address, args.job_id, args.follow)
    if args.action == "stop":
        return ops.stop(args.address, args.job_id)
    return ops.runs(args.job_id, args.tracking_uri)


def _model(module: str, name: str) -> Callable[[], type[BaseModel]]:
    def load() -> type[BaseModel]:
        import importlib

        return getattr(importlib.import_module(module), name)

    return load


STAGES: dict[str, Stage] = {
    "corrupt": Stage(
        "make a mixed-quality dataset: keep a clean subset, corrupt the rest (Ray Data)",
        _corrupt,
        _model("ambient_ray.stages.corrupt", "CorruptConfig"),
        _corrupt_extra,
    ),
    "precompute": Stage(
        "images -> VAE latents, captions -> text embeddings, from local or S3 weights (Ray Data)",
        _precompute,
        _model("ambient_ray.stages.precompute", "PrecomputeConfig"),
    ),
    "train-classifier": Stage(
        "train the noise (σ_min) or crops (σ_max) classifier (Ray Train + DeepSpeed)",
        _classifier,
        _model("ambient_ray.stages.train_classifier", "ClassifierTrainConfig"),
    ),
    "locality": Stage(
        "measure crop(σ), the context a trained denoiser needs at each σ",
        _locality,
        _model("ambient_ray.stages.locality", "LocalityConfig"),
    ),
    "annotate": Stage(
        "σ_min / σ_max for every row from trained classifiers or fixed rules (Ray Data)",
        _annotate,
        _model("ambient_ray.stages.annotate", "AnnotateConfig"),
    ),
    "train": Stage(
        "train an ambient diffusion model (Ray Train + DeepSpeed ZeRO, MLflow)",
        _train,
        _model("ambient_ray.stages.train", "TrainConfig"),
    ),
    "sample": Stage(
        "draw images from a trained model (EDM Heun sampler)",
        _sample,
        _model("ambient_ray.stages.sample", "SampleConfig"),
    ),
    "phema": Stage(
        "post-hoc EMA: any σ_rel from the power-EMA snapshots of a run (EDM2 Sec. 3.2)",
        _phema,
        _model("ambient_ray.stages.phema", "PhemaConfig"),
    ),
    "features": Stage(
        "train the in-project feature network for FD on built-in data (no download)",
        _features,
        _model("ambient_ray.stages.features", "FeaturesConfig"),
    ),
    "evaluate": Stage(
        "FD, precision/recall, Vendi, memorization and proximal FD of samples",
        _evaluate,
        _model("ambient_ray.stages.evaluate", "EvaluateConfig"),
    ),
    "experiment": Stage(
        "the controlled experiment: only-clean, all-data, ambient-fixed, ambient-o, oracle",
        _experiment,
        _model("ambient_ray.workflows.experiment", "ExperimentConfig"),
    ),
    "tune": Stage(
        "Ray Tune search over λ_max, τ, the crop-size threshold and training keys, logged to MLflow",
        _tune,
        _model("tuning.search", "TuneConfig"),
        _tune_extra,
    ),
    "pipeline": Stage(
        "corrupt -> train-classifier -> annotate -> train -> sample -> evaluate from one config; "
        "re-runs skip finished stages",
        _pipeline,
        _model("ambient_ray.workflows.pipeline", "PipelineConfig"),
    ),
    "plan": Stage(
        "per-GPU memory of training a model preset under DeepSpeed ZeRO, and the stage and node count to use",
        _plan,
        _model("ambient_ray.train.planner", "PlanConfig"),
    ),
    "jobs": Stage(
        "follow, stop and trace the Ray jobs of a cluster (list, logs, stop, runs)", _jobs, extra=_jobs_extra
    ),
}


def parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, just that sub-command gets its flags (so running one stage
    imports only its own modules)."""
    p = argparse.ArgumentParser(prog="ambient-ray", description="Train good diffusion models from bad data, with Ray.")
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, stage in STAGES.items():
        sp = sub.add_parser(name, help=stage.help, description=stage.help)
        if only is None or only == name:
            _populate(sp, stage)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    stage = next((a for a in argv if not a.startswith("-")), None)
    return parser(only=stage if stage in STAGES else "").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return STAGES[args.stage].main(args)
    except user_errors() as e:
        print(f"ambient-ray {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, or a stage that stopped part-way (its message says what it kept)
        traceback.print_exc()
        print(f"ambient-ray {args.stage}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
