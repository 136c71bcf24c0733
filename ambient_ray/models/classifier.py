"""The annotation classifiers of Ambient-o, in pure torch (no Ray): a "half U-Net" and how it is fed.

Ambient Diffusion Omni (Daras et al. 2025) App. F.4: the classifiers use the diffusion model's own
recipe with an encoder-only "Half-UNet", the U-Net with its decoder removed. Here that is
:func:`ambient_ray.models.ddpmpp.build_encoder` (input conv, residual blocks, downsampling, bottleneck) then
GroupNorm, SiLU, global average pooling and a linear layer to one logit: the log-odds that the input
is "good" (S_G).

Two kinds:

- ``noise`` — c_noise(x_σ, σ) of Eq. 3.1: conditioned on σ exactly as the denoiser is (EDM's c_in
  scales the input, c_noise = ln(σ)/4 feeds the embedding). Trained with binary cross-entropy on
  x_σ = y + σ·z, noised clean (label 1) versus noised corrupted (label 0) samples, σ log-uniform over
  the annotation range. Its curves give σ_min (Eq. 3.2).
- ``crops`` — c_crops of Sec. 3.2: a crop of a sample, target data (label 1) versus other data
  (label 0), at several crop sizes (the network is convolutional and pools globally, so one network
  takes every size). It sees crops as observed, without added noise: with noise, a large σ fools any
  classifier and the supremum of Eq. 3.4 would always be the top of the grid; the crop size crop(σ)
  is what carries σ. Its curves give σ_max (Eq. 3.4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ambient_ray.models.ddpmpp import Mlp, build_encoder, noise_embedding
from ambient_ray.models.ddpmpp_config import ClassifierConfig, Kind, UNetConfig  # noqa: F401 (re-exported)
from ambient_ray.models.precond import edm_precond


class HalfUNet(nn.Module):
    """logit = head(pool(encoder(c_in·x, c_noise))) for the ``noise`` kind; no σ input for ``crops``."""

    def __init__(self, cfg: ClassifierConfig, kind: Kind = "noise", sigma_data: float = 0.5):
        super().__init__()
        self.config, self.kind, self.sigma_data = cfg, kind, float(sigma_data)
        mc = cfg.model_channels
        emb_dim = 4 * mc
        self.emb_channels = 2 * (mc // 2)
        self.map_noise = Mlp(self.emb_channels, emb_dim, emb_dim, act_layer=nn.SiLU)
        self.conv_in, self.enc, self.mid, _, c = build_encoder(cfg, emb_dim)
        self.norm_out = nn.GroupNorm(cfg.groups, c)
        self.head = nn.Linear(c, 1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float | None = None) -> torch.Tensor:
        """(B,) logits. ``x`` in [-1, 1] (plus noise of level ``sigma`` for the ``noise`` kind)."""
        dtype = self.conv_in.weight.dtype
        x = x.float()
        if self.kind == "noise":
            if sigma is None:
                raise ValueError("the noise classifier needs sigma")
            sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
            _, _, c_in, c_noise = edm_precond(sigma, self.sigma_data)
            x = c_in.view(-1, 1, 1, 1) * x
        else:  # crops: as observed, and a constant embedding input
            c_noise = torch.zeros(x.shape[0], device=x.device)
        emb = F.silu(self.map_noise(noise_embedding(c_noise, self.emb_channels).to(dtype)))
        h = self.conv_in(x.to(dtype))
        for m in self.enc:
            h = m(h, emb)
        for m in self.mid:
            h = m(h, emb)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h).squeeze(1).float()


def build_classifier(cfg: ClassifierConfig, kind: Kind, sigma_data: float = 0.5) -> HalfUNet:
    return HalfUNet(cfg, kind, sigma_data)


# ------------------------------------------------------------------------------ training batches


def loguniform_sigma(n: int, lo: float, hi: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """σ log-uniform on [lo, hi]: every octave of the annotation grid trained alike."""
    return torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(n, generator=generator))


def draw_rows(labels: torch.Tensor, n: int, balanced: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Row indices for one batch: half good (label 1) and half bad (label 0) when ``balanced`` (the
    paper's default, App. E: 5.34 vs 6.04 FID unbalanced), else uniform over all rows."""
    if not balanced:
        return torch.randint(0, len(labels), (n,), generator=generator)
    good, bad = (labels == 1).nonzero().flatten(), (labels == 0).nonzero().flatten()
    k = n // 2
    pick_g = good[torch.randint(0, len(good), (n - k,), generator=generator)]
    pick_b = bad[torch.randint(0, len(bad), (k,), generator=generator)]
    return torch.cat([pick_g, pick_b])


def random_crops(y: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random ``size`` x ``size`` crop of each image of (B, C, H, W)."""
    b, _, h, w = y.shape
    size = min(int(size), h, w)
    top = torch.randint(0, h - size + 1, (b, 1), generator=generator) + torch.arange(size)
    left = torch.randint(0, w - size + 1, (b, 1), generator=generator) + torch.arange(size)
    # advanced indices around a slice: the result is (B, size, size, C)
    return y[torch.arange(b).view(b, 1, 1), :, top.view(b, size, 1), left.view(b, 1, size)].permute(0, 3, 1, 2)


def classifier_batch(
    kind: Kind,
    images: torch.Tensor,
    labels: torch.Tensor,
    n: int,
    *,
    balanced: bool,
    sigma_lo: float,
    sigma_hi: float,
    crop_sizes: list[int],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One training batch (inputs, σ or None, targets) for the BCE of Eq. 3.1 (noise) or of the crops classifier.

    ``images`` uint8 (N, C, H, W); ``labels`` 1 good / 0 bad. Noise: x_σ = y + σ·z with σ log-uniform
    on [sigma_lo, sigma_hi]. Crops: one crop size for the batch, drawn from ``crop_sizes``.
    """
    idx = draw_rows(labels, n, balanced, generator)
    y = images[idx].float() / 127.5 - 1.0
    target = labels[idx].float()
    if kind == "noise":
        sigma = loguniform_sigma(n, sigma_lo, sigma_hi, generator)
        return y + sigma.view(-1, 1, 1, 1) * torch.randn(y.shape, generator=generator), sigma, target
    size = crop_sizes[int(torch.randint(0, len(crop_sizes), (1,), generator=generator))]
    return random_crops(y, size, generator), None, target


# ------------------------------------------------------------------------------ annotation curves


def _row_noise(
    shape: tuple, seeds: list[int] | torch.Generator | None, rows: range, device: torch.device
) -> torch.Tensor:
    """Noise of ``shape`` per row, on ``device``: from each row's own seed (the same whatever the
    batch; drawn by the device's own generator, so CPU and GPU streams differ), or one CPU generator."""
    if isinstance(seeds, list):
        gens = [torch.Generator(device=device).manual_seed(seeds[i]) for i in rows]
        return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
    return torch.randn((len(rows), *shape), generator=seeds).to(device)


@torch.no_grad()
def noise_curves(
    net: HalfUNet,
    y: torch.Tensor,
    grid: torch.Tensor,
    draws: int,
    seeds: list[int] | torch.Generator | None = None,
    max_batch: int = 4096,
    with_std: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, G) mean probability of "clean" over ``draws`` noise draws at each grid σ (the inner
    expectation of Eq. 3.2). ``y`` (B, C, H, W) in [-1, 1], on the network's device; ``seeds`` one
    per row (results independent of batching) or a generator. The B·G·draws noised copies go through
    the network about ``max_batch`` at a time (whole samples per forward). ``with_std``: also the
    (B, G) standard deviation over the draws (unbiased; 0 for one draw), which the confidence and
    shrinkage estimators of σ_min need (:mod:`ambient_ray.diffusion.thresholds`)."""
    b, g = y.shape[0], grid.numel()
    sig = grid.to(y.device, torch.float32).repeat_interleave(draws)  # (G*K,)
    per = max(1, max_batch // (g * draws))
    out, spread = [], []
    for s in range(0, b, per):
        rows = range(s, min(b, s + per))
        noise = _row_noise((g * draws, *y.shape[1:]), seeds, rows, y.device)
        x = (y[s : s + len(rows)].unsqueeze(1) + sig.view(1, -1, 1, 1, 1) * noise).flatten(0, 1)
        p = torch.sigmoid(net(x, sig.repeat(len(rows)))).view(len(rows), g, draws)
        out.append(p.mean(dim=2).cpu())
        spread.append(p.std(dim=2).cpu() if draws > 1 else torch.zeros(len(rows), g))
    if with_std:
        return torch.cat(out), torch.cat(spread)
    return torch.cat(out)


@torch.no_grad()
def crop_curves(
    net: HalfUNet,
    y: torch.Tensor,
    crop_sizes: torch.Tensor,
    draws: int,
    seeds: list[int] | torch.Generator | None = None,
) -> torch.Tensor:
    """(B, G) mean probability of "target" over ``draws`` random crops of size ``crop_sizes[j]``
    (crop(σ_j), one per grid σ: Eq. 3.4's A(t)). ``seeds``: one per row, or a generator."""
    b, g = y.shape[0], crop_sizes.numel()
    out = torch.empty(b, g)
    gens = [torch.Generator().manual_seed(x) for x in seeds] if isinstance(seeds, list) else None
    for size in sorted(set(crop_sizes.tolist())):
        if gens is not None:
            crops = torch.cat(
                [random_crops(y[i : i + 1].expand(draws, -1, -1, -1).cpu(), int(size), gens[i]) for i in range(b)]
            )
        else:
            crops = random_crops(y.repeat_interleave(draws, dim=0).cpu(), int(size), seeds)
        p = torch.sigmoid(net(crops.to(y.device))).view(b, draws).mean(dim=1).cpu()
        out[:, crop_sizes == size] = p.unsqueeze(1)
    return out
