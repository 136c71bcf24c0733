"""The ambient math in pure torch (no Ray): the ambient loss, the buffer, and
the σ-first sampler that pairs each training noise level with a sample that may train it.

Conventions: variance-exploding EDM, x_σ = x_0 + σ·z, data in [-1, 1], σ_data = 0.5 by default.
A sample annotated with σ_n (``sigma_min``) is only ever seen as x_{σ_n} = y + σ_n·z; σ_n = 0 means
a clean sample. A crops-annotated sample (``sigma_max`` > 0) may also train σ ≤ sigma_max through a
random crop of size crop(σ).

Papers: Karras et al. 2022 (EDM), Table 1 (:mod:`ambient_ray.diffusion.edm`); Ambient Diffusion Omni (Daras et
al. 2025), Sec. 3.1 and App. D (Eq. D.1, D.2) for the ambient loss, weight and buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ambient_ray.diffusion.edm import bcast, edm_weight, lognormal_sigma

# ------------------------------------------------------------------------------ EDM


# ------------------------------------------------------------------------------ ambient


def ambient_weight(sigma: torch.Tensor, sigma_n: torch.Tensor) -> torch.Tensor:
    """λ_amb(σ, σ_n) = σ⁴ / (σ² − σ_n²)² (Ambient-o Eq. D.1); 1 where σ_n = 0."""
    return sigma**4 / (sigma**2 - sigma_n**2) ** 2


def buffer_sigma(sigma_n: torch.Tensor | float, lambda_max: float) -> torch.Tensor:
    """The smallest usable σ for a sample annotated σ_n: sqrt(1 + 1/(λ_max − 1))·σ_n (Ambient-o Eq. D.2).

    Above it 1/α = σ²/(σ² − σ_n²) ≤ λ_max. Note: the paper says this keeps λ_amb ≤ λ_max, but with
    λ_amb = σ⁴/(σ² − σ_n²)² (Eq. D.1) the bound that Eq. D.2 and its examples (λ_max = 2 -> σ > √2·σ_n,
    λ_max = 4 -> σ > (2/√3)·σ_n) give is λ_amb ≤ λ_max². We implement Eq. D.2 as written, so λ_max
    means what the paper's ablation (best: 4) meant. ``lambda_max = inf`` gives σ_n itself (no buffer).
    """
    if not lambda_max > 1.0:
        raise ValueError(f"lambda_max must be > 1 (got {lambda_max}): λ_amb ≥ 1 everywhere")
    factor = 1.0 if math.isinf(lambda_max) else math.sqrt(1.0 + 1.0 / (lambda_max - 1.0))
    return torch.as_tensor(sigma_n, dtype=torch.float32) * factor


def ambient_x0_to_xn(
    x0_pred: torch.Tensor, x_sigma: torch.Tensor, sigma: torch.Tensor, sigma_n: torch.Tensor
) -> torch.Tensor:
    """Map an x_0 prediction to a prediction of x_{σ_n} (Ambient-o Sec. 3.1).

    With x_σ = x_{σ_n} + sqrt(σ² − σ_n²)·z', Tweedie gives
    E[x_{σ_n} | x_σ] = α·E[x_0 | x_σ] + (1 − α)·x_σ with α = (σ² − σ_n²)/σ².
    """
    alpha = bcast((sigma**2 - sigma_n**2) / sigma**2, x_sigma)
    return alpha * x0_pred + (1.0 - alpha) * x_sigma


def ambient_loss(
    x0_pred: torch.Tensor,
    x_sigma: torch.Tensor,
    x_sigma_n: torch.Tensor,
    sigma: torch.Tensor,
    sigma_n: torch.Tensor,
    sigma_data: float = 0.5,
    extra_weight: bool = True,
) -> torch.Tensor:
    """Per-element ambient loss: λ(σ)·λ_amb(σ, σ_n)·‖α·D + (1 − α)·x_σ − x_{σ_n}‖².

    ``sigma`` and ``sigma_n`` are (B,) and must satisfy σ > σ_n (use :func:`buffer_sigma`). With
    σ_n = 0 this is exactly :func:`edm_loss` with x_{σ_n} = x_0. ``extra_weight`` False drops λ_amb: DSD's
    Phase-I loss λ(σ)·‖α·D + (1 − α)·x_σ − y‖² (seed 004, Sec. 3.1), which has the same minimiser.
    """
    sigma = torch.as_tensor(sigma, dtype=x_sigma.dtype, device=x_sigma.device)
    sigma_n = torch.as_tensor(sigma_n, dtype=x_sigma.dtype, device=x_sigma.device)
    pred_n = ambient_x0_to_xn(x0_pred, x_sigma, sigma, sigma_n)
    w = edm_weight(sigma, sigma_data) * (ambient_weight(sigma, sigma_n) if extra_weight else 1.0)
    return bcast(w, x_sigma) * (pred_n - x_sigma_n) ** 2


# ------------------------------------------------------------------------------ σ sampler


@dataclass
class CropTable:
    """crop(σ): the crop size that suffices to denoise at σ, as a step function of σ.

    ``sigmas`` ascending; ``sizes[i]`` holds for σ ≤ sigmas[i] (the last size beyond). Made by the
    annotation stage from a trained denoiser's locality map (Ambient-o Figs. 11-14).
    """

    sigmas: list[float]
    sizes: list[int]

    def __post_init__(self):
        if len(self.sigmas) != len(self.sizes) or not self.sigmas:
            raise ValueError("crop table: sigmas and sizes must be non-empty and of equal length")
        if any(b <= a for a, b in zip(self.sigmas, self.sigmas[1:])):
            raise ValueError("crop table: sigmas must increase")

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        idx = torch.searchsorted(torch.tensor(self.sigmas, dtype=sigma.dtype), sigma.contiguous(), right=False)
        idx = idx.clamp(max=len(self.sizes) - 1)
        return torch.tensor(self.sizes, dtype=torch.long)[idx]


@dataclass
class Coverage:
    """Per σ-bucket counts (the "donut" of Ambient-o Fig. 10): draws, and how many samples could train there."""

    edges: torch.Tensor  # (K+1,) bucket edges in σ
    draws: torch.Tensor = field(default=None)  # (K,) σ's drawn into each bucket
    full_draws: torch.Tensor = field(default=None)  # (K,) of them paired with a whole sample
    crop_draws: torch.Tensor = field(default=None)  # (K,) of them paired with a crop
    redraws: int = 0  # σ's that had no eligible sample and were redrawn

    def __post_init__(self):
        k = len(self.edges) - 1
        for name in ("draws", "full_draws", "crop_draws"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(k, dtype=torch.long))

    def bucket(self, sigma: torch.Tensor) -> torch.Tensor:
        return (torch.bucketize(sigma, self.edges[1:-1], right=False)).clamp(0, len(self.edges) - 2)

    def count(self, sigma: torch.Tensor, crop_size: torch.Tensor) -> None:
        """Count drawn σ's into their buckets (whole or through a crop: ``crop_size`` > 0)."""
        b = self.bucket(sigma)
        m = len(self.draws)
        self.draws += torch.bincount(b, minlength=m)
        self.full_draws += torch.bincount(b[crop_size == 0], minlength=m)
        self.crop_draws += torch.bincount(b[crop_size > 0], minlength=m)

    def donut(self, full_count, crop_count) -> list[dict]:
        """Per bucket: its σ range, samples eligible whole / through crops at its lower edge (by the sampler's
        ``full_count`` / ``crop_count``), draws so far."""
        e = self.edges
        lo = e[:-1].clamp(min=1e-6)
        full, crops = full_count(lo), crop_count(lo)
        return [
            {
                "sigma_lo": float(e[i]),
                "sigma_hi": float(e[i + 1]),
                "eligible_full": int(full[i]),
                "eligible_crops": int(crops[i]),
                "draws": int(self.draws[i]),
                "full_draws": int(self.full_draws[i]),
                "crop_draws": int(self.crop_draws[i]),
            }
            for i in range(len(e) - 1)
        ]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The counters, as tensors (safetensors-friendly)."""
        return {
            "draws": self.draws.clone(),
            "full_draws": self.full_draws.clone(),
            "crop_draws": self.crop_draws.clone(),
            "redraws": torch.tensor(self.redraws),
        }

    def load_state_dict(self, state: dict) -> None:
        self.draws, self.full_draws, self.crop_draws = (
            state["draws"].clone(),
            state["full_draws"].clone(),
            state["crop_draws"].clone(),
        )
        self.redraws = int(state["redraws"])


class SigmaSampler:
    """Draw σ first, then pair it with a sample that is eligible at σ (Ambient-o's J_ambient-o).

    A sample i is eligible at σ if σ > buffer(σ_min_i) (it trains as a whole), or, if it has a crops
    annotation, σ ≤ σ_max_i (it trains through a crop of size crop(σ)). Among the eligible samples one
    is picked uniformly, so low noise levels are trained by clean samples (and crops) and high levels
    by everything. Where no sample is eligible at a drawn σ, that σ is redrawn from the log-normal
    restricted to the eligible range, and :attr:`coverage` counts it.
    """

    def __init__(
        self,
        sigma_min: torch.Tensor,
        sigma_max: torch.Tensor | None = None,
        *,
        lambda_max: float = 4.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        crop: CropTable | None = None,
        bucket_edges: list[float] | None = None,
    ):
        sigma_min = torch.as_tensor(sigma_min, dtype=torch.float32).flatten()
        if sigma_min.numel() == 0:
            raise ValueError("SigmaSampler: no samples")
        if not torch.isfinite(sigma_min).all() or (sigma_min < 0).any():
            bad = int((~torch.isfinite(sigma_min) | (sigma_min < 0)).nonzero()[0])
            raise ValueError(f"sigma_min must be finite and >= 0 (sample {bad} has {float(sigma_min[bad])})")
        n = sigma_min.numel()
        sigma_max = torch.zeros(n) if sigma_max is None else torch.as_tensor(sigma_max, dtype=torch.float32).flatten()
        if sigma_max.numel() != n or not torch.isfinite(sigma_max).all() or (sigma_max < 0).any():
            raise ValueError("sigma_max must be finite, >= 0 and one per sample")
        if (sigma_max > 0).any() and crop is None:
            raise ValueError("samples have sigma_max > 0 (crops annotation) but no crop table was given")
        self.n = n
        self.lambda_max = lambda_max
        self.p_mean, self.p_std = p_mean, p_std
        self.crop = crop
        self.threshold = buffer_sigma(sigma_min, lambda_max)  # full use needs σ > threshold
        self.sigma_max = sigma_max
        # sorted views: eligible sets are prefixes, so counts and uniform picks are searchsorted + index
        self._full_order = torch.argsort(self.threshold)
        self._full_sorted = self.threshold[self._full_order]
        self._crop_order = torch.argsort(-sigma_max)
        self._crop_sorted = -sigma_max[self._crop_order]  # ascending
        self._n_crop = int((sigma_max > 0).sum())
        edges = bucket_edges or [0.002, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 80.0]
        self.coverage = Coverage(torch.tensor(edges, dtype=torch.float32))

    # eligibility counts at given σ's
    def full_count(self, sigma: torch.Tensor) -> torch.Tensor:
        """How many samples may train σ as a whole (threshold < σ)."""
        return torch.searchsorted(self._full_sorted, sigma.contiguous(), right=False)

    def crop_count(self, sigma: torch.Tensor) -> torch.Tensor:
        """How many samples may train σ through a crop (0 < σ ≤ sigma_max)."""
        if self._n_crop == 0:
            return torch.zeros_like(sigma, dtype=torch.long)
        return torch.searchsorted(self._crop_sorted, -sigma.contiguous(), right=True).clamp(max=self._n_crop)

    def eligible(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.full_count(sigma) + self.crop_count(sigma)

    def _eligible_range_draw(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """σ from the log-normal restricted to where some sample is eligible (by rejection, then by clamping)."""
        lo = float(self._full_sorted[0])  # any σ above the smallest threshold has a whole sample
        hi = float(-self._crop_sorted[0]) if self._n_crop else 0.0  # any σ in (0, hi] has a crop
        out = torch.empty(0)
        for _ in range(50):
            s = lognormal_sigma(4 * n + 16, self.p_mean, self.p_std, generator)
            s = s[(s > lo) | (s <= hi)]
            out = torch.cat([out, s])
            if len(out) >= n:
                return out[:n]
        # the eligible range has almost no log-normal mass: draw log-uniformly just above the threshold
        u = torch.rand(n - len(out), generator=generator)
        return torch.cat([out, lo * (1.0 + 1e-6) * torch.exp(u * math.log(4.0))])

    def sample(
        self, batch: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``batch`` (σ, sample index, crop size) triples; crop size 0 means the whole sample."""
        sigma = lognormal_sigma(batch, self.p_mean, self.p_std, generator)
        none = self.eligible(sigma) == 0
        if none.any():
            k = int(none.sum())
            sigma[none] = self._eligible_range_draw(k, generator)
            self.coverage.redraws += k
        nf, nc = self.full_count(sigma), self.crop_count(sigma)
        # uniform over the union: a draw landing on a crop-eligible sample that is also fully eligible
        # is redrawn (rejection keeps the pick uniform over distinct samples)
        idx = torch.empty(batch, dtype=torch.long)
        crop_size = torch.zeros(batch, dtype=torch.long)
        todo = torch.ones(batch, dtype=torch.bool)
        while todo.any():
            u = torch.rand(int(todo.sum()), generator=generator)
            tot = (nf + nc)[todo]
            pick = (u * tot).long().clamp(max=tot - 1)
            in_full = pick < nf[todo]
            cand = torch.where(
                in_full,
                self._full_order[pick.clamp(max=self.n - 1)],
                self._crop_order[(pick - nf[todo]).clamp(min=0, max=max(self._n_crop - 1, 0))]
                if self._n_crop
                else self._full_order[0],
            )
            # reject crop picks of samples that are fully eligible at this σ (already counted in the full set)
            dup = ~in_full & (self.threshold[cand] < sigma[todo])
            rows = todo.nonzero().flatten()
            ok = rows[~dup]
            idx[ok] = cand[~dup]
            crop_mask = ~in_full[~dup]
            if crop_mask.any() and self.crop is not None:
                crop_size[ok[crop_mask]] = self.crop(sigma[ok[crop_mask]])
            todo[ok] = False
        self.coverage.count(sigma, crop_size)
        return sigma, idx, crop_size

    def donut(self) -> list[dict]:
        """Per bucket: its σ range, samples eligible whole / through crops at its lower edge, draws so far."""
        return self.coverage.donut(self.full_count, self.crop_count)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The coverage counters, as tensors (safetensors-friendly)."""
        return self.coverage.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.coverage.load_state_dict(state)


def random_crop_mask(
    shape: tuple[int, int, int, int], crop_size: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, 1, H, W) masks: 1 inside one random ``crop_size`` square per sample (all ones where size is 0).

    Crop-trained samples are masked in the loss rather than cut out: shapes stay equal across the
    batch, and at σ ≤ σ_max the denoiser needs only crop(σ) of context by the definition of crop(σ),
    so the pixels inside the crop are graded on what a crop of the sample could teach.
    """
    b, _, h, w = shape
    mask = torch.ones(b, 1, h, w)
    for i in (crop_size > 0).nonzero().flatten().tolist():
        s = int(min(crop_size[i], h, w))
        top = int(torch.randint(0, h - s + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - s + 1, (1,), generator=generator))
        mask[i] = 0.0
        mask[i, :, top : top + s, left : left + s] = 1.0
    return mask


# ------------------------------------------------------------------------------ one training batch


@dataclass
class Batch:
    """One micro-batch of the ambient objective, built by :func:`ambient_batch`."""

    x_sigma: torch.Tensor  # (B, C, H, W) the network input x_σ
    x_sigma_n: torch.Tensor  # (B, C, H, W) the sample as observed, x_{σ_n} = y + σ_n·z
    sigma: torch.Tensor  # (B,) training noise level
    sigma_n: torch.Tensor  # (B,) the sample's annotation used here (0 for crops below σ_max)
    mask: torch.Tensor  # (B, 1, H, W) pixels that count in the loss (a crop, or all)
    index: torch.Tensor  # (B,) rows of the dataset
    crop_size: torch.Tensor  # (B,) the crop each row trains through (0: the whole row)


@dataclass
class Latents:
    """Rows stored as a latent distribution (EDM2's convention): ``mean_std`` (N, 2c, h, w) holds each
    row's latent mean, then its std; every use draws a fresh latent z = mean + std·ε and normalises it
    per channel, x_0 = (z − shift)·scale (the precompute stage measured shift and scale so that each
    channel has the configured std). ``pixels`` data has std 0, shift 0 and scale 1: x_0 is the image."""

    mean_std: torch.Tensor
    shift: torch.Tensor  # (c,)
    scale: torch.Tensor  # (c,)

    def __len__(self) -> int:
        return len(self.mean_std)

    def clean(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.draw(self.mean_std[idx], generator)

    def draw(self, mean_std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_0 of rows given as (B, 2c, h, w) mean and std."""
        c = mean_std.shape[1] // 2
        rows = mean_std.float()
        mean, std = rows[:, :c], rows[:, c:]
        z = mean + std * torch.randn(mean.shape, generator=generator) if bool((std > 0).any()) else mean
        return (z - self.shift.view(1, -1, 1, 1)) * self.scale.view(1, -1, 1, 1)

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        """The latent z of a normalised x (before decoding it with the VAE)."""
        return x / self.scale.view(1, -1, 1, 1).to(x) + self.shift.view(1, -1, 1, 1).to(x)


def clean_rows(rows: torch.Tensor | Latents, idx: torch.Tensor, generator: torch.Generator | None = None):
    """The rows ``idx`` in the data scale: uint8 images (N, C, H, W) mapped to [-1, 1], float rows (the ``noisy``
    column: already in that scale) as they are, or a fresh draw of :class:`Latents`."""
    if isinstance(rows, Latents):
        return rows.clean(idx, generator)
    return rows[idx].float() if rows.dtype.is_floating_point else rows[idx].float() / 127.5 - 1.0


def ambient_batch(
    sampler: SigmaSampler,
    images: torch.Tensor | Latents,
    sigma_min: torch.Tensor,
    batch: int,
    generator: torch.Generator | None = None,
    observed_noisy: bool = False,
) -> Batch:
    """Draw σ first and pair it with eligible rows (:meth:`SigmaSampler.sample`), then noise them.

    ``images`` are uint8 (N, C, H, W), mapped to [-1, 1], or :class:`Latents` (a fresh latent per use).
    A row annotated σ_n is first noised to x_{σ_n} = y + σ_n·z (all the model may see of it), then to
    x_σ = x_{σ_n} + sqrt(σ² − σ_n²)·z' (Ambient-o Sec. 3.1). Rows drawn through a crop (σ ≤ σ_max) count
    as clean inside the crop. ``observed_noisy``: the rows are observed with their σ_n noise already in them
    (DSD's y = x + σ_n·z, seed 004): y is x_{σ_n} itself.
    """
    sigma, idx, crop_size = sampler.sample(batch, generator)
    y = clean_rows(images, idx, generator)
    return noise_batch(sigma, y, sigma_min[idx], crop_size, idx, generator, observed_noisy)


def noise_batch(
    sigma: torch.Tensor,
    y: torch.Tensor,
    sigma_min: torch.Tensor,
    crop_size: torch.Tensor,
    index: torch.Tensor,
    generator: torch.Generator | None = None,
    observed_noisy: bool = False,
) -> Batch:
    """The ambient batch of rows ``y`` (x_0 in [-1, 1] or normalised latents) paired with ``sigma``: each row
    noised to its own σ_n (0 inside a crop), then to σ (Ambient-o Sec. 3.1), and its crop mask. With
    ``observed_noisy`` the rows already hold their σ_n noise (y = x_{σ_n}; no crops then)."""
    if observed_noisy:
        if bool((crop_size > 0).any()):
            raise ValueError("rows observed with their noise train whole (no crops annotation)")
        sn, x_n = sigma_min, y
    else:
        sn = torch.where(crop_size > 0, torch.zeros_like(sigma), sigma_min)
        x_n = y + bcast(sn, y) * torch.randn(y.shape, generator=generator)
    x_s = x_n + bcast((sigma**2 - sn**2).clamp(min=0).sqrt(), y) * torch.randn(y.shape, generator=generator)
    return Batch(x_s, x_n, sigma, sn, random_crop_mask(tuple(y.shape), crop_size, generator), index, crop_size)


def batch_loss(
    x0_pred: torch.Tensor,
    b: Batch,
    sigma_data: float = 0.5,
    observed: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
    extra_weight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's ambient loss: its mean, and the per-sample losses (mean over each mask's pixels).

    ``observed`` (B, 1, H, W), a row's observed pixels A (Ambient Diffusion, seed 003 Eq. 3.2): only they are
    graded, and the sum is still divided by the crop's (or image's) C·H·W, not by A's size, as the reference sums
    over pixels (see :mod:`ambient_ray.diffusion.masked`). A fully observed row's loss is unchanged by it.
    ``seen`` (B, 1, H, W), the pixels the network saw (Ã): a graded pixel it did not see was predicted as σ_data·F
    (:meth:`ambient_ray.models.precond.EDMPrecond.precondition`), so its EDM weight is 1/c_out² = 1/σ_data² in
    place of λ(σ) (times the ambient weight on an annotated row). A weight that depends on (σ, Ã) alone leaves the
    minimiser, E[x0 | Ã x_σ, Ã] per pixel, where it was. ``extra_weight`` False: without the ambient weight
    λ_amb (DSD's Phase-I loss, :func:`ambient_loss`)."""
    dev = x0_pred.device
    x_s, x_n = b.x_sigma.to(dev), b.x_sigma_n.to(dev)
    if observed is not None:  # where, not a product: an inf or NaN at a hidden pixel reaches neither loss nor grad
        graded_px = observed.to(dev).bool()
        x_s = torch.where(graded_px, x_s, torch.zeros_like(x_s))
        x_n = torch.where(graded_px, x_n, torch.zeros_like(x_n))
    per = ambient_loss(x0_pred, x_s, x_n, b.sigma.to(dev), b.sigma_n.to(dev), sigma_data, extra_weight)
    if seen is not None:  # unseen pixels: 1/σ_data² in place of EDM's λ(σ)
        rescale = bcast(1.0 / (sigma_data**2 * edm_weight(b.sigma.to(dev), sigma_data)), per)
        per = torch.where(seen.to(dev).bool(), per, per * rescale)
    m = b.mask.to(dev)
    graded = per * m
    if observed is not None:
        graded = torch.where(graded_px, graded, torch.zeros_like(graded))
    per_sample = graded.sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)).clamp(min=1) * per.shape[1])
    return per_sample.mean(), per_sample
