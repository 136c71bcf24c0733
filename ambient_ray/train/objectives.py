"""The objective registry: ``objective`` in a training config names the entry that trains it.

An :class:`Objective` brings a stage's config class (its sections), a driver-side ``prepare`` (checks the data and
returns a typed :class:`~ambient_ray.train.driver.Prepared`: the rows every worker gets, the columns it reads) and a
worker-side task (:class:`~ambient_ray.train.loop.Task`). Every Ray Train worker runs :func:`worker_loop`, which
looks the objective up again by name. The built-in entries are registered at the end of this file; a new objective
is a task file under ``train/tasks/`` and one ``OBJECTIVES.register`` line here (docs/design/extending.md,
"Adding an objective, a sampler or a stage").
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

from ambient_ray.config import ConfigError
from ambient_ray.registry import Registry
from ambient_ray.train.config import EngineConfig
from ambient_ray.train.tasks import classifier_config, denoiser_config, denoiser_data, distill_config

if TYPE_CHECKING:  # the worker side (torch) is imported on the workers: a stage's --help lists objectives without it
    from ambient_ray.train import loop
    from ambient_ray.train.prepared import Prepared


@dataclasses.dataclass(frozen=True)
class Objective:
    """``stage``: the CLI stage that trains it; ``config``: that stage's config class; ``prepare(cfg)``: the driver
    side; ``task(cfg, rows)``: the worker side (``rows``: ``prepare``'s ``Prepared.rows``); ``help``: one line for
    ``--help``."""

    stage: str
    config: type[EngineConfig]
    prepare: Callable[[Any], Prepared]
    task: Callable[[Any, Any], loop.Task]
    help: str


OBJECTIVES: Registry[Objective] = Registry("objective")


def for_stage(name: str, stage: str) -> Objective:
    """The objective ``name`` of a ``stage`` run; a ConfigError naming the stage's objectives otherwise."""
    allowed = names(stage)
    if name not in allowed:
        where = f" (an objective of 'ambient-ray {OBJECTIVES.get(name).stage}')" if name in OBJECTIVES else ""
        raise ConfigError(
            f"config key 'objective': unknown objective {name!r}{where}; allowed here: {', '.join(allowed)}"
        )
    return OBJECTIVES.get(name)


def names(stage: str) -> list[str]:
    return [n for n, o in OBJECTIVES.items() if o.stage == stage]


def describe(stage: str) -> str:
    """The stage's objectives for its ``--help``: one ``name: help`` line each."""
    return "\n".join(f"  {n}: {OBJECTIVES.get(n).help}" for n in names(stage))


def worker_loop(config: dict) -> None:
    """Every Ray Train worker's function: the run's objective (``config["objective"]``) on the one loop."""
    from ambient_ray.train import loop

    objective = OBJECTIVES.get(config["objective"])
    cfg = objective.config.model_validate(config["cfg"])
    loop.run(objective.task(cfg, config["data"]), cfg, config)


# ------------------------------------------------------------------------------ the built-in objectives


def _ambient_task(cfg: Any, rows: Any) -> loop.Task:
    from ambient_ray.train.tasks.ambient import AmbientTask

    return AmbientTask(cfg, rows)


def _masked_task(cfg: Any, rows: Any) -> loop.Task:
    from ambient_ray.train.tasks.masked import MaskedTask

    return MaskedTask(cfg, rows)


def _noisy_task(cfg: Any, rows: Any) -> loop.Task:
    from ambient_ray.train.tasks.noisy import NoisyTask

    return NoisyTask(cfg, rows)


def _distill_task(cfg: Any, rows: Any) -> loop.Task:
    from ambient_ray.train.tasks.distill import DistillTask

    return DistillTask(cfg, rows)


def _classifier_task(cfg: Any, rows: Any) -> loop.Task:
    from ambient_ray.train.tasks.classifier import ClassifierTask

    return ClassifierTask(cfg, rows)


OBJECTIVES.register(
    "ambient",
    Objective(
        stage="train",
        config=denoiser_config.TrainConfig,
        prepare=denoiser_data.prepare,
        task=_ambient_task,
        help="Ambient-o's loss (Eq. 3.2-3.3): x0 prediction mapped to x_{σ_min}, each row above its σ_min buffer",
    ),
)
OBJECTIVES.register(
    "masked",
    Objective(
        stage="train",
        config=denoiser_config.TrainConfig,
        prepare=denoiser_data.prepare,
        task=_masked_task,
        help="Ambient Diffusion on masked rows (seed 003 Eq. 3.2): Ã = B⊙A seen, graded on all of A; clean and "
        "σ_min-annotated rows in the same run with their own loss",
    ),
)
OBJECTIVES.register(
    "noisy",
    Objective(
        stage="train",
        config=denoiser_config.TrainConfig,
        prepare=denoiser_data.prepare,
        task=_noisy_task,
        help="DSD's Phase I (seed 004): rows observed as y = x + σ_n·z (the 'noisy' column) teach E[x | x_σ] at "
        "σ > σ_n through the ambient loss with y as x_{σ_n}",
    ),
)
OBJECTIVES.register(
    "classifier",
    Objective(
        stage="train-classifier",
        config=classifier_config.ClassifierTrainConfig,
        prepare=classifier_config.prepare,
        task=_classifier_task,
        help="Ambient-o's annotation classifiers (Eq. 3.1): BCE of noised images (noise) or crops (crops)",
    ),
)
OBJECTIVES.register(
    "distill",
    Objective(
        stage="distill",
        config=distill_config.DistillConfig,
        prepare=distill_config.prepare,
        task=_distill_task,
        help="Denoising Score Distillation (seed 004, SiD's loss): a one-step generator and a fake score, both from "
        "the teacher's weights, against the frozen teacher",
    ),
)
