"""The samplers of Denoising Score Distillation (DSD, seed paper 004, "Denoising Score Distillation: From Noisy
Diffusion Pretraining to One-Step High-Quality Generation"): its two teacher baselines and its one-step generator.

A teacher of DSD's Phase I is trained on noisy data only (observations y = x0 + σ_n·ε, σ_n in the [-1, 1] scale;
its model.json records ``meta["noisy"]["sigma_n"]``). The paper samples it two ways (Sec. 4, "Baseline methods",
after Daras et al. 2024's Ambient Tweedie; its App. D.1 Algorithm 3, absent from our text extraction):

- **Ambient-Full** (``ambient-full``): "continues sampling until σ = 0, adhering to the standard diffusion
  sampling": EDM's Heun sampler (Karras et al. 2022, Algorithm 1, or 2 with ``sampler.stochastic``) from σ_max to
  0, the same integration as ``heun``. Below σ_n such a network has seen no data (with the standard objective it
  learnt the noisy data's score; with Ambient Tweedie it cannot learn the clean score there), so its samples carry
  the data's noise: the baseline that shows it.
- **Ambient-Truncated** (``ambient-truncated``): "an early-stopping approach, where sampling terminates at σ_n":
  Heun on EDM's ρ-schedule of ``steps`` levels from σ_max down to σ_n (σ_n in place of σ_min), then one last
  denoiser call, x0 = D(x_{σ_n}; σ_n), the posterior mean of the clean image given the state at σ_n (Tweedie).
  That is EDM's Algorithm 1 with σ_min = σ_n exactly (its last step, Euler from σ_min to 0, lands on
  D(x; σ_min)), and costs the same **2·steps − 1** network evaluations: two per Heun step between the ``steps``
  levels (steps − 1 of them) and the final call. Deterministic only (a churn at σ_n would move the last call off
  σ_n); ``steps`` ≥ 2 (one level would be σ_max alone).

The student of Phase II, a one-step generator distilled from the teacher with SiD (seed 004, Sec. 3; its
model.json records ``meta["one_step"]``: ``sigma_init``, the teacher), is a denoiser network of the teacher's
architecture called once at a fixed noise level: G(z) = D(σ_init·z; σ_init), σ_init = 2.5 in SiD and DSD.

- **One step** (``one-step``): x = D(σ_init·z; σ_init) on the batch's latents z, labels or captions as the other
  samplers pass them: **1** network evaluation per image.

Their entries, the checks of their knobs and their evaluation counts are in :mod:`~ambient_ray.sampling.builtin`;
:func:`truncated_heun` and :func:`one_step_sample` are the samplers on any denoiser ``D(x, σ, labels)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ambient_ray.config import ConfigError
from ambient_ray.diffusion.samplers import edm_time_steps
from ambient_ray.sampling.edm import conditioned, heun
from ambient_ray.sampling.registry import Batch

if TYPE_CHECKING:
    from ambient_ray.sampling.config import SamplerConfig

SIGMA_INIT = 2.5  # SiD's and DSD's generator input noise level, where a generator's model.json names none


# ------------------------------------------------------------------------------------------------ the samplers


@torch.no_grad()
def truncated_heun(
    denoiser,
    latents: torch.Tensor,
    *,
    steps: int,
    sigma_n: float,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ambient-Truncated: EDM's Heun solver (Algorithm 1) on the ρ-schedule t_0 = σ_max > ... > t_{steps−1} = σ_n
    (:func:`~ambient_ray.diffusion.samplers.edm_time_steps` with σ_min = σ_n), x_{t_0} = σ_max·latents; then
    returns D(x_{σ_n}; σ_n). Per step i < steps − 1:

        d = (x − D(x; t_i))/t_i;  x' = x + (t_{i+1} − t_i)·d;  d' = (x' − D(x'; t_{i+1}))/t_{i+1};
        x ← x + (t_{i+1} − t_i)·(d + d')/2

    2·(steps − 1) + 1 = 2·steps − 1 denoiser calls. The state is float64 (as in heun_sample); the result comes back
    in the latents' dtype, the final prediction itself (not an Euler step landing on it)."""
    if steps < 2:
        raise ValueError(f"the truncated sampler needs steps >= 2 (levels σ_max .. σ_n): got {steps}")
    if not 0 < sigma_n < sigma_max:
        raise ValueError(f"need 0 < sigma_n < sigma_max: got sigma_n={sigma_n}, sigma_max={sigma_max}")
    t = edm_time_steps(steps, sigma_n, sigma_max, rho)[:-1].to(latents.device)  # the steps levels, t[-1] = σ_n
    n = latents.shape[0]

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return denoiser(x, sigma.expand(n), class_labels).to(torch.float64)

    x = latents.to(torch.float64) * t[0]
    for i in range(steps - 1):
        t_cur, t_next = t[i], t[i + 1]
        slope = (x - denoise(x, t_cur)) / t_cur
        x_euler = x + (t_next - t_cur) * slope
        slope_next = (x_euler - denoise(x_euler, t_next)) / t_next
        x = x + (t_next - t_cur) * 0.5 * (slope + slope_next)
    return denoiser(x, t[-1].expand(n), class_labels).to(latents.dtype)


@torch.no_grad()
def one_step_sample(
    denoiser, latents: torch.Tensor, sigma_init: float = SIGMA_INIT, class_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """A one-step generator's samples: D(σ_init·z; σ_init) for the latents z, one denoiser call, in the latents'
    dtype (the network gets the latents' dtype, not float64: nothing is integrated)."""
    sigma = torch.full((latents.shape[0],), float(sigma_init), dtype=latents.dtype, device=latents.device)
    return denoiser(latents * float(sigma_init), sigma, class_labels).to(latents.dtype)


# ------------------------------------------------------------------------------------------ the registry's side


def _meta(net) -> dict:
    return getattr(net, "meta", None) or {}


def _not_a_generator(net, cfg: SamplerConfig) -> None:
    if _meta(net).get("one_step"):
        raise ConfigError(
            f"config key 'sampler.name': the model is a one-step generator (meta.one_step in its model.json): sample "
            f"it with --one-step (sampler 'one-step'), not {cfg.name!r}"
        )


def sigma_n(net, cfg: SamplerConfig) -> float:
    """σ_n, where Ambient-Truncated stops: ``sampler.sigma_n``, else the model's ``meta["noisy"]["sigma_n"]``."""
    if cfg.sigma_n is not None:
        found = cfg.sigma_n
    else:
        found = (_meta(net).get("noisy") or {}).get("sigma_n")
        if found is None:
            raise ConfigError(
                "config key 'sampler.sigma_n': sampler 'ambient-truncated' stops at the noise level σ_n of the "
                "model's training data, and the model's model.json records none (meta.noisy.sigma_n, written for "
                "a model trained on noisy data); set sampler.sigma_n (in the [-1, 1] scale, e.g. 0.2)"
            )
    if not 0 < float(found) < cfg.sigma_max:
        raise ConfigError(
            f"config key 'sampler.sigma_n': σ_n = {found} must lie in (0, sampler.sigma_max = {cfg.sigma_max})"
        )
    return float(found)


def sigma_init(net, cfg: SamplerConfig) -> float:
    """σ_init of a one-step generator: ``sampler.sigma_init``, else the model's ``meta["one_step"]["sigma_init"]``
    (2.5, SiD's, where its ``one_step`` names none); a model without ``meta["one_step"]`` needs the knob."""
    if cfg.sigma_init is not None:
        return float(cfg.sigma_init)
    gen = _meta(net).get("one_step")
    if not gen:
        raise ConfigError(
            "config key 'sampler.name': sampler 'one-step' is for a one-step generator (DSD's or SiD's distilled "
            "student: meta.one_step in its model.json, with sigma_init); this model's model.json has no one_step: "
            "sample it with 'heun' (or 'ambient-full' / 'ambient-truncated' for a model of noisy data), or set "
            "sampler.sigma_init to call it as a generator anyway"
        )
    return float(gen.get("sigma_init", SIGMA_INIT))


def full_prepare(net, cfg: SamplerConfig):
    """``ambient-full``'s ``prepare``: any denoiser but a one-step generator."""
    _not_a_generator(net, cfg)
    return net


def truncated_prepare(net, cfg: SamplerConfig):
    """``ambient-truncated``'s ``prepare``: refuses a one-step generator, and a model without σ_n (nor the knob)."""
    _not_a_generator(net, cfg)
    sigma_n(net, cfg)
    return net


def generator_prepare(net, cfg: SamplerConfig):
    """``one-step``'s ``prepare``: refuses a model that is no generator unless ``sampler.sigma_init`` is set."""
    sigma_init(net, cfg)
    return net


def ambient_full(net, batch: Batch, cfg: SamplerConfig) -> torch.Tensor:
    """The ``ambient-full`` sampler: ``heun`` itself (EDM Algorithm 1, or 2 with ``stochastic``) down to σ = 0."""
    return heun(net, batch, cfg)


def ambient_truncated(net, batch: Batch, cfg: SamplerConfig) -> torch.Tensor:
    """The ``ambient-truncated`` sampler: :func:`truncated_heun` down to σ_n (:func:`sigma_n`), then D(x; σ_n)."""
    return truncated_heun(
        conditioned(net, batch),
        batch.latents,
        steps=cfg.steps,
        sigma_n=sigma_n(net, cfg),
        sigma_max=cfg.sigma_max,
        class_labels=batch.class_labels,
    )


def one_step(net, batch: Batch, cfg: SamplerConfig) -> torch.Tensor:
    """The ``one-step`` sampler: D(σ_init·z; σ_init) (:func:`sigma_init`), one network evaluation per batch."""
    return one_step_sample(conditioned(net, batch), batch.latents, sigma_init(net, cfg), batch.class_labels)
