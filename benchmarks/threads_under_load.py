"""Training throughput of the demo's network when the cores are shared, measured in one run.

The demo's train-stage network (``jobs/configs/demo.yaml``: the U-Net on 8x8 grey digits, batch 64, AdamW)
steps in plain PyTorch at 1 and 2 torch threads under two OpenMP wait policies:

* **spin**: the OpenMP default (torch's libgomp lets a thread at a barrier spin before it sleeps), what a
  Ray worker runs unless the driver sets ``OMP_WAIT_POLICY`` (``ambient_ray.io.ray_runtime.worker_env``);
* **passive**: ``OMP_WAIT_POLICY=PASSIVE`` (a waiting thread sleeps at once);

each on a quiet machine and with a planted CPU-bound neighbour (``--neighbours`` processes of
``while True: pass``). The wait policy is read when torch is imported, so each (policy, threads) pair is
its own process, started once and told to measure in turns (:mod:`benchmarks.timing`: one untimed round,
then ``--repeats`` rounds of every side), so a slow spell of the machine lands on every side alike. A
round is the images/s of the steps that fit in ``--seconds`` after one untimed step.

Printed: the medians [min..max], each side's loaded/quiet ratio, 2 threads / 1 thread, passive / spin, and
the demo's worker before (``cpus_per_worker: 2``: 2 threads) against now (``auto``: the threads that
``resolve_cpus_per_worker`` gives on this machine, 1 on 2 cores), both with the default (spin) policy.

    python benchmarks/threads_under_load.py [--repeats 3] [--seconds 2] [--neighbours 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import timing  # benchmarks/timing.py, beside this script

POLICIES = {"spin": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jobs", "configs", "demo.yaml")


def child(threads: int, seconds: float) -> None:
    """One side: build the demo's network, then for each line on stdin print the images/s of one round."""
    import torch
    import yaml

    from ambient_ray.models.ddpmpp import UNetConfig, build_denoiser

    torch.set_num_threads(threads)
    with open(CONFIG) as f:
        spec = yaml.safe_load(f)["train"]
    batch = spec["batch_size"]
    torch.manual_seed(0)
    net = build_denoiser(UNetConfig(**spec["model"], img_resolution=8, in_channels=1))
    opt = torch.optim.AdamW(net.parameters(), lr=spec["optim"]["lr"])
    x = torch.rand(batch, 1, 8, 8) * 2 - 1

    def step() -> None:
        sigma = torch.exp(torch.randn(batch) * 1.2 - 1.2)
        d = net(x + sigma.view(-1, 1, 1, 1) * torch.randn_like(x), sigma)
        loss = ((d - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):  # warm-up: allocations, the OpenMP team
        step()
    print("ready", flush=True)
    for _ in sys.stdin:
        step()
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < seconds:
            step()
            n += 1
        print(batch * n / (time.perf_counter() - t0), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per round")
    ap.add_argument("--neighbours", type=int, default=2, help="CPU-bound processes planted for the loaded rounds")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.seconds)

    from ambient_ray.train.config import resolve_cpus_per_worker

    cores = os.cpu_count() or 1
    auto = max(1, int(resolve_cpus_per_worker("auto", 1, [cores])))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_"))}
    procs = {}
    for policy, env in POLICIES.items():
        for threads in (1, 2):
            cmd = [sys.executable, __file__, "--child", str(threads), "--seconds", str(args.seconds)]
            p = subprocess.Popen(cmd, env={**base, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs[f"{policy} policy, {threads} thread{'s' if threads > 1 else ''}"] = p
    for p in procs.values():
        assert p.stdout.readline().strip() == "ready"

    def side(p):
        def measure(r: int) -> float:
            p.stdin.write("go\n")
            p.stdin.flush()
            return float(p.stdout.readline())

        return measure

    stats = {}
    try:
        for load in ("quiet", "loaded"):
            hogs = []
            if load == "loaded":
                hog = [sys.executable, "-c", "while True: pass"]
                hogs = [subprocess.Popen(hog) for _ in range(args.neighbours)]
                time.sleep(0.5)
            print(f"{load}:", flush=True)
            try:
                got = timing.interleave({n: side(p) for n, p in procs.items()}, args.repeats)
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
            stats.update({(load, n): s for n, s in got.items()})
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()

    print(
        f"threads under load: the demo's network (8x8 grey, batch 64, AdamW) in plain PyTorch, {cores} cores, "
        f"loaded = {args.neighbours} CPU-bound neighbour(s); images/s, median of {args.repeats} interleaved rounds "
        "[min..max] after a warm-up round; spin: the OpenMP default, passive: OMP_WAIT_POLICY=PASSIVE"
    )
    for name in procs:
        q, lo = stats[("quiet", name)], stats[("loaded", name)]
        print(f"  {name:24s} quiet {q.show(unit='images/s')}")
        print(f"  {'':24s} loaded{lo.show(unit='images/s')}  loaded/quiet {timing.ratio(lo, q):.2f}")
    for load in ("quiet", "loaded"):
        s = {n: stats[(load, n)] for n in procs}
        t1o, t2o, t1n, t2n = s.values()
        print(
            f"{load:6s}: 2 threads / 1 thread: spin {timing.ratio(t2o, t1o):.2f}, passive "
            f"{timing.ratio(t2n, t1n):.2f};  passive / spin: 1 thread {timing.ratio(t1n, t1o):.2f}, 2 threads "
            f"{timing.ratio(t2n, t2o):.2f}"
        )
    now = f"spin policy, {min(auto, 2)} thread{'s' if min(auto, 2) > 1 else ''}"
    for load in ("quiet", "loaded"):
        before, after = stats[(load, "spin policy, 2 threads")], stats[(load, now)]
        print(
            f"the demo's worker, {load}: before (cpus_per_worker 2) {before.median:.0f} images/s, now (auto = "
            f"{auto} thread(s) on {cores} cores) {after.median:.0f} images/s: now / before "
            f"{timing.ratio(after, before):.2f}"
        )


if __name__ == "__main__":
    main()
