"""Training worker memory against dataset size, streamed and in memory, measured in one run.

A synthetic dataset of precomputed latents (``latent``: float32 (2·4, 32, 32), mean then std, 32 KB a row,
``latents.json`` with ``vae: pixels`` so nothing is decoded; σ_min on the grid {0, 0.2, 0.5}, three
strata) is written with pyarrow at 10·N rows, in shards of ``--shard-rows``; the N-row dataset is its first
N/shard-rows shards (hard links). The train stage then runs on both sizes, once per data path
(``stream.mode`` ``stream`` and ``memory``): the tiny U-Net preset at ``--channels`` 8 (the smallest,
so that the streamed runs read enough rows in little time), one worker of 1 CPU on a 2-CPU Ray cluster,
batch ``--batch``, ``stream.pool_rows`` at its default, MLflow off, no sample grid.

The figure is the peak RSS of the Ray Train worker process (the process under this one whose title
names ``RayTrainWorker``), polled from outside every ``--poll`` seconds, with no code added to the
training loop; beside it the peak private RSS (RSS less shared pages: those are mostly Ray's object
store, whose pages a worker maps when it reads a block, and the libraries). A streamed worker's pools
fill only as fast as its batches consume rows, so the streamed runs take as many steps as the pools of
the larger dataset need to be full (computed here as ``DenoiserTask.setup_stream`` sizes them); at fewer
steps they would hold only the rows drawn so far. The in-memory runs take ``--steps`` (their memory is
all taken when the worker loads its share). Goal: streamed peak at 10·N ÷ peak at N ≤ 1.2; the
in-memory ratio is printed as the contrast (that worker holds its whole share).

    python benchmarks/train_memory.py [--rows 5000] [--factor 10] [--batch 64] [--steps 10] [--stream-steps S]
        [--paths stream,memory] [--memory-max-rows M] [--profile] [--poll 0.2] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import threading
import time

import numpy as np

CHANNELS, SIDE = 4, 32
SIGMA_GRID = (0.0, 0.2, 0.5)
ROW_BYTES = 2 * CHANNELS * SIDE * SIDE * 4  # float32 mean and std


def make_latents(root: str, rows: int, shard_rows: int = 2000, seed: int = 0) -> str:
    """A precompute-like output under ``root``: ``data/part-NNNNN.parquet`` (random latents, every column the
    train stage reads) and ``latents.json`` (``vae: pixels``); returns ``root``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ambient_ray.data import schema
    from ambient_ray.data.images import encode_png

    spec = schema.latent_spec(CHANNELS, SIDE, SIDE)
    fields = [*schema.DATA_SCHEMA, pa.field("sigma_min", pa.float32()), pa.field("sigma_max", pa.float32())]
    sch = pa.schema([*fields, schema.tensor_field(spec)])
    png = encode_png(np.zeros((1, 1, 1), np.uint8))
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    for s, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        mean = rng.random((n, CHANNELS, SIDE, SIDE), dtype=np.float32) * 2 - 1
        std = rng.random((n, CHANNELS, SIDE, SIDE), dtype=np.float32) * 0.1
        smin = rng.choice(np.array(SIGMA_GRID, np.float32), n, p=[0.8, 0.1, 0.1])
        cols = {
            "id": [f"r{i:08d}" for i in range(start, start + n)],
            "image": [png] * n,
            "height": np.full(n, SIDE, np.int32),
            "width": np.full(n, SIDE, np.int32),
            "channels": np.full(n, CHANNELS, np.int32),
            "label": np.zeros(n, np.int64),
            "caption": [""] * n,
            "source": ["synthetic"] * n,
            "quality": np.where(smin > 0, "corrupted", "clean"),
            "corruption": np.where(smin > 0, "synthetic", ""),
            "seed": np.arange(start, start + n, dtype=np.int64),
            "sigma_min": smin,
            "sigma_max": np.zeros(n, np.float32),
        }
        arrays = [pa.array(cols[f.name], type=f.type) for f in fields]
        table = pa.Table.from_arrays([*arrays, schema.to_arrow(spec, np.concatenate([mean, std], axis=1))], schema=sch)
        # random floats do not compress: written plain (zstd would only add its time to the set-up)
        path = os.path.join(root, "data", f"part-{s:05d}.parquet")
        pq.write_table(table, path, compression="none", use_dictionary=["id", "image", "source", "quality"])
    info = {
        "vae": "pixels",
        "vae_subfolder": None,
        "vae_fingerprint": "synthetic-benchmark",
        "text_encoder": None,
        "text_fingerprint": None,
        "resolution": SIDE,
        "channels": CHANNELS,
        "factor": 1,
        "latent_shape": [2 * CHANNELS, SIDE, SIDE],
        "latent_channels": CHANNELS,
        "emb_shape": None,
        "emb_dtype": None,
        "shift": [0.0] * CHANNELS,
        "scale": [1.0] * CHANNELS,
        "how": "identity (pixels)",
    }
    with open(os.path.join(root, "latents.json"), "w") as f:
        json.dump(info, f, indent=1)
    return root


def first_shards(src: str, dst: str, rows: int, shard_rows: int) -> str:
    """``dst``: the first ``rows`` rows of the dataset ``src`` (whole shards, hard-linked) with its latents.json."""
    os.makedirs(os.path.join(dst, "data"), exist_ok=True)
    for s in range(rows // shard_rows):
        name = f"part-{s:05d}.parquet"
        os.link(os.path.join(src, "data", name), os.path.join(dst, "data", name))
    shutil.copy(os.path.join(src, "latents.json"), os.path.join(dst, "latents.json"))
    return dst


class PeakRSS:
    """Polls, every ``interval`` seconds in a thread, the processes under this one whose command line names
    ``match`` (Ray sets a worker's title to its actor class), and keeps the largest RSS of one of them and
    the largest private RSS (RSS less shared pages)."""

    def __init__(self, match: str = "RayTrainWorker", interval: float = 0.2):
        self.match, self.interval = match, interval
        self.rss = self.private = 0
        self.samples = 0
        self.timeline: list[tuple[float, int, int]] = []  # (seconds since start, RSS, private RSS) of each sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name="peak-rss")

    def _poll(self) -> None:
        import psutil

        me, t0 = psutil.Process(), time.perf_counter()
        while not self._stop.is_set():
            for p in me.children(recursive=True):
                try:
                    if self.match not in " ".join(p.cmdline()):
                        continue
                    m = p.memory_info()
                except psutil.Error:  # gone, or not ours to read
                    continue
                self.rss, self.private = max(self.rss, m.rss), max(self.private, m.rss - m.shared)
                self.samples += 1
                self.timeline.append((time.perf_counter() - t0, m.rss, m.rss - m.shared))
            self._stop.wait(self.interval)

    def profile(self, points: int = 8) -> str:
        """RSS / private RSS in MiB at ``points`` evenly spaced times of the worker's life."""
        if not self.timeline:
            return ""
        t_first, t_last = self.timeline[0][0], self.timeline[-1][0]
        out, j = [], 0
        for i in range(points + 1):
            t = t_first + (t_last - t_first) * i / points
            while j < len(self.timeline) - 1 and self.timeline[j][0] < t:
                j += 1
            s, rss, private = self.timeline[j]
            out.append(f"{s - t_first:.0f}s {rss / 2**20:.0f}/{private / 2**20:.0f}")
        return "  ".join(out)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def train_config(data: str, out: str, mode: str, steps: int, batch: int, model: dict, **kw):
    """The train stage's config for the benchmarks: one worker, checkpoint and summary at the last step only."""
    from ambient_ray.stages import train

    return train.TrainConfig(
        data=data,
        out=out,
        model=model,
        batch_size=batch,
        steps=steps,
        checkpoint_every=steps,
        num_workers=1,
        sample_grid=0,
        stream=dict(mode=mode),
        mlflow=dict(enabled=False),
        **kw,
    )


def pool_fill(cfg) -> tuple[dict[int, int], int]:
    """The streamed worker's pool sizes for ``cfg``'s data (as ``DenoiserTask.setup_stream`` sizes them, one
    worker) and how many rows it must read before every pool is full (each stratum's rows arrive at its share
    of the data)."""
    import torch

    from ambient_ray.data.metadata import load_metadata
    from ambient_ray.data.streaming import capacities
    from ambient_ray.diffusion import stratified
    from ambient_ray.train.tasks import denoiser_data

    smin, smax, _ = denoiser_data.resolve_sigmas(load_metadata(cfg.data), cfg)
    st = denoiser_data.strata_counts(cfg, smin, smax)
    table = stratified.strata_table(st["edges"])
    n = torch.zeros(len(table), dtype=torch.long)
    n[torch.tensor(st["strata"])] = torch.tensor(st["counts"])
    a = cfg.ambient
    sampler = stratified.StratifiedSigmaSampler(table[:, 0], table[:, 1], n, p_mean=a.p_mean, p_std=a.p_std)
    g = torch.Generator().manual_seed(cfg.seed + 31337)
    caps = capacities(sampler.stratum_probs(sampler.sample(20_000, g)[0]).mean(0), sampler.active, cfg.stream.pool_rows)
    total = sum(st["counts"])
    need = max(min(caps[k], c) * total / c for k, c in zip(st["strata"], st["counts"]))
    return caps, math.ceil(need)


def run_train(cfg) -> dict:
    """``train.run(cfg)``, run once more (into ``OUT-retry``) if Ray Train tore it down from outside: its
    detached PlacementGroupCleaner takes a State API lookup that misses the live controller for a dead
    controller and removes the run's placement group ("A worker health check failed ... its placement group
    was removed"; seen twice on the loaded 2-core machine, see ray-project/ray#65447's review)."""
    from ambient_ray.stages import train

    try:
        return train.run(cfg)
    except Exception as e:  # Ray Train's WorkerGroupError
        if "placement group was removed" not in str(e):
            raise
        print("  (Ray Train's placement group cleaner removed a live run's placement group: run again)", flush=True)
        return train.run(cfg.model_copy(update={"out": cfg.out + "-retry"}))


def measure(cfg, poll: float) -> tuple[PeakRSS, dict, float]:
    """Run the train stage under a :class:`PeakRSS`; the peaks, the summary and the wall seconds."""
    t0 = time.perf_counter()
    with PeakRSS(interval=poll) as peak:
        summary = run_train(cfg)
    if not peak.samples:
        raise SystemExit("no RayTrainWorker process was seen during the run")
    return peak, summary, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000, help="N (the larger dataset has factor·N rows)")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--shard-rows", type=int, default=1000, help="rows per Parquet shard; must divide --rows")
    ap.add_argument("--batch", type=int, default=64, help="rows per step (more: the pools fill in fewer steps)")
    ap.add_argument("--channels", type=int, default=8, help="model_channels of the tiny U-Net")
    ap.add_argument("--steps", type=int, default=10, help="steps of the in-memory runs")
    ap.add_argument("--stream-steps", type=int, default=None, help="default: until the pools are full")
    ap.add_argument("--cpus", type=int, default=2, help="Ray's CPUs (the worker takes --cpus-per-worker of them)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--paths", default="stream,memory", help="data paths to measure (stream.mode)")
    ap.add_argument("--memory-max-rows", type=int, default=None, help="skip the in-memory path above this many rows")
    ap.add_argument("--poll", type=float, default=0.2, help="seconds between RSS samples")
    ap.add_argument("--profile", action="store_true", help="print each run's RSS over the worker's life")
    ap.add_argument("--tmp", default=None, help="folder for the data and runs (default: a fresh temporary one)")
    args = ap.parse_args()
    if args.rows % args.shard_rows:
        ap.error(f"--shard-rows {args.shard_rows} must divide --rows {args.rows} (the N-row set is whole shards)")

    import ray

    from ambient_ray.io import ray_runtime

    sizes = (args.rows, args.rows * args.factor)
    paths = [p for p in args.paths.split(",") if p]
    model = dict(preset="tiny", model_channels=args.channels)
    tmp = tempfile.mkdtemp(prefix="ambient-bench-mem-", dir=args.tmp)
    peaks: dict[tuple[str, int], PeakRSS] = {}
    steps: dict[str, int] = {"memory": args.steps}
    try:
        t0 = time.perf_counter()
        big = make_latents(f"{tmp}/big", sizes[1], args.shard_rows)
        small = first_shards(big, f"{tmp}/small", sizes[0], args.shard_rows)
        gb = sizes[1] * ROW_BYTES / 1e9
        print(f"data: {sizes[1]} rows ({gb:.2f} GB of latents) in {time.perf_counter() - t0:.1f} s", flush=True)
        fills = {
            n: pool_fill(train_config(d, tmp, "stream", 1, args.batch, model)) for n, d in zip(sizes, (small, big))
        }
        caps, need = fills[sizes[1]]
        steps["stream"] = args.stream_steps or math.ceil(max(f[1] for f in fills.values()) / args.batch)
        print(
            f"stream pools at {sizes[1]} rows: {sum(caps.values())} rows ({sum(caps.values()) * ROW_BYTES / 2**20:.0f}"
            f" MiB) over {len(caps)} strata {sorted(caps.values())}, full after {need} rows read; "
            f"{steps['stream']} streamed steps",
            flush=True,
        )
        ray_runtime.ray_init(None, num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        for mode in paths:
            for n, data in zip(sizes, (small, big)):
                if mode == "memory" and args.memory_max_rows and n > args.memory_max_rows:
                    print(f"  {mode:6s} {n:>8d} rows: skipped (--memory-max-rows {args.memory_max_rows})")
                    continue
                out = f"{tmp}/run-{mode}-{n}"
                k = steps.get(mode, args.steps)
                cfg = train_config(
                    data, out, mode, k, args.batch, model, cpus_per_worker=args.cpus_per_worker, log_every=k
                )
                peak, summary, wall = measure(cfg, args.poll)
                peaks[mode, n] = peak
                m = summary["metrics"]
                print(
                    f"  {mode:6s} {n:>8d} rows: peak RSS {peak.rss / 2**20:7.0f} MiB, "
                    f"private {peak.private / 2**20:7.0f} MiB ({peak.samples} samples), "
                    f"{k} steps in {wall:.0f} s, {m['images_per_s']:.0f} images/s"
                    + (f", data_wait_fraction {m['data_wait_fraction']:.3f}" if "data_wait_fraction" in m else ""),
                    flush=True,
                )
                if args.profile:
                    print(f"      RSS/private MiB over the worker's life: {peak.profile()}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(out + "-retry", ignore_errors=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    full = "pools full" if steps["stream"] * args.batch >= need else "pools not yet full"
    print(
        f"train memory: {CHANNELS}x{SIDE}x{SIDE} latents ({ROW_BYTES // 1024} KB a row), tiny U-Net (model_channels "
        f"{args.channels}), 1 worker of {args.cpus_per_worker:g} CPU on {args.cpus} Ray CPUs, batch {args.batch}, "
        f"streamed {steps['stream']} steps ({full}), "
        f"in memory {steps['memory']}; peak RSS of the RayTrainWorker"
    )
    for mode in paths:
        a, b = peaks.get((mode, sizes[0])), peaks.get((mode, sizes[1]))
        if not (a and b):
            continue
        goal = "(goal <= 1.2)" if mode == "stream" else "(the contrast: grows with N)"
        print(
            f"  {mode:6s}: {sizes[0]} rows {a.rss / 2**20:6.0f} MiB, {sizes[1]} rows {b.rss / 2**20:6.0f} MiB: "
            f"ratio {b.rss / a.rss:.2f} {goal}; private RSS {a.private / 2**20:.0f} -> {b.private / 2**20:.0f} MiB "
            f"({b.private / a.private:.2f})"
        )


if __name__ == "__main__":
    main()
