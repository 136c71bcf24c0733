"""The tune stage's config (:class:`TuneConfig`, its flags) and its check, without Ray: what ``ambient-ray tune
--help`` and a config error need (the search is :mod:`tuning.search`, which re-exports these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError, Strict, flag
from ambient_ray.io.tracking import MlflowConfig
from ambient_ray.stages import registry
from tuning import space as spacemod


class TuneConfig(Strict):
    """Config of ``ambient-ray tune`` (a search-space file is one of these)."""

    space: dict[str, Any] = Field(
        default_factory=dict, description="searched keys: STAGE.KEY -> {uniform|loguniform|choice|grid|randint: ...}"
    )
    data: str = Field(..., description="the mixed dataset (a corrupt output)", json_schema_extra=flag("--data"))
    out: str = Field(..., description="output URI of the search", json_schema_extra=flag("--out"))
    num_samples: int = Field(
        4,
        ge=1,
        description="trials (with grid keys: repeats of the whole grid)",
        json_schema_extra=flag("--num-samples"),
    )
    searcher: Literal["random", "grid", "optuna", "hyperopt"] = Field(
        "random",
        description="how trials are drawn: random, grid (every space key a grid), optuna (TPE) or hyperopt "
        "(neither takes grid keys)",
        json_schema_extra=flag("--searcher", "how trials are drawn"),
    )
    scheduler: Literal["none", "asha"] = Field(
        "asha",
        description="early stopping: asha (stops trials whose val_loss trails at each rung) or none",
        json_schema_extra=flag("--scheduler", "early stopping"),
    )
    metric: Literal["val_loss", "fd"] = Field(
        "val_loss", description="what picks the best trial (ASHA and the searcher use val_loss)"
    )
    grace_period: int | None = Field(
        None, ge=1, description="ASHA: steps before a trial can be stopped (default: report_every)"
    )
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep 1/reduction_factor of the trials at each rung")
    report_every: int = Field(50, ge=1, description="training steps between the validation reports ASHA reads")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as the cluster's CPUs hold")
    trial_cpus: float = Field(1.0, gt=0, description="CPUs of the trial process (annotation, sampling, evaluation)")
    trial_gpus: float = Field(0.0, ge=0, description="GPUs of the trial process; fractions share a GPU")
    trial_max_failures: int = Field(
        0, ge=0, description="restarts of a failed trial (it continues from its last checkpoint)"
    )
    fail_fast: bool = Field(False, description="stop the whole search at the first failed trial")
    seed: int = Field(0, ge=0, description="seed of the searcher")
    classifier: str | None = Field(
        None,
        description="shared noise classifier (default: train one into OUT/prep/classifier)",
        json_schema_extra=flag("--classifier"),
    )
    samples: int = Field(256, ge=0, description="images each completed trial samples for its FD (0: no FD)")
    classifier_train: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray train-classifier'")
    annotate: dict[str, Any] = Field(
        default_factory=dict, description="keys of 'ambient-ray annotate', fixed for every trial"
    )
    train: dict[str, Any] = Field(
        default_factory=dict, description="keys of 'ambient-ray train', fixed for every trial"
    )
    sample: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray sample'")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray evaluate' (e.g. features)")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


def check(cfg: TuneConfig) -> TuneConfig:
    """Refuse a bad space or stage section before any trial starts (errors name the key)."""
    flat = spacemod.check(cfg.space, {"annotate": cfg.annotate, "train": cfg.train, "sample": cfg.sample}, cfg.searcher)
    if cfg.searcher in ("optuna", "hyperopt"):
        _require(cfg.searcher)
    for stage in spacemod.STAGES:
        owned = sorted(spacemod.owned(stage) & set(getattr(cfg, stage)))
        if owned:
            raise ConfigError(f"config key '{stage}.{owned[0]}': set by the search itself for each trial")
        both = sorted({f"{stage}.{k}" for k in cfgmod.flatten(getattr(cfg, stage))} & set(flat))
        if both:
            raise ConfigError(f"config key '{both[0]}': both searched (in 'space') and fixed; drop one")
    for section, stage, owned in (
        ("evaluate", "evaluate", registry.owned("evaluate", "reference", "reference_where")),
        ("classifier_train", "train-classifier", registry.owned("train-classifier")),
    ):
        fill = {"samples": "x", "reference": "x", "out": "x"} if section == "evaluate" else {"data": "x", "out": "x"}
        model = registry.get(stage).model()
        cfgmod.build_section(model, section, getattr(cfg, section), owned=owned, owner="the search itself", fill=fill)
    # a trial's training asks for num_workers x cpus_per_worker inside the trial's resources: `auto` (every CPU of a
    # node but one) would let one trial hold a whole node, so a search's trials take 1 CPU a worker unless given
    if cfg.train.get("cpus_per_worker", "auto") == "auto":
        cfg.train["cpus_per_worker"] = 1
    return cfg


def _require(searcher: str) -> None:
    import importlib.util

    if importlib.util.find_spec(searcher) is None:
        raise ConfigError(
            f"searcher '{searcher}' needs the {searcher} package: pip install {searcher} "
            "(or pip install 'ambient-ray[tune]')"
        )


def load(path: str | None = None, sets: list[str] | None = None, flags: dict | None = None) -> TuneConfig:
    return check(cfgmod.build(TuneConfig, path, sets, flags))
