"""EDM2 networks (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models"),
written from the paper, in pure torch (no Ray, no DeepSpeed).

Magnitude preservation (paper Sec. 2.3, App. B.2): every layer keeps activations at unit magnitude (unit
second moment per element) in expectation.

- :class:`MPConv`: convolution or linear layer without bias whose weight is normalised to unit magnitude
  per output row and scaled by gain / sqrt(fan_in), so the output has the input's magnitude ("weight
  normalisation"). The *forced* weight normalisation, which also keeps the stored weight at unit row
  magnitude (so Adam's effective learning rate does not decay as the norms grow), is applied by the
  trainer to the optimizer's master weights after each step (:func:`mp_weights`, :func:`row_scale`), not
  in ``forward``: DeepSpeed rewrites the module's weights from its fp32 master copy after every step, so a
  renormalisation inside ``forward`` would be lost at ZeRO >= 1 and rerun under activation checkpointing.
- :func:`mp_silu` (SiLU / 0.596), :func:`mp_sum` (a weighted sum divided by the norm of its weights),
  :func:`mp_cat` (concatenation with per-part weights keeping unit magnitude), :class:`MPFourier`
  (cos(2π(f·x + φ))·√2 with fixed random f, φ).

The U-Net (the paper's config G, Fig. 21): an encoder of 3 blocks per level at channel multipliers
[1, 2, 3, 4] with down-sampling blocks between levels, a decoder mirroring it with 4 blocks per level fed
by skips through :func:`mp_cat` (t = 0.5), self-attention with 64 channels per head at 16x16 and 8x8 (the
q, k, v normalised per pixel), residuals combined by :func:`mp_sum` (t = 0.3), pixel normalisation in
the encoder, no normalisation layers and no biases, the input concatenated with a ones channel, the
noise embedding (Fourier features of c_noise) and the class embedding summed by :func:`mp_sum`
(t = 0.5), and an output convolution whose learned gain starts at 0.

The denoiser adds EDM's preconditioning (Karras et al. 2022, Table 1) and the learned log-variance u(σ)
of the loss weighting (EDM2 Sec. 2.5, Eq. 4 there: loss = λ(σ)/e^u(σ)·‖D − y‖² + u(σ)), a Fourier-
feature head on c_noise.

Presets, on the paper's ImageNet-512 latents (64x64x4, 1000 classes): ``edm2-xs`` .. ``edm2-xxl`` have
125M, 280M, 498M, 777M, 1119M and 1523M parameters (``tests/test_edm2.py`` checks them within 1%);
``edm2-tiny`` is for CPU tests.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ambient_ray.models.edm2_config import PAPER_INTERFACE, PRESETS, EDM2Config  # noqa: F401 (re-exported)
from ambient_ray.models.precond import EDMPrecond

# ------------------------------------------------------------------------------ magnitude-preserving operations


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x scaled to unit magnitude (unit mean square) over ``dim`` (default: all but the first), in fp32 for
    the norm: x / (eps + ‖x‖ / sqrt(n)), n the number of elements reduced."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    n = x.numel() / max(norm.numel(), 1)
    return x / (eps + norm / math.sqrt(n)).to(x.dtype)


def row_scale(sumsq: torch.Tensor, fan_in: int, eps: float = 1e-4) -> torch.Tensor:
    """The factor per output row that :func:`normalize` applies to a weight, from each row's sum of squares
    (so that a trainer holding the weight in pieces can reduce the sums and scale its own piece)."""
    return 1.0 / (eps + (sumsq / fan_in).sqrt())


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled back to unit magnitude for unit-normal input (E[silu(z)²]^½ ≈ 0.596)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1 − t)·a + t·b divided by the norm of the weights, so that unit-magnitude inputs give unit magnitude."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation along ``dim`` with the parts weighted (1 − t) : t and the result at unit magnitude."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


class MPFourier(nn.Module):
    """Fourier features cos(2π(f·x + φ))·√2 of a scalar per sample, with fixed random f ~ N(0, 1), φ ~ U(0, 1)
    (drawn from a fixed seed, so every build of the network has the same ones)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels, generator=g, device="cpu") * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels, generator=g, device="cpu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float().reshape(-1, 1) * self.freqs.float() + self.phases.float()
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (``kernel`` (kh, kw)) or linear layer (``kernel`` ()), no bias; the
    weight is normalised per output row and scaled by gain / sqrt(fan_in) in ``forward``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = normalize(self.weight.float())  # weight normalisation (differentiable)
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


def mp_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weights that forced weight normalisation keeps at unit row magnitude (every :class:`MPConv`'s),
    in module order (the same on every rank)."""
    return [m.weight for m in module.modules() if isinstance(m, MPConv)]


@torch.no_grad()
def force_normalize_(module: nn.Module) -> None:
    """Forced weight normalisation of a whole, unsharded module in place (tests, and training without
    DeepSpeed); the trainer does the same on the optimizer's master weights."""
    for w in mp_weights(module):
        w.copy_(normalize(w.float()).to(w.dtype))


# ------------------------------------------------------------------------------ the U-Net


class Block(nn.Module):
    """An encoder or decoder block: optional 2x resampling, a residual branch (SiLU, 3x3 conv, modulation by
    the embedding, SiLU, dropout, 3x3 conv) mixed in by mp_sum, optional self-attention, activation clamp."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: Literal["enc", "dec"],
        cfg: EDM2Config,
        resample: Literal["keep", "up", "down"] = "keep",
        attention: bool = False,
    ):
        super().__init__()
        self.out_channels, self.flavor, self.resample = out_channels, flavor, resample
        self.cfg = cfg
        self.heads = out_channels // cfg.channels_per_head if attention else 0
        self.emb_gain = nn.Parameter(torch.zeros(1))  # shape (1,): DeepSpeed cannot broadcast 0-d parameters
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, ())
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if attention else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel normalisation
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.cfg.dropout:
            y = F.dropout(y, p=self.cfg.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.cfg.res_balance)
        if self.heads:
            n, ch, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(n, 3, self.heads, ch // self.heads, h * w)
            q, k, v = normalize(qkv, dim=3).unbind(1)  # each (n, heads, dh, hw), unit magnitude per pixel
            y = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
            y = self.attn_proj(y.transpose(2, 3).reshape(n, ch, h, w))
            x = mp_sum(x, y, t=self.cfg.attn_balance)
        if self.cfg.clip_act is not None:
            x = x.clamp(-self.cfg.clip_act, self.cfg.clip_act)
        return x


class EDM2UNet(nn.Module):
    """F(x, c_noise[, class_labels]) of config G; ``class_labels``: int (B,) or one-hot float (B, label_dim)."""

    def __init__(self, cfg: EDM2Config):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.model_channels * m for m in cfg.channel_mult]
        cemb = max(widths)
        self.emb_fourier = MPFourier(cfg.model_channels)
        self.emb_noise = MPConv(cfg.model_channels, cemb, ())
        self.emb_label = MPConv(cfg.label_dim, cemb, ()) if cfg.label_dim else None
        self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()
        cout = cfg.in_channels + int(cfg.mask_input) + 1  # the input (and its mask) and a channel of ones
        for level, width in enumerate(widths):
            res = cfg.img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, width, (3, 3))
                cout = width
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, "enc", cfg, resample="down")
            for i in range(cfg.num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = Block(
                    cout, width, cemb, "enc", cfg, attention=res in cfg.attn_resolutions
                )
                cout = width
        skips = [m.out_channels for m in self.enc.values()]
        for level, width in reversed(list(enumerate(widths))):
            res = cfg.img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, "dec", cfg, attention=True)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, "dec", cfg)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, "dec", cfg, resample="up")
            for i in range(cfg.num_blocks + 1):
                cin = cout + skips.pop()
                self.dec[f"{res}x{res}_block{i}"] = Block(
                    cin, width, cemb, "dec", cfg, attention=res in cfg.attn_resolutions
                )
                cout = width
        self.out_conv = MPConv(cout, cfg.in_channels, (3, 3))
        self.out_gain = nn.Parameter(torch.zeros(1))  # shape (1,): DeepSpeed cannot broadcast 0-d parameters

    def embed(self, c_noise: torch.Tensor, class_labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(c_noise).to(dtype))
        if self.emb_label is not None:
            if class_labels is None:
                raise ValueError(f"this EDM2 U-Net is class-conditional (label_dim={self.cfg.label_dim}): pass labels")
            onehot = class_labels
            if not class_labels.is_floating_point():
                onehot = F.one_hot(class_labels.long().reshape(-1), self.cfg.label_dim)
            if self.training and self.cfg.label_dropout:
                keep = torch.rand(onehot.shape[0], 1, device=onehot.device) >= self.cfg.label_dropout
                onehot = onehot * keep
            label = self.emb_label((onehot * math.sqrt(self.cfg.label_dim)).to(dtype))
            emb = mp_sum(emb, label, t=0.5)
        return mp_silu(emb)

    def run(self, block: nn.Module, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.cfg.checkpoint_blocks and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, emb, use_reentrant=False)
        return block(x, emb)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(c_noise, class_labels, x.dtype)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else self.run(block, x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=0.5)
            x = self.run(block, x, emb)
        return self.out_conv(x, gain=self.out_gain)


class EDM2Denoiser(EDMPrecond):
    """D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise) (EDM Table 1) with the learned log-variance u(σ)
    (``return_logvar=True`` gives (D, u) with u of shape (B, 1, 1, 1))."""

    has_logvar = True
    dtype_param = "unet.out_conv.weight"

    def __init__(self, cfg: EDM2Config, sigma_data: float = 0.5):
        super().__init__(cfg, sigma_data)
        self.unet = EDM2UNet(cfg)
        self.logvar_fourier = MPFourier(cfg.logvar_channels, seed=1)
        self.logvar_linear = MPConv(cfg.logvar_channels, 1, ())

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        return_logvar: bool = False,
        mask: torch.Tensor | None = None,
    ):
        d, c_noise = self.precondition(x, sigma, class_labels, mask=mask)
        if not return_logvar:
            return d
        u = self.logvar_linear(self.logvar_fourier(c_noise.float())).float().reshape((-1,) + (1,) * (x.ndim - 1))
        return d, u

    def network(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        return self.unet(x, c_noise.to(x.dtype), class_labels)


def build_denoiser(cfg: EDM2Config, sigma_data: float = 0.5) -> EDM2Denoiser:
    """An :class:`EDM2Denoiser` with fresh weights (the global torch seed)."""
    return EDM2Denoiser(cfg, sigma_data)
