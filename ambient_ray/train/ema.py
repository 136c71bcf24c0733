"""Exponential moving averages of the weights, in fp32 on the training device, chosen by ``ema``.

An EMA is updated after every optimizer step (after the post-step hooks, so it averages the weights as they
will be used) from the full parameters, and saved as ``ema.safetensors``. ``warmup`` is the EMA of the first
wave: decay min(ema_decay, (1 + t)/(10 + t)) after the t-th optimizer step.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ambient_ray.registry import Registry


class WarmupEMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ with d = min(decay, (1 + t)/(10 + t)), t = optimizer steps taken (from 1)."""

    def __init__(self, params: Iterable[torch.Tensor], device: torch.device, decay: float):
        self.decay = decay
        self.tensors = [p.detach().clone().float().to(device) for p in params]

    @torch.no_grad()
    def update(self, params: Iterable[torch.Tensor], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.tensors, params):
            e.mul_(d).add_(p.detach().float(), alpha=1 - d)

    def load(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = [t.float().to(e.device) for t, e in zip(tensors, self.tensors)]


EMAS: Registry[Callable[..., WarmupEMA]] = Registry("ema")
EMAS.register("warmup", lambda params, device, cfg: WarmupEMA(params, device, cfg.ema_decay))
