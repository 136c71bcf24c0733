"""The EDM Heun sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Algorithm 1, deterministic; Algorithm 2, stochastic, with ``sampler.stochastic``), registered as ``heun``
(its entry is in :mod:`~ambient_ray.sampling.builtin`, which imports this module at the first draw).

:func:`solve` is the one call of :func:`~ambient_ray.diffusion.samplers.heun_sample` with the section's knobs, for
every sampler that runs Heun on its own denoiser.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ambient_ray.diffusion.samplers import ClassifierFree, heun_sample
from ambient_ray.sampling.registry import Batch

if TYPE_CHECKING:
    from ambient_ray.sampling.config import SamplerConfig


def solve(denoiser, batch: Batch, cfg: SamplerConfig) -> torch.Tensor:
    """Heun's 2nd-order solve from σ_max to 0 in ``cfg.steps`` steps (2·steps − 1 denoiser calls): EDM Algorithm 1,
    or Algorithm 2 (S_churn, S_min, S_max, S_noise; its noise from the batch's generator) when ``cfg.stochastic``."""
    return heun_sample(
        denoiser,
        batch.latents,
        num_steps=cfg.steps,
        sigma_max=cfg.sigma_max,
        class_labels=batch.class_labels,
        generator=batch.generator,
        s_churn=cfg.s_churn if cfg.stochastic else 0.0,
        s_min=cfg.s_min,
        s_max=cfg.s_max,
        s_noise=cfg.s_noise,
    )


def conditioned(net, batch: Batch, weight: float = 1.0):
    """The denoiser D(x; σ, labels) of the batch: ``net`` itself, or, for a caption network, ``net`` on the batch's
    captions (classifier-free guided with ``weight``; 1: the conditional network alone)."""
    if batch.captions is None:
        return net
    return ClassifierFree(net, batch.captions[0], batch.captions[1], weight)


def heun(net, batch: Batch, cfg: SamplerConfig) -> torch.Tensor:
    """EDM Algorithm 1/2 on the network (a caption network on the batch's captions, unguided)."""
    return solve(conditioned(net, batch), batch, cfg)
