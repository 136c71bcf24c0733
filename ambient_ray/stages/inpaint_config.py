"""The inpaint stage's config (:class:`InpaintConfig`, its flags) without torch: what its ``--help`` and a config
error need (the stage is :mod:`ambient_ray.stages.inpaint`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ambient_ray.config import Strict, flag
from ambient_ray.io.tracking import MlflowConfig

Mode = Literal["mean", "sample", "both"]


class InpaintConfig(Strict):
    """Config of ``ambient-ray inpaint``: restore masked images with a model trained by the ``masked`` objective."""

    data: str = Field(
        ...,
        description="the masked images: an image folder (NAME.mask.png beside NAME.png: 0/255 or 0/1, nonzero = "
        "observed), Parquet (a folder of shards, a stage output or one file) with a 'mask' column (the uint8 "
        "(1, H, W) tensor column, 1 = observed) or tar shards (KEY.mask.png); local or s3://. A row without a "
        "mask is fully observed; data without any mask is refused",
        json_schema_extra=flag("--data"),
    )
    model: str = Field(
        ...,
        description="the trained model: a training output folder, or a folder with model.json + ema.safetensors, "
        "of a network built with model.mask_input: true (the masked objective)",
        json_schema_extra=flag("--model"),
    )
    out: str = Field(
        ..., description="output URI (local folder or s3://bucket/prefix)", json_schema_extra=flag("--out")
    )
    mode: Mode = Field(
        "both",
        description="mean: the one-step posterior mean E[x0 | A x_σ, A] (Ambient Diffusion, Eq. 4.1: one network "
        "evaluation); sample: a sampled restoration that keeps the observed pixels ('steps' steps from "
        "sigma_max); both",
        json_schema_extra=flag("--mode"),
    )
    sigma: float = Field(
        0.002,
        gt=0,
        description="mode mean: the σ the posterior mean is evaluated at. Small (the default, the sampler's "
        "σ_min): the observed pixels taken as nearly noiseless; for measurements with noise of std s in [-1, 1] "
        "units, s (Appendix E.1); a larger σ (e.g. 0.02-0.1) where the network saw too few small σ in training",
        json_schema_extra=flag("--sigma"),
    )
    steps: int = Field(
        18,
        ge=1,
        description="mode sample: sampler steps from sigma_max to sigma_min",
        json_schema_extra=flag("--steps"),
    )
    sigma_min: float = Field(0.002, gt=0, description="mode sample: the σ the sampler ends at")
    sigma_max: float = Field(80.0, gt=0, description="mode sample: the σ the sampler starts from")
    rho: float = Field(7.0, gt=0, description="mode sample: the σ schedule's exponent ρ (EDM, Eq. 5)")
    seed: int = Field(
        0,
        ge=0,
        description="seed of the noise, drawn per batch on the CPU (the same rows and batch_size give the same "
        "noise on any device)",
        json_schema_extra=flag("--seed"),
    )
    batch_size: int = Field(64, ge=1, description="images per network batch", json_schema_extra=flag("--batch-size"))
    weights: Literal["ema", "raw"] = Field(
        "ema", description="network weights: ema (ema.safetensors) or raw (model.safetensors, the last step's)"
    )
    class_label: int | None = Field(
        None,
        ge=0,
        description="a class-conditional model: the class of every row (default: each row's 'label' column; data "
        "without one needs this key, and a row without a label is quarantined)",
        json_schema_extra=flag("--class-label"),
    )
    limit: int | None = Field(None, ge=1, description="restore only the first N rows (in the data's order)")
    pngs: bool = Field(
        False,
        description="also write each restoration as a PNG file: OUT/images/<mean|sample>/<id>.png",
        json_schema_extra=flag("--pngs"),
    )
    preview: int = Field(
        8, ge=0, le=64, description="rows in OUT/preview.png (observed, hidden pixels grey | mean | sample); 0: none"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the network runs; auto: a GPU where torch sees one, else the CPU"
    )
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @model_validator(mode="after")
    def _sigmas(self) -> InpaintConfig:
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"config key 'sigma_min': {self.sigma_min} must be below 'sigma_max' ({self.sigma_max})")
        return self

    @property
    def modes(self) -> tuple[str, ...]:
        """The restorations made, in column order: ``mean``, ``sample`` or both."""
        return ("mean", "sample") if self.mode == "both" else (self.mode,)


def report(cfg: InpaintConfig, s: dict) -> None:
    """The lines ``ambient-ray inpaint`` prints after a run."""
    from ambient_ray.stages.reports import mlflow_line

    print(
        f"inpaint: {s['rows_in']} rows in, {s['rows_out']} restored ({' and '.join(s['modes'])}), "
        f"{s['rows_quarantined']} quarantined; {s['observed_fraction']:.0%} of the pixels observed; "
        f"{s['images_per_s']:.1f} images/s on {s['device']}"
    )
    if s["rows_quarantined"]:
        print(f"  quarantined rows (with reasons): {s['out']}/quarantine/")
    print(f"  data: {s['data']}/   preview: {s['preview'] or 'none'}   config: {s['out']}/config.yaml")
    mlflow_line(s)
