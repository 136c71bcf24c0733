"""The masked objective's step against the ambient objective's, on the same network and batch (issue 32).

Both sides run one training step (the objective's forward and loss, backward, an Adam step) of the same network,
a U-Net with a mask channel (``model.mask_input``), on the same drawn batch of digits-sized rows: the ambient side
through :class:`~ambient_ray.train.tasks.ambient.AmbientTask` (no mask passed: every pixel seen), the masked side
through :class:`~ambient_ray.train.tasks.masked.MaskedTask` (half the rows behind masks A, Ã = B⊙A drawn afresh,
the loss graded on A). What the masked side adds is the mask draw, two ``where``s and the mask channel's copy; the
target is a ratio ≤ 1.05. The sides run in turns (:mod:`benchmarks.timing`), two steps a turn, 40 turns: on a
shared machine a busy spell then lands on both sides alike and the medians hold.

    python benchmarks/masked_step.py [--steps 2] [--repeats 40] [--batch 64] [--size 16] [--channels 32]
"""

from __future__ import annotations

import argparse
import time
import types

import timing  # benchmarks/timing.py, beside this script
import torch

from ambient_ray.diffusion import ambient
from ambient_ray.models import registry
from ambient_ray.stages.train import TrainConfig
from ambient_ray.train.tasks.ambient import AmbientTask
from ambient_ray.train.tasks.masked import MaskedTask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--channels", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    n, r = 4 * args.batch, args.size
    model = dict(img_resolution=r, in_channels=1, model_channels=args.channels, channel_mult=[1, 2], mask_input=True)
    cfg = TrainConfig(data="-", out="-", model=model, masked=dict(delta=0.1))
    torch.manual_seed(0)
    net = registry.build({"kind": "denoiser", "arch": "ddpmpp", "model": model})
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    w = types.SimpleNamespace(engine=net, device=torch.device("cpu"), generator=g)

    plain = AmbientTask.__new__(AmbientTask)
    plain.cfg, plain.logvar = cfg, False
    masked = MaskedTask.__new__(MaskedTask)
    masked.cfg, masked.logvar, masked.fixed = cfg, False, None
    masked.observed = torch.ones(n, 1, r, r, dtype=torch.bool)
    masked.observed[: n // 2] = torch.rand(n // 2, 1, r, r, generator=g) >= 0.6  # half the rows at p = 0.6
    masked.masked_row = ~masked.observed.flatten(1).all(dim=1)
    y = torch.rand(n, 1, r, r, generator=g) * 2 - 1

    def batch() -> ambient.Batch:
        idx = torch.randint(0, n, (args.batch,), generator=g)
        sigma = (torch.randn(args.batch, generator=g) * 1.2 - 1.2).exp()
        b = args.batch
        return ambient.noise_batch(sigma, y[idx], torch.zeros(b), torch.zeros(b), idx, g)

    batches = [batch() for _ in range(args.steps)]

    def side(task):
        def run(_round: int) -> float:
            t0 = time.perf_counter()
            for b in batches:
                loss, _ = task.objective(w, b, (None,), {})
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return (time.perf_counter() - t0) / len(batches)

        return run

    print(f"network: ddpmpp {args.channels} channels at {r}x{r} with a mask channel; batch {args.batch}")
    stats = timing.interleave({"ambient": side(plain), "masked": side(masked)}, args.repeats)
    for s in stats.values():
        print(f"{s.name:>8}: {s.show(1e3, 'ms/step')}")
    print(f"masked ÷ ambient step time: {timing.ratio(stats['masked'], stats['ambient']):.3f} (target ≤ 1.05)")


if __name__ == "__main__":
    main()
