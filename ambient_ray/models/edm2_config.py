"""The EDM2 U-Net's config (:class:`EDM2Config`, its presets), without torch (the network is in
:mod:`ambient_ray.models.edm2`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ambient_ray.config import Strict, fill_preset

# One line per size (paper Table 2 / App. E): model_channels and dropout; the rest is config G.
PRESETS: dict[str, dict] = {
    "edm2-tiny": dict(
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
        channels_per_head=16,
        logvar_channels=16,
    ),
    "edm2-xs": dict(model_channels=128),
    "edm2-s": dict(model_channels=192),
    "edm2-m": dict(model_channels=256, dropout=0.10),
    "edm2-l": dict(model_channels=320, dropout=0.10),
    "edm2-xl": dict(model_channels=384, dropout=0.10),
    "edm2-xxl": dict(model_channels=448, dropout=0.10),
}
# the setting the presets' paper sizes are quoted for (ImageNet-512 through the SD VAE)
PAPER_INTERFACE = dict(img_resolution=64, in_channels=4, label_dim=1000)


class EDM2Config(Strict):
    """Architecture of the EDM2 U-Net (saved in ``model.json``). ``img_resolution`` and ``in_channels`` come
    from the data (pixels or precomputed latents); ``label_dim`` > 0 makes it class-conditional."""

    arch: Literal["edm2"] = Field("edm2", description="model architecture (see ambient_ray.models.registry)")
    preset: str | None = Field(None, description=f"a size of the family: {', '.join(PRESETS)}; explicit keys win")
    img_resolution: int = Field(64, ge=4, description="square image (or latent) side")
    in_channels: int = Field(4, ge=1, description="image (or latent) channels")
    model_channels: int = Field(128, ge=4, description="channels at the first level")
    channel_mult: list[int] = Field(
        default_factory=lambda: [1, 2, 3, 4], min_length=1, description="channel multiplier per level"
    )
    num_blocks: int = Field(3, ge=1, description="encoder blocks per level (the decoder has one more)")
    attn_resolutions: list[int] = Field(default_factory=lambda: [16, 8], description="resolutions with attention")
    channels_per_head: int = Field(
        64, ge=1, description="attention head width (heads = a level's channels / this; must divide them)"
    )
    dropout: float = Field(0.0, ge=0.0, le=1.0, description="dropout in the residual branches")
    label_dim: int = Field(0, ge=0, description="number of classes; 0 = unconditional")
    mask_input: bool = Field(
        False,
        description="Ambient Diffusion on masked data: the network also takes the mask Ã as one more input channel "
        "(the pixels outside it set to 0), D = net(x, σ, ..., mask=Ã); for train.objective masked, on pixel data",
    )
    label_dropout: float = Field(0.0, ge=0.0, le=1.0, description="training label dropout (CFG); EDM2 uses 0")
    logvar_channels: int = Field(128, ge=1, description="Fourier features of the learned log-variance head")
    res_balance: float = Field(0.3, ge=0.0, le=1.0, description="mp_sum weight of a residual branch")
    attn_balance: float = Field(0.3, ge=0.0, le=1.0, description="mp_sum weight of an attention branch")
    clip_act: float | None = Field(256.0, description="clamp block outputs to ±this (None: off)")
    checkpoint_blocks: bool = Field(
        False, description="activation checkpointing: recompute each block in the backward pass (less memory)"
    )

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        return fill_preset(data, PRESETS, cls.__name__)

    @model_validator(mode="after")
    def _check(self) -> EDM2Config:
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.img_resolution % factor:
            raise ValueError(
                f"img_resolution {self.img_resolution} must be divisible by {factor} "
                f"for {len(self.channel_mult)} levels"
            )
        last = len(self.channel_mult) - 1  # the bottleneck's first block always attends
        for level, m in enumerate(self.channel_mult):
            attends = level == last or (self.img_resolution >> level) in self.attn_resolutions
            if attends and (self.model_channels * m) % self.channels_per_head:
                raise ValueError(
                    f"model_channels*{m} = {self.model_channels * m} is not a multiple of channels_per_head "
                    f"{self.channels_per_head}"
                )
        return self
