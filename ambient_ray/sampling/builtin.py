"""The built-in samplers' entries in :data:`~ambient_ray.sampling.registry.SAMPLERS`, registered without torch:
each entry's functions are imported at their first call (:func:`~ambient_ray.sampling.registry.lazy`) from
:mod:`~ambient_ray.sampling.edm` (``heun``) and :mod:`~ambient_ray.sampling.guidance` (``autoguidance``,
``classifier-free``), so the sampler config and a stage's ``--help`` list them without importing those."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ambient_ray.sampling.registry import SAMPLERS, Sampler, lazy

if TYPE_CHECKING:
    from ambient_ray.sampling.config import SamplerConfig


def needs_guide(cfg: SamplerConfig) -> None:
    if not cfg.guide:
        raise ValueError("sampler 'autoguidance' needs a guiding model ('guide')")


def no_guide(cfg: SamplerConfig) -> None:
    if cfg.guide:
        raise ValueError("sampler 'classifier-free' takes no guiding model ('guide' is for sampler autoguidance)")


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
