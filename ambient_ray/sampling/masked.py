"""The samplers of a network trained on masked data (Ambient Diffusion, Daras et al. 2023, "Ambient Diffusion:
Learning Clean Distributions from Highly Corrupted Data", Sec. 3.2, Eq. 3.3 and 3.4), pure torch.

Such a network predicts ``E[x0 | Ã x_σ, Ã]`` for a mask ``Ã`` (N x 1 x H x W, 1 = seen) and is called as
``net(x, σ, *cond, mask=Ã)``: it zeroes the pixels of x outside Ã itself (``net.mask_input`` is True). Here a
denoiser is any ``denoise(x, sigma, mask) -> x0 prediction`` (``sigma`` of shape (N,)).

- **Fixed mask** (Eq. 3.3, ``fixed-mask``): one mask Ã per image, drawn at the density of the training masks
  (:func:`draw_masks`) and kept for the whole trajectory; each step is EDM's Heun step (Karras et al. 2022,
  Algorithm 1, ρ-schedule) on D(x; σ, Ã), the x0 prediction clipped to [-1, 1]. Eq. 3.3 is its Euler (DDIM)
  part: x_{t-Δ} = γ x_t + (1 − γ) D(x_t; Ã), γ = σ_{t−Δ}/σ_t. The last step (to σ = 0) returns the prediction.
  The network never sees the pixels outside Ã, so they end as the conditional mean of the seen ones (the paper's
  remark; :func:`masked_heun` spells it out for Gaussian data).
- **Reconstruction guidance** (Eq. 3.4, ``reconstruction-guidance``): k masks per image, Ã_1 the fixed mask and
  k − 1 further ones (the paper: k = 4, w = 5e-4, constant in t); every step also subtracts
  w·∇_x ½ Σ_k ‖D(x; Ã_1) − D(x; Ã_k)‖² (the gradient through all k predictions).

For restoration (the inpaint stage), :func:`posterior_mean` (one step, E[x0 | A x_σ, A]) and :func:`restore` (the
fixed-mask sampler with Ã = A, the observed pixels of the state kept consistent with the observation).

The registered samplers' functions are :func:`fixed_mask` and :func:`reconstruction_guidance`, and
:func:`takes_masks` their ``prepare`` (their entries are in :mod:`~ambient_ray.sampling.builtin`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ambient_ray.config import ConfigError
from ambient_ray.diffusion.samplers import edm_time_steps
from ambient_ray.sampling.registry import Batch

if TYPE_CHECKING:
    from ambient_ray.sampling.config import SamplerConfig

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------ the sampler


def draw_masks(
    n: int, shape_hw: tuple[int, int], density: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` masks (n, 1, H, W) of 0.0/1.0, each pixel kept (1) independently with probability ``density`` (the
    density of Ã, (1 − p)(1 − δ) for pixels missing with probability p and erased again with probability δ), one
    per image and shared across channels; drawn on the generator's device (the CPU for a draw's generator)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1]: got {density}")
    h, w = shape_hw
    device = generator.device if generator is not None else None
    return (torch.rand(n, 1, h, w, generator=generator, device=device) < density).float()


@torch.no_grad()
def masked_heun(
    denoise: Denoise,
    latents: torch.Tensor,
    masks: torch.Tensor,
    *,
    steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    guidance_masks: Sequence[torch.Tensor] | torch.Tensor | None = None,
    weight: float = 0.0,
    clip: bool = True,
) -> torch.Tensor:
    """The fixed-mask sampler (Eq. 3.3) as EDM's Heun solver, with optional reconstruction guidance (Eq. 3.4).

    ``latents`` (N, C, H, W) are standard normal, x = σ_max·latents; ``masks`` (N, 1, H, W) is Ã_1, one per image,
    fixed for all steps; the t_i are EDM's ρ-schedule (:func:`~ambient_ray.diffusion.samplers.edm_time_steps`).
    With D(x; σ) = ``denoise(x, σ, Ã_1)``, clipped to [-1, 1] with ``clip``, step i < N − 1 is Heun's:

        d = (x − D(x; t_i))/t_i;  x' = x + (t_{i+1} − t_i)·d;  d' = (x' − D(x'; t_{i+1}))/t_{i+1}
        x ← x + (t_{i+1} − t_i)·(d + d')/2 − w·g(x),   g(x) = ∇_x ½ Σ_{k≥2} ‖D(x; t_i, Ã_1) − D(x; t_i, Ã_k)‖²

    and the last step (t_N = 0) returns D(x; t_{N−1}) (an Euler step to 0 lands on the prediction).

    Guidance (``guidance_masks``: the k − 1 further masks Ã_2..Ã_k, each (N, 1, H, W), a list or a (k − 1, N, 1,
    H, W) tensor, fixed for all steps; ``weight`` w, constant in t): g is evaluated once per step at x_{t_i}, where
    Eq. 3.4 evaluates it, and subtracted after the Heun step; the 2nd-order correction uses the fixed mask's
    prediction only, as the unguided sampler does. So Heun's correction refines the ODE part (Eq. 3.3) and the
    guidance stays Eq. 3.4's explicit term, at k + 1 network evaluations per step (the k predictions at x_{t_i} in
    one batch of k·N, with a backward through them, then one at x'), not 2k. The gradient flows through all k
    predictions (Ã_1's included), taken before clipping (a clipped pixel would pass no gradient); the last step
    returns the prediction unguided. Per image the term is that image's own sum: the images do not interact.

    Gaussian data (why the fixed-mask sampler keeps the seen pixels' law and fills the rest with their conditional
    mean): for x0 ~ N(μ, Σ) the exact D(x; σ, Ã) = μ + Σ_{:,S}(Σ_SS + σ²I)⁻¹(x_S − μ_S) depends on x_S only, and its
    S part is the exact denoiser of the marginal N(μ_S, Σ_SS); so x_S follows that marginal's probability-flow ODE
    and ends ~ N(μ_S, Σ_SS) (up to the start's mismatch, O(|μ|·√λ/σ_max), and Heun's error). The hidden
    coordinates never feed back; the returned prediction's hidden part is μ_H + Σ_HS(Σ_SS + σ²)⁻¹(x_S − μ_S) at
    σ = t_{N−1}, which is exactly E[x_H | x_S] of the returned S part (both are the same affine map of x_S).

    The state is float64 (as :func:`~ambient_ray.diffusion.samplers.heun_sample`'s); the result comes back in the
    latents' dtype."""
    return _solve(denoise, latents, masks, steps, sigma_min, sigma_max, rho, guidance_masks, weight, clip)


def guidance_gradient(
    denoise: Denoise, x: torch.Tensor, sigma: torch.Tensor, masks: torch.Tensor, clip: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D(x; σ, Ã_1), ∇_x ½ Σ_{k≥2} ‖D(x; σ, Ã_1) − D(x; σ, Ã_k)‖²) for ``masks`` (k, N, 1, H, W), the k predictions
    in one batch of k·N. The prediction comes back detached (clipped with ``clip``), the loss on the raw ones."""
    k, n = masks.shape[0], x.shape[0]
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        sig = sigma.reshape(-1).expand(n).repeat(k)
        rep = xg.unsqueeze(0).expand(k, *xg.shape).reshape(k * n, *xg.shape[1:])
        pred = denoise(rep, sig, masks.reshape(k * n, *masks.shape[2:])).to(x.dtype).reshape(k, *x.shape)
        loss = 0.5 * (pred[:1] - pred[1:]).square().sum()
        (grad,) = torch.autograd.grad(loss, xg)
    d = pred[0].detach()
    return (d.clamp(-1.0, 1.0) if clip else d), grad


def _solve(
    denoise: Denoise,
    latents: torch.Tensor,
    masks: torch.Tensor,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    guidance_masks: Sequence[torch.Tensor] | torch.Tensor | None,
    weight: float,
    clip: bool,
    keep: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`masked_heun`; ``keep(x, σ)``, where given, rewrites every state the network sees (:func:`restore`)."""
    device, n = latents.device, latents.shape[0]
    t = edm_time_steps(steps, sigma_min, sigma_max, rho).to(device)
    m1 = _mask(masks, latents).to(torch.float64)
    stack = None
    if guidance_masks is not None and len(guidance_masks) > 0 and weight != 0.0:
        if weight < 0:
            raise ValueError(f"the guidance weight must be >= 0: got {weight}")
        stack = torch.stack([m1] + [_mask(m, latents).to(torch.float64) for m in guidance_masks])
    keep = keep or (lambda x, s: x)

    def predict(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        d = denoise(x, sigma.expand(n), m1).to(torch.float64)
        return d.clamp(-1.0, 1.0) if clip else d

    x = keep(latents.to(torch.float64) * t[0], t[0])
    for i in range(steps):
        t_cur, t_next = t[i], t[i + 1]
        last = i == steps - 1  # t_next = 0
        grad = None
        if stack is not None and not last:
            d, grad = guidance_gradient(denoise, x, t_cur, stack, clip)
        else:
            d = predict(x, t_cur)
        if last:
            return d.to(latents.dtype)
        slope = (x - d) / t_cur
        x_next = keep(x + (t_next - t_cur) * slope, t_next)
        slope_next = (x_next - predict(x_next, t_next)) / t_next
        x_next = x + (t_next - t_cur) * 0.5 * (slope + slope_next)
        if grad is not None:
            x_next = x_next - weight * grad
        x = keep(x_next, t_next)
    raise AssertionError("unreachable: the last step returns")


def _mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` as (N, 1, H, W) on ``like``'s device, checked against ``like`` (N, C, H, W)."""
    m = mask if mask.dim() == 4 else mask.unsqueeze(1)
    if m.dim() != 4 or m.shape[0] != like.shape[0] or m.shape[1] != 1 or m.shape[-2:] != like.shape[-2:]:
        raise ValueError(f"a mask of shape {tuple(mask.shape)} does not fit images of shape {tuple(like.shape)}")
    return m.to(like.device)


# -------------------------------------------------------------------------------------------- for restoration


@torch.no_grad()
def posterior_mean(
    denoise: Denoise,
    y: torch.Tensor,
    mask: torch.Tensor,
    sigma: float | torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One step: E[x0 | A x_σ, A] = D(x_σ; σ, A) for the observation ``y`` (N, C, H, W; its pixels outside ``mask``
    arbitrary, NaN included) and ``mask`` A (N, 1, H, W), with x_σ = y + σ·z on A (z standard normal, drawn from
    ``generator``, on its device) and 0 outside it (what A x_σ holds; a masked network zeroes them anyway).
    ``sigma`` > 0: a float or one per image (N,). Returned in y's dtype."""
    m = _mask(mask, y).bool()
    gen_device = generator.device if generator is not None else y.device
    z = torch.randn(y.shape, generator=generator, device=gen_device, dtype=y.dtype).to(y.device)
    sig = torch.as_tensor(sigma, dtype=y.dtype, device=y.device).reshape(-1).expand(y.shape[0])
    x = torch.where(m, y + sig.view(-1, 1, 1, 1) * z, torch.zeros_like(y))
    return denoise(x, sig, m.to(y.dtype)).to(y.dtype)


@torch.no_grad()
def restore(
    denoise: Denoise,
    y: torch.Tensor,
    mask: torch.Tensor,
    *,
    steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    generator: torch.Generator | None = None,
    clip: bool = True,
) -> torch.Tensor:
    """A restoration of ``y`` (N, C, H, W in [-1, 1]; its pixels outside ``mask`` arbitrary, NaN included) by the
    fixed-mask sampler with Ã = A (``mask``, N x 1 x H x W), keeping the observed pixels.

    One standard-normal draw z (N, C, H, W, from ``generator``, on its device) is both the start, x = σ_max·z,
    and the noise of the observation: before every network evaluation the observed pixels of the state are set to
    y + σ_t·z. With one z for the whole trajectory they lie on the probability-flow path of a point mass at y
    (x = y + σ·z solves dx/dσ = (x − y)/σ), which is what a deterministic sampler's observed pixels should follow;
    a fresh z per step would jump between paths. The returned image is the last prediction, its observed pixels
    set to y exactly; y's hidden pixels are never read (``torch.where``, no product), so a NaN there stays out.

    Note: a masked network under Ã = A never sees the hidden pixels of the state, so its predictions depend on the
    observed pixels y + σ_t·z only, and the result is D(y + σ_min·z; σ_min, A) on the hidden pixels: the posterior
    mean at σ_min (:func:`posterior_mean`), not a sample; the trajectory matters for a denoiser that reads the
    whole state (an ordinary network: then this is replacement-based inpainting)."""
    m = _mask(mask, y).to(torch.float64)
    seen = m.bool()
    y0 = torch.where(seen, y.to(torch.float64), torch.zeros((), dtype=torch.float64, device=y.device))
    gen_device = generator.device if generator is not None else y.device
    z = torch.randn(y.shape, generator=generator, device=gen_device, dtype=torch.float64).to(y.device)

    def keep(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.where(seen, y0 + sigma * z, x)

    out = _solve(denoise, z, m, steps, sigma_min, sigma_max, rho, None, 0.0, clip, keep)
    return torch.where(seen, y0, out).to(y.dtype)


# ------------------------------------------------------------------------------------------ the registry's side


def takes_masks(net, cfg: SamplerConfig):
    """The samplers' ``prepare``: refuses a network that takes no mask, or one whose mask density is unknown."""
    if not (getattr(net, "mask_input", False) or getattr(getattr(net, "config", None), "mask_input", False)):
        raise ConfigError(
            f"config key 'sampler.name': sampler {cfg.name!r} is for a network trained on masked data (Ambient "
            "Diffusion; model.mask_input); this model takes no mask: sample it with 'heun'"
        )
    density(net, cfg)
    return net


def density(net, cfg: SamplerConfig) -> float:
    """The density of the masks: ``sampler.mask_density``, else the model's ``meta["masked"]["density"]``."""
    if cfg.mask_density is not None:
        return float(cfg.mask_density)
    found = ((getattr(net, "meta", None) or {}).get("masked") or {}).get("density")
    if found is None:
        raise ConfigError(
            "config key 'sampler.mask_density': the model's model.json records no mask density "
            "(meta.masked.density); set sampler.mask_density"
        )
    return float(found)


def _denoiser(net, batch: Batch) -> Denoise:
    """D(x; σ, Ã) of the batch: the network under the mask, on the batch's labels (or captions, unguided)."""
    cond = batch.captions if batch.captions is not None else (batch.class_labels,)
    return lambda x, sigma, mask: net(x, sigma, *cond, mask=mask)


def _clips(net) -> bool:
    """The x0 prediction is clipped to [-1, 1] for a pixel-space model (not for one of normalised latents)."""
    return not (getattr(net, "meta", None) or {}).get("latents")


def _draw(net, batch: Batch, cfg: SamplerConfig, k: int) -> torch.Tensor:
    """k masks per image (k, N, 1, H, W), from the batch's generator after its latents, on the latents' device."""
    n, _, h, w = batch.latents.shape
    p = density(net, cfg)
    return torch.stack([draw_masks(n, (h, w), p, batch.generator) for _ in range(k)]).to(batch.latents.device)


def fixed_mask(net, batch: Batch, cfg: SamplerConfig) -> torch.Tensor:
    """The ``fixed-mask`` sampler: one mask per image at the model's density, Heun (Eq. 3.3)."""
    (m,) = _draw(net, batch, cfg, 1)
    return masked_heun(
        _denoiser(net, batch), batch.latents, m, steps=cfg.steps, sigma_max=cfg.sigma_max, clip=_clips(net)
    )


def reconstruction_guidance(net, batch: Batch, cfg: SamplerConfig) -> torch.Tensor:
    """The ``reconstruction-guidance`` sampler: ``cfg.guidance_masks`` masks per image (the first drawn as the
    fixed-mask sampler draws its one), weight ``cfg.guidance_weight`` (Eq. 3.4)."""
    m = _draw(net, batch, cfg, cfg.guidance_masks)
    return masked_heun(
        _denoiser(net, batch),
        batch.latents,
        m[0],
        steps=cfg.steps,
        sigma_max=cfg.sigma_max,
        guidance_masks=m[1:],
        weight=cfg.guidance_weight,
        clip=_clips(net),
    )
