"""Corrupt-stage throughput: Ray Data vs a plain single-process loop over the same work.

For each image size, the same plan (built-in digits tiled to >= 20,000 images and resized) is run
(a) by the corrupt stage on a local Ray cluster with N CPUs and (b) by a plain Python loop that calls
the very same per-shard function (load, decode, corrupt, PNG-encode, write Parquet) one shard after
another in this process. Both write to a local temporary folder. Printed: images/s of each and the
ratio to ideal scaling, ray / (single x N), from the medians of ``--repeats`` interleaved rounds
(:mod:`benchmarks.timing`; Ray start-up and a warm-up round are not timed).

    python benchmarks/corrupt_throughput.py [--cpus 2] [--images 20000] [--sizes 32,64] [--corruption blur:sigma=1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time

import ray
import timing  # benchmarks/timing.py, beside this script

from ambient_ray import corruptions
from ambient_ray.data.sources import SourceConfig, list_items, make_source
from ambient_ray.io import ray_runtime
from ambient_ray.stages import corrupt as stage


def plain_loop(cfg: stage.CorruptConfig) -> float:
    """Seconds for the same shards, processed one after another in this process."""
    source = make_source(cfg.source)
    items = list_items(source, cfg.source)
    ids = [i for i, _ in items]
    specs = [corruptions.parse(s) for s in cfg.corruptions]
    roles, seeds = stage.plan_rows(ids, len(specs), cfg.clean_fraction, cfg.seed)
    t0 = time.perf_counter()
    for k in range(math.ceil(len(items) / cfg.shard_size)):
        s = slice(k * cfg.shard_size, (k + 1) * cfg.shard_size)
        payload = {"ids": ids[s], "locs": [loc for _, loc in items[s]], "roles": roles[s], "seeds": seeds[s]}
        stage.process_shard(
            {"shard": [k], "payload": [json.dumps(payload)]},
            source=source,
            source_cfg=cfg.source,
            specs=specs,
            out=cfg.out,
        )
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--sizes", default="32,64")
    ap.add_argument("--corruption", default="blur:sigma=1")
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of both sides, after an untimed one")
    args = ap.parse_args()

    ray_runtime.ray_init(None, num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    tmp = tempfile.mkdtemp(prefix="ambient-bench-")
    repeat = math.ceil(args.images / 1797)
    rows = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            src = SourceConfig(dataset="digits", image_size=size, repeat=repeat, limit=args.images)
            common = dict(source=src, corruptions=[args.corruption], shard_size=args.shard_size, preview=0)
            n = args.images

            def single(r: int, size=size, common=common) -> float:  # seconds per image
                return plain_loop(stage.CorruptConfig(out=f"{tmp}/plain{size}-{r + 1}", **common)) / n

            def on_ray(r: int, size=size, common=common) -> float:
                res = stage.run(stage.CorruptConfig(out=f"{tmp}/ray{size}-{r + 1}", **common), progress=False)
                return res.seconds / res.rows_run

            stats = timing.interleave({"single": single, "ray": on_ray}, args.repeats)
            rows.append((size, n, stats["single"], stats["ray"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    print(
        f"corrupt stage throughput, {args.corruption}, {args.cpus} CPUs, shards of {args.shard_size}; "
        f"medians of {args.repeats} interleaved rounds after a warm-up round"
    )
    print(f"{'size':>6} {'images':>7} {'single img/s':>13} {'ray img/s':>10} {'ray/(single*cpus)':>18}  spread")
    for size, n, single, on_ray in rows:
        ratio = timing.ratio(single, on_ray) / args.cpus  # images/s ratio = inverse of the seconds ratio
        print(
            f"{size:>4}px {n:>7} {1 / single.median:>13.0f} {1 / on_ray.median:>10.0f} {ratio:>18.2f}  "
            f"single {single.spread:.1%}, ray {on_ray.spread:.1%}"
        )


if __name__ == "__main__":
    main()
