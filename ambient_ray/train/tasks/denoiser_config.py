"""Config of a denoiser run (``ambient-ray train``): the engine's keys, the network (``model``), the objective
(``objective``, default ``ambient``) and the sections the denoiser objectives read (``ambient``, ``stream``,
``text``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ambient_ray.config import Strict, flag
from ambient_ray.models import registry
from ambient_ray.train.config import EngineConfig, data_field


class AmbientConfig(Strict):
    lambda_max: float = Field(4.0, gt=1.0, description="buffer: σ > sqrt(1 + 1/(λ_max − 1))·σ_min (Eq. D.2)")
    p_mean: float = Field(-1.2, description="training σ: the log-normal's mean of ln σ (EDM's P_mean)")
    p_std: float = Field(1.2, gt=0, description="training σ: the standard deviation of ln σ (EDM's P_std)")
    sigma_data: float = Field(
        0.5,
        gt=0,
        description="the data's standard deviation (pixels in [-1, 1]) in the EDM preconditioning and loss weight",
    )
    corrupted_sigma_min: float | None = Field(
        None, ge=0, description="σ_min for rows with quality=corrupted when the data has no sigma_min column"
    )
    quality_score: str | None = Field(
        None,
        description="a column of per-row quality scores (e.g. CLIP-IQA): the lowest low_fraction of rows get "
        "corrupted_sigma_min, the rest are clean (Ambient-o's ImageNet recipe); used without a sigma_min column",
    )
    low_fraction: float = Field(0.9, gt=0, lt=1, description="with quality_score: the share of rows called low quality")
    source_sigma_min: dict[str, float] = Field(
        default_factory=dict,
        description="a fixed σ_min per value of the 'source' column (Ambient-o's text-to-image recipe: the "
        "synthetic DiffusionDB at 2, the other sources clean); a row's σ_min is the larger of this and what the "
        "other rules give it",
    )
    crop_sigmas: list[float] = Field(default_factory=list, description="crop(σ) table: σ thresholds, ascending")
    crop_sizes: list[int] = Field(default_factory=list, description="crop(σ) table: crop size for σ ≤ each threshold")


class StreamConfig(Strict):
    """How the workers get their rows (docs/stages/train.md, "Data: in memory or streamed")."""

    mode: Literal["auto", "memory", "stream"] = Field(
        "auto",
        description="memory: every worker holds its share in RAM (exact random access, the small-data default); "
        "stream: each worker reads only its share through Ray Data into bounded per-stratum pools; "
        "auto: stream above 'above_rows' rows",
        json_schema_extra=flag("--data-path", "memory, stream or auto", choices=("auto", "memory", "stream")),
    )
    above_rows: int = Field(200_000, ge=0, description="auto: stream datasets with more rows than this")
    pool_rows: int = Field(8192, ge=16, description="stream: rows a worker keeps in its per-stratum pools in all")
    read_batch: int = Field(256, ge=1, description="stream: rows per Ray Data batch read by a worker")


class TextConfig(Strict):
    """Text-to-image training (a network that takes captions, e.g. ``model.arch: dit``; docs/text-to-image.md)."""

    mask_ratio: float = Field(
        0.0, ge=0, lt=1, description="share of patch tokens dropped per image (MicroDiT: 0.75 in pretraining)"
    )
    caption_dropout: float = Field(
        0.1, ge=0, le=1, description="share of rows trained with the null caption (zeros), for classifier-free guidance"
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="fixed prompts of the periodic sample grids (default: the first rows' captions)",
    )
    guidance: float = Field(5.0, ge=0, description="classifier-free guidance weight of the periodic grids")


class MaskedConfig(Strict):
    """Ambient Diffusion on masked data (``objective: masked``; seed paper 003, Sec. 3.1 and Eq. 3.2;
    docs/stages/train.md, "Masked data")."""

    delta: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="δ: each observed pixel of a masked row is hidden again with probability δ (Ã = B⊙A, "
        "B ~ Bernoulli(1 − δ)) and graded all the same; 0 = the naive objective (the paper: 0.1, 0.3 at p = 0.9)",
    )
    fixed_per_row: bool = Field(
        False,
        description="draw Ã once per row (from the run's seed and the row's id: the reference code's way) "
        "instead of afresh at every use (the theory's way, the default)",
    )


class NoisyConfig(Strict):
    """DSD's Phase I on data observed with Gaussian noise (``objective: noisy``; seed paper 004, Sec. 3.1;
    docs/stages/train.md, "Noisy data")."""

    way: Literal["adjusted", "standard"] = Field(
        "adjusted",
        description="adjusted: the ambient loss with each row at σ_min = σ_n (learns the clean data's denoiser above "
        "σ_n; DSD's Eq. 3); standard: the plain EDM loss on y as if it were clean (learns the noisy data's; Eq. 1)",
    )
    extra_weight: bool = Field(
        False,
        description="multiply the loss by Ambient-o's σ⁴/(σ² − σ_n²)² (Eq. D.1; then σ keeps the buffer of "
        "ambient.lambda_max above σ_n); off: DSD's Phase-I loss, σ drawn anywhere above σ_n",
    )


class TrainConfig(EngineConfig):
    """Config of ``ambient-ray train`` (the engine's keys, plus the model, the objective and its sections)."""

    data: str = data_field(required=True)
    objective: str = Field(
        "ambient",
        description="the training objective (ambient_ray.train.objectives): ambient, Ambient-o's loss (Eq. 3.2-3.3 "
        "with the buffer of Eq. D.2); masked, Ambient Diffusion on masked rows (seed 003 Eq. 3.2), every other row "
        "with its own loss; noisy, DSD's Phase I on rows observed with Gaussian noise (seed 004); 'ambient-ray train "
        "--help' lists every registered one",
        json_schema_extra=flag("--objective", "the training objective (ambient: Ambient-o's loss)"),
    )

    model: registry.config_type("denoiser") = Field(
        default_factory=registry.ARCHS.get("ddpmpp").config,
        description="the denoiser: model.arch (ddpmpp) and its keys; resolution and channels come from the data",
    )
    ambient: AmbientConfig = Field(default_factory=AmbientConfig)
    sample_grid: int = Field(16, ge=0, description="samples drawn from the EMA model at the end (0: none)")
    rows: str | None = Field(
        None, description="train only on the rows this filter selects, FIELD=V1[,V2] (e.g. quality=clean)"
    )
    val_rows: int = Field(64, ge=1, description="with report_every: clean rows per worker for the validation loss")
    stream: StreamConfig = Field(default_factory=StreamConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    masked: MaskedConfig = Field(default_factory=MaskedConfig)
    noisy: NoisyConfig = Field(default_factory=NoisyConfig)
