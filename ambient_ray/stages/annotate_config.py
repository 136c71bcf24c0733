"""The annotate stage's config (:class:`AnnotateConfig`, its flags) without torch: what its ``--help`` and a
config error need (the stage is :mod:`ambient_ray.stages.annotate`, which re-exports these)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ambient_ray.config import ConfigError, flag
from ambient_ray.diffusion.threshold_rules import DRAW_RULES, Mode, Rule
from ambient_ray.stages.actor_stage import ActorConfig


class AnnotateConfig(ActorConfig):
    """Config of ``ambient-ray annotate`` (the actor keys: :class:`~ambient_ray.stages.actor_stage.ActorConfig`)."""

    classifier: str | None = Field(
        None,
        description="noise classifier (train-classifier --kind noise output) for σ_min",
        json_schema_extra=flag("--classifier"),
    )
    crops_classifier: str | None = Field(
        None,
        description="crops classifier (--kind crops) for σ_max; needs 'locality'",
        json_schema_extra=flag("--crops-classifier"),
    )
    locality: str | None = Field(
        None,
        description="locality.json (or its folder) from 'ambient-ray locality': crop(σ)",
        json_schema_extra=flag("--locality"),
    )
    locality_eps: float | None = Field(
        None,
        ge=0,
        description="re-derive crop(σ) from the locality table's losses with this ε (default: the table's own crop(σ))",
    )
    curves_from: str | None = Field(
        None,
        description="another annotate output whose curves to reuse when they were computed with the same plan "
        "(a new τ or mode)",
    )
    tau: float = Field(
        0.45, gt=0, le=0.5, description="threshold τ = 0.5 − ε (Eq. 3.2, 3.4)", json_schema_extra=flag("--tau")
    )
    mode: Mode = Field(
        "per-sample",
        description="σ_min per sample (the paper's best) or one per corrupted set",
        json_schema_extra=flag("--mode"),
    )
    sets: Literal["corruption", "all"] = Field(
        "corruption",
        description="per-dataset: a set per corruption spec, or all non-clean rows as one set (one σ_min for all)",
    )
    rule: Rule = Field(
        "shrunk",
        description="per sample: how σ_min is read off a sample's noisy curve (docs/stages/annotate.md, "
        "'Per-sample σ_min estimators'): shrunk (the default: the best FD of the rules in the controlled "
        "experiment), first (Eq. 3.2 as written), smoothed (the authors'), last, isotonic, confident",
        json_schema_extra=flag("--rule"),
    )
    span: float = Field(
        32.0,
        ge=1,
        description="rule smoothed: the moving average's span in grid points (the authors': 32 of 2,048; scale "
        "it with grid_points for the same smoothing in σ, e.g. 8 of 512)",
    )
    z: float = Field(1.0, ge=0, description="rule confident: the bound is mean − z·std/√draws")
    crops_mode: Mode = Field("per-sample", description="σ_max per sample or one per corrupted set (as mode)")
    grid_lo: float | None = Field(None, gt=0, description="σ grid's low end (default: the classifier's training range)")
    grid_hi: float | None = Field(
        None, gt=0, description="σ grid's high end (default: the classifier's training range)"
    )
    grid_points: int = Field(24, ge=2, description="σ grid points")
    grid: Literal["log", "lognormal"] = Field(
        "log",
        description="log: log-spaced over [grid_lo, grid_hi]; lognormal: sorted draws of the training "
        "log-normal (grid_p_mean, grid_p_std) inside that range, densest where training σ's are (the authors')",
    )
    grid_p_mean: float = Field(-1.2, description="grid lognormal: the log-normal's mean of ln σ")
    grid_p_std: float = Field(1.2, gt=0, description="grid lognormal: its standard deviation of ln σ")
    draws: int = Field(4, ge=1, description="noise draws (or crops) per grid σ and row")
    weights: Literal["ema", "raw"] = Field(
        "ema", description="classifier weights: ema (ema.safetensors) or raw (model.safetensors, the last step's)"
    )
    fixed: dict[str, float] = Field(
        default_factory=dict,
        description="σ_min per source, e.g. {synthetic: 2.0}",
        json_schema_extra=flag(
            "--fixed",
            "σ_min for every row of a source (repeatable)",
            parse=lambda items: parse_fixed(items),
            repeat=True,
            metavar="SOURCE=SIGMA",
        ),
    )
    fixed_sigma_min: float | None = Field(None, ge=0, description="σ_min for non-clean rows no other rule annotates")
    scorer: str | None = Field(
        None,
        description="quality scorer: 'sharpness', a TorchScript URI or timm:ARCH@WEIGHTS",
        json_schema_extra=flag("--scorer"),
    )
    top_percent: float = Field(
        10.0,
        gt=0,
        le=100,
        description="with a scorer: the top k % by score are S_G (clean)",
        json_schema_extra=flag("--top-percent"),
    )
    batch_size: int = Field(256, ge=1, description="rows per classifier batch inside an actor")
    max_forward: int | None = Field(
        None, ge=1, description="noised images per forward pass (default 4096 on CPU, 32768 on GPU)"
    )
    seed: int = Field(
        0, ge=0, description="seed of the noise draws and crops (per row: a row's curve is the same in any shard)"
    )
    overwrite: bool = Field(
        False,
        description="recompute the curves in 'out' that other classifiers, grid, draws, seed or data computed",
        json_schema_extra=flag("--overwrite", "recompute curves of another run in --out"),
    )

    @model_validator(mode="after")
    def _draws_for_the_rule(self) -> "AnnotateConfig":
        if self.mode == "per-sample" and self.rule in DRAW_RULES and self.draws < 2:
            raise ValueError(
                f"rule {self.rule} weighs each curve by the spread of its noise draws: it needs draws >= 2 "
                f"(got {self.draws}); or choose rule first"
            )
        return self

    @field_validator("fixed")
    @classmethod
    def _fixed(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not math.isfinite(x) or x < 0}
        if bad:
            raise ValueError(f"fixed σ_min must be finite and >= 0: {bad}")
        return v


def parse_fixed(items: list[str] | None) -> dict[str, float] | None:
    """``['synthetic=2', 'web=0.5']`` -> {'synthetic': 2.0, 'web': 0.5} (for ``--fixed``)."""
    if not items:
        return None
    out = {}
    for item in items:
        src, eq, val = item.partition("=")
        try:
            out[src.strip()] = float(val)
        except ValueError:
            raise ConfigError(f"--fixed {item!r}: expected SOURCE=SIGMA, e.g. --fixed synthetic=2") from None
        if not eq or not src.strip():
            raise ConfigError(f"--fixed {item!r}: expected SOURCE=SIGMA, e.g. --fixed synthetic=2")
    return out
