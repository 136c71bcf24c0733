"""The streaming feed: the share of a streamed training worker's step time spent waiting for its next rows,
and the streamed step time against the in-memory one, measured in one run on the same model and data.

Data: the synthetic 4×32×32 latents of :mod:`train_memory` (``--rows`` rows, σ_min on {0, 0.2, 0.5}).
Model: a U-Net whose step takes about 50 ms on one CPU thread: the tiny preset at ``--channels`` 8 and
``--batch`` 8 takes 60 ms a step in a plain PyTorch loop on the idle 2-core development machine (pass
other values to match another machine). One worker of ``--cpus-per-worker`` CPUs on a Ray cluster of
``--cpus`` CPUs: the default 1 of 2 leaves one CPU to Ray Data's read tasks (a worker holding every CPU
would leave the reads none). Each run is ``--steps`` steps with ``--log-every``; the figures are those
of its last logging interval (the summary's metrics; the first interval holds the start of the stream and
of the network): ``data_wait_fraction`` (seconds ``StratumPools.take`` blocked on the reader ÷ the
interval's seconds) and the step time (batch ÷ ``images_per_s``). The streamed and in-memory runs take
turns (:mod:`benchmarks.timing`, ``--repeats`` rounds, no warm-up round: every run starts afresh anyway).
Goal: wait fraction ≤ 0.05; streamed ÷ in-memory step time is printed beside it.

    python benchmarks/feed.py [--rows 4000] [--steps 60] [--log-every 20] [--batch 8] [--channels 8]
        [--cpus 2] [--cpus-per-worker 1] [--repeats 1] [--read-batch 256]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import timing  # benchmarks/timing.py, beside this script
import train_memory  # benchmarks/train_memory.py: the synthetic latents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--channels", type=int, default=8, help="model_channels of the tiny U-Net")
    ap.add_argument("--cpus", type=int, default=2, help="Ray's CPUs")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--read-batch", type=int, default=None, help="stream.read_batch (default: the config's)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of streamed and in-memory runs")
    args = ap.parse_args()

    import ray

    from ambient_ray.io import ray_runtime

    tmp = tempfile.mkdtemp(prefix="ambient-bench-feed-")
    waits: list[float] = []
    try:
        t0 = time.perf_counter()
        data = train_memory.make_latents(f"{tmp}/data", args.rows)
        print(f"data: {args.rows} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        ray_runtime.ray_init(None, num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        model = dict(preset="tiny", model_channels=args.channels)
        stream = {"read_batch": args.read_batch} if args.read_batch else {}

        def side(mode: str):
            def run(r: int) -> float:
                out = f"{tmp}/run-{mode}-{r}"
                cfg = train_memory.train_config(
                    data,
                    out,
                    mode,
                    args.steps,
                    args.batch,
                    model,
                    cpus_per_worker=args.cpus_per_worker,
                    log_every=args.log_every,
                )
                cfg.stream = cfg.stream.model_copy(update=stream)
                m = train_memory.run_train(cfg)["metrics"]
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(out + "-retry", ignore_errors=True)
                if mode == "stream":
                    waits.append(m["data_wait_fraction"])
                    print(f"    data_wait_fraction {m['data_wait_fraction']:.4f}", flush=True)
                return args.batch / m["images_per_s"]

            return run

        names = ("streamed", "in memory")
        stats = timing.interleave(dict(zip(names, (side("stream"), side("memory")))), args.repeats, warmup=False)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    streamed, memory = (stats[n] for n in names)
    wait = timing.Stat("data_wait_fraction", waits)
    print(
        f"feed: {args.rows} rows of 4x32x32 latents, tiny U-Net (model_channels {args.channels}), batch {args.batch}, "
        f"1 worker of {args.cpus_per_worker:g} CPU on {args.cpus} Ray CPUs, last {args.log_every} of {args.steps} "
        f"steps; median of {args.repeats} interleaved rounds [min..max]"
    )
    for st in (streamed, memory):
        print(f"  {st.name:10s} {st.show(1000, 'ms/step')}")
    print(f"  data_wait_fraction (streamed): {wait.show(100, '%')}  (goal <= 5 %)")
    print(f"  streamed / in-memory step time: {timing.ratio(streamed, memory):.3f}  (ratio of medians)")


if __name__ == "__main__":
    main()
