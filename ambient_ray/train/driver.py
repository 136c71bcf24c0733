"""The training driver, after a stage's own checks: refuse a clash with an earlier run, check ``init_from``, open
the MLflow run, run the workers with Ray Train (:func:`fit`: the only TorchTrainer of ambient-ray), export the
last checkpoint's weights, register the model, write ``summary.json``. This is the engine's Ray Train glue."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, TypedDict

from ambient_ray.config import ConfigError
from ambient_ray.data.metadata import data_dir
from ambient_ray.io import storage, tracking
from ambient_ray.io.checkpoint import export_weights, latest_checkpoint
from ambient_ray.train.config import EngineConfig, resolve_cpus_per_worker, workers_that_fit
from ambient_ray.train.prepared import Prepared


class TrainingSummary(TypedDict):
    """What :func:`train` returns (and writes as ``summary.json``), with the stage's ``extra`` keys added."""

    out: str
    checkpoint: str | None
    mlflow_run_id: str | None
    mlflow_uri: str | None
    seconds: float
    metrics: dict[str, Any]


def check_resume(cfg: EngineConfig, out: str, meta: dict, parts: dict[str, dict] | None = None) -> None:
    """Refuse an ``out`` that holds a run unless resuming, and a resume with another model: the export part's
    (``meta``) or another trained part's (``parts``: ``{name: model.json}``, against ``parts/NAME/model.json``)."""
    ckpt = latest_checkpoint(out)
    started = storage.exists(storage.join(out, "ray", "train"))
    if started and not cfg.resume:
        raise ConfigError(f"{out} already holds a training run; pass --resume to continue it or use another --out")
    if cfg.resume and ckpt:
        check_same_model(ckpt, meta)
        for name, part in (parts or {}).items():
            check_same_model(storage.join(ckpt, "parts", name), part, f"part {name!r}: ")


def check_same_model(ckpt: str, meta: dict, what: str = "") -> None:
    """The ``model.json`` in checkpoint folder ``ckpt`` describes the network of ``meta`` (its kind, its model keys
    through the registry, so a checkpoint written before a key existed compares with its default)."""
    saved = json.loads(storage.read_bytes(storage.join(ckpt, "model.json")))
    if saved.get("kind", "denoiser") != meta.get("kind", "denoiser"):
        raise ConfigError(
            f"{what}the checkpoint in {ckpt} is a {saved.get('kind', 'denoiser')}, not a {meta.get('kind')}"
        )
    from ambient_ray.models.registry import config_of

    was, now = (config_of(m).model_dump(mode="json", exclude={"preset"}) for m in (saved, meta))
    diff = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    if diff:
        details = ", ".join(f"model.{k}: checkpoint {was.get(k)!r} vs config {now.get(k)!r}" for k in diff)
        raise ConfigError(f"{what}the checkpoint in {ckpt} was trained with another model config ({details})")


def check_init(cfg: EngineConfig, meta: dict) -> None:
    """Driver side of ``init_from``: the earlier output exists and holds a network of the same kind and arch
    whose parameters have this run's names and shapes (both networks built on the meta device: a key that
    changes no parameter shape, such as the DiT's ``img_resolution``, whose positions are a buffer, may
    differ); otherwise a ConfigError naming the first parameter that does not fit."""
    from ambient_ray.models import weights
    from ambient_ray.models.registry import arch_of, config_of
    from ambient_ray.train.planner import meta_model

    try:
        d, saved = weights.model_dir(cfg.init_from)
    except FileNotFoundError as e:
        raise ConfigError(f"config key 'init_from': {e}") from None
    if not storage.exists(storage.join(d, "model.safetensors")):
        raise ConfigError(f"config key 'init_from': {d} has no model.safetensors")
    kinds = (saved.get("kind", "denoiser"), meta.get("kind", "denoiser"))
    for what, (was, now) in (("kind", kinds), ("model.arch", (arch_of(saved), arch_of(meta)))):
        if was != now:
            raise ConfigError(f"config key 'init_from': {d} holds {what} {was!r}; this run trains {what} {now!r}")
    old = {n: tuple(p.shape) for n, p in meta_model(saved).named_parameters()}
    new = {n: tuple(p.shape) for n, p in meta_model(meta).named_parameters()}
    bad = [n for n in new if old.get(n) != new[n]] + [n for n in old if n not in new]
    if bad:
        was, now = (config_of(m).model_dump(mode="json", exclude={"preset"}) for m in (saved, meta))
        keys = ", ".join(
            f"model.{k}: {was.get(k)!r} vs {now.get(k)!r}" for k in sorted(now) if was.get(k) != now.get(k)
        )
        raise ConfigError(
            f"config key 'init_from': the network in {d} does not fit this run's: parameter '{bad[0]}' is "
            f"{old.get(bad[0], 'absent')} there and {new.get(bad[0], 'absent')} here"
            + (f" (model keys that differ: {keys})" if keys else "")
        )


def elastic_workers(cfg: EngineConfig) -> int | tuple[int, int]:
    """Ray Train's ``num_workers``: ``num_workers``, or with ``min_workers`` below it the elastic range (min, max)."""
    if cfg.min_workers is None or cfg.min_workers >= cfg.num_workers:
        return cfg.num_workers
    return (cfg.min_workers, cfg.num_workers)


def fit(
    cfg: EngineConfig,
    loop: Callable[[dict], None],
    loop_config: dict,
    columns: list[str],
    callbacks: list | None = None,
    stream: Callable | None = None,
):
    """Run ``loop`` on ``cfg.num_workers`` Ray Train workers over the dataset's ``columns``; the Ray Train result.

    ``callbacks``: Ray Train ``UserCallback``s (a Ray Tune trial passes the one that forwards each
    report to Tune).

    In memory (``stream`` None): the Parquet shards are read (and decoded nothing yet) in the driver and
    materialized before the workers take their CPUs (a worker set that holds every CPU of the cluster, 2
    workers on a 2-CPU node, would leave no CPU for read tasks started from inside the workers), and every
    worker iterates all of it (:func:`load_rank_rows` keeps its share). Streaming: ``stream(dataset)``
    adds its lazy steps (e.g. the annotation columns) and each worker reads only its own share through
    ``streaming_split`` (:func:`stream_batches`); the read tasks need CPUs beside the workers'.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ambient_ray.io import ray_runtime

    out = storage.normalize(cfg.out)
    ray_runtime.ray_init(out)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.use_gpu else "cpu")
    fs, path = storage.filesystem(storage.join(out, "ray"))
    # cpus_per_worker auto: whole CPUs per worker that fit with one CPU per node to spare; the worker runs as many
    # torch threads as Ray gives it (Worker: setup_threads)
    nodes = [(n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]
    cpus = resolve_cpus_per_worker(cfg.cpus_per_worker, cfg.num_workers, nodes, cfg.use_gpu)
    if cfg.cpus_per_worker == "auto" and workers_that_fit(cpus, nodes, cfg.use_gpu) < cfg.num_workers:
        print(
            f"train: {cfg.num_workers} workers of {cpus:g} CPU{'' if cpus == 1 else 's'}"
            + (" and a GPU" if cfg.use_gpu else "")
            + f" do not fit the cluster's nodes yet ({len(nodes)} alive, one CPU each kept free); Ray Train waits "
            "for nodes",
            file=sys.stderr,
        )
    loop_config = {**loop_config, "cpus_per_worker": cpus}
    datasets = {}
    if columns:  # a run with no dataset (e.g. a distillation, which draws noise, not rows) reads nothing
        data_fs, data_path = storage.filesystem(data_dir(cfg.data))
        ds = ray.data.read_parquet(data_path, filesystem=data_fs, file_extensions=["parquet"])
        ds = ds.select_columns(columns)
        ds = stream(ds) if stream else ds.materialize()
        # the workers' pass over the rows runs with the dataset's own Data context: no progress bar for it
        # (its bar would stay on the job's output, redrawn by an idle process)
        ds.context.enable_progress_bars = False
        datasets["train"] = ds
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=elastic_workers(cfg),
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cpus},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets=datasets,
        # explicit options: Train's defaults pass the deprecated ExecutionOptions.exclude_resources
        # streamed: Ray Train's streaming_split(equal=True), so every worker steps through as many rows
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"] if stream and datasets else [], execution_options=ray.data.ExecutionOptions()
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=callbacks or None,
        ),
    )
    return trainer.fit()


def train(
    cfg: EngineConfig,
    prepared: Prepared,
    *,
    stage: str,
    artifacts: Callable[[str, str], dict[str, bytes]],
    callbacks: list | None = None,
) -> TrainingSummary:
    """A training stage's driver, after its own checks: refuse a clash with an earlier run, save the resolved
    config, open the MLflow run (params: the config, and the run's size: ``parameters``, FLOPs per image from
    ``costs``, ``world_size``, ``global_batch``; for a transformer ``active_parameters``, ``tokens_per_image`` and
    ``tokens_per_step``, the global batch's kept tokens), :func:`fit` the objective's workers
    (:func:`ambient_ray.train.objectives.worker_loop`; each gets ``prepared.rows`` as the loop config's ``data``;
    the run's ``checkpoint`` tag follows each checkpoint's URI), export the last checkpoint's weights to
    ``OUT/model/``, write and log the stage's ``artifacts(out, ckpt)``, register ``OUT/model`` as a version in the
    MLflow model registry, close the run and write ``summary.json`` (``prepared.extra`` added to it).
    Returns the summary."""
    from ambient_ray import config as cfgmod
    from ambient_ray.train.objectives import worker_loop

    meta, costs = prepared.meta, prepared.costs

    out = storage.normalize(cfg.out)
    check_resume(cfg, out, meta, prepared.parts)
    if cfg.init_from and not (cfg.resume and latest_checkpoint(out)):  # a resumed run continues its own weights
        check_init(cfg, meta)
    cfgmod.save_resolved(cfg, out)
    size = {"world_size": cfg.num_workers, "global_batch": cfg.batch_size * cfg.optim.grad_accum * cfg.num_workers}
    params = {**cfgmod.flatten(cfg), **size, **(costs.params(size["global_batch"]) if costs else {})}
    params.update(prepared.params)
    run_id, uri = tracking.start_run(cfg.mlflow, out, params=params, tags={"stage": stage, **prepared.tags})
    print(prepared.headline + (f"; MLflow run {run_id} at {uri}" if run_id else "; MLflow off"))
    loop_config = {"cfg": cfg.model_dump(mode="json"), "objective": cfg.objective, "data": prepared.rows}
    loop_config.update(mlflow_run_id=run_id, mlflow_uri=uri)
    loop_config["costs"] = dataclasses.asdict(costs) if costs else None
    if run_id:
        callbacks = [*(callbacks or []), checkpoint_tag(run_id, uri, out)]
    t0 = time.perf_counter()
    result = fit(cfg, worker_loop, loop_config, prepared.columns, callbacks, prepared.stream)
    seconds = time.perf_counter() - t0
    ckpt = latest_checkpoint(out)
    export_weights(out, ckpt)
    files = {"config.yaml": storage.read_bytes(storage.join(out, "config.yaml"))}
    if ckpt:
        files.update(artifacts(out, ckpt))
    tracking.log_files(run_id, uri, files)
    model_uri = storage.join(out, "model")
    end_tags = {"checkpoint": ckpt or "", "model": model_uri}
    if ckpt and cfg.mlflow.register_model:
        name = tracking.registered_name(cfg.mlflow, stage)
        version = tracking.register_model(run_id, uri, name, model_uri, tags={"checkpoint": ckpt, "stage": stage})
        if version:
            end_tags["registered_model"] = f"{name}/{version}"
    tracking.finish(run_id, uri, tags=end_tags)
    summary = {
        **{"out": out, "checkpoint": ckpt, "mlflow_run_id": run_id, "mlflow_uri": uri, "seconds": seconds},
        **{"metrics": result.metrics, **prepared.extra},
    }
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(summary, indent=1, default=str).encode())
    return summary


def checkpoint_tag(run_id: str, uri: str | None, out: str):
    """A Ray Train callback (run on its controller): after each reported checkpoint, the MLflow run's ``checkpoint``
    tag is that checkpoint's URI (``OUT/ray/train/checkpoint_*``: referenced, never uploaded) and ``checkpoint_step``
    its step."""
    from ray.train import UserCallback

    class CheckpointTag(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if checkpoint is None:
                return
            name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
            tags = {"checkpoint": storage.join(out, "ray", "train", name)}
            tags["checkpoint_step"] = (metrics[0] if metrics else {}).get("step", "")
            try:
                tracking.set_tags(run_id, uri, tags)
            except Exception as e:  # a tag never fails the run
                print(f"mlflow: could not tag the checkpoint {name}: {e}")

    return CheckpointTag()
