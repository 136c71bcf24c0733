"""The one training loop: every model ambient-ray trains runs here, on the engine's :class:`Worker`.

A task (:mod:`ambient_ray.train.tasks`) supplies its named parts (:class:`~ambient_ray.train.parts.Part`), its
schedule (which trained part steps next, how many times), its batches and its loss; the loop owns the rest,
the same for every task: gradient accumulation, each part's optimizer step, post-step hooks and EMA (through
the worker), interval metrics summed over ranks, validation on report steps, the progress line,
MLflow metrics from rank 0 (with the model TFLOP/s, MFU and peak memory of :meth:`Worker.throughput`), the
task's sample grids every ``grid_every`` steps, and checkpoints reported to Ray Train with each rank's task state.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from ambient_ray.train.config import EngineConfig
from ambient_ray.train.parts import Part
from ambient_ray.train.worker import Worker, progress_line


class Task(Protocol):
    """What a task gives the loop. Methods that say "collective" are called on every rank."""

    name: str  # the progress line's logger (ambient_ray.NAME)

    def parts(self) -> dict[str, Part]:
        """The task's named networks, built under the run's seed (the same initial weights on every rank): one
        trained part marked ``export`` (the network ``meta`` describes), any other trained or frozen parts."""

    def meta(self) -> dict:
        """``model.json``: what rebuilds the network (``arch``, ``kind``, ``model``, ...)."""

    def setup(self, w: Worker) -> None:
        """Take this rank's rows (after the worker exists, before a checkpoint is restored)."""

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """This rank's task state from a restored checkpoint (empty on a fresh start)."""

    def loss(self, w: Worker, part: str) -> torch.Tensor:
        """One micro-batch for trained part ``part``: draw it, run the networks (``w.parts[name].engine``; the
        export part's is ``w.engine``), return the loss to backpropagate into ``part`` (and keep the interval's
        statistics)."""

    def interval(self, w: Worker, seconds: float) -> tuple[dict, dict]:
        """Collective: the interval's metrics summed over ranks (reported and logged) and rank 0's extra
        MLflow metrics (logged only); resets the interval's statistics."""

    def validation(self, w: Worker) -> dict:
        """Collective: validation metrics on a reporting step ({} if the task has none)."""

    def progress(self, metrics: dict) -> str:
        """The progress line's text after ``step N/M``."""

    def state(self) -> dict[str, torch.Tensor]:
        """This rank's task state for a checkpoint."""

    def files(self) -> dict[str, str]:
        """Rank 0's extra checkpoint files (name -> text)."""

    # optional: def schedule(self) -> list[tuple[str, int]]
    #     One step of the run: (trained part, optimizer steps) in order, e.g. [("fake_score", 1), ("generator", 1)];
    #     default: the export part once.
    # optional: def grid(self, w: Worker) -> bytes | None
    #     Collective (under ZeRO-3): a PNG of samples of the EMA weights with a fixed seed and fixed labels on rank 0
    #     (None elsewhere), logged every ``grid_every`` steps as grids/grid_<step>.png.


def run(task: Task, cfg: EngineConfig, config: dict) -> None:
    """A Ray Train worker's whole run of ``task`` (``config``: the loop config of :func:`driver.fit`)."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    w = Worker(cfg, task.parts, task.meta(), config)  # under ZeRO-3 built partitioned
    try:
        steps(task, cfg, w)
    finally:
        w.close()


def schedule(task: Task, w: Worker) -> list[tuple[str, int]]:
    """The task's schedule (default: the export part once a step), checked against its trained parts."""
    plan = task.schedule() if hasattr(task, "schedule") else [(w.main, 1)]
    trained = {p.name for p in w.trained()}
    bad = [name for name, _ in plan if name not in trained]
    if bad or not plan:
        raise ValueError(f"schedule {plan}: every entry must name a trained part ({', '.join(sorted(trained))})")
    return plan


def steps(task: Task, cfg: EngineConfig, w: Worker, ckpt=None) -> None:
    """The run's steps on its worker ``w``, from its last checkpoint (``ckpt``, default Ray Train's; if any) to
    ``cfg.steps``. A step runs the schedule: each entry's part takes its optimizer steps (each of
    ``grad_accum`` micro-batches), each followed by its hooks and EMA."""
    task.setup(w)
    task.load_state(w.restore(ckpt))
    plan = schedule(task, w)
    t_last, step_last = time.perf_counter(), w.step
    while w.step < cfg.steps:
        w.begin_step()
        for name, n in plan:
            engine = w.parts[name].engine
            for _ in range(n):
                for _ in range(cfg.optim.grad_accum):
                    engine.backward(task.loss(w, name))
                    engine.step()
                w.update(name)
        log_now, checkpoint_now = w.end_step()
        if cfg.grid_every and w.step % cfg.grid_every == 0 and hasattr(task, "grid"):
            t_grid = time.perf_counter()
            png = task.grid(w)  # collective under ZeRO-3
            if png:
                w.log_files({f"grid_{w.step:07d}.png": png}, "grids")
            t_last += time.perf_counter() - t_grid  # not training time
        if not log_now:
            continue
        now = time.perf_counter()
        metrics, extra = task.interval(w, now - t_last)
        extra = {**extra, **w.throughput(w.step - step_last, now - t_last)}  # collective
        if cfg.grad_guard:  # collective
            extra = {**extra, "nonfinite_grads": w.take_nonfinite()}
        metrics = {"step": w.step, **metrics, "lr": w.lr()}
        if checkpoint_now or w.report_due():  # only what goes to Ray Train
            metrics.update(task.validation(w))
        if w.rank == 0:
            progress_line(task.name, f"step {w.step}/{cfg.steps}  {task.progress(metrics)}")
            w.log({**metrics, **extra})
        t_last, step_last = now, w.step
        if checkpoint_now:
            w.save_and_report(metrics, task.state(), task.files() if w.rank == 0 else None)
        elif w.report_due():
            w.report(metrics)
