"""A text-to-image diffusion transformer with an expert-choice MoE, in the MicroDiT style (Sehwag et al. 2024,
"Stretching Each Dollar: Diffusion Training from Scratch on a Micro-Budget"), pure torch (no Ray, no DeepSpeed).

The network F(x, c_noise, caption tokens, caption mask[, keep]) of an EDM-preconditioned denoiser:

- **Patches**: a p×p convolution to the model width, fixed 2-D sin-cos positions.
- **Conditioning**: sinusoidal features of c_noise through an MLP, plus the mean-pooled caption through
  another, drive every block's adaLN (shift, scale and gate of the attention and feed-forward branches,
  zero-initialised: each block starts as the identity).
- **Captions**: the precomputed token embeddings (with their mask) are projected to the width by an MLP and
  refined by one transformer block of their own; every block cross-attends to them (padding masked out).
- **Patch mixer**: a few blocks at their own width run on *all* patch tokens before patch masking, so the
  tokens the backbone keeps have seen the whole image (paper Sec. 3).
- **Patch masking**: in training, each image keeps a random ``1 − mask_ratio`` of its tokens (``keep``, the
  indices, drawn by the task); the backbone runs on those alone, the dropped ones come back as a learned-free
  zero token before unpatchifying, and the loss counts only the kept patches (:func:`patch_mask`).
- **Backbone blocks**: self-attention, cross-attention, feed-forward, pre-LayerNorm without biases, QK
  LayerNorm, widths growing with depth (attention width ratio linspace(qkv_ratio), feed-forward ratio
  linspace(ffn_ratio) over the blocks); the feed-forward is SwiGLU, or in every other block an expert-choice
  MoE (:class:`ExpertChoiceMoE`).

Presets: ``microdit-xl-2`` (width 1024, depth 28, patch 2, mixer of 6 blocks at 768, 8 experts of capacity 2 in
blocks 1, 3, ..., 25 and in the mixer's 1, 3, 5: about 1.16B parameters), ``dit-tiny`` for CPU tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ambient_ray.models.dit_config import PAPER_INTERFACE, PRESETS, DiTConfig, kept_tokens  # noqa: F401 (re-exported)
from ambient_ray.models.layers import zeroed
from ambient_ray.models.precond import EDMPrecond


def _round_up(x: float, m: int) -> int:
    return m * math.ceil(int(x) / m)


class Attention(nn.Module):
    """Multi-head attention of width ``hidden`` with LayerNorm on q and k over all heads (QK normalisation);
    self-attention with ``ctx`` None, else cross-attention to ``ctx``; keys where ``key_mask`` is 0 ignored."""

    def __init__(self, dim: int, hidden: int, head_dim: int, eps: float, cross: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.cross = hidden // head_dim, head_dim, cross
        if cross:
            self.q, self.kv = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, 2 * hidden, bias=False)
        else:
            self.qkv = nn.Linear(dim, 3 * hidden, bias=False)
        self.q_norm = nn.LayerNorm(hidden, eps=eps, elementwise_affine=False)
        self.k_norm = nn.LayerNorm(hidden, eps=eps, elementwise_affine=False)
        self.proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None, key_mask: torch.Tensor | None = None):
        b, n, _ = x.shape
        if self.cross:
            q, (k, v) = self.q(x), self.kv(ctx).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)

        def heads(t):
            return t.reshape(b, t.shape[1], self.heads, self.head_dim).transpose(1, 2)

        mask = None if key_mask is None else key_mask[:, None, None, :].bool()
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


class SwiGLU(nn.Module):
    """w3(silu(w1 x) · w2 x), hidden width 2/3 of ``hidden`` rounded up to ``multiple_of``."""

    def __init__(self, dim: int, hidden: float, multiple_of: int):
        super().__init__()
        h = _round_up(2 * hidden / 3, multiple_of)
        self.w1, self.w2, self.w3 = (
            nn.Linear(dim, h, bias=False),
            nn.Linear(dim, h, bias=False),
            nn.Linear(h, dim, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class ExpertChoiceMoE(nn.Module):
    """Expert-choice mixture of GELU experts (Zhou et al. 2022; MicroDiT Sec. 3): a router gives each token a
    softmax over the E experts; each expert takes, *within each image*, the k = ⌊capacity·T/E⌋ tokens that
    rank it highest, and a token's output is the sum of its experts' outputs weighted by their router
    probabilities (a token may be taken by no expert, or by several). Every expert runs every step on exactly
    k tokens per image (a static shape: ZeRO-3's module trace never changes, no expert idles on a rank).

    Dispatch by gather and scatter-add over token indices, O(E·k·D) memory, not a one-hot (T × k) einsum."""

    def __init__(self, dim: int, hidden: float, experts: int, capacity: float, multiple_of: int):
        super().__init__()
        h = _round_up(hidden, multiple_of)
        self.experts, self.capacity = experts, capacity
        self.gate = nn.Linear(dim, experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(experts, dim, h))
        self.w2 = nn.Parameter(torch.empty(experts, h, dim))
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        k = max(1, int(self.capacity * t / self.experts))
        probs = self.gate(x).float().softmax(dim=-1)  # (b, t, E)
        weight, index = probs.transpose(1, 2).topk(k, dim=-1)  # (b, E, k): each expert's tokens in each image
        xin = torch.gather(x, 1, index.reshape(b, -1, 1).expand(-1, -1, d)).reshape(b, self.experts, k, d)
        h = F.gelu(torch.einsum("bekd,edh->bekh", xin, self.w1))
        y = torch.einsum("bekh,ehd->bekd", h, self.w2) * weight[..., None].to(x.dtype)
        out = torch.zeros_like(x)
        return out.scatter_add_(1, index.reshape(b, -1, 1).expand(-1, -1, d), y.reshape(b, -1, d))


class Block(nn.Module):
    """x += g1·self_attn(mod1(norm x)); x += cross_attn(norm x, captions); x += g2·ffn(mod2(norm x)); the six
    modulation vectors from the conditioning c by a zero-initialised linear (adaLN-zero)."""

    def __init__(self, dim: int, cond: int, qkv: float, ffn: float, moe: bool, cfg: DiTConfig):
        super().__init__()
        hd = cfg.head_dim
        hidden = dim if qkv == 1 else 2 * hd * math.ceil(dim * qkv / (2 * hd))
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, eps=cfg.norm_eps, bias=False) for _ in range(3))
        self.attn = Attention(dim, hidden, hd, cfg.norm_eps)
        self.cross = Attention(dim, dim, hd, cfg.norm_eps, cross=True)
        self.ffn = (
            ExpertChoiceMoE(dim, dim * ffn, cfg.experts, cfg.capacity, cfg.multiple_of)
            if moe
            else SwiGLU(dim, dim * ffn, cfg.multiple_of)
        )
        self.ada = nn.Sequential(nn.GELU(approximate="tanh"), zeroed(nn.Linear(cond, 6 * dim)))

    def forward(self, x, c, ctx, ctx_mask):
        s1, sc1, g1, s2, sc2, g2 = self.ada(c)[:, None].chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + s1)
        x = x + self.cross(self.norm2(x), ctx, ctx_mask)
        return x + g2 * self.ffn(self.norm3(x) * (1 + sc2) + s2)


class CaptionBlock(nn.Module):
    """The captions' own pre-norm transformer block (self-attention over the valid tokens, SwiGLU 4x), its
    output branches zero-initialised."""

    def __init__(self, dim: int, cfg: DiTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps, bias=False)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps, bias=False)
        self.attn = Attention(dim, dim, cfg.head_dim, cfg.norm_eps)
        self.ffn = SwiGLU(dim, 4 * dim, cfg.multiple_of)
        zeroed(self.attn.proj)
        zeroed(self.ffn.w3)

    def forward(self, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        y = y + self.attn(self.norm1(y), key_mask=mask)
        return y + self.ffn(self.norm2(y))


def mlp(i: int, h: int, o: int, eps: float, norm: bool = True) -> nn.Sequential:
    """Linear, GELU (tanh), optional LayerNorm, Linear, with biases."""
    mid = [nn.LayerNorm(h, eps=eps, bias=False)] if norm else []
    return nn.Sequential(nn.Linear(i, h), nn.GELU(approximate="tanh"), *mid, nn.Linear(h, o))


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings (side² × dim): half the channels for rows, half for columns."""
    pos = torch.arange(side, dtype=torch.float64, device="cpu")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device="cpu") / (dim // 4))
    out = torch.outer(pos, omega)
    one = torch.cat([out.sin(), out.cos()], dim=1)  # (side, dim/2)
    rows = one[:, None, :].expand(side, side, -1)
    cols = one[None, :, :].expand(side, side, -1)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, dim).float()


def timestep_features(c: torch.Tensor, dim: int = 512, max_period: float = 10_000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=c.device) / half)
    args = c.float().reshape(-1, 1) * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


def linspace(a: float, b: float, n: int) -> list[float]:
    return [a + (b - a) * i / (n - 1) for i in range(n)] if n > 1 else [a]


def moe_blocks(depth: int, every: int, last_dense: bool) -> list[bool]:
    """Which of ``depth`` blocks have an MoE feed-forward: i with (i + 1) % every == 0 (1, 3, 5, ... for 2),
    never block 0, and with ``last_dense`` never the last."""
    return [i > 0 and (i + 1) % every == 0 and not (last_dense and i == depth - 1) for i in range(depth)]


class DiT(nn.Module):
    """F(x, c_noise, captions, caption_mask, keep) -> x's shape; ``keep`` (B, K) token indices per image (patch
    masking: the backbone sees only those, the rest of the output is 0) or None (all tokens)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        w, mw, eps = cfg.width, cfg.mixer_width, cfg.norm_eps
        self.patchify = nn.Conv2d(cfg.in_channels + int(cfg.mask_input), w, cfg.patch, stride=cfg.patch)
        side = cfg.img_resolution // cfg.patch
        self.register_buffer("pos", sincos_2d(w, side)[None], persistent=False)
        self.t_embed = mlp(512, w, w, eps, norm=False)
        self.y_embed = mlp(cfg.caption_dim, w, w, eps)
        self.y_block = CaptionBlock(w, cfg)
        self.y_pool = mlp(w, w, w, eps)
        mixer_moe = moe_blocks(cfg.mixer_depth, cfg.moe_every, last_dense=False)
        self.mixer = nn.ModuleList(
            Block(mw, w, 1.0, cfg.mixer_ffn_ratio, mixer_moe[i], cfg) for i in range(cfg.mixer_depth)
        )
        self.mixer_in = self.mixer_out = self.mixer_y = None
        if cfg.mixer_depth and mw != w:
            self.mixer_in = nn.Sequential(nn.LayerNorm(w, eps=eps, bias=False), nn.Linear(w, mw, bias=False))
            self.mixer_out = nn.Sequential(nn.LayerNorm(mw, eps=eps, bias=False), nn.Linear(mw, w, bias=False))
            self.mixer_y = nn.Sequential(nn.LayerNorm(w, eps=eps, bias=False), nn.Linear(w, mw, bias=False))
        qkv, ffn = linspace(*cfg.qkv_ratio, cfg.depth), linspace(*cfg.ffn_ratio, cfg.depth)
        moe = moe_blocks(cfg.depth, cfg.moe_every, last_dense=True)
        self.blocks = nn.ModuleList(Block(w, w, qkv[i], ffn[i], moe[i], cfg) for i in range(cfg.depth))
        self.final_norm = nn.LayerNorm(w, eps=eps, bias=False)
        self.final_ada = nn.Sequential(nn.GELU(approximate="tanh"), zeroed(nn.Linear(w, 2 * w)))
        self.final = zeroed(nn.Linear(w, cfg.patch**2 * cfg.in_channels))

    def moe_layers(self) -> list[ExpertChoiceMoE]:
        return [m for m in self.modules() if isinstance(m, ExpertChoiceMoE)]

    # parameters a patch token never passes through: they run once per image (adaLN modulation, the noise and
    # pooled-caption embeddings) or on the caption tokens (their projection and block, cross-attention's k/v)
    PER_IMAGE_OR_CAPTION = ("t_embed.", "y_embed.", "y_block.", "y_pool.", "mixer_y.", "final_ada.", ".ada.", ".kv.")

    def active_parameters(self, per_token: bool = False) -> int:
        """Parameters a forward uses, each expert weighted by the share of tokens it takes. Expert choice with E
        experts at capacity c: every expert takes c·T/E of an image's T tokens, so a token passes through c experts
        on average and an MoE layer's experts count c/E of their parameters (the routers count whole, as do all
        other parameters). ``per_token``: only the parameters an image token passes through (without those in
        :attr:`PER_IMAGE_OR_CAPTION`); about 420M for ``microdit-xl-2``, the figure quoted for MicroDiT-XL/2."""
        experts = {id(p): m.capacity / m.experts for m in self.moe_layers() for p in (m.w1, m.w2)}
        total = 0.0
        for name, p in self.named_parameters():
            if per_token and any(k in f".{name}" for k in self.PER_IMAGE_OR_CAPTION):
                continue
            total += p.numel() * min(1.0, experts.get(id(p), 1.0))
        return round(total)

    def run(self, block: nn.Module, *args):
        if self.cfg.checkpoint_blocks and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        captions: torch.Tensor,
        caption_mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg, b = self.cfg, x.shape[0]
        if caption_mask is not None:  # a caption without valid tokens (a null caption) attends to all of them
            caption_mask = caption_mask.bool() | ~caption_mask.bool().any(1, keepdim=True)
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)  # (b, T, w)
        y = self.y_embed(captions.to(x.dtype))
        y = self.y_block(y, caption_mask)
        m = caption_mask[..., None].to(y.dtype) if caption_mask is not None else torch.ones_like(y[..., :1])
        pooled = (y * m).sum(1) / m.sum(1).clamp(min=1)
        c = self.t_embed(timestep_features(c_noise).to(x.dtype)) + self.y_pool(pooled)
        if cfg.mixer_depth:
            hm = self.mixer_in(h) if self.mixer_in is not None else h
            ym = self.mixer_y(y) if self.mixer_y is not None else y
            for blk in self.mixer:
                hm = self.run(blk, hm, c, ym, caption_mask)
            h = hm
        if keep is not None:
            h = torch.gather(h, 1, keep[..., None].expand(-1, -1, h.shape[-1]))
        if self.mixer_out is not None:
            h = self.mixer_out(h)
        for blk in self.blocks:
            h = self.run(blk, h, c, y, caption_mask)
        shift, scale = self.final_ada(c)[:, None].chunk(2, dim=-1)
        out = self.final(self.final_norm(h) * (1 + scale) + shift)  # (b, K, p²·C)
        if keep is not None:
            full = out.new_zeros(b, cfg.tokens(), out.shape[-1])
            out = full.scatter(1, keep[..., None].expand(-1, -1, out.shape[-1]), out)
        return unpatchify(out, cfg.patch, cfg.in_channels)


def unpatchify(tokens: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """(B, T, p²·C) tokens in row-major patch order -> (B, C, H, W)."""
    b, t, _ = tokens.shape
    side = math.isqrt(t)
    x = tokens.reshape(b, side, side, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, side * p, side * p)


def patch_keep(batch: int, tokens: int, mask_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image, the sorted indices of the int(T·(1 − mask_ratio)) tokens it keeps, drawn uniformly."""
    k = kept_tokens(tokens, mask_ratio)
    order = torch.rand(batch, tokens, generator=generator).argsort(dim=1)
    return order[:, :k].sort(dim=1).values


def patch_mask(keep: torch.Tensor, tokens: int, p: int, side: int) -> torch.Tensor:
    """The (B, 1, H, W) pixel mask of the kept patches (1 kept, 0 dropped): the loss counts only those."""
    b = keep.shape[0]
    m = torch.zeros(b, tokens)
    m.scatter_(1, keep.cpu(), 1.0)
    g = side // p
    return m.reshape(b, 1, g, 1, g, 1).expand(b, 1, g, p, g, p).reshape(b, 1, side, side)


class DiTDenoiser(EDMPrecond):
    """D(x; σ, captions) = c_skip·x + c_out·F(c_in·x, c_noise, ...) (EDM Table 1) around :class:`DiT`."""

    dtype_param = "net.final.weight"

    def __init__(self, cfg: DiTConfig, sigma_data: float = 0.5):
        super().__init__(cfg, sigma_data)
        self.net = DiT(cfg)

    def forward(self, x, sigma, captions, caption_mask=None, keep=None, mask=None):
        return self.precondition(x, sigma, captions, caption_mask, keep, mask=mask)[0]

    def network(self, x, c_noise, captions, caption_mask, keep):
        return self.net(x, c_noise, captions, caption_mask, keep)

    def active_parameters(self, per_token: bool = False) -> int:
        """The network's :meth:`DiT.active_parameters` (the preconditioning has no parameters)."""
        return self.net.active_parameters(per_token)


def build_denoiser(cfg: DiTConfig, sigma_data: float = 0.5) -> DiTDenoiser:
    return DiTDenoiser(cfg, sigma_data)


def example_inputs(
    cfg: DiTConfig, batch: int, generator: torch.Generator | None = None, mask_ratio: float = 0.0
) -> tuple:
    """x, σ, caption tokens and their mask (zeros and ones; random with ``generator``, about half the tokens
    valid per caption); with ``mask_ratio`` > 0 also ``keep``, the kept token indices of patch masking (the
    first :func:`kept_tokens` of every image; random ones with ``generator``), so the backbone runs on those."""
    r, c, t, d = cfg.img_resolution, cfg.in_channels, cfg.caption_tokens, cfg.caption_dim
    if generator is None:
        out = torch.zeros(batch, c, r, r), torch.ones(batch), torch.zeros(batch, t, d), torch.ones(batch, t)
        keep = torch.arange(kept_tokens(cfg.tokens(), mask_ratio)).repeat(batch, 1)
    else:
        lengths = torch.randint(1, t + 1, (batch, 1), generator=generator)
        out = (
            torch.randn(batch, c, r, r, generator=generator),
            torch.rand(batch, generator=generator) + 0.1,
            torch.randn(batch, t, d, generator=generator),
            (torch.arange(t) < lengths).float(),
        )
        keep = patch_keep(batch, cfg.tokens(), mask_ratio, generator) if mask_ratio > 0 else None
    return out + (keep,) if mask_ratio > 0 else out
