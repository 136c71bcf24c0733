"""The built-in samplers' entries in :data:`~ambient_ray.sampling.registry.SAMPLERS`, registered without torch:
each entry's functions are imported at their first call (:func:`~ambient_ray.sampling.registry.lazy`) from
:mod:`~ambient_ray.sampling.edm` (``heun``), :mod:`~ambient_ray.sampling.guidance` (``autoguidance``,
``classifier-free``), :mod:`~ambient_ray.sampling.masked` (``fixed-mask``, ``reconstruction-guidance``, for a
network trained on masked data) and :mod:`~ambient_ray.sampling.dsd` (``ambient-full``, ``ambient-truncated``,
for a network trained on noisy data, and ``one-step``, for a distilled generator), so the sampler config and a
stage's ``--help`` list them without importing those. Each entry's ``nfe`` counts its network evaluations per
image."""

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


def truncated(cfg: SamplerConfig) -> None:
    """``ambient-truncated``'s check: deterministic, at least 2 levels (σ_max and σ_n), σ_n below σ_max."""
    deterministic(cfg)
    if cfg.steps < 2:
        raise ValueError("sampler 'ambient-truncated' needs steps >= 2: its levels run from sigma_max down to sigma_n")
    if cfg.sigma_n is not None and cfg.sigma_n >= cfg.sigma_max:
        raise ValueError(f"sampler.sigma_n ({cfg.sigma_n}) must be below sampler.sigma_max ({cfg.sigma_max})")


def single(cfg: SamplerConfig) -> None:
    """``one-step``'s check: one call of the generator, so no guide, no guidance weight, no Algorithm 2."""
    no_guidance(cfg)
    if cfg.stochastic:
        raise ValueError("sampler 'one-step' calls the generator once: 'stochastic' is for 'heun'")


def guided_evaluations(cfg: SamplerConfig) -> int:
    """``autoguidance``, ``classifier-free``: 2·steps − 1 denoiser calls, each two networks (main and guide, or the
    caption and null halves) unless the weight is 1 (the model alone)."""
    return (2 * cfg.steps - 1) * (1 if cfg.guidance == 1.0 else 2)


def guidance_evaluations(cfg: SamplerConfig) -> int:
    """``reconstruction-guidance``: per step but the last, k predictions (one batch of k images per image, with a
    backward) and the corrector's one; the last step one: (k + 1)·(steps − 1) + 1. Weight 0: the fixed-mask
    sampler's 2·steps − 1."""
    if cfg.guidance_weight == 0.0:
        return 2 * cfg.steps - 1
    return (cfg.guidance_masks + 1) * (cfg.steps - 1) + 1


def one_evaluation(cfg: SamplerConfig) -> int:
    """``one-step``: one call of the generator."""
    return 1


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
        nfe=guided_evaluations,
    ),
)
SAMPLERS.register(
    "classifier-free",
    Sampler(
        lazy("ambient_ray.sampling.guidance:classifier_free"),
        "Heun, classifier-free guided: D(null) + w*(D(caption) - D(null)) (Ho & Salimans 2022; --prompt, --guidance)",
        prepare=lazy("ambient_ray.sampling.guidance:_takes_captions"),
        check=no_guide,
        nfe=guided_evaluations,
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
        nfe=guidance_evaluations,
    ),
)
SAMPLERS.register(
    "ambient-full",
    Sampler(
        lazy("ambient_ray.sampling.dsd:ambient_full"),
        "Ambient-Full, DSD's teacher baseline (seed paper 004, Sec. 4): heun down to σ = 0, on a model trained on "
        "noisy data (meta.noisy); its samples keep the data's noise",
        prepare=lazy("ambient_ray.sampling.dsd:full_prepare"),
    ),
)
SAMPLERS.register(
    "ambient-truncated",
    Sampler(
        lazy("ambient_ray.sampling.dsd:ambient_truncated"),
        "Ambient-Truncated, DSD's teacher baseline (seed paper 004, Sec. 4): Heun from σ_max down to σ_n only, "
        "then x0 = D(x; σ_n) (2*steps-1 evaluations; sampler.sigma_n, default the model's meta.noisy.sigma_n)",
        prepare=lazy("ambient_ray.sampling.dsd:truncated_prepare"),
        check=truncated,
    ),
)
SAMPLERS.register(
    "one-step",
    Sampler(
        lazy("ambient_ray.sampling.dsd:one_step"),
        "a distilled one-step generator (DSD/SiD, seed paper 004; meta.one_step): x = D(σ_init·z; σ_init), one "
        "network evaluation (--one-step; sampler.sigma_init, default the model's, 2.5)",
        prepare=lazy("ambient_ray.sampling.dsd:generator_prepare"),
        check=single,
        nfe=one_evaluation,
    ),
)
