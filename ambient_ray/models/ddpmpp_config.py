"""The DDPM++ U-Net's config (:class:`UNetConfig`, its presets) and the half U-Net classifier's, without torch:
what a stage's config and ``--help`` need (the networks are in :mod:`ambient_ray.models.ddpmpp` and
:mod:`ambient_ray.models.classifier`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ambient_ray.config import Strict, fill_preset

# Sizes of the family, one line each; a preset fills the keys a config leaves unset (``model.preset``).
PRESETS: dict[str, dict] = {
    "tiny": dict(model_channels=32, channel_mult=[1, 2], num_blocks=1),
    "small": dict(model_channels=64, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8]),
    "cifar10": dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13),
}


class UNetConfig(Strict):
    """Architecture of :class:`UNet` (saved in ``model.json``; rebuilds the network for sampling).

    ``img_resolution`` and ``in_channels`` are the interface: a stage takes them from its data, and a value
    given in the config must agree with the data."""

    arch: Literal["ddpmpp"] = Field("ddpmpp", description="model architecture (see ambient_ray.models.registry)")
    preset: str | None = Field(None, description=f"a size of the family: {', '.join(PRESETS)}; explicit keys win")
    img_resolution: int = Field(16, ge=4, description="square image side in pixels")
    in_channels: int = Field(1, ge=1, le=4, description="image channels (1 grey, 3 RGB)")
    model_channels: int = Field(32, ge=8, description="channels at the first level")
    channel_mult: list[int] = Field(
        default_factory=lambda: [1, 2], min_length=1, description="channel multiplier per level"
    )
    num_blocks: int = Field(1, ge=1, description="residual blocks per level (encoder; the decoder has one more)")
    attn_resolutions: list[int] = Field(
        default_factory=list, description="resolutions with self-attention (the bottleneck always has it)"
    )
    dropout: float = Field(0.0, ge=0.0, le=1.0, description="dropout in the residual blocks")
    label_dim: int = Field(0, ge=0, description="number of classes; 0 = unconditional")
    mask_input: bool = Field(
        False,
        description="Ambient Diffusion on masked data: the network also takes the mask Ã as one more input channel "
        "(the pixels outside it set to 0), D = net(x, σ, ..., mask=Ã); for train.objective masked, on pixel data",
    )
    label_dropout: float = Field(
        0.0, ge=0.0, le=1.0, description="probability of dropping a training label (classifier-free guidance)"
    )
    groups: int = Field(8, ge=1, description="GroupNorm groups; must divide every level's channel count")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        return fill_preset(data, PRESETS, cls.__name__)

    @model_validator(mode="after")
    def _check(self) -> UNetConfig:
        if any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult entries must be >= 1 (got {self.channel_mult})")
        levels = len(self.channel_mult)
        factor = 2 ** (levels - 1)
        if self.img_resolution % factor:
            raise ValueError(
                f"img_resolution={self.img_resolution} must be divisible by 2**(len(channel_mult)-1) = {factor} "
                f"(channel_mult has {levels} levels); change img_resolution or channel_mult"
            )
        resolutions = [self.img_resolution >> i for i in range(levels)]
        bad = [r for r in self.attn_resolutions if r not in resolutions]
        if bad:
            raise ValueError(f"attn_resolutions {bad} are not among the U-Net's resolutions {resolutions}")
        bad = [self.model_channels * m for m in self.channel_mult if (self.model_channels * m) % self.groups]
        if bad:
            raise ValueError(
                f"groups={self.groups} must divide every level's channels (model_channels*channel_mult); "
                f"{bad} are not divisible"
            )
        return self

    @property
    def resolutions(self) -> list[int]:
        return [self.img_resolution >> i for i in range(len(self.channel_mult))]


Kind = Literal["noise", "crops"]


class ClassifierConfig(UNetConfig):
    """The half U-Net's architecture: the U-Net's encoder keys (``label_dim`` must stay 0)."""

    arch: Literal["classifier"] = Field("classifier", description="model architecture: the half U-Net")

    @model_validator(mode="after")
    def _no_labels(self) -> "ClassifierConfig":
        if self.label_dim or self.label_dropout:
            raise ValueError("a classifier is not class-conditional: leave label_dim and label_dropout at 0")
        if self.mask_input:
            raise ValueError("a classifier takes no mask channel: leave mask_input false")
        return self
