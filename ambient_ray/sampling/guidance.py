"""The guided samplers: Heun (EDM Algorithm 1/2) on a guided denoiser.

- ``autoguidance``: guidance by a weaker model (EDM2, Karras et al. 2024, and "Guiding a Diffusion Model with a
  Bad Version of Itself", Karras et al. 2024): D = D_guide + w·(D − D_guide), the guide a smaller or
  shorter-trained model of the same data (:class:`~ambient_ray.diffusion.samplers.Guided`).
- ``classifier-free``: classifier-free guidance of a caption network (Ho & Salimans 2022, Eq. 6, whose weight is
  ours − 1): D = D(x; σ, ∅) + w·(D(x; σ, c) − D(x; σ, ∅)) (:class:`~ambient_ray.diffusion.samplers.ClassifierFree`).

w = ``sampler.guidance``; w = 1 is the (conditional) model alone.
Their entries (and the checks of their knobs) are in :mod:`~ambient_ray.sampling.builtin`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ambient_ray.config import ConfigError
from ambient_ray.diffusion.samplers import Guided
from ambient_ray.models import weights
from ambient_ray.models.registry import takes_captions
from ambient_ray.sampling.edm import conditioned, solve
from ambient_ray.sampling.registry import Batch

if TYPE_CHECKING:
    from ambient_ray.sampling.config import SamplerConfig


def guided(net, guide_uri: str | None, weight: float, weights_kind: str = "ema"):
    """``net`` guided by the model at ``guide_uri`` with weight ``weight`` (:class:`~ambient_ray.diffusion.samplers.
    Guided`); ``net`` itself without a guide. The guide must share the main model's interface and latents."""
    if not guide_uri:
        return net
    guide = weights.load(guide_uri, "denoiser", weights_kind)
    a, b = net.config, guide.config
    for key in ("img_resolution", "in_channels", "label_dim"):
        if getattr(a, key) != getattr(b, key):
            raise ConfigError(
                f"config key 'sampler.guide': the guiding model {guide_uri} has {key}={getattr(b, key)} but the "
                f"model has {getattr(a, key)}; a guide must be trained on the same data"
            )
    if (getattr(net, "meta", None) or {}).get("latents") != (getattr(guide, "meta", None) or {}).get("latents"):
        raise ConfigError(f"config key 'sampler.guide': {guide_uri} was trained on other latents than the model")
    return Guided(net, guide, weight)


def _load_guide(net, cfg: SamplerConfig):
    if takes_captions(net.config.arch):
        raise ConfigError(
            "config key 'sampler.guide': a text-to-image model is guided classifier-free ('sampler.guidance', "
            "'prompts')"
        )
    return guided(net, cfg.guide, cfg.guidance, cfg.guide_weights)


def _takes_captions(net, cfg: SamplerConfig):
    if not takes_captions(net.config.arch):
        raise ConfigError(
            f"config key 'sampler.name': classifier-free guidance is for a network of captions; model.arch "
            f"{net.config.arch} takes none"
        )
    return net


def classifier_free(net, batch: Batch, cfg: SamplerConfig) -> torch.Tensor:
    """Heun on lerp(D(x; σ, ∅), D(x; σ, c), w): both halves in one batch of 2B (the null caption ∅ without captions)."""
    return solve(conditioned(net, batch, cfg.guidance), batch, cfg)
