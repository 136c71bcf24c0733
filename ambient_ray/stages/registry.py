"""The stage registry: every ``ambient-ray`` sub-command, and what the command line and the workflows look up
per stage (its config class and ``run``, its output folder, how an unfinished run resumes, the keys that wire
it to other stages).

``ambient-ray --help`` lists the stages in the order registered here; ``ambient-ray STAGE`` builds the stage's
config from its flags (declared beside the config fields) and calls its ``run``. The pipeline, the experiment
and the tune stage (:mod:`ambient_ray.workflows`, :mod:`tuning.search`) take from here each section's config
class, the stage's folder under their OUT, its resume policy, its wiring keys and how to call it.

A stage's code is imported only when it is used (``module`` and ``config`` are names), so ``ambient-ray
corrupt`` does not import the training stack. Adding a stage: write ``ambient_ray/stages/NAME.py`` (a config
class with its flags and ``run(cfg[, progress])`` returning a summary dict with ``out``), add one
``STAGES.register("NAME", Stage(...))`` below, and ``jobs/NAME.py`` (the stage as a Ray job).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ambient_ray.registry import Registry
from ambient_ray.stages import reports

# What a workflow does with a stage's output folder that holds an unfinished run (its done-marker missing):
# - "shards": keep it; the stage resumes shard by shard (its own done-markers) and replaces another plan itself
# - "shards-overwrite": keep it, and let the stage replace an unfinished run of another plan (overwrite=true)
# - "checkpoint": continue from its latest checkpoint (resume=true); without one, start over
# - "restart": start over from an empty folder
Resume = Literal["shards", "shards-overwrite", "checkpoint", "restart"]


def _load(ref: str) -> Any:
    """``module:attr`` -> that attribute (the module imported now)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Stage:
    """One registered stage (a sub-command of ``ambient-ray``)."""

    help: str  # one line: the sub-command's help in ``ambient-ray --help``
    module: str | None = None  # the module holding its config class and run function
    # its config class in ``module``, or ``other.module:Class`` where the stage module imports heavy libraries
    # (its ``--help`` and config errors then need only the light module); None: a command without a config (jobs)
    config: str | None = None
    function: str = "run"  # its run function in ``module``: function(cfg[, progress=...]) -> summary
    progress: bool = False  # the run function takes ``progress`` (show progress bars)
    folder: str | None = None  # its output folder under a workflow's OUT (``OUT/annotated``)
    resume: Resume = "restart"  # what a workflow does with an unfinished output folder
    links: frozenset[str] = frozenset()  # config keys that wire it to other stages: inputs, out, MLflow parent
    # config keys naming a Parquet dataset (a folder of shards or one file), checked with pyarrow before the
    # stage's module is imported or Ray starts: a missing path or column is one line naming it (a DataError).
    # The training stages check their data on the driver themselves, after their objective (a config key)
    reads: tuple[str, ...] = ()
    input: str = "data"  # its main input (dotted config key): what a chain feeds it, what progress lines name
    keep: tuple[str, ...] = ()  # summary keys a workflow keeps in its report besides out, MLflow run and figures
    report: Callable[[Any, Any], None] | None = None  # the CLI's lines after a run: report(cfg, summary)
    figures: Callable[[Any, Any], dict] | None = None  # headline figures a workflow keeps: figures(cfg, summary)
    extra: str | None = None  # ``module:function(parser)`` adding the flags that are not config keys
    command: str | None = None  # ``module:function(args, flags) -> exit code`` run instead of build -> run -> report

    def model(self) -> Any:
        """The config class (imported now), or None."""
        if self.config is None:
            return None
        return _load(self.config) if ":" in self.config else getattr(importlib.import_module(self.module), self.config)

    def call(self, cfg: Any, *, progress: bool = True, **kwargs: Any) -> Any:
        """Run the stage on a built config; ``kwargs`` go to its run function (e.g. train's ``callbacks``)."""
        self.check_inputs(cfg)
        run = getattr(importlib.import_module(self.module), self.function)  # looked up now: tests patch it
        return run(cfg, progress=progress, **kwargs) if self.progress else run(cfg, **kwargs)

    def check_inputs(self, cfg: Any) -> None:
        """The quick check of the datasets the config names (``reads``)."""
        from ambient_ray.config import get_key
        from ambient_ray.data.metadata import check_dataset

        for key in self.reads:
            if value := get_key(cfg, key):
                check_dataset(value)

    def add_flags(self, parser: Any) -> None:
        if self.extra is not None:
            _load(self.extra)(parser)

    def command_function(self) -> Callable | None:
        """The stage's own command (imported now), or None: the CLI builds the config, runs and reports."""
        return None if self.command is None else _load(self.command)

    @property
    def resumes_in_place(self) -> bool:
        """Whether an unfinished run is continued in its folder by the stage itself (shard by shard)."""
        return self.resume in ("shards", "shards-overwrite")


class StageRegistry(Registry[Stage]):
    """The generic registry, plus the stages in the order they were registered (the order of a run)."""

    def __init__(self) -> None:
        super().__init__("stage")

    def in_order(self) -> list[tuple[str, Stage]]:
        return list(self._entries.items())


STAGES = StageRegistry()


def get(name: str) -> Stage:
    """The registered stage ``name``; a KeyError names the registered ones."""
    return STAGES.get(name)


def owned(name: str, *also: str) -> set[str]:
    """The keys a workflow sets itself in a section of stage ``name``: the stage's links and ``also``."""
    return set(get(name).links) | set(also)


def _keys(*names: str) -> frozenset[str]:
    return frozenset(names)


# ------------------------------------------------------------------------------ the stages, in the order of a run

STAGES.register(
    "corrupt",
    Stage(
        "make a mixed-quality dataset: keep a clean subset, corrupt the rest (Ray Data)",
        "ambient_ray.stages.corrupt",
        "CorruptConfig",
        progress=True,
        folder="corrupt",
        resume="shards",
        links=_keys("out"),
        input="source.dataset",
        report=reports.corrupt,
        figures=reports.corrupt_figures,
        extra="ambient_ray.commands:corrupt_flags",
        command="ambient_ray.commands:corrupt",
    ),
)
STAGES.register(
    "precompute",
    Stage(
        "images -> VAE latents, captions -> text embeddings, from local or S3 weights (Ray Data)",
        "ambient_ray.stages.precompute",
        "ambient_ray.stages.precompute_config:PrecomputeConfig",
        progress=True,
        reads=("data",),
        folder="precomputed",
        resume="shards-overwrite",
        links=_keys("data", "out", "mlflow"),
        report=reports.precompute,
        figures=reports.precompute_figures,
    ),
)
STAGES.register(
    "train-classifier",
    Stage(
        "train the noise (σ_min) or crops (σ_max) classifier (Ray Train + DeepSpeed)",
        "ambient_ray.stages.train_classifier",
        "ambient_ray.train.tasks.classifier_config:ClassifierTrainConfig",
        folder="classifier",
        resume="checkpoint",
        links=_keys("data", "out", "kind", "mlflow"),
        report=reports.train_classifier,
        figures=reports.train_classifier_figures,
    ),
)
STAGES.register(
    "locality",
    Stage(
        "measure crop(σ), the context a trained denoiser needs at each σ",
        "ambient_ray.stages.locality",
        "LocalityConfig",
        reads=("data",),
        folder="locality",
        links=_keys("checkpoint", "data", "out", "mlflow"),
        input="checkpoint",
        report=reports.locality,
    ),
)
STAGES.register(
    "annotate",
    Stage(
        "σ_min / σ_max for every row from trained classifiers or fixed rules (Ray Data)",
        "ambient_ray.stages.annotate",
        "ambient_ray.stages.annotate_config:AnnotateConfig",
        progress=True,
        reads=("data",),
        folder="annotated",
        resume="shards",
        links=_keys("data", "out", "classifier", "mlflow"),
        report=reports.annotate,
        figures=reports.annotate_figures,
    ),
)
STAGES.register(
    "train",
    Stage(
        "train an ambient diffusion model (Ray Train + DeepSpeed ZeRO, MLflow)",
        "ambient_ray.stages.train",
        "ambient_ray.train.tasks.denoiser_config:TrainConfig",
        folder="train",
        resume="checkpoint",
        links=_keys("data", "out", "mlflow"),
        keep=("checkpoint",),
        report=reports.train,
        figures=reports.train_figures,
    ),
)
STAGES.register(
    "distill",
    Stage(
        "distil a trained denoiser into a one-step generator (Denoising Score Distillation; Ray Train + DeepSpeed)",
        "ambient_ray.stages.distill",
        "ambient_ray.train.tasks.distill_config:DistillConfig",
        folder="distill",
        resume="checkpoint",
        links=_keys("teacher", "data", "out", "mlflow"),
        input="teacher",
        keep=("checkpoint", "picked"),
        report=reports.distill,
        figures=reports.distill_figures,
    ),
)
STAGES.register(
    "sample",
    Stage(
        "draw images from a trained model with a registered sampler (default: EDM Heun)",
        "ambient_ray.stages.sample",
        "SampleConfig",
        progress=True,
        folder="samples",
        links=_keys("checkpoint", "out", "mlflow"),
        input="checkpoint",
        report=reports.sample,
        figures=reports.sample_figures,
    ),
)
STAGES.register(
    "inpaint",
    Stage(
        "restore masked images with a model of the masked objective: posterior mean and/or a sample",
        "ambient_ray.stages.inpaint",
        "ambient_ray.stages.inpaint_config:InpaintConfig",
        progress=True,
        folder="inpainted",
        links=_keys("data", "model", "out", "mlflow"),
        # its lines are beside its config (the light module), imported when they are printed
        report=lambda cfg, s: _load("ambient_ray.stages.inpaint_config:report")(cfg, s),
    ),
)
STAGES.register(
    "phema",
    Stage(
        "post-hoc EMA: any σ_rel from the power-EMA snapshots of a run (EDM2 Sec. 3.2)",
        "ambient_ray.stages.phema",
        "PhemaConfig",
        folder="phema",
        links=_keys("run", "out"),
        input="run",
        report=reports.phema,
    ),
)
STAGES.register(
    "features",
    Stage(
        "train the in-project feature network for FD on built-in data (no download)",
        "ambient_ray.stages.features",
        "FeaturesConfig",
        progress=True,
        folder="features",
        links=_keys("dataset", "out"),
        input="dataset",
        report=reports.features,
    ),
)
STAGES.register(
    "evaluate",
    Stage(
        "FD, precision/recall, Vendi, memorization and proximal FD of samples",
        "ambient_ray.stages.evaluate",
        "EvaluateConfig",
        progress=True,
        folder="eval",
        links=_keys("samples", "out", "mlflow"),
        input="samples",
        report=reports.evaluate,
        figures=reports.evaluate_figures,
    ),
)
STAGES.register(
    "experiment",
    Stage(
        "the controlled experiment: only-clean, all-data, ambient-fixed, ambient-o, oracle",
        "ambient_ray.workflows.experiment",
        "ExperimentConfig",
        progress=True,
        report=reports.experiment,
    ),
)
STAGES.register(
    "experiment-masked",
    Stage(
        "the masked experiment (Ambient Diffusion): ambient, naive and oracle at each missing probability p",
        "ambient_ray.workflows.experiment_masked",
        "MaskedExperimentConfig",
        progress=True,
        report=lambda cfg, s: _load("ambient_ray.workflows.experiment_masked:report")(cfg, s),
    ),
)
STAGES.register(
    "experiment-dsd",
    Stage(
        "the DSD experiment (Denoising Score Distillation): observations, Ambient-Full/-Truncated, DSD, oracle per σ_n",
        "ambient_ray.workflows.experiment_dsd",
        "DsdExperimentConfig",
        progress=True,
        report=lambda cfg, s: _load("ambient_ray.workflows.experiment_dsd:report")(cfg, s),
    ),
)
STAGES.register(
    "tune",
    Stage(
        "Ray Tune search over λ_max, τ, the crop-size threshold and training keys, logged to MLflow",
        "tuning.search",
        "tuning.config:TuneConfig",
        extra="ambient_ray.commands:tune_flags",
        command="ambient_ray.commands:tune",
    ),
)
STAGES.register(
    "pipeline",
    Stage(
        "corrupt -> train-classifier -> annotate -> train -> sample -> evaluate from one config; "
        "re-runs skip finished stages",
        "ambient_ray.workflows.pipeline",
        "PipelineConfig",
        progress=True,
        report=reports.pipeline,
    ),
)
STAGES.register(
    "plan",
    Stage(
        "per-GPU memory of training a model preset under DeepSpeed ZeRO, and the stage and node count to use",
        "ambient_ray.train.planner",
        "ambient_ray.train.plan_config:PlanConfig",
        function="plan",
        report=reports.plan,
    ),
)
STAGES.register(
    "theory",
    Stage(
        "what Ambient-o's theory says: the KDE and contraction bounds, their crossover σ*, a 1-D simulation that "
        "checks them, and (--curves) an annotated dataset's TV per σ",
        "ambient_ray.stages.theory",
        "TheoryConfig",
        report=reports.theory,
    ),
)
STAGES.register(
    "jobs",
    Stage(
        "follow, stop and trace the Ray jobs of a cluster (list, logs, stop, runs)",
        extra="ambient_ray.commands:jobs_flags",
        command="ambient_ray.commands:jobs",
    ),
)
STAGES.register(
    "ls",
    Stage(
        "list a run's outputs, local or on S3: one line a folder (file count, size), or every file (-r)",
        extra="ambient_ray.commands:ls_flags",
        command="ambient_ray.commands:ls",
    ),
)
STAGES.register(
    "get",
    Stage(
        "copy an output file or folder from local disk or S3 here (e.g. a sample grid to look at)",
        extra="ambient_ray.commands:get_flags",
        command="ambient_ray.commands:get",
    ),
)
