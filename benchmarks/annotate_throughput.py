"""Annotation throughput: the annotate stage (Ray Data actor pool) vs a plain batched torch loop.

Same classifier (a half U-Net; its weights do not change the cost), same data (built-in digits tiled
and resized), same σ grid and noise draws per row. Timed from the Parquet shards on disk to every
row's probability curve:

(a) **plain**: one process reads the shards with pyarrow, decodes the PNGs, and runs
    ``classifier.noise_curves`` over batches with one random generator, ``torch.set_num_threads(N)``;
(b) **annotate**: ``annotate.run`` with N actors of 1 CPU each on a local Ray cluster with N CPUs
    (phase 1 only: ``seconds_curves``; per-row seeded noise, Parquet curves and markers written).

Printed: images/s of each and the ratio annotate / plain at the same N (the goal: >= 0.9 per CPU), from the
medians of ``--repeats`` interleaved rounds after an untimed one (:mod:`benchmarks.timing`).
With ``--device cuda --no-ray`` (a GPU machine without Ray), (b) is the actor's per-shard function
called directly in this process on the GPU, which measures our per-shard work against the plain loop
there; Ray's own cost is the CPU figure.

    python benchmarks/annotate_throughput.py [--cpus 1,2] [--repeat 4] [--size 8] [--width 16] [--grid 24] [--draws 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import timing  # benchmarks/timing.py, beside this script
import torch


def make_data(root: str, repeat: int, size: int, limit: int | None = None, name: str = "data") -> str:
    from ambient_ray.data.sources import SourceConfig
    from ambient_ray.stages.corrupt import CorruptConfig
    from ambient_ray.stages.corrupt import run as corrupt_run

    out = os.path.join(root, name)
    src = SourceConfig(dataset="digits", repeat=repeat, image_size=size, limit=limit)
    corrupt_run(
        CorruptConfig(
            out=out, source=src, corruptions=["blur:sigma=1"], clean_fraction=0.1, shard_size=1024, preview=0
        ),
        progress=False,
    )
    return out


def make_classifier(root: str, size: int, channels: int, width: int) -> str:
    from safetensors.torch import save_file

    from ambient_ray.models.classifier import ClassifierConfig, build_classifier

    d = os.path.join(root, "clf", "model")
    os.makedirs(d, exist_ok=True)
    cfg = ClassifierConfig(img_resolution=size, in_channels=channels, model_channels=width, channel_mult=[1, 2])
    torch.manual_seed(0)
    net = build_classifier(cfg, "noise")
    with open(os.path.join(d, "model.json"), "w") as f:
        json.dump(
            {
                "kind": "noise",
                "model": cfg.model_dump(mode="json"),
                "img_resolution": size,
                "in_channels": channels,
                "sigma_range": [0.01, 20.0],
            },
            f,
        )
    save_file({n: p.detach().contiguous() for n, p in net.named_parameters()}, os.path.join(d, "ema.safetensors"))
    return os.path.dirname(d)


def plain(
    data: str, clf: str, grid: torch.Tensor, draws: int, batch: int, threads: int, device: str
) -> tuple[int, float]:
    """(rows, seconds) of the plain loop."""
    import pyarrow.parquet as pq

    from ambient_ray.data.images import decode_png
    from ambient_ray.models.classifier import noise_curves
    from ambient_ray.models.weights import load

    torch.set_num_threads(threads)
    net = load(clf, "noise").to(device)
    g = torch.Generator().manual_seed(0)
    files = sorted(
        os.path.join(data, "data", f) for f in os.listdir(os.path.join(data, "data")) if f.endswith(".parquet")
    )
    t0 = time.perf_counter()
    n = 0
    for f in files:
        imgs = pq.read_table(f, columns=["image"]).column("image").to_pylist()
        for s in range(0, len(imgs), batch):
            y = torch.from_numpy(np.stack([decode_png(b).transpose(2, 0, 1) for b in imgs[s : s + batch]]))
            noise_curves(net, (y.float() / 127.5 - 1).to(device), grid, draws, g, 32768 if device == "cuda" else 4096)
            n += len(y)
    if device == "cuda":
        torch.cuda.synchronize()
    return n, time.perf_counter() - t0


def stage(data: str, clf: str, out: str, cpus: int, grid_points: int, draws: int, batch: int) -> tuple[int, float]:
    from ambient_ray.stages import annotate

    cfg = annotate.AnnotateConfig(
        data=data,
        out=out,
        classifier=clf,
        grid_points=grid_points,
        draws=draws,
        batch_size=batch,
        concurrency=cpus,
        num_cpus=1,
        mlflow=dict(enabled=False),
    )
    s = annotate.run(cfg, progress=False)
    return s["rows_run"], s["seconds_curves"]


def actor_direct(
    data: str, clf: str, out: str, grid_points: int, draws: int, batch: int, device: str
) -> tuple[int, float]:
    """The actor's per-shard work without Ray (for a GPU machine that has no Ray)."""
    from ambient_ray.data.metadata import data_dir, load_metadata
    from ambient_ray.io import storage
    from ambient_ray.stages import annotate

    cfg = annotate.AnnotateConfig(
        data=data,
        out=out,
        classifier=clf,
        grid_points=grid_points,
        draws=draws,
        batch_size=batch,
        num_gpus=1.0 if device == "cuda" else 0.0,
        mlflow=dict(enabled=False),
    )
    files = storage.list_files(data_dir(data), (".parquet",))
    plan = annotate.make_plan(cfg, storage.normalize(out), files, load_metadata(data))
    actor = annotate.CurveActor(plan)
    t0 = time.perf_counter()
    rows = sum(actor.shard(f, annotate._shard_name(f))["rows"] for f in files)
    if device == "cuda":
        torch.cuda.synchronize()
    return rows, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", default="1,2", help="CPU counts to compare at (comma-separated)")
    ap.add_argument("--repeat", type=int, default=4, help="tile the 1,797 digits this many times")
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--width", type=int, default=16, help="the half U-Net's model_channels")
    ap.add_argument("--grid", type=int, default=24)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of both sides, after an untimed one")
    ap.add_argument("--no-ray", action="store_true", help="(b) = the actor's shard function called directly")
    ap.add_argument("--data", help="an existing corrupt output to use (e.g. made here for a machine without Ray)")
    ap.add_argument("--warm", help="with --data: a small corrupt output for the untimed warm-up (default: --data)")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="annotate-bench-")
    try:
        if args.no_ray:
            os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        data = args.data or make_data(root, args.repeat, args.size)
        # the untimed warm-up: Ray Data's first run, the allocator, caches
        warm = (args.warm or data) if args.data else make_data(root, 1, args.size, limit=256, name="warm")
        clf = make_classifier(root, args.size, 1, args.width)
        grid = torch.from_numpy(np.geomspace(0.01, 20.0, args.grid))
        evals = args.grid * args.draws
        if not args.no_ray:
            import ray

            ray.shutdown()  # the corrupt stage's in-process Ray; each comparison starts its own
        import pyarrow.parquet as pq

        n_img = sum(
            pq.read_metadata(os.path.join(data, "data", f)).num_rows for f in os.listdir(os.path.join(data, "data"))
        )
        print(
            f"{n_img} images {args.size}x{args.size}, half U-Net width {args.width}, "
            f"{args.grid} σ x {args.draws} draws = {evals} classifier "
            f"evaluations per image, batch {args.batch} rows, device {args.device}"
        )
        plain(warm, clf, grid, args.draws, args.batch, 1, args.device)  # warm-up (allocator, caches)
        if args.device == "cuda" or args.no_ray:
            n0, t0 = plain(data, clf, grid, args.draws, args.batch, 1, args.device)
            n1, t1 = actor_direct(
                data, clf, os.path.join(root, "direct"), args.grid, args.draws, args.batch, args.device
            )
            print(
                f"plain loop: {n0 / t0:8.1f} images/s | actor shard function (no Ray): {n1 / t1:8.1f} images/s | "
                f"ratio {(n1 / t1) / (n0 / t0):.3f}"
            )
            return
        import ray

        from ambient_ray.io import ray_runtime

        for cpus in [int(c) for c in args.cpus.split(",")]:
            ray_runtime.ray_init(None, num_cpus=cpus, include_dashboard=False, log_to_driver=False)

            def plain_side(r: int, cpus=cpus) -> float:  # seconds per image
                n, t = plain(data, clf, grid, args.draws, args.batch, cpus, "cpu")
                return t / n

            def stage_side(r: int, cpus=cpus) -> float:  # a fresh folder each round (a used one resumes)
                out = os.path.join(root, f"run{cpus}-{r + 1}")
                n, t = stage(data, clf, out, cpus, args.grid, args.draws, args.batch)
                return t / n

            st = timing.interleave({"plain": plain_side, "annotate": stage_side}, args.repeats)
            ray.shutdown()
            print(
                f"CPUs {cpus}: plain loop ({cpus} threads) {1 / st['plain'].median:8.1f} images/s | annotate "
                f"({cpus} actors x 1 CPU) {1 / st['annotate'].median:8.1f} images/s | ratio of medians "
                f"{timing.ratio(st['plain'], st['annotate']):.3f} (spread: plain {st['plain'].spread:.1%}, "
                f"annotate {st['annotate'].spread:.1%}; {args.repeats} interleaved rounds after a warm-up)"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
