"""The ``ambient-ray`` command line: one sub-command per pipeline stage.

Every stage takes ``--config FILE`` (local path or S3 URI, YAML) and ``--set key=value`` overrides
(dotted keys; values parsed as YAML), plus flags for its most used keys. Precedence: ``--set`` >
flags > config file > defaults. ``python -m jobs.<stage>`` runs the same code (for ``ray job submit``).
"""

from __future__ import annotations

import argparse
import sys

from ambient_ray import config as cfgmod
from ambient_ray.corruptions import CorruptionError
from ambient_ray.io.storage import StorageError

USER_ERRORS = (cfgmod.ConfigError, CorruptionError, StorageError, FileNotFoundError, ValueError)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (local path or s3:// URI)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _corrupt_parser(sub) -> None:
    p = sub.add_parser("corrupt", help="make a mixed-quality dataset: keep a clean subset, corrupt the rest (Ray Data)")
    _common(p)
    p.add_argument(
        "--dataset", help="built-in (digits, faces, photos) or URI of an image folder, tar shards or Parquet"
    )
    p.add_argument(
        "--corruption",
        action="append",
        help="corruption spec, e.g. blur:sigma=0.6 (repeat to split the corrupted part)",
    )
    p.add_argument("--clean-fraction", type=float, help="fraction of rows kept clean (default 0.1)")
    p.add_argument("--seed", type=int, help="seed for the clean subset and the corruptions (default 0)")
    p.add_argument("--out", help="output URI (local folder or s3://bucket/prefix)")
    p.add_argument("--image-size", type=int, help="resize images to this square size")
    p.add_argument("--channels", type=int, choices=(1, 3), help="convert images to 1 or 3 channels")
    p.add_argument("--shard-size", type=int, help="rows per output shard (default 1024)")
    p.add_argument("--plugin", action="append", help="module registering extra corruptions (repeatable)")
    p.add_argument(
        "--overwrite", action="store_true", default=None, help="replace an existing run with a different plan"
    )
    p.add_argument("--list-corruptions", action="store_true", help="list the known corruptions and exit")


def _run_corrupt(args) -> int:
    from ambient_ray import corruptions
    from ambient_ray.stages import corrupt

    if args.list_corruptions:
        if args.plugin:
            corrupt.load_plugins(args.plugin)
        for name, ct in sorted(corruptions.registered().items()):
            params = ", ".join(
                f"{k}: {p.describe()}" + ("" if p.default is None else f" = {p.default}") for k, p in ct.params.items()
            )
            print(f"{name:14s} {params}")
        return 0
    flags = {
        "source.dataset": args.dataset,
        "corruptions": args.corruption,
        "clean_fraction": args.clean_fraction,
        "seed": args.seed,
        "out": args.out,
        "source.image_size": args.image_size,
        "source.channels": args.channels,
        "shard_size": args.shard_size,
        "plugins": args.plugin,
        "overwrite": args.overwrite,
    }
    cfg = cfgmod.build(corrupt.CorruptConfig, args.config, args.sets, flags)
    result = corrupt.run(cfg, progress=not args.no_progress)
    print(result.summary())
    if result.rows_quarantined:
        print(f"  quarantined rows (with reasons): {result.out}/quarantine/")
    print(f"  data: {result.out}/data/   preview: {result.out}/preview.png   config: {result.out}/config.yaml")
    return 0


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train an ambient diffusion model (Ray Train + DeepSpeed ZeRO, MLflow)")
    _common(p)
    p.add_argument("--data", help="dataset URI: a corrupt/annotate output folder or Parquet shards")
    p.add_argument("--out", help="output URI for checkpoints, weights and plots")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--num-workers", type=int, help="Ray Train workers")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage")
    p.add_argument(
        "--resume", action="store_true", default=None, help="continue the run in --out from its latest checkpoint"
    )


def _run_train(args) -> int:
    from ambient_ray.stages import train

    flags = {
        "data": args.data,
        "out": args.out,
        "steps": args.steps,
        "num_workers": args.num_workers,
        "zero_stage": args.zero_stage,
        "resume": args.resume,
    }
    cfg = cfgmod.build(train.TrainConfig, args.config, args.sets, flags)
    s = train.run(cfg)
    print(f"train: done in {s['seconds']:.0f}s; final loss {s['metrics'].get('loss', float('nan')):.4f}")
    print(f"  weights (safetensors): {s['out']}/model/   checkpoint: {s['checkpoint']}")
    print(f"  σ coverage: {s['out']}/coverage.png   samples: {s['out']}/samples.png")
    if s["mlflow_run_id"]:
        print(f"  MLflow run {s['mlflow_run_id']} at {s['mlflow_uri']}")
    return 0


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw images from a trained model (EDM Heun sampler)")
    _common(p)
    p.add_argument("--checkpoint", help="training output folder (or its model/ folder)")
    p.add_argument("--num", type=int, help="number of images")
    p.add_argument("--out", help="output URI")
    p.add_argument("--steps", type=int, help="sampler steps (default 18)")
    p.add_argument("--stochastic", action="store_true", default=None, help="stochastic EDM sampler")
    p.add_argument("--seed", type=int)


def _run_sample(args) -> int:
    from ambient_ray.stages import sample

    flags = {
        "checkpoint": args.checkpoint,
        "num": args.num,
        "out": args.out,
        "steps": args.steps,
        "stochastic": args.stochastic,
        "seed": args.seed,
    }
    cfg = cfgmod.build(sample.SampleConfig, args.config, args.sets, flags)
    s = sample.run(cfg, progress=not args.no_progress)
    print(f"sample: {cfg.num} images -> {s['samples']}  grid: {s['grid']}")
    return 0


def _classifier_parser(sub) -> None:
    p = sub.add_parser(
        "train-classifier", help="train the noise (σ_min) or crops (σ_max) classifier (Ray Train + DeepSpeed)"
    )
    _common(p)
    p.add_argument("--data", help="dataset URI (a corrupt output folder or Parquet shards)")
    p.add_argument(
        "--kind", choices=("noise", "crops"), help="noise: clean vs corrupted under noise; crops: target vs other crops"
    )
    p.add_argument("--out", help="output URI")
    p.add_argument("--good", help="rows labelled good, FIELD=V1[,V2] (default quality=clean)")
    p.add_argument("--bad", help="rows labelled bad (default: the rest)")
    p.add_argument("--steps", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--resume", action="store_true", default=None)


def _run_classifier(args) -> int:
    from ambient_ray.stages import train_classifier

    flags = {
        "data": args.data,
        "kind": args.kind,
        "out": args.out,
        "good": args.good,
        "bad": args.bad,
        "steps": args.steps,
        "num_workers": args.num_workers,
        "resume": args.resume,
    }
    cfg = cfgmod.build(train_classifier.ClassifierTrainConfig, args.config, args.sets, flags)
    s = train_classifier.run(cfg)
    m = s["metrics"]
    print(
        f"train-classifier: done in {s['seconds']:.0f}s; final loss {m.get('loss', float('nan')):.4f}, accuracy {m.get('accuracy', float('nan')):.3f}"
    )
    print(f"  classifier (safetensors): {s['out']}/model/   probability curves: {s['out']}/curves.png")
    if s["mlflow_run_id"]:
        print(f"  MLflow run {s['mlflow_run_id']} at {s['mlflow_uri']}")
    return 0


def _locality_parser(sub) -> None:
    p = sub.add_parser("locality", help="measure crop(σ), the context a trained denoiser needs at each σ")
    _common(p)
    p.add_argument("--checkpoint", help="a train output folder (the denoiser)")
    p.add_argument("--data", help="dataset URI (its clean rows are used)")
    p.add_argument("--out", help="output URI")
    p.add_argument("--eps", type=float, help="relative tolerance to the full-context loss (default 0.05)")


def _run_locality(args) -> int:
    from ambient_ray.stages import locality

    flags = {"checkpoint": args.checkpoint, "data": args.data, "out": args.out, "eps": args.eps}
    cfg = cfgmod.build(locality.LocalityConfig, args.config, args.sets, flags)
    s = locality.run(cfg)
    t = s["table"]
    print("locality: crop(σ) = " + ", ".join(f"{c}px@σ≤{x:.3g}" for x, c in zip(t["sigmas"], t["crop"])))
    print(f"  table: {s['out']}/locality.json   plot: {s['out']}/locality.png")
    return 0


def _annotate_parser(sub) -> None:
    p = sub.add_parser(
        "annotate", help="σ_min / σ_max for every row from trained classifiers or fixed rules (Ray Data)"
    )
    _common(p)
    p.add_argument("--data", help="dataset URI (a corrupt output folder or Parquet shards)")
    p.add_argument("--classifier", help="noise classifier (train-classifier --kind noise output)")
    p.add_argument(
        "--crops-classifier", help="crops classifier (train-classifier --kind crops output); needs --locality"
    )
    p.add_argument("--locality", help="locality.json from 'ambient-ray locality'")
    p.add_argument("--out", help="output URI")
    p.add_argument("--tau", type=float, help="threshold τ = 0.5 − ε (default 0.45)")
    p.add_argument("--mode", choices=("per-sample", "per-dataset"))
    p.add_argument(
        "--fixed", action="append", metavar="SOURCE=SIGMA", help="σ_min for every row of a source (repeatable)"
    )
    p.add_argument("--scorer", help="quality scorer: sharpness, a TorchScript file or timm:ARCH@WEIGHTS")
    p.add_argument("--top-percent", type=float, help="with --scorer: the top k %% are clean (S_G)")
    p.add_argument("--overwrite", action="store_true", default=None, help="recompute curves of another run in --out")


def _run_annotate(args) -> int:
    from ambient_ray.stages import annotate

    flags = {
        "data": args.data,
        "classifier": args.classifier,
        "crops_classifier": args.crops_classifier,
        "locality": args.locality,
        "out": args.out,
        "tau": args.tau,
        "mode": args.mode,
        "fixed": annotate.parse_fixed(args.fixed),
        "scorer": args.scorer,
        "top_percent": args.top_percent,
        "overwrite": args.overwrite,
    }
    cfg = cfgmod.build(annotate.AnnotateConfig, args.config, args.sets, flags)
    s = annotate.run(cfg, progress=not args.no_progress)
    print(
        f"annotate: {s['rows_in']} rows in, {s['rows_out']} out, {s['rows_quarantined']} quarantined; "
        f"{s['shards_run']} shards run, {s['shards_skipped']} already done; mean σ_min {s['mean_sigma_min']:.3f}"
    )
    for g, v in s["mean_sigma_min_by_group"].items():
        print(f"  mean σ_min {g}: {v:.3f}")
    if s["never_crossed"]:
        print(
            f"  {s['never_crossed']} rows never crossed τ={cfg.tau}: σ_min = top of the grid (annotation 'classifier:never-crossed')"
        )
    print(
        f"  data: {s['out']}/data/   report: {s['out']}/annotation.json   plots: {s['out']}/sigma_min.png, curves.png"
    )
    return 0


def _features_parser(sub) -> None:
    p = sub.add_parser("features", help="train the in-project feature network for FD on built-in data (no download)")
    _common(p)
    p.add_argument("--dataset", help="built-in name (digits, faces, photos) or a stage output URI")
    p.add_argument("--where", help="row filter on a stage output, e.g. quality=clean")
    p.add_argument("--out", help="output URI (use it as --features net@OUT)")
    p.add_argument("--steps", type=int)


def _run_features(args) -> int:
    from ambient_ray.stages import features

    flags = {"dataset": args.dataset, "where": args.where, "out": args.out, "steps": args.steps}
    cfg = cfgmod.build(features.FeaturesConfig, args.config, args.sets, flags)
    s = features.run(cfg, progress=not args.no_progress)
    print(f"features: trained on {s['task']}, held-out accuracy {s['accuracy']:.3f}; use --features {s['spec']}")
    return 0


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="FD, precision/recall, Vendi, memorization and proximal FD of samples")
    _common(p)
    p.add_argument("--samples", help="generated images: a sample output folder, .npy, or stage output")
    p.add_argument("--reference", help="reference images: built-in name, .npy, or stage output")
    p.add_argument("--reference-where", help="row filter on the reference, e.g. quality=clean")
    p.add_argument("--holdout", help="held-out reference (adds fd_holdout)")
    p.add_argument("--features", help="pixels, inception@WEIGHTS, dinov2[:ARCH]@WEIGHTS or net@FOLDER (default pixels)")
    p.add_argument("--train", help="training data (adds the memorization share)")
    p.add_argument("--proximal", help="corruption spec of the training data (adds proximal FD)")
    p.add_argument("--proximal-reference", help="corrupted training rows (default: --train)")
    p.add_argument("--out", help="output URI (metrics.json)")


def _run_evaluate(args) -> int:
    from ambient_ray.stages import evaluate

    flags = {
        "samples": args.samples,
        "reference": args.reference,
        "reference_where": args.reference_where,
        "holdout": args.holdout,
        "features": args.features,
        "train": args.train,
        "proximal": args.proximal,
        "proximal_reference": args.proximal_reference,
        "out": args.out,
    }
    cfg = cfgmod.build(evaluate.EvaluateConfig, args.config, args.sets, flags)
    s = evaluate.run(cfg, progress=not args.no_progress)
    d = s["details"]
    print(
        f"evaluate: {d['samples']} samples vs {d['reference']} reference images, features {d['features']} ({d['dim']}-d)"
    )
    for k, v in s["metrics"].items():
        print(f"  {k:14s} {v:.4f}")
    print(f"  report: {s['out']}/metrics.json" + (f"   MLflow run {s['mlflow_run_id']}" if s["mlflow_run_id"] else ""))
    return 0


def _experiment_parser(sub) -> None:
    p = sub.add_parser(
        "experiment", help="the controlled experiment: only-clean, all-data, ambient-fixed, ambient-o, oracle"
    )
    _common(p)
    p.add_argument("--dataset", help="built-in name or URI of clean images (default digits)")
    p.add_argument("--corruption", action="append", help="corruption spec (repeatable)")
    p.add_argument("--clean-fraction", type=float)
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--arms", help="comma-separated arms (default: all five)")
    p.add_argument("--out", help="output URI")


def _run_experiment(args) -> int:
    from ambient_ray.workflows import experiment

    def csv(v, cast=str):
        return None if v is None else [cast(x.strip()) for x in v.split(",") if x.strip()]

    flags = {
        "dataset": args.dataset,
        "corruption": args.corruption,
        "clean_fraction": args.clean_fraction,
        "seeds": csv(args.seeds, int),
        "arms": csv(args.arms),
        "out": args.out,
    }
    cfg = cfgmod.build(experiment.ExperimentConfig, args.config, args.sets, flags)
    s = experiment.run(cfg, progress=not args.no_progress)
    print(
        f"experiment: {s['minutes']:.0f} min; table: {s['out']}/results.md, results.json, results.png"
        + (f"; MLflow parent run {s['mlflow_run_id']}" if s["mlflow_run_id"] else "")
    )
    return 0


def _tune_parser(sub) -> None:
    p = sub.add_parser(
        "tune", help="Ray Tune search over λ_max, τ, the crop-size threshold and training keys, logged to MLflow"
    )
    _common(p)
    p.add_argument("--space", help="search config with the space (e.g. tuning/ambient_o.yaml); same as --config")
    p.add_argument("--data", help="the mixed dataset (a corrupt output)")
    p.add_argument("--out", help="output URI of the search")
    p.add_argument("--num-samples", type=int, help="trials (with grid keys: repeats of the grid)")
    p.add_argument("--scheduler", choices=("none", "asha"), help="early stopping (default asha)")
    p.add_argument(
        "--searcher", choices=("random", "grid", "optuna", "hyperopt"), help="how trials are drawn (default random)"
    )
    p.add_argument("--classifier", help="a trained noise classifier to share (default: train one)")
    p.add_argument(
        "--resume", metavar="URI", help="continue the interrupted search in URI (its --out); finished trials are kept"
    )


def _run_tune(args) -> int:
    from tuning import search

    if args.resume:
        if args.space or args.config or args.sets or args.data or args.out:
            raise cfgmod.ConfigError(
                "--resume takes the search's own config (URI/tune.yaml); give no --space, --config, --set, --data or --out"
            )
        s = search.run(resume=args.resume)
    else:
        if args.space and args.config:
            raise cfgmod.ConfigError("give the search config once: --space or --config")
        flags = {
            "data": args.data,
            "out": args.out,
            "num_samples": args.num_samples,
            "scheduler": args.scheduler,
            "searcher": args.searcher,
            "classifier": args.classifier,
        }
        s = search.run(search.load(args.space or args.config, args.sets, flags))
    print(
        f"tune: {s['trials']} trials ({s['completed']} completed, {s['stopped_early']} stopped early, {s['errors']} failed, {s['unfinished']} unfinished) "
        f"in {s['minutes']:.0f} min; {s['out']}/results.md" + (", best.yaml" if s["best"] else "")
    )
    return 1 if s["errors"] or s["unfinished"] else 0


def _pipeline_parser(sub) -> None:
    p = sub.add_parser(
        "pipeline",
        help="corrupt -> train-classifier -> annotate -> train -> sample -> evaluate from one config; re-runs skip finished stages",
    )
    _common(p)
    p.add_argument("--out", help="output URI; one folder per stage under it")


def _run_pipeline(args) -> int:
    from ambient_ray.workflows import pipeline

    cfg = cfgmod.build(pipeline.PipelineConfig, args.config, args.sets, {"out": args.out})
    s = pipeline.run(cfg, progress=not args.no_progress)
    print(f"pipeline: done in {s['minutes']:.1f} min; report {s['out']}/pipeline.json")
    for name, st in s["stages"].items():
        print(f"  {name:10s} {st['out']}" + (f"   MLflow run {st['mlflow_run_id']}" if st.get("mlflow_run_id") else ""))
    if s["mlflow_run_id"]:
        print(f"  MLflow: pipeline run {s['mlflow_run_id']} at {s['mlflow_uri']}")
    return 0


def _jobs_parser(sub) -> None:
    p = sub.add_parser("jobs", help="follow, stop and trace the Ray jobs of a cluster (list, logs, stop, runs)")
    p.add_argument("action", choices=("list", "logs", "stop", "runs"))
    p.add_argument(
        "job_id", nargs="?", help="the job's submission id (from 'ray job submit' or 'ambient-ray jobs list')"
    )
    p.add_argument("--address", help="the cluster's dashboard URL (default: RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="logs: follow until the job ends; exits 1 unless it succeeded")
    p.add_argument("--tracking-uri", help="runs: the MLflow server (default: MLFLOW_TRACKING_URI)")


def _run_jobs(args) -> int:
    from ambient_ray.workflows import ops

    if args.action != "list" and not args.job_id:
        raise ValueError(f"jobs {args.action} needs a job id")
    if args.action == "list":
        return ops.list_jobs(args.address)
    if args.action == "logs":
        return ops.logs(args.address, args.job_id, args.follow)
    if args.action == "stop":
        return ops.stop(args.address, args.job_id)
    return ops.runs(args.job_id, args.tracking_uri)


STAGES = {
    "corrupt": (_corrupt_parser, _run_corrupt),
    "train-classifier": (_classifier_parser, _run_classifier),
    "locality": (_locality_parser, _run_locality),
    "annotate": (_annotate_parser, _run_annotate),
    "train": (_train_parser, _run_train),
    "sample": (_sample_parser, _run_sample),
    "features": (_features_parser, _run_features),
    "evaluate": (_evaluate_parser, _run_evaluate),
    "experiment": (_experiment_parser, _run_experiment),
    "tune": (_tune_parser, _run_tune),
    "pipeline": (_pipeline_parser, _run_pipeline),
    "jobs": (_jobs_parser, _run_jobs),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambient-ray", description="Train good diffusion models from bad data, with Ray.")
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for make, _ in STAGES.values():
        make(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return STAGES[args.stage][1](args)
    except USER_ERRORS as e:
        print(f"ambient-ray {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a stage that failed part-way reports what it kept
        print(f"ambient-ray {args.stage}: failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
