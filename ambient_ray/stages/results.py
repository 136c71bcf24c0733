"""What the stages return, typed, and the one error a stage raises when it stopped part-way.

Each stage's ``run()`` returns a plain dict (JSON-safe, also written as the stage's summary file), so
callers keep reading ``s["metrics"]``; these TypedDicts name its keys. ``corrupt`` returns its
:class:`~ambient_ray.stages.corrupt.CorruptResult` dataclass instead.
"""

from __future__ import annotations

from typing import Any, TypedDict


class StageFailed(RuntimeError):
    """A stage that stopped part-way; the message names the stage, what finished and how to resume.

    Raised by the sharded stages (corrupt, annotate) when shards failed, and by the pipeline around any
    other stage error (naming the stage and its input); the pipeline lets it through as is."""


class StageResult(TypedDict, total=False):
    """Keys every stage result has where it applies: its output folder, its MLflow run, its run time."""

    out: str
    mlflow_run_id: str | None
    mlflow_uri: str | None
    seconds: float


class TrainingResult(StageResult):
    """``train`` and ``train-classifier``: the latest checkpoint and the final reported metrics."""

    checkpoint: str | None
    metrics: dict[str, Any]


class TrainResult(TrainingResult):
    rows: int
    sigma_min: str


class ClassifierResult(TrainingResult):
    good_rows: int
    bad_rows: int


class AnnotateResult(StageResult):
    rows_in: int
    rows_out: int
    rows_quarantined: int
    shards: int
    shards_run: int
    shards_skipped: int
    rows_run: int
    seconds_curves: float
    images_per_s: float
    never_crossed: int
    mean_sigma_min: float
    mean_sigma_min_by_group: dict[str, float]
    rows_with_sigma_max: int
    annotations: dict[str, int]
    provenance: dict[str, Any]


class PrecomputeResult(StageResult):
    rows_in: int
    rows_out: int
    rows_quarantined: int
    shards: int
    shards_run: int
    shards_skipped: int
    seconds: float
    images_per_s: float
    latents: dict[str, Any]


class SampleResult(StageResult):
    samples: str
    grid: str
    sampler: str  # the sampler that drew them (one-step for a generator's folder without one named)
    nfe: int  # network evaluations per image (sampling.nfe)
    seconds_per_1000_images: float  # the draw's wall time (sampling, decoding, uint8) per 1,000 images


class EvaluateResult(StageResult):
    metrics: dict[str, float]
    details: dict[str, Any]


class FeaturesResult(StageResult):
    spec: str
    accuracy: float
    task: str


class LocalityResult(StageResult):
    table: dict[str, Any]
