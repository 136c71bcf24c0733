"""The one training loop: every model ambient-ray trains runs here, on the engine's :class:`Worker`.

A task (:mod:`ambient_ray.train.tasks`) supplies its network, its batches and its loss; the loop owns the
rest, the same for every task: gradient accumulation, the optimizer step and the post-step hooks (through
the worker), the EMA, interval metrics summed over ranks, validation on report steps, the progress line,
MLflow metrics from rank 0 (with the model TFLOP/s, MFU and peak memory of :meth:`Worker.throughput`), the
task's sample grids every ``grid_every`` steps, and checkpoints reported to Ray Train with each rank's task state.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from ambient_ray.train.engine import EngineConfig, Worker, progress_line


class Task(Protocol):
    """What a task gives the loop. Methods that say "collective" are called on every rank."""

    name: str  # the progress line's logger (ambient_ray.NAME)

    def build(self) -> torch.nn.Module:
        """The network, built under the run's seed (the same initial weights on every rank)."""

    def meta(self) -> dict:
        """``model.json``: what rebuilds the network (``arch``, ``kind``, ``model``, ...)."""

    def setup(self, w: Worker) -> None:
        """Take this rank's rows (after the worker exists, before a checkpoint is restored)."""

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """This rank's task state from a restored checkpoint (empty on a fresh start)."""

    def loss(self, w: Worker) -> torch.Tensor:
        """One micro-batch: draw it, run the network through ``w.engine``, return the loss to backpropagate
        (and keep the interval's statistics)."""

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

    # optional: def grid(self, w: Worker) -> bytes | None
    #     Collective (under ZeRO-3): a PNG of samples of the EMA weights with a fixed seed and fixed labels on rank 0
    #     (None elsewhere), logged every ``grid_every`` steps as grids/grid_<step>.png.


def run(task: Task, cfg: EngineConfig, config: dict) -> None:
    """A Ray Train worker's whole run of ``task`` (``config``: the loop config of :func:`engine.fit`)."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    w = Worker(cfg, task.build(), task.meta(), config)
    try:
        steps(task, cfg, w)
    finally:
        w.close()


def steps(task: Task, cfg: EngineConfig, w: Worker) -> None:
    """The run's steps on its worker ``w``, from its last checkpoint (if any) to ``cfg.steps``."""
    task.setup(w)
    task.load_state(w.restore())
    t_last, step_last = time.perf_counter(), w.step
    while w.step < cfg.steps:
        for _ in range(cfg.optim.grad_accum):
            w.engine.backward(task.loss(w))
            w.engine.step()
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
