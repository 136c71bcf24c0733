"""The EDM sampler (Karras et al. 2022, Algorithms 1 and 2) and helpers to turn samples into images.

Pure torch (no Ray). ``denoiser(x, sigma, class_labels)`` is any callable returning D(x; σ) ≈ E[x_0 | x]
with ``sigma`` of shape (B,), e.g. :class:`ambient_ray.models.ddpmpp.EDMDenoiser`.

Precision: the sampler keeps its state x_i, the time steps and the ODE derivative in float64 (as the
EDM reference implementation does): the update x + (t_{i+1} − t_i)·d adds small steps to values of
size σ_max = 80, where float32 would lose about 1e-5 relative per step. The denoiser is called with
float64 tensors and must cast to its own dtype (EDMDenoiser does); the result is returned in the
latents' dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def edm_time_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """t_0 = σ_max > ... > t_{N-1} = σ_min, then t_N = 0 (EDM Eq. 5): N + 1 float64 values.

    t_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i < N.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1 (got {num_steps})")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max (got {sigma_min}, {sigma_max})")
    i = torch.arange(num_steps, dtype=torch.float64)
    frac = i / (num_steps - 1) if num_steps > 1 else i
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sample(
    denoiser,
    latents: torch.Tensor,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    class_labels: torch.Tensor | None = None,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = math.inf,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Solve the probability-flow ODE from σ_max to 0 with Heun's 2nd-order method (EDM Algorithm 2).

    ``latents`` are standard normal; x_0 = latents·t_0. For each step i (N = ``num_steps``):

    - γ_i = min(S_churn/N, √2 − 1) if S_min ≤ t_i ≤ S_max else 0;  t̂ = (1 + γ_i)·t_i
    - x̂ = x_i + sqrt(t̂² − t_i²)·ε,  ε ~ N(0, S_noise²)                       (add noise: "churn")
    - d = (x̂ − D(x̂; t̂))/t̂;  x_{i+1} = x̂ + (t_{i+1} − t̂)·d                  (Euler step)
    - if t_{i+1} ≠ 0: d' = (x_{i+1} − D(x_{i+1}; t_{i+1}))/t_{i+1};
      x_{i+1} = x̂ + (t_{i+1} − t̂)·(d + d')/2                                (2nd-order correction)

    With ``s_churn = 0`` this is the deterministic Algorithm 1 (2N − 1 denoiser calls) and
    ``generator`` is unused. EDM's stochastic settings are e.g. S_churn=40, S_min=0.05, S_max=50,
    S_noise=1.003. The noise ε is drawn on the generator's device and moved to the latents'.
    """
    if s_churn < 0 or s_noise < 0:
        raise ValueError("s_churn and s_noise must be >= 0")
    device, out_dtype = latents.device, latents.dtype
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho).to(device)
    b = latents.shape[0]
    gamma_max = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)

    def d_of(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoiser(x, t.expand(b), class_labels).to(torch.float64)

    x = latents.to(torch.float64) * t_steps[0]
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        gamma = gamma_max if s_churn > 0 and s_min <= float(t_cur) <= s_max else 0.0
        t_hat = t_cur * (1.0 + gamma)
        if gamma > 0:
            eps = torch.randn(
                x.shape,
                generator=generator,
                dtype=torch.float64,
                device=generator.device if generator is not None else device,
            ).to(device)
            x_hat = x + (t_hat**2 - t_cur**2).sqrt() * s_noise * eps
        else:
            x_hat = x
        d = (x_hat - d_of(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if i < num_steps - 1:  # t_next > 0
            d_prime = (x - d_of(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
    return x.to(out_dtype)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C) numpy: round((x + 1)·127.5), clipped to [0, 255].

    The exact inverse of the training map y = pixel/127.5 − 1.
    """
    if x.ndim != 4:
        raise ValueError(f"to_uint8 expects (B, C, H, W), got shape {tuple(x.shape)}")
    y = ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).cpu().numpy()


class Guided:
    """EDM2's guidance by a weaker model ("autoguidance"; Karras et al. 2024 and its follow-up, "Guiding a
    Diffusion Model with a Bad Version of Itself"): D(x; σ, c) = D_guide + w·(D_main − D_guide), i.e.
    ``lerp(D_guide, D_main, w)``. The guide is a smaller or shorter-trained model of the same data and
    interface; w = 1 is the main model alone, w > 1 extrapolates away from the guide's errors.

    A denoiser for the samplers; ``config`` and ``meta`` are the main model's (resolution, channels, labels,
    latent decoding)."""

    def __init__(self, main, guide, weight: float):
        self.main, self.guide, self.weight = main, guide, float(weight)
        self.config, self.meta = main.config, getattr(main, "meta", None)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None):
        d = self.main(x, sigma, class_labels)
        if self.weight == 1.0:
            return d
        return self.guide(x, sigma, class_labels).lerp(d, self.weight)


class ClassifierFree:
    """Classifier-free guidance (Ho & Salimans 2022) of a network of captions: D = D(x; σ, ∅) + w·(D(x; σ, c) −
    D(x; σ, ∅)), i.e. ``lerp(D_null, D_cond, w)``, the null caption ∅ being zero embeddings with no valid token
    (what caption dropout trains). Both halves run as one batch of 2B. ``captions`` (B, T, D) and ``mask``
    (B, T) belong to the B images of the batch being sampled; w = 1 is the conditional model alone, w = 0 the
    unconditional one.

    A denoiser for the samplers (``class_labels`` is ignored); ``config`` and ``meta`` are the network's."""

    def __init__(self, net, captions: torch.Tensor, mask: torch.Tensor, weight: float):
        self.net, self.weight = net, float(weight)
        self.captions, self.mask = captions, mask
        self.config, self.meta = net.config, getattr(net, "meta", None)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None):
        c, m = self.captions.to(x.device), self.mask.to(x.device)
        if self.weight == 1.0:
            return self.net(x, sigma, c, m)
        both = self.net(
            torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([c, torch.zeros_like(c)]), torch.cat([m, 0 * m])
        )
        d_cond, d_null = both.chunk(2)
        return d_null.lerp(d_cond, self.weight)
