"""A small DDPM++-style U-Net and its EDM-preconditioned denoiser, in pure torch (no Ray).

The network F(x, c_noise) follows the DDPM++ layout used by Karras et al. 2022 (EDM, App. F.2, after
Song et al. 2021): residual blocks with GroupNorm/SiLU/3x3 convs and a per-block scale/shift from the
noise embedding, self-attention at chosen resolutions and always at the bottleneck, strided-conv
downsampling, nearest + conv upsampling, and a mirrored decoder fed by skip concatenations.
The denoiser wraps it with the EDM preconditioning of Table 1:

    D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)),   c_noise = ln(σ)/4.

Defaults are tiny (16x16 grey, 0.7M parameters; a training step of 64 images takes ~0.5 s on two
CPU cores, see ``benchmarks/train_overhead.py``). Paper sizes come from the config, e.g. EDM's CIFAR-10
DDPM++ (57M parameters here):
``img_resolution=32, in_channels=3, model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
attn_resolutions=[16], dropout=0.13``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from ambient_ray.models.ddpmpp_config import PRESETS, UNetConfig  # noqa: F401 (re-exported)
from ambient_ray.models.layers import zeroed
from ambient_ray.models.precond import EDMPrecond

# ------------------------------------------------------------------------------ building blocks


def noise_embedding(c_noise: torch.Tensor, dim: int, max_freq: float = 100.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos(ω_k c), sin(ω_k c)] with ω_k log-spaced in [1, max_freq].

    c_noise = ln(σ)/4 spans about [-1.6, 1.1] for σ in [0.002, 80], so the frequencies are chosen to
    resolve that range (as the Fourier features of NCSN++ do); they are fixed, not learned or stored,
    so the embedding needs no weights and is computed in float32 whatever the network's dtype.
    """
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), half, device=c_noise.device, dtype=torch.float32))
    arg = c_noise.float().reshape(-1, 1) * freqs
    return torch.cat([arg.cos(), arg.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then GroupNorm modulated by the embedding (scale/shift), SiLU, dropout, conv;
    plus a skip (1x1 conv when the channels change); the sum is scaled by 1/sqrt(2) (DDPM++)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm0 = nn.GroupNorm(groups, cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * cout)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        return (h + self.skip(x)) * (1.0 / math.sqrt(2.0))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels (64 channels per head), residual, scaled by 1/sqrt(2)."""

    def __init__(self, channels: int, groups: int, channels_per_head: int = 64):
        super().__init__()
        self.heads = max(1, channels // channels_per_head)
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        a = a.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(a)) * (1.0 / math.sqrt(2.0))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ------------------------------------------------------------------------------ the network


def build_encoder(cfg: UNetConfig, emb_dim: int) -> tuple[nn.Conv2d, nn.ModuleList, nn.ModuleList, list[int], int]:
    """The U-Net's encoder half: input conv, per-level residual blocks (+ attention) and downsampling,
    and the bottleneck (ResBlock, attention, ResBlock). Returns (conv_in, enc, mid, skip channels,
    bottleneck channels); the U-Net adds the decoder, the classifier a pooled linear head."""
    mc, g, p = cfg.model_channels, cfg.groups, cfg.dropout
    conv_in = nn.Conv2d(cfg.in_channels + int(getattr(cfg, "mask_input", False)), mc, 3, padding=1)
    enc = nn.ModuleList()
    skips = [mc]
    c = mc
    for level, (mult, res) in enumerate(zip(cfg.channel_mult, cfg.resolutions)):
        for _ in range(cfg.num_blocks):
            enc.append(ResBlock(c, mc * mult, emb_dim, g, p))
            c = mc * mult
            if res in cfg.attn_resolutions:
                enc.append(SelfAttention(c, g))
            skips.append(c)
        if level < len(cfg.channel_mult) - 1:
            enc.append(Downsample(c))
            skips.append(c)
    mid = nn.ModuleList([ResBlock(c, c, emb_dim, g, p), SelfAttention(c, g), ResBlock(c, c, emb_dim, g, p)])
    return conv_in, enc, mid, skips, c


class UNet(nn.Module):
    """F(x, c_noise[, class_labels]) -> a tensor of x's shape (the raw network of EDM's D)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, g, p = cfg.model_channels, cfg.groups, cfg.dropout
        emb_dim = 4 * mc
        self.emb_channels = e = 2 * (mc // 2)  # sin/cos pairs
        self.map_label = nn.Linear(cfg.label_dim, e, bias=False) if cfg.label_dim else None
        self.map_noise = Mlp(e, emb_dim, emb_dim, act_layer=nn.SiLU)  # Linear-SiLU-Linear; a SiLU follows

        self.conv_in, self.enc, self.mid, skips, c = build_encoder(cfg, emb_dim)
        self.dec = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            mult, res = cfg.channel_mult[level], cfg.resolutions[level]
            for _ in range(cfg.num_blocks + 1):
                self.dec.append(ResBlock(c + skips.pop(), mc * mult, emb_dim, g, p))
                c = mc * mult
                if res in cfg.attn_resolutions:
                    self.dec.append(SelfAttention(c, g))
            if level > 0:
                self.dec.append(Upsample(c))
        assert not skips
        self.norm_out = nn.GroupNorm(g, c)
        self.conv_out = zeroed(nn.Conv2d(c, cfg.in_channels, 3, padding=1))  # F = 0 at init: D(x; σ) = c_skip·x

    def embed(self, c_noise: torch.Tensor, class_labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The conditioning vector: SiLU(MLP(sinusoidal(c_noise) + label embedding))."""
        emb = noise_embedding(c_noise, self.emb_channels)
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(
                    f"this UNet is class-conditional (label_dim={self.config.label_dim}): pass class_labels"
                )
            onehot = class_labels
            if not class_labels.is_floating_point():
                onehot = F.one_hot(class_labels.long().reshape(-1), self.config.label_dim)
            onehot = onehot.to(emb.dtype)
            if self.training and self.config.label_dropout > 0:
                keep = torch.rand(onehot.shape[0], 1, device=onehot.device) >= self.config.label_dropout
                onehot = onehot * keep
            emb = emb + self.map_label(onehot.to(dtype)).float()
        return F.silu(self.map_noise(emb.to(dtype)))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(c_noise, class_labels, x.dtype)
        h = self.conv_in(x)
        skips = [h]
        for m in self.enc:
            h = m(h, emb)
            if not isinstance(m, SelfAttention):  # attention refines the block output in place
                skips.append(h)
            else:
                skips[-1] = h
        for m in self.mid:
            h = m(h, emb)
        for m in self.dec:
            h = m(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(m, ResBlock) else m(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class EDMDenoiser(EDMPrecond):
    """D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise) (Karras et al. 2022, Table 1 and Eq. 7) around :class:`UNet`.

    ``sigma`` is (B,) (or a scalar) and is broadcast over the image. The preconditioning is computed
    in float32 (float64 if x is float64), the network runs in its own parameter dtype (e.g. bf16 under
    DeepSpeed), and D is returned in float32 or wider: ``promote_types(x.dtype, float32)``.
    """

    dtype_param, wide = "unet.conv_in.weight", True

    def __init__(self, cfg: UNetConfig, sigma_data: float = 0.5):
        super().__init__(cfg, sigma_data)
        self.unet = UNet(cfg)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.precondition(x, sigma, class_labels, mask=mask)[0]

    def network(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        return self.unet(x, c_noise, class_labels)


def build_denoiser(cfg: UNetConfig, sigma_data: float = 0.5) -> EDMDenoiser:
    """An :class:`EDMDenoiser` around a fresh :class:`UNet` of ``cfg`` (uses the global torch seed)."""
    return EDMDenoiser(cfg, sigma_data=sigma_data)
