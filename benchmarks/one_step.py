"""What a distilled one-step generator saves against the teacher's Heun sampler (DSD, seed paper 004, Sec. 4.3: 50k
images in 20 s against 10 min, "a 30x speedup"), measured in one run on the same network and latents.

A generator is a denoiser network of its teacher's architecture called once, x = D(σ_init·z; σ_init), so the cost of
its call is the teacher's: one network's random weights serve both sides. Sides, each the registered sampler's
function on one batch of ``--batch`` images: ``one-step`` (1 network evaluation per image) and ``heun`` with
``--steps`` steps (2·steps − 1: 35 at EDM's 18). The sides run in turns (:mod:`benchmarks.timing`): one untimed
round, then ``--repeats`` rounds; printed are the medians of the images per second, their spread, and the ratio
one-step ÷ Heun in images/s, beside the ratio of network evaluations the counts predict (35 at 18 steps: Heun's
own arithmetic on the state is the difference). On the CPU torch runs ``--threads`` threads (default 1: steadier
on a shared machine).

    python benchmarks/one_step.py [--batch 64] [--resolution 32] [--channels 3] [--steps 18] [--preset small]
        [--repeats 3] [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import timing  # benchmarks/timing.py, beside this script
import torch

from ambient_ray.models import registry
from ambient_ray.sampling import Batch, SamplerConfig, nfe
from ambient_ray.sampling.dsd import one_step
from ambient_ray.sampling.edm import heun


def network(args, device):
    """(the network, what it is): the registry's DDPM++ at ``--preset``, random weights, a generator's meta."""
    model = {"preset": args.preset, "img_resolution": args.resolution, "in_channels": args.channels}
    net = registry.build({"kind": "denoiser", "arch": "ddpmpp", "model": model})
    net.meta = {"one_step": {"sigma_init": 2.5, "teacher": "(the same network)"}}
    params = sum(p.numel() for p in net.parameters())
    return net.to(device).eval(), f"ddpmpp {args.preset}, {params / 1e6:.2f} M parameters"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of every side (interleaved)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net, what = network(args, device)
    print(f"{what}; {args.batch} images of {args.channels}x{args.resolution}², on {device}")

    counts: dict[str, int] = {}  # per side: images through the network in its warm-up round
    forward = net.forward

    def side(sample, cfg, name):
        def counting(x, *a, **kw):
            counts[name] += x.shape[0]
            return forward(x, *a, **kw)

        def run(_round: int) -> float:
            g = torch.Generator().manual_seed(0)
            shape = (args.batch, args.channels, args.resolution, args.resolution)
            batch = Batch(torch.randn(shape, generator=g).to(device), None, None, g)
            if _round == -1:  # the warm-up round counts the work
                counts[name] = 0
                net.forward = counting
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                sample(net, batch, cfg)
            if device.type == "cuda":
                torch.cuda.synchronize()
            took = time.perf_counter() - t0
            net.forward = forward
            return args.batch / took  # images per second

        return run

    cfgs = {"one-step": SamplerConfig(name="one-step"), f"heun {args.steps}": SamplerConfig(steps=args.steps)}
    sides = {
        "one-step": side(one_step, cfgs["one-step"], "one-step"),
        f"heun {args.steps}": side(heun, cfgs[f"heun {args.steps}"], f"heun {args.steps}"),
    }
    stats = timing.interleave(sides, args.repeats)
    print()
    for name, stat in stats.items():
        per_image = counts[name] / args.batch
        assert per_image == nfe(cfgs[name]), (name, per_image)  # the documented count is what runs
        print(f"{name:10s} {stat.show(1.0, 'images/s')}; {per_image:.0f} network evaluations/image")
    one, multi = stats["one-step"], stats[f"heun {args.steps}"]
    work = nfe(cfgs[f"heun {args.steps}"])
    print(f"one-step ÷ heun {args.steps}: {timing.ratio(one, multi):.1f}x images/s (network evaluations: {work}x)")


if __name__ == "__main__":
    main()
