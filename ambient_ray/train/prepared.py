"""What an objective's driver side hands the training driver (:func:`ambient_ray.train.driver.train`)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ambient_ray.train import perf


@dataclasses.dataclass
class Prepared:
    """What an objective's driver side (``Objective.prepare``) hands the engine: the export part's ``model.json``,
    the typed ``rows`` every worker's task gets (the loop config's ``data``), the dataset columns the workers read
    (none: a run without a dataset), the MLflow tags, the headline printed at the start, the summary's extra keys,
    the lazy steps of a streamed dataset, the model's costs (parameters, FLOPs per image) for MLflow, and the
    ``model.json`` of every other trained part by name (a resume is checked against each), and MLflow params
    measured on the data."""

    meta: dict
    rows: Any
    columns: list[str]
    tags: dict
    headline: str
    extra: dict
    stream: Callable | None = None
    costs: perf.Costs | None = None
    parts: dict[str, dict] = dataclasses.field(default_factory=dict)
    params: dict = dataclasses.field(default_factory=dict)  # more MLflow params (the run's config is logged anyway)
