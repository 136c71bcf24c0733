"""The ``sampler:`` config section: which registered sampler (``name``) and its knobs.

Its flags (``--sampler``, ``--steps``, ``--stochastic``, ``--guidance``, ``--guide``) are those of the sample
stage, whose config holds this section; the training grids build one from their own keys. The knobs of one
sampler only (``guide``, ``mask_density``, ...) say so in their descriptions.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ambient_ray.config import Strict, flag
from ambient_ray.sampling.registry import SAMPLERS

DEFAULT = "heun"


def _listing() -> str:
    return "; ".join(f"{name}: {s.about}" for name, s in SAMPLERS.items())


class SamplerConfig(Strict):
    """A sampler and its knobs (defaults: EDM's deterministic Heun sampler, 18 steps, from σ = 80)."""

    name: str = Field(
        DEFAULT,
        description=f"the sampler, one of: {_listing()}",
        json_schema_extra=flag("--sampler", metavar="NAME"),
    )
    steps: int = Field(
        18,
        ge=1,
        description="Heun steps (2*steps-1 network evaluations; ambient-truncated: levels from σ_max to σ_n, "
        "2*steps-1 evaluations too; one-step: unused)",
        json_schema_extra=flag("--steps"),
    )
    stochastic: bool = Field(
        False,
        description="EDM stochastic sampler (Algorithm 2) instead of the deterministic one (Algorithm 1)",
        json_schema_extra=flag("--stochastic"),
    )
    s_churn: float = Field(40.0, ge=0, description="stochastic: S_churn, the total noise added back (EDM Alg. 2)")
    s_min: float = Field(0.05, ge=0, description="stochastic: noise is added back only at S_min <= σ <= S_max")
    s_max: float = Field(50.0, ge=0, description="stochastic: the upper end of that σ range")
    s_noise: float = Field(1.003, ge=0, description="stochastic: S_noise, the std of the noise added back")
    sigma_max: float = Field(80.0, gt=0, description="the σ the sampler starts from (EDM's σ_max)")
    guidance: float = Field(
        1.0,
        ge=0,
        description="guidance weight w of a guided sampler (autoguidance: D_guide + w*(D - D_guide); "
        "classifier-free: D(null) + w*(D(caption) - D(null))); 1: none",
        json_schema_extra=flag("--guidance"),
    )
    guide: str | None = Field(
        None,
        description="autoguidance: the guiding model (a smaller or shorter-trained run on the same data)",
        json_schema_extra=flag("--guide"),
    )
    guide_weights: Literal["ema", "raw"] = Field("ema", description="autoguidance: the guide's weights")
    mask_density: float | None = Field(
        None,
        ge=0,
        le=1,
        description="fixed-mask, reconstruction-guidance: the fraction of pixels a mask keeps (default: the "
        "model's, meta.masked.density in its model.json: (1 - p)(1 - δ), the density of the training masks Ã)",
    )
    guidance_masks: int = Field(
        4,
        ge=2,
        description="reconstruction-guidance: masks per image, the fixed one included (the paper: 4; each extra "
        "mask is one more prediction per step, with its backward)",
    )
    guidance_weight: float = Field(
        5e-4,
        ge=0,
        description="reconstruction-guidance: the weight w of the consistency gradient "
        "w·∇½Σ_k‖D(x; Ã_1) − D(x; Ã_k)‖², constant in σ (the paper: 5e-4)",
    )

    sigma_n: float | None = Field(
        None,
        gt=0,
        description="ambient-truncated: the noise level σ_n of the model's training data (std of the added "
        "Gaussian noise, in the [-1, 1] pixel scale), where sampling stops and returns D(x; σ_n) (default: the "
        "model's, meta.noisy.sigma_n in its model.json)",
    )
    sigma_init: float | None = Field(
        None,
        gt=0,
        description="one-step: the generator's input noise level, x = D(σ_init·z; σ_init) (default: the model's, "
        "meta.one_step.sigma_init in its model.json; 2.5 in SiD and DSD); set, it runs any model as a generator",
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler.name {name!r}; allowed here: {', '.join(SAMPLERS.names())}")
        return name

    @model_validator(mode="after")
    def _fits(self) -> SamplerConfig:
        SAMPLERS.get(self.name).check(self)
        return self
