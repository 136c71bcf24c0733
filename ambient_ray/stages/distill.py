"""The distill stage: Denoising Score Distillation's Phase II (seed paper 004, Sec. 3.2) of any denoiser ambient-ray
trains into a one-step generator, on the engine (Ray Train + DeepSpeed at any ZeRO stage, MLflow).

``ambient-ray distill --teacher RUN --out URI [--data URI] [--way adjusted|standard] [--sigma-n S]`` trains the
generator and the fake score, both from the teacher's EMA weights, against the frozen teacher
(:mod:`ambient_ray.train.tasks.distill`). Outputs under OUT, as for ``train``: ``model/`` (the EMA generator;
its ``model.json`` is the teacher's network marked ``one_step``, which ``ambient-ray sample --one-step`` draws
from in one network evaluation), ``ray/train/checkpoint_*`` (generator, fake score and their DeepSpeed states;
the teacher is rebuilt from its folder), ``samples.png`` (one-step samples), with ``distill.eval_every``
``picked/`` (the EMA generator of the best proximal FD so far and ``picked.json``), ``config.yaml``,
``mlflow_run.json``, ``summary.json``.
"""

from __future__ import annotations

import json

from ambient_ray.io import storage
from ambient_ray.stages.results import TrainResult
from ambient_ray.train import driver, objectives
from ambient_ray.train.tasks.distill_config import DistillConfig


def run(cfg: DistillConfig) -> TrainResult:
    """Distil; returns the training summary (out, checkpoint, MLflow run, final metrics, the picked checkpoint)."""
    objective = objectives.for_stage(cfg.objective, "distill")
    storage.check_reachable(storage.normalize(cfg.out))
    prepared = objective.prepare(cfg)
    summary = driver.train(cfg, prepared, stage="distill", artifacts=lambda out, ckpt: artifacts(cfg, out))
    picked = storage.join(storage.normalize(cfg.out), "picked", "picked.json")
    if storage.exists(picked):
        summary["picked"] = json.loads(storage.read_bytes(picked))
        storage.write_bytes(storage.join(summary["out"], "summary.json"), json.dumps(summary, indent=1).encode())
    return summary


def artifacts(cfg: DistillConfig, out: str) -> dict[str, bytes]:
    """One-step samples of the exported EMA generator (``samples.png``) and the proximal-FD pick (``picked.json``)."""
    from ambient_ray.io import plots
    from ambient_ray.models.weights import load
    from ambient_ray.sampling import SamplerConfig
    from ambient_ray.sampling.draw import draw

    files = {}
    if cfg.sample_grid:
        net = load(storage.join(out, "model"), "denoiser")
        imgs = draw(net, cfg.sample_grid, SamplerConfig(name="one-step"), seed=cfg.seed)
        files["samples.png"] = grid = plots.image_grid_png(imgs)
        storage.write_bytes(storage.join(out, "samples.png"), grid)
    picked = storage.join(out, "picked", "picked.json")
    if storage.exists(picked):
        files["picked.json"] = storage.read_bytes(picked)
    return files
