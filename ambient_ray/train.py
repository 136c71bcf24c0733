"""The train stage: Ambient-o training on Ray Train (TorchTrainer) with DeepSpeed ZeRO, tracked in MLflow.

Driver: validate the dataset (columns, σ annotations, one image shape) before any worker starts,
open or reuse the MLflow run, read the Parquet shards with Ray Data (materialized before the workers
take their CPUs), and run a ``TorchTrainer`` whose storage is ``OUT/ray``.
Worker: iterate the dataset, keep this rank's rows (a stable hash of ``id``, so a
restarted worker gets the same rows), hold them as uint8, and train: draw σ first, pair it with an
eligible sample (:class:`ambient_ray.ambient.SigmaSampler`), add the sample's own σ_n noise, and take
the ambient loss. Checkpoints hold the DeepSpeed state, the EMA weights and each rank's random state;
a restarted or ``--resume``d run continues exactly where its last checkpoint left it.

Outputs under OUT: ``ray/train/checkpoint_*`` (Ray Train checkpoints), ``model/ema.safetensors``,
``model/model.safetensors`` and ``model/model.json`` (inference weights and the config to rebuild
the network), ``coverage.json`` and ``coverage.png`` (the σ donut), ``samples.png``, ``config.yaml``,
``mlflow_run.json``.
"""

from __future__ import annotations

import json
import math
import logging
import os
import tempfile
import time
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ambient_ray import ambient, storage
from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError, Strict
from ambient_ray.tracking import MlflowConfig
from ambient_ray.unet import UNetConfig, build_denoiser

META_COLUMNS = ("id", "height", "width", "channels", "quality", "source", "label", "sigma_min", "sigma_max")


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(50, ge=0)
    decay: Literal["none", "cosine", "linear"] = "cosine"
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    grad_accum: int = Field(1, ge=1)


class AmbientConfig(Strict):
    lambda_max: float = Field(4.0, gt=1.0, description="buffer: σ > sqrt(1 + 1/(λ_max − 1))·σ_min (Eq. D.2)")
    p_mean: float = -1.2
    p_std: float = Field(1.2, gt=0)
    sigma_data: float = Field(0.5, gt=0)
    corrupted_sigma_min: float | None = Field(
        None, ge=0, description="σ_min for rows with quality=corrupted when the data has no sigma_min column"
    )
    crop_sigmas: list[float] = Field(default_factory=list, description="crop(σ) table: σ thresholds, ascending")
    crop_sizes: list[int] = Field(default_factory=list, description="crop(σ) table: crop size for σ ≤ each threshold")


class TrainConfig(Strict):
    """Config of ``ambient-ray train``."""

    data: str = Field(..., description="dataset URI (a corrupt/annotate output folder or Parquet shards)")
    out: str = Field(..., description="output URI")
    model: UNetConfig = Field(default_factory=UNetConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ambient: AmbientConfig = Field(default_factory=AmbientConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    batch_size: int = Field(32, ge=1, description="micro-batch per worker")
    steps: int = Field(200, ge=1, description="optimizer steps")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    zero_stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimizer states to CPU (stage >= 1)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    seed: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1, description="worker restarts from the last checkpoint (-1: unlimited)")
    resume: bool = Field(False, description="continue the run already in 'out' from its latest checkpoint")
    sample_grid: int = Field(16, ge=0, description="samples drawn from the EMA model at the end (0: none)")
    debug_fail_at_step: int | None = Field(None, description="tests: raise once at this step to exercise recovery")


# ------------------------------------------------------------------------------ data


def data_dir(uri: str) -> str:
    uri = storage.normalize(uri)
    sub = storage.join(uri, "data")
    return sub if storage.is_dir(sub) else uri


def load_metadata(cfg: TrainConfig):
    """The dataset's non-image columns (pandas), validated; raises ConfigError/ValueError naming rows."""
    import pyarrow.parquet as pq

    files = storage.list_files(data_dir(cfg.data), (".parquet",))
    if not files:
        raise FileNotFoundError(f"no Parquet shards under {cfg.data}")
    tables = []
    for f in files:
        fs, path = storage.filesystem(f)
        names = pq.read_schema(path, filesystem=fs).names
        for required in ("id", "image"):
            if required not in names:
                raise ValueError(f"{f}: missing column '{required}' (columns: {', '.join(names)})")
        tables.append(pq.read_table(path, filesystem=fs, columns=[c for c in META_COLUMNS if c in names]))
    import pyarrow as pa

    meta = pa.concat_tables(tables, promote_options="default").to_pandas()
    if meta["id"].duplicated().any():
        raise ValueError(f"duplicate ids in {cfg.data}: {meta['id'][meta['id'].duplicated()].head(5).tolist()}")
    return meta


def resolve_sigmas(meta, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """σ_min and σ_max per row, and where they came from."""
    n = len(meta)
    if "sigma_min" in meta:
        smin = meta["sigma_min"].to_numpy(dtype=np.float64, na_value=np.nan)
        origin = "sigma_min column"
    elif cfg.ambient.corrupted_sigma_min is not None and "quality" in meta:
        smin = np.where(meta["quality"].to_numpy() == "corrupted", cfg.ambient.corrupted_sigma_min, 0.0)
        origin = f"fixed sigma_min={cfg.ambient.corrupted_sigma_min} for quality=corrupted"
    else:
        smin = np.zeros(n)
        origin = "no sigma_min column: every row treated as clean (plain EDM)"
        n_bad = int((meta["quality"] == "corrupted").sum()) if "quality" in meta else 0
        if n_bad:
            origin += f"; warning: {n_bad} rows marked corrupted train as clean (annotate them, or set ambient.corrupted_sigma_min)"
    bad = ~np.isfinite(smin) | (smin < 0)
    if bad.any():
        rows = meta["id"][bad].head(5).tolist()
        raise ValueError(f"sigma_min must be finite and >= 0: {int(bad.sum())} rows are not, e.g. {rows} = {smin[bad][:5].tolist()}")
    smax = meta["sigma_max"].to_numpy(dtype=np.float64, na_value=0.0) if "sigma_max" in meta else np.zeros(n)
    if (~np.isfinite(smax) | (smax < 0)).any():
        raise ValueError("sigma_max must be finite and >= 0")
    if (smax > 0).any() and not cfg.ambient.crop_sigmas:
        raise ConfigError("the data has sigma_max > 0 (crops annotation) but ambient.crop_sigmas/crop_sizes are not set")
    return smin.astype(np.float32), smax.astype(np.float32), origin


def check_shapes(meta, cfg: TrainConfig) -> tuple[int, int]:
    """One (resolution, channels) for the whole dataset, matching the model config."""
    if not {"height", "width", "channels"} <= set(meta.columns):
        raise ValueError("dataset lacks height/width/channels columns; write it with the corrupt stage")
    shapes = meta.groupby(["height", "width", "channels"]).size()
    if len(shapes) > 1:
        listing = ", ".join(f"{h}x{w}x{c}: {k} rows" for (h, w, c), k in shapes.items())
        raise ValueError(f"images of mixed shapes in {cfg.data} ({listing}); corrupt with --image-size to resize")
    (h, w, c) = shapes.index[0]
    if h != w:
        raise ValueError(f"images are {h}x{w}; training needs square images (corrupt with --image-size)")
    if h != cfg.model.img_resolution or c != cfg.model.in_channels:
        raise ConfigError(
            f"config key 'model.img_resolution'/'model.in_channels': the data is {h}x{w} with {c} channels but the "
            f"model is {cfg.model.img_resolution}x{cfg.model.img_resolution} with {cfg.model.in_channels}; "
            f"set --set model.img_resolution={h} --set model.in_channels={c}"
        )
    return int(h), int(c)


def _row_rank(ids, world: int) -> np.ndarray:
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=4).digest(), "big") % world for i in ids])


# ------------------------------------------------------------------------------ worker


def _lr_lambda(cfg: OptimConfig, steps: int):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.decay == "none":
            return 1.0
        t = min(1.0, (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * t)) if cfg.decay == "cosine" else 1.0 - t

    return f


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    ds = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.optim.grad_clip > 0:
        ds["gradient_clipping"] = cfg.optim.grad_clip
    if cfg.offload_optimizer:  # DeepSpeed builds its CPU Adam for offloaded states
        o = cfg.optim
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay}}
    return ds


def _load_rows(rank: int, world: int, smin_all: dict, smax_all: dict, label_dim: int):
    """This rank's rows from the Ray Data shard: images uint8 (N, C, H, W), σ_min, σ_max, labels, sorted by id."""
    import ray.train

    from ambient_ray.datasets import decode_png

    it = ray.train.get_dataset_shard("train").iter_batches(batch_size=512, batch_format="numpy")
    ids, imgs, labels = [], [], []
    for batch in it:
        keep = _row_rank(batch["id"], world) == rank
        for j in np.nonzero(keep)[0]:
            ids.append(str(batch["id"][j]))
            imgs.append(decode_png(batch["image"][j]).transpose(2, 0, 1))
            labels.append(int(batch["label"][j]) if "label" in batch and batch["label"][j] is not None else 0)
    if not ids:
        raise RuntimeError(f"rank {rank} of {world} got no rows: the dataset is smaller than the number of workers")
    order = np.argsort(ids)
    ids = [ids[i] for i in order]
    images = torch.from_numpy(np.stack([imgs[i] for i in order]))
    smin = torch.tensor([smin_all[i] for i in ids])
    smax = torch.tensor([smax_all[i] for i in ids])
    lab = torch.tensor([labels[i] for i in order]) if label_dim else None
    return ids, images, smin, smax, lab


def _rank_state_file(d: str, rank: int) -> str:
    return os.path.join(d, f"rank-{rank:04d}.safetensors")


def train_loop(config: dict) -> None:
    """Ray Train worker function (config: the TrainConfig as a dict plus the σ annotations)."""
    import deepspeed
    import ray.train
    from safetensors.torch import load_file, save_file

    cfg = TrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if device.type == "cpu":  # one intra-op thread per CPU the worker holds
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    ids, images, smin, smax, labels = _load_rows(rank, world, config["sigma_min"], config["sigma_max"], cfg.model.label_dim)
    crop = ambient.CropTable(cfg.ambient.crop_sigmas, cfg.ambient.crop_sizes) if cfg.ambient.crop_sigmas else None
    a = cfg.ambient
    sampler = ambient.SigmaSampler(smin, smax, lambda_max=a.lambda_max, p_mean=a.p_mean, p_std=a.p_std, crop=crop)
    # rank 0's dataset-wide view for the σ donut: eligible counts over all rows, draws summed over ranks
    view = None
    if rank == 0:
        all_min, all_max = (torch.tensor(list(config[k].values())) for k in ("sigma_min", "sigma_max"))
        view = ambient.SigmaSampler(all_min, all_max, lambda_max=a.lambda_max, p_mean=a.p_mean, p_std=a.p_std, crop=crop)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    net = build_denoiser(cfg.model, sigma_data=cfg.ambient.sigma_data)
    ema = [p.detach().clone().float().to(device) for p in net.parameters()]  # fp32, on the device
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = None if cfg.offload_optimizer else torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.optim, cfg.steps))  # noqa: E731
    engine, _, _, scheduler = deepspeed.initialize(
        model=net, model_parameters=params, optimizer=optimizer, lr_scheduler=sched,
        config=deepspeed_config(cfg, bf16), dist_init_required=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    step = 0

    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="ds")
            ema = [e.to(device) for e in _load_ema(d, net)]
            state = load_file(_rank_state_file(d, rank))
            gen.set_state(state["generator"])
            sampler.load_state_dict({k[len("sampler.") :]: v for k, v in state.items() if k.startswith("sampler.")})
            step = int(state["step"])

    zero3 = cfg.zero_stage == 3
    n_buckets = len(sampler.coverage.edges) - 1
    bucket_loss, bucket_n = torch.zeros(n_buckets), torch.zeros(n_buckets)
    t_last, seen = time.perf_counter(), 0

    def save_and_report(metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag="ds")
            state = {"generator": gen.get_state(), "step": torch.tensor(step)}
            state.update({f"sampler.{k}": v for k, v in sampler.state_dict().items()})
            save_file(state, _rank_state_file(d, rank))
            _save_weights(d, net, ema, engine, zero3, cfg, write=rank == 0)  # a collective under ZeRO-3
            if rank == 0:
                with open(os.path.join(d, "coverage.json"), "w") as f:
                    json.dump({"donut": view.donut(), "redraws": view.coverage.redraws, "rows": view.n}, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    mlflow_client = _mlflow_client(config) if rank == 0 else None
    while step < cfg.steps:
        for _ in range(cfg.optim.grad_accum):
            b = ambient.ambient_batch(sampler, images, smin, cfg.batch_size, gen)
            cl = labels[b.index].to(device) if labels is not None else None
            # x_σ and σ stay fp32: the denoiser computes its preconditioning in fp32 and casts the
            # network input to the parameters' dtype (bf16 under DeepSpeed on GPU) itself
            d_out = engine(b.x_sigma.to(device), b.sigma.to(device), cl).float()
            loss, per_sample = ambient.batch_loss(d_out, b, cfg.ambient.sigma_data)
            engine.backward(loss)
            engine.step()
            k = sampler.coverage.bucket(b.sigma)
            bucket_loss.index_add_(0, k, per_sample.detach().float().cpu())
            bucket_n.index_add_(0, k, torch.ones_like(b.sigma))
            seen += cfg.batch_size
        step += 1
        _update_ema(engine, ema, cfg.ema_decay, step, zero3)

        if cfg.debug_fail_at_step is not None and step == cfg.debug_fail_at_step:
            marker = storage.join(storage.normalize(cfg.out), "_debug_failed")
            if not storage.exists(marker):
                if rank == 0:
                    storage.write_bytes(marker, b"1")
                raise RuntimeError(f"debug_fail_at_step={step}: planted failure")

        last = step == cfg.steps
        if step % cfg.log_every == 0 or last or step % cfg.checkpoint_every == 0:
            now = time.perf_counter()
            # summed over ranks: the interval's loss per σ bucket, and the σ-coverage counters
            c = sampler.coverage
            sums = torch.cat([bucket_loss, bucket_n, c.draws, c.full_draws, c.crop_draws, torch.tensor([c.redraws])]).double()
            if world > 1:
                import torch.distributed as dist

                sums = sums.to(device)
                dist.all_reduce(sums)
                sums = sums.cpu()
            b_loss, b_n, draws, full_draws, crop_draws, redraws = sums.split([n_buckets] * 5 + [1])
            if view is not None:
                vc = view.coverage
                vc.draws, vc.full_draws, vc.crop_draws = draws.long(), full_draws.long(), crop_draws.long()
                vc.redraws = int(redraws)
            metrics = {
                "step": step, "loss": float(b_loss.sum() / b_n.sum().clamp(min=1)), "lr": float(scheduler.get_last_lr()[0]),
                "images_per_s": seen * world / max(now - t_last, 1e-9),
            }  # fmt: skip
            buckets = {f"loss_bucket_{i:02d}": float(b_loss[i] / b_n[i]) for i in range(n_buckets) if b_n[i] > 0}
            if rank == 0:  # the job's progress line (Ray forwards worker output to the driver)
                # a log record, not print: Ray Train's patched print also tees to a stdout that a
                # library has wrapped, and the driver would show every line twice
                logging.getLogger("ambient_ray.train").info(
                    f"step {step}/{cfg.steps}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
                    f"{metrics['images_per_s']:.0f} images/s"
                )  # fmt: skip
            if mlflow_client is not None:
                _log_metrics(mlflow_client, config["mlflow_run_id"], {**metrics, **buckets}, step, view)
            bucket_loss.zero_()
            bucket_n.zero_()
            t_last, seen = now, 0
            if step % cfg.checkpoint_every == 0 or last:
                save_and_report(metrics)


def _gather_params(engine, zero3: bool):
    import contextlib

    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None) if zero3 else contextlib.nullcontext()


@torch.no_grad()
def _update_ema(engine, ema: list[torch.Tensor], decay: float, step: int, zero3: bool) -> None:
    d = min(decay, (1 + step) / (10 + step))  # warm-up of the EMA
    with _gather_params(engine, zero3):
        for e, p in zip(ema, engine.module.parameters()):
            e.mul_(d).add_(p.detach().float(), alpha=1 - d)


def _save_weights(d: str, net, ema, engine, zero3: bool, cfg: TrainConfig, write: bool) -> None:
    from safetensors.torch import save_file

    names = [n for n, _ in net.named_parameters()]
    with _gather_params(engine, zero3):
        raw = {n: p.detach().float().cpu().contiguous() for n, p in engine.module.named_parameters()}
    if not write:
        return
    save_file({n: e.cpu().contiguous() for n, e in zip(names, ema)}, os.path.join(d, "ema.safetensors"))
    save_file(raw, os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "model.json"), "w") as f:
        json.dump({"model": cfg.model.model_dump(mode="json"), "sigma_data": cfg.ambient.sigma_data}, f)


def _load_ema(d: str, net) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(os.path.join(d, "ema.safetensors"))
    return [state[n].float() for n, _ in net.named_parameters()]


def _mlflow_client(config: dict):
    if not config.get("mlflow_run_id"):
        return None
    from mlflow.tracking import MlflowClient

    return MlflowClient(config["mlflow_uri"])


def _log_metrics(client, run_id: str, metrics: dict, step: int, sampler) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if k != "step"]
    for i, row in enumerate(sampler.donut()):
        items.append(Metric(f"draws_bucket_{i:02d}", float(row["draws"]), ts, step))
        items.append(Metric(f"eligible_bucket_{i:02d}", float(row["eligible_full"] + row["eligible_crops"]), ts, step))
    client.log_batch(run_id, metrics=items)


# ------------------------------------------------------------------------------ driver


def latest_checkpoint(out: str) -> str | None:
    """The newest Ray Train checkpoint folder under OUT/ray/train, if any."""
    root = storage.join(storage.normalize(out), "ray", "train")
    files = storage.list_files(root, ("model.json",))
    ckpts = sorted({f.rsplit("/", 2)[-2] for f in files if "/checkpoint_" in f})
    return storage.join(root, ckpts[-1]) if ckpts else None


def _check_resume(cfg: TrainConfig, out: str) -> None:
    ckpt = latest_checkpoint(out)
    started = storage.exists(storage.join(out, "ray", "train"))
    if started and not cfg.resume:
        raise ConfigError(f"{out} already holds a training run; pass --resume to continue it or use another --out")
    if cfg.resume and ckpt:
        saved = json.loads(storage.read_bytes(storage.join(ckpt, "model.json")))
        now = cfg.model.model_dump(mode="json")
        diff = [k for k in sorted(set(saved["model"]) | set(now)) if saved["model"].get(k) != now.get(k)]
        if diff:
            details = ", ".join(f"model.{k}: checkpoint {saved['model'].get(k)!r} vs config {now.get(k)!r}" for k in diff)
            raise ConfigError(f"the checkpoint in {ckpt} was trained with another model config ({details})")


def run(cfg: TrainConfig) -> dict:
    """Train; returns a summary dict (out URIs, MLflow run id, final metrics)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ambient_ray import tracking

    out = storage.normalize(cfg.out)
    storage.check_reachable(out)
    meta = load_metadata(cfg)
    smin, smax, origin = resolve_sigmas(meta, cfg)
    check_shapes(meta, cfg)
    if cfg.zero_stage == 0 and cfg.offload_optimizer:
        raise ConfigError("config key 'offload_optimizer': needs zero_stage >= 1")
    _check_resume(cfg, out)
    cfgmod.save_resolved(cfg, out)

    if not ray.is_initialized():
        ray.init(logging_level="WARNING")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.use_gpu else "cpu")
    run_id, uri = tracking.start_run(cfg.mlflow, out, params=cfgmod.flatten(cfg), tags={"stage": "train", "sigma_min": origin})
    print(f"train: {len(meta)} rows ({origin})" + (f"; MLflow run {run_id} at {uri}" if run_id else "; MLflow off"))

    fs, path = storage.filesystem(storage.join(out, "ray"))
    data_fs, data_path = storage.filesystem(data_dir(cfg.data))
    # Read (and decode nothing yet) in the driver, before the workers take their CPUs: a worker set
    # that holds every CPU of the cluster (2 workers on a 2-CPU node) would leave no CPU for read
    # tasks started from inside the workers. Each worker then iterates the materialized blocks.
    ds = ray.data.read_parquet(data_path, filesystem=data_fs, file_extensions=["parquet"])
    ds = ds.select_columns([c for c in ("id", "image", "label") if c in meta.columns or c == "image"]).materialize()
    ids = meta["id"].tolist()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "sigma_min": dict(zip(ids, smin.tolist())),
            "sigma_max": dict(zip(ids, smax.tolist())),
            "mlflow_run_id": run_id,
            "mlflow_uri": uri,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    t0 = time.perf_counter()
    # the workers' pass over the materialized rows takes the driver's Data context: no progress bar
    # for it (it would stay on the job's output, redrawn beside every progress line)
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        result = trainer.fit()
    finally:
        ctx.enable_progress_bars = bars
    seconds = time.perf_counter() - t0
    ckpt = latest_checkpoint(out)
    summary = {"out": out, "checkpoint": ckpt, "mlflow_run_id": run_id, "mlflow_uri": uri, "seconds": seconds, "metrics": result.metrics}
    tracking.finish_training(cfg, out, ckpt, run_id, uri)
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(summary, indent=1, default=str).encode())
    return summary
