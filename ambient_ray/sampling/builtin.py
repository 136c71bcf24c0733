"""The built-in samplers' entries in :data:`~ambient_ray.sampling.registry.SAMPLERS`, registered without torch:
each entry's functions are imported at their first call (:func:`~ambient_ray.sampling.registry.lazy`) from
:mod:`~ambient_ray.sampling.edm` (``heun``), :mod:`~ambient_ray.sampling.guidance` (``autoguidance``,
``classifier-free``) and :mod:`~ambient_ray.sampling.masked` (``fixed-mask``, ``reconstruction-guidance``, for a
network trained on masked data), so the sampler config and a stage's ``--help`` list them without importing
those."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ambient_ray.sampling.registry import SAMPLERS, Sampler, lazy, no_guidance

if TYPE_CHECKING:
    from ambient_ray.sampling.config import SamplerConfig


def needs_guide(cfg: SamplerConfig) -> None:
    if not cfg.guide:
        raise ValueError("sampler 'autoguidance' needs a guiding model ('guide')")


def no_guide(cfg: SamplerConfig) -> None:
    if cfg.guide:
        raise ValueError("sampler 'classifier-free' takes no guiding model ('guide' is for sampler autoguidance)")


def deterministic(cfg: SamplerConfig) -> None:
    """The masked samplers' check: no guide or guidance weight (theirs is 'guidance_weight'), no Algorithm 2."""
    no_guidance(cfg)
    if cfg.stochastic:
        raise ValueError(f"sampler {cfg.name!r} is deterministic (Heun, Algorithm 1): 'stochastic' is for 'heun'")


SAMPLERS.register(
    "heun",
    Sampler(
        lazy("ambient_ray.sampling.edm:heun"),
        "EDM Heun sampler (Karras et al. 2022, Alg. 1; Alg. 2 with --stochastic)",
    ),
)
SAMPLERS.register(
    "autoguidance",
    Sampler(
        lazy("ambient_ray.sampling.edm:heun"),  # on the guided denoiser that prepare builds
        "Heun, guided by a weaker model: D_guide + w*(D - D_guide) (EDM2's autoguidance; --guide, --guidance)",
        prepare=lazy("ambient_ray.sampling.guidance:_load_guide"),
        check=needs_guide,
    ),
)
SAMPLERS.register(
    "classifier-free",
    Sampler(
        lazy("ambient_ray.sampling.guidance:classifier_free"),
        "Heun, classifier-free guided: D(null) + w*(D(caption) - D(null)) (Ho & Salimans 2022; --prompt, --guidance)",
        prepare=lazy("ambient_ray.sampling.guidance:_takes_captions"),
        check=no_guide,
    ),
)
SAMPLERS.register(
    "fixed-mask",
    Sampler(
        lazy("ambient_ray.sampling.masked:fixed_mask"),
        "Heun on a masked network, one mask per image fixed for all steps (Ambient Diffusion, Daras et al. 2023, "
        "Eq. 3.3; sampler.mask_density)",
        prepare=lazy("ambient_ray.sampling.masked:takes_masks"),
        check=deterministic,
    ),
)
SAMPLERS.register(
    "reconstruction-guidance",
    Sampler(
        lazy("ambient_ray.sampling.masked:reconstruction_guidance"),
        "fixed-mask, minus w*grad 1/2 sum_k |D(x; mask 1) - D(x; mask k)|^2 (Daras et al. 2023, Eq. 3.4; "
        "sampler.guidance_masks, sampler.guidance_weight)",
        prepare=lazy("ambient_ray.sampling.masked:takes_masks"),
        check=deterministic,
    ),
)
