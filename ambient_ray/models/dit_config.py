"""The diffusion transformer's config (:class:`DiTConfig`, its presets), without torch (the network is in
:mod:`ambient_ray.models.dit`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ambient_ray.config import Strict, fill_preset

PRESETS: dict[str, dict] = {
    "dit-tiny": dict(width=64, depth=4, head_dim=16, mixer_depth=2, mixer_width=64, caption_dim=32, multiple_of=32),
    "microdit-xl-2": dict(width=1024, depth=28, head_dim=64, mixer_depth=6, mixer_width=768),
}
# the setting the presets' sizes are quoted for: 256² images through an f=8 VAE, 77 x 1024 caption tokens
PAPER_INTERFACE = dict(img_resolution=32, in_channels=4, caption_dim=1024)


class DiTConfig(Strict):
    """Architecture of the MoE diffusion transformer (saved in ``model.json``); the interface (latent side and
    channels, caption embedding width) comes from the data."""

    arch: Literal["dit"] = Field("dit", description="model architecture (see ambient_ray.models.registry)")
    preset: str | None = Field(None, description=f"a size of the family: {', '.join(PRESETS)}; explicit keys win")
    img_resolution: int = Field(32, ge=2, description="latent side")
    in_channels: int = Field(4, ge=1, description="latent channels")
    mask_input: bool = Field(
        False,
        description="Ambient Diffusion on masked data: the network also takes the mask Ã as one more input channel "
        "(the pixels outside it set to 0), D = net(x, σ, ..., mask=Ã); for train.objective masked, on pixel data",
    )
    caption_dim: int = Field(1024, ge=1, description="width of the caption token embeddings")
    caption_tokens: int = Field(77, ge=1, description="caption tokens per row (the text encoder's max length)")
    patch: int = Field(2, ge=1, description="patch side")
    width: int = Field(1024, ge=8, description="backbone width")
    depth: int = Field(28, ge=1, description="backbone blocks")
    head_dim: int = Field(64, ge=1, description="attention head width (width and mixer_width are multiples of it)")
    qkv_ratio: tuple[float, float] = Field((0.5, 1.0), description="attention width / width, first to last block")
    ffn_ratio: tuple[float, float] = Field((0.5, 4.0), description="feed-forward width / width, first to last block")
    multiple_of: int = Field(256, ge=1, description="feed-forward widths are rounded up to a multiple of this")
    mixer_depth: int = Field(6, ge=0, description="patch-mixer blocks before masking (0: none)")
    mixer_width: int = Field(768, ge=8, description="patch-mixer width (a multiple of head_dim and of 4)")
    mixer_ffn_ratio: float = Field(4.0, gt=0, description="patch-mixer feed-forward width / mixer_width")
    experts: int = Field(8, ge=1, description="experts of an MoE feed-forward")
    capacity: float = Field(2.0, gt=0, description="expert-choice capacity: each expert takes capacity·T/E tokens")
    moe_every: int = Field(2, ge=1, description="MoE in every this-many-th block (never the backbone's last)")
    norm_eps: float = Field(1e-6, gt=0, description="ε of every LayerNorm (the blocks' and the q/k norms)")
    checkpoint_blocks: bool = Field(False, description="activation checkpointing: recompute each block in backward")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        return fill_preset(data, PRESETS, cls.__name__)

    @model_validator(mode="after")
    def _check(self) -> DiTConfig:
        if self.img_resolution % self.patch:
            raise ValueError(f"img_resolution {self.img_resolution} is not a multiple of patch {self.patch}")
        for name in ("width", "mixer_width"):
            if getattr(self, name) % self.head_dim or getattr(self, name) % 4:
                raise ValueError(f"{name} {getattr(self, name)} must be a multiple of head_dim and of 4")
        return self

    def tokens(self) -> int:
        return (self.img_resolution // self.patch) ** 2


def kept_tokens(tokens: int, mask_ratio: float) -> int:
    """How many of an image's ``tokens`` patch masking keeps: int(T·(1 − mask_ratio)), at least one."""
    return max(1, int(tokens * (1 - mask_ratio)))
