"""The precompute stage's config (:class:`PrecomputeConfig`, its flags) without torch: what its ``--help`` and a
config error need (the stage is :mod:`ambient_ray.stages.precompute`, which re-exports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ambient_ray.config import flag
from ambient_ray.stages.actor_stage import ActorConfig


class PrecomputeConfig(ActorConfig):
    """Config of ``ambient-ray precompute`` (the actor keys: :class:`~ambient_ray.stages.actor_stage.ActorConfig`)."""

    vae: str = Field(
        ...,
        description="a diffusers AutoencoderKL folder (local or s3://), or 'pixels' (identity, for pixel-space runs)",
        json_schema_extra=flag("--vae"),
    )
    vae_subfolder: str | None = Field(
        None,
        description="the VAE's folder inside --vae (e.g. 'vae' of a pipeline)",
        json_schema_extra=flag("--vae-subfolder"),
    )
    text_encoder: str | None = Field(
        None,
        description="a transformers CLIP/T5 text-encoder folder (local or s3://), or local-dir:PATH (open_clip)",
        json_schema_extra=flag("--text-encoder"),
    )
    resolution: int | None = Field(
        None,
        ge=8,
        description="centre-crop and resize to this size first (default: the data's)",
        json_schema_extra=flag("--resolution"),
    )
    latent_std: float = Field(0.5, gt=0, description="measured normalisation: rescale each channel to this std")
    latent_shift: list[float] | None = Field(None, description="configured normalisation: per-channel shift")
    latent_scale: list[float] | None = Field(None, description="configured normalisation: per-channel scale")
    emb_dtype: Literal["float16", "float32"] = Field("float16", description="dtype of stored caption embeddings")
    batch_size: int = Field(32, ge=1, description="images (and captions) per encoder call")
