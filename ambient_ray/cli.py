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
from ambient_ray.storage import StorageError

USER_ERRORS = (cfgmod.ConfigError, CorruptionError, StorageError, FileNotFoundError, ValueError)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (local path or s3:// URI)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _corrupt_parser(sub) -> None:
    p = sub.add_parser("corrupt", help="make a mixed-quality dataset: keep a clean subset, corrupt the rest (Ray Data)")
    _common(p)
    p.add_argument("--dataset", help="built-in (digits, faces, photos) or URI of an image folder, tar shards or Parquet")
    p.add_argument("--corruption", action="append", help="corruption spec, e.g. blur:sigma=0.6 (repeat to split the corrupted part)")
    p.add_argument("--clean-fraction", type=float, help="fraction of rows kept clean (default 0.1)")
    p.add_argument("--seed", type=int, help="seed for the clean subset and the corruptions (default 0)")
    p.add_argument("--out", help="output URI (local folder or s3://bucket/prefix)")
    p.add_argument("--image-size", type=int, help="resize images to this square size")
    p.add_argument("--channels", type=int, choices=(1, 3), help="convert images to 1 or 3 channels")
    p.add_argument("--shard-size", type=int, help="rows per output shard (default 1024)")
    p.add_argument("--plugin", action="append", help="module registering extra corruptions (repeatable)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing run with a different plan")
    p.add_argument("--list-corruptions", action="store_true", help="list the known corruptions and exit")


def _run_corrupt(args) -> int:
    from ambient_ray import corrupt, corruptions

    if args.list_corruptions:
        if args.plugin:
            corrupt.load_plugins(args.plugin)
        for name, ct in sorted(corruptions.registered().items()):
            params = ", ".join(f"{k}: {p.describe()}" + ("" if p.default is None else f" = {p.default}") for k, p in ct.params.items())
            print(f"{name:14s} {params}")
        return 0
    flags = {
        "source.dataset": args.dataset, "corruptions": args.corruption, "clean_fraction": args.clean_fraction,
        "seed": args.seed, "out": args.out, "source.image_size": args.image_size, "source.channels": args.channels,
        "shard_size": args.shard_size, "plugins": args.plugin, "overwrite": args.overwrite,
    }  # fmt: skip
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
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out from its latest checkpoint")


def _run_train(args) -> int:
    from ambient_ray import train

    flags = {"data": args.data, "out": args.out, "steps": args.steps, "num_workers": args.num_workers,
             "zero_stage": args.zero_stage, "resume": args.resume}  # fmt: skip
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
    from ambient_ray import sample

    flags = {"checkpoint": args.checkpoint, "num": args.num, "out": args.out, "steps": args.steps,
             "stochastic": args.stochastic, "seed": args.seed}  # fmt: skip
    cfg = cfgmod.build(sample.SampleConfig, args.config, args.sets, flags)
    s = sample.run(cfg, progress=not args.no_progress)
    print(f"sample: {cfg.num} images -> {s['samples']}  grid: {s['grid']}")
    return 0


STAGES = {
    "corrupt": (_corrupt_parser, _run_corrupt),
    "train": (_train_parser, _run_train),
    "sample": (_sample_parser, _run_sample),
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
