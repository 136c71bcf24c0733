"""What reconstruction guidance costs against the fixed-mask sampler (Ambient Diffusion, Eq. 3.4 against Eq. 3.3),
measured in one run on the same network, latents and masks.

The network is a DDPM++ built with the model registry with ``mask_input: true`` (``--preset``, default ``tiny``;
random weights: the cost of a call does not depend on them), or, where this checkout's models take no mask yet, a
small conv stand-in with the same call ``net(x, σ, labels, mask=Ã)``. Sides, each the registered sampler's function
on one batch of ``--batch`` images, ``--steps`` Heun steps: ``fixed-mask`` (2·steps − 1 network calls, no
gradient) and ``reconstruction-guidance`` with k = 2 and k = 4 masks (per step but the last, the k predictions in
one batch of k·B with a backward to x, then the corrector's one call). The sides run in turns
(:mod:`benchmarks.timing`): one untimed round, then ``--repeats`` rounds; printed are the medians per image, their
spread, and the ratios guided ÷ fixed-mask per image (the paper: "one extra prediction per step for each extra
mask"; the backward makes each extra prediction cost more than a forward). Beside them, counted (not timed, so
free of the machine's load): the images each side puts through the network per image sampled, and how many of
those are followed by a backward. On the CPU torch runs ``--threads`` threads (default 1: steadier on a shared
machine).

    python benchmarks/masked_sampling.py [--batch 16] [--resolution 32] [--channels 3] [--steps 18]
        [--preset tiny] [--repeats 3] [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import timing  # benchmarks/timing.py, beside this script
import torch
from torch import nn

from ambient_ray.models.precond import edm_precond
from ambient_ray.sampling import Batch, SamplerConfig
from ambient_ray.sampling.masked import fixed_mask, reconstruction_guidance


class ConvStandIn(nn.Module):
    """D = c_skip·(Ã⊙x) + c_out·F(c_in·(Ã⊙x), Ã, σ), F three 3x3 convolutions (where the registry's networks
    take no mask yet)."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(channels + 2, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, x, sigma, class_labels=None, *, mask):
        sigma = torch.as_tensor(sigma, device=x.device).float().reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in edm_precond(sigma))
        x = torch.where(mask.bool(), x.float(), torch.zeros((), device=x.device))
        noise = c_noise.expand(-1, 1, *x.shape[-2:])
        return c_skip * x + c_out * self.f(torch.cat([c_in * x, mask.float(), noise], dim=1))


def network(args, device):
    """(the network, what it is): the registry's DDPM++ with a mask channel, else the stand-in."""
    from ambient_ray.models import registry

    model = {"preset": args.preset, "img_resolution": args.resolution, "in_channels": args.channels}
    try:
        net = registry.build({"kind": "denoiser", "arch": "ddpmpp", "model": {**model, "mask_input": True}})
        what = f"ddpmpp {args.preset} with mask_input"
    except Exception as e:  # this checkout's models take no mask yet
        net, what = ConvStandIn(args.channels), f"a conv stand-in (ddpmpp takes no mask here: {type(e).__name__})"
    net.mask_input = True
    net.meta = {"masked": {"delta": 0.1, "observed_fraction": 0.6, "density": 0.54}}
    params = sum(p.numel() for p in net.parameters())
    return net.to(device).eval(), f"{what}, {params / 1e6:.2f} M parameters"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of every side (interleaved)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net, what = network(args, device)
    print(f"{what}; {args.batch} images of {args.channels}x{args.resolution}², {args.steps} steps, on {device}")

    counts: dict[str, list[int]] = {}  # per side: [images through the network, of them with a backward]
    forward = net.forward

    def counting(name):
        def call(x, *a, **kw):
            counts[name][0] += x.shape[0]
            counts[name][1] += x.shape[0] if torch.is_grad_enabled() and x.requires_grad else 0
            return forward(x, *a, **kw)

        return call

    def side(sample, cfg, name):
        def run(_round: int) -> float:
            g = torch.Generator().manual_seed(0)
            shape = (args.batch, args.channels, args.resolution, args.resolution)
            batch = Batch(torch.randn(shape, generator=g).to(device), None, None, g)
            if _round == -1:  # the warm-up round counts the work
                counts[name] = [0, 0]
                net.forward = counting(name)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            sample(net, batch, cfg)
            if device.type == "cuda":
                torch.cuda.synchronize()
            took = (time.perf_counter() - t0) / args.batch
            net.forward = forward
            return took

        return run

    sides = {"fixed-mask": side(fixed_mask, SamplerConfig(name="fixed-mask", steps=args.steps), "fixed-mask")}
    for k in (2, 4):
        cfg = SamplerConfig(name="reconstruction-guidance", steps=args.steps, guidance_masks=k)
        sides[f"guidance k={k}"] = side(reconstruction_guidance, cfg, f"guidance k={k}")
    stats = timing.interleave(sides, args.repeats)
    print()
    for name, stat in stats.items():
        images, backward = (c / args.batch for c in counts[name])
        print(
            f"{name:16s} {stat.show(1e3, 'ms/image')}; {images:.0f} network images/image, {backward:.0f} with backward"
        )
    base = stats["fixed-mask"]
    for k in (2, 4):
        name = f"guidance k={k}"
        work = counts[name][0] / counts["fixed-mask"][0]
        print(f"{name} ÷ fixed-mask: {timing.ratio(stats[name], base):.2f} per image (network images: {work:.2f})")


if __name__ == "__main__":
    main()
