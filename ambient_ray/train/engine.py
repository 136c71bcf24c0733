"""The training engine shared by every model ambient-ray trains: Ray Train (TorchTrainer) + DeepSpeed ZeRO.

This is the only Ray Train and DeepSpeed glue. The one training loop (:mod:`ambient_ray.train.loop`) runs a
task (:mod:`ambient_ray.train.tasks`) on a :class:`Worker` here: the common config (:class:`EngineConfig`),
each worker's share of rows (a stable hash of ``id``), the DeepSpeed engine (ZeRO 0-3, CPU offload, bf16
on GPU) with its optimizer (``optim.name``) and schedule (:mod:`ambient_ray.train.schedules`), the fp32 EMA
(:mod:`ambient_ray.train.ema`), post-step hooks, checkpoints (DeepSpeed state, EMA, inference weights, each
rank's random and task state) that a restarted or ``--resume``d run continues from exactly, MLflow metrics
from rank 0, and the driver (:func:`train`, :func:`fit`).

The EMA per rank: under ZeRO 0/1/2 every rank holds the whole module and the whole fp32 EMA. Under ZeRO-3 a
rank holds only its partition of each parameter, and of the EMA only that partition's (built after
``deepspeed.initialize``, updated from ``p.ds_tensor`` with no communication); the full EMA, like the full
raw weights, is gathered only when a checkpoint is saved, one parameter at a time, into ``ema.safetensors``
(what sampling loads) beside each rank's own partitions (``ema-rank-NNNN.safetensors``), which a restore on
as many ranks loads alone; any other restore slices its partitions out of ``ema.safetensors``. The power EMA
(``ema: power``) keeps several profiles this way (the others in ``ema-profiles.safetensors``) and writes
snapshots of all of them to ``OUT/phema/`` every ``ema_snapshot_every`` images (:meth:`Worker.snapshot`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import time
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import Field

from ambient_ray.config import ConfigError, Strict, flag
from ambient_ray.data.metadata import data_dir, one_shape
from ambient_ray.io import storage, tracking
from ambient_ray.io.tracking import MlflowConfig
from ambient_ray.models.edm2 import force_normalize_, mp_weights, row_scale
from ambient_ray.registry import Registry
from ambient_ray.stages.results import TrainingResult
from ambient_ray.train import perf
from ambient_ray.train.ema import EMAS
from ambient_ray.train.schedules import lr_lambda


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(50, ge=0)
    name: Literal["adamw", "adam"] = Field("adamw", description="optimizer (DeepSpeed's CPU Adam under offload)")
    decay: Literal["none", "cosine", "linear", "inv_sqrt"] = Field(
        "cosine", description="learning-rate schedule after warm-up (ambient_ray.train.schedules)"
    )
    ref_steps: int = Field(10_000, ge=1, description="inv_sqrt: t_ref, the step where the decay starts")
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    grad_accum: int = Field(1, ge=1)


class EngineConfig(Strict):
    """What every model trained on the engine shares: data, outputs, Ray Train, DeepSpeed, checkpoints, MLflow."""

    data: str = Field(
        ...,
        description="dataset URI (a corrupt/annotate output folder or Parquet shards)",
        json_schema_extra=flag("--data"),
    )
    out: str = Field(..., description="output URI for checkpoints, weights and plots", json_schema_extra=flag("--out"))
    optim: OptimConfig = Field(default_factory=OptimConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    batch_size: int = Field(32, ge=1, description="micro-batch per worker")
    steps: int = Field(200, ge=1, description="optimizer steps", json_schema_extra=flag("--steps"))
    num_workers: int = Field(1, ge=1, json_schema_extra=flag("--num-workers", "Ray Train workers"))
    min_workers: int | None = Field(
        None,
        ge=1,
        description="elastic (zero_stage 0 only): a run that loses workers restarts from its last checkpoint on as "
        "many as fit, at least this many (Ray Train's ScalingConfig(num_workers=(min, max))); None: num_workers always",
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    zero_stage: int = Field(
        2, ge=0, le=3, json_schema_extra=flag("--zero-stage", "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    )
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimizer states to CPU (stage >= 1)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    ema: Literal["warmup", "power"] = Field(
        "warmup",
        description="EMA of the weights (ambient_ray.train.ema): warmup (ema_decay), or power: EDM2's power-function "
        "EMA, one profile per ema_stds, with snapshots for 'ambient-ray phema'",
    )
    ema_decay: float = Field(0.999, ge=0, lt=1, description="warmup: the decay")
    ema_stds: list[float] = Field(
        [0.05, 0.10],
        min_length=1,
        description="power: σ_rel of each profile tracked (EDM2 Sec. 3.1; each in (0, 0.3003)); the first is "
        "ema.safetensors, the one sampling loads",
    )
    ema_snapshot_every: int | None = Field(
        8_000_000,
        ge=1,
        description="power: write every profile to OUT/phema/ each time this many training images (steps × global "
        "batch) have passed, and at the last step; None: no snapshots",
    )
    seed: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    report_every: int | None = Field(
        None,
        ge=1,
        description="also report metrics (no checkpoint) to Ray Train every this many steps, with a validation loss "
        "(Ray Tune's early stopping reads them)",
    )
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1, description="worker restarts from the last checkpoint (-1: unlimited)")
    resume: bool = Field(
        False,
        description="continue the run already in 'out' from its latest checkpoint",
        json_schema_extra=flag("--resume", "continue the run in --out from its latest checkpoint"),
    )
    grad_guard: bool = Field(
        False,
        description="zero non-finite gradient elements (EDM2) and count them (metric nonfinite_grads); a hook on "
        "every parameter, so opt-in (about +20% per step on small models)",
    )
    init_from: str | None = Field(
        None,
        description="start from the weights of an earlier training output (its folder or its model/ folder, local "
        "or s3://): the network and its EMA from its raw model.safetensors, at step 0 with a fresh optimizer and "
        "schedule; the architecture must agree (only keys that change no parameter shape may differ, e.g. the "
        "DiT's img_resolution); ignored when the run resumes from its own checkpoint",
        json_schema_extra=flag("--init-from"),
    )
    debug_fail_at_step: int | None = Field(None, description="tests: raise once at this step to exercise recovery")
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="one device's peak TFLOP/s for the mfu metric (default: the GPU's dense bf16 peak by its name, "
        "ambient_ray.train.perf; on CPU mfu is logged only when this is set)",
    )
    grid_every: int = Field(
        1000,
        ge=0,
        description="log a sample grid of the EMA weights (grids/grid_<step>.png) every this many steps (0: never)",
    )
    grid_images: int = Field(16, ge=1, description="images per grid (fixed seed and labels: every grid comparable)")
    grid_sampler_steps: int = Field(18, ge=1, description="Heun steps of a grid's sampler")


# ------------------------------------------------------------------------------ data (driver)


def check_run(cfg: EngineConfig, meta, shape: tuple[int, int] | None = None) -> tuple[int, int]:
    """Before any worker starts: the data has one square shape (returned: resolution, channels; ``shape``
    when the stage knows it, as for precomputed latents) and the DeepSpeed options agree."""
    h, c = shape or one_shape(meta, cfg.data)
    if cfg.ema == "power":
        from ambient_ray.diffusion.phema import SIGMA_REL_MAX

        bad = [s for s in cfg.ema_stds if not 0 < s < SIGMA_REL_MAX]
        if bad or len(set(cfg.ema_stds)) < len(cfg.ema_stds):
            raise ConfigError(
                f"config key 'ema_stds': {cfg.ema_stds}: distinct σ_rel values in (0, {SIGMA_REL_MAX:.4f}) expected"
            )
    if cfg.zero_stage == 0 and cfg.offload_optimizer:
        raise ConfigError("config key 'offload_optimizer': needs zero_stage >= 1")
    if cfg.min_workers is not None and cfg.min_workers > cfg.num_workers:
        raise ConfigError(f"config key 'min_workers': {cfg.min_workers} is more than num_workers={cfg.num_workers}")
    if cfg.min_workers is not None and cfg.min_workers < cfg.num_workers and cfg.zero_stage > 0:
        # DeepSpeed refuses a ZeRO >= 1 checkpoint saved on another number of ranks
        raise ConfigError("config key 'min_workers': fewer workers than num_workers needs zero_stage 0")
    return h, c


def row_rank(ids, world: int) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=4).digest(), "big") % world for i in ids])


# ------------------------------------------------------------------------------ worker


OPTIMIZERS: Registry[Callable] = Registry("optim.name")
OPTIMIZERS.register("adamw", torch.optim.AdamW)
OPTIMIZERS.register("adam", torch.optim.Adam)
DEEPSPEED_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam"}  # offloaded states: DeepSpeed builds its CPU Adam


def deepspeed_config(cfg: EngineConfig, bf16: bool) -> dict:
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
        ds["optimizer"] = {
            "type": DEEPSPEED_OPTIMIZERS[o.name],
            "params": {"lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay},
        }
    return ds


def load_rank_rows(
    rank: int,
    world: int,
    per_row: dict[str, dict],
    label_dim: int = 0,
    tensor: tuple[str, list[int]] | None = None,
    columns: dict[str, list[int]] | None = None,
):
    """This rank's rows of the Ray Data shard "train", sorted by id: ids, images uint8 (N, C, H, W) (or,
    with ``tensor`` = (column, shape), that float32 tensor column, e.g. precomputed latents), ``{name:
    tensor}`` of the per-row values given as ``{name: {id: value}}`` and of the tensor ``columns`` ``{name:
    shape}`` (kept in their stored dtype, e.g. float16 caption embeddings), and class labels (or None). Rows
    without per-row values (filtered out on the driver) are skipped."""
    import ray.train

    from ambient_ray.data.images import decode_png

    known = next(iter(per_row.values())) if per_row else None
    it = ray.train.get_dataset_shard("train").iter_batches(batch_size=512, batch_format="numpy")
    ids, imgs, labels = [], [], []
    extra: dict[str, list] = {name: [] for name in columns or {}}
    for batch in it:
        keep = row_rank(batch["id"], world) == rank
        if known is not None:
            keep &= np.array([i in known for i in batch["id"]], dtype=bool)
        for j in np.nonzero(keep)[0]:
            ids.append(str(batch["id"][j]))
            if tensor:
                imgs.append(np.asarray(batch[tensor[0]][j], dtype=np.float32).reshape(tensor[1]))
            else:
                imgs.append(decode_png(batch["image"][j]).transpose(2, 0, 1))
            labels.append(int(batch["label"][j]) if "label" in batch and batch["label"][j] is not None else 0)
            for name, shape in (columns or {}).items():
                extra[name].append(np.asarray(batch[name][j]).reshape(shape))
    if not ids:
        raise RuntimeError(f"rank {rank} of {world} got no rows: the dataset is smaller than the number of workers")
    order = np.argsort(ids)
    ids = [ids[i] for i in order]
    images = torch.from_numpy(np.stack([imgs[i] for i in order]))
    values = {name: torch.tensor([col[i] for i in ids]) for name, col in per_row.items()}
    values.update({name: torch.from_numpy(np.stack([col[i] for i in order])) for name, col in extra.items()})
    lab = torch.tensor([labels[i] for i in order]) if label_dim else None
    return ids, images, values, lab


class Worker:
    """One Ray Train worker's engine: device, DeepSpeed engine, EMA, checkpoints, metrics.

    Build the network under ``torch.manual_seed(cfg.seed)`` (identical initial weights on every rank)
    and pass it in; ``meta`` is written as ``model.json`` beside the inference weights.
    """

    def __init__(self, cfg: EngineConfig, net: torch.nn.Module, meta: dict, config: dict):
        import deepspeed
        import ray.train

        self.cfg, self.net, self.meta = cfg, net, meta
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        cuda = cfg.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        if self.device.type == "cpu":  # one intra-op thread per CPU the worker holds
            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
            # DeepSpeed's CPU shared-memory all-reduce op serves only its inference_all_reduce; training's
            # collectives go through gloo. Left on, it is JIT-compiled at the first run (about a minute per
            # virtual environment) and loaded by every worker.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.zero3 = cfg.zero_stage == 3
        if cfg.init_from and ray.train.get_checkpoint() is None:  # before DeepSpeed: ZeRO-3 partitions these
            load_init(net, cfg.init_from)
        mp = mp_weights(net)
        if mp:  # forced weight normalisation starts from unit-magnitude rows (the same on every rank)
            force_normalize_(net)
        # fp32, on the device: of the full weights, or under ZeRO-3 of this rank's partitions (after initialize)
        self.ema = None if self.zero3 else EMAS.get(cfg.ema)(net.parameters(), self.device, cfg)
        self.post_step_hooks: list[Callable[[Worker], None]] = []
        params = [p for p in net.parameters() if p.requires_grad]
        o = cfg.optim
        optimizer = (
            None
            if cfg.offload_optimizer
            else OPTIMIZERS.get(o.name)(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        )

        def sched(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o, cfg.steps))

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=net,
            model_parameters=params,
            optimizer=optimizer,
            lr_scheduler=sched,
            config=deepspeed_config(cfg, self.bf16),
            dist_init_required=False,
        )
        if self.zero3:  # the partitions exist from here on
            self.ema = EMAS.get(cfg.ema)(self.engine.module.parameters(), self.device, cfg, sharded=True)
        if mp:  # before the EMA update of every step
            self.post_step_hooks.append(ForcedWeightNorm(self, mp))
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=self.device)
        if cfg.grad_guard:
            for p in params:
                p.register_hook(self._guard)
        self.generator = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        self.step = 0
        self.mlflow = (config.get("mlflow_run_id"), config.get("mlflow_uri")) if self.rank == 0 else (None, None)
        # large runs: FLOPs per image (from the driver) for tflop_per_s and mfu, one device's peak
        self.costs = perf.Costs(**config["costs"]) if config.get("costs") else None
        self.peak = cfg.peak_tflops or (perf.peak_tflops(torch.cuda.get_device_name(self.device)) if cuda else None)
        self.system = None
        if ctx.get_local_rank() == 0:  # one system metrics monitor per node
            run_id, uri = config.get("mlflow_run_id"), config.get("mlflow_uri")
            self.system = tracking.system_metrics(cfg.mlflow, run_id, uri, f"node_{ctx.get_node_rank()}")

    def close(self) -> None:
        """At the end of the run (or on its failure): stop this node's system metrics monitor."""
        if self.system is not None:
            self.system.stop()
            self.system = None

    def throughput(self, steps: int, seconds: float) -> dict:
        """Collective: the interval's ``tflop_per_s`` and ``mfu`` (:func:`perf.achieved`, over ``steps`` optimizer
        steps of the global batch in ``seconds``) and the run's peak memory so far, the largest over the ranks:
        ``peak_rss_gib`` and, on GPU, ``peak_gpu_memory_gib`` (``torch.cuda.max_memory_allocated``)."""
        images = steps * self.cfg.batch_size * self.cfg.optim.grad_accum * self.world
        out = perf.achieved(self.costs, images, seconds, self.world, self.peak)
        mem = self.all_reduce(perf.peak_memory(self.device), op="max")
        out["peak_rss_gib"] = float(mem[0]) / 2**30
        if self.device.type == "cuda":
            out["peak_gpu_memory_gib"] = float(mem[1]) / 2**30
        return out

    def ema_weights(self) -> dict[str, torch.Tensor] | None:
        """The full EMA weights by parameter name as fp32 CPU tensors on rank 0, None elsewhere. Under ZeRO-3 a
        collective (every rank takes part in the gather, a parameter at a time); otherwise no communication."""
        if not self.zero3 and self.rank != 0:
            return None
        names = [n for n, _ in self.net.named_parameters()]
        tensors = self.ema.export(keep=self.rank == 0)
        return dict(zip(names, tensors)) if self.rank == 0 else None

    def _guard(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient hook (``grad_guard``): non-finite elements counted (no device sync) and set to 0, as EDM2 does."""
        self.nonfinite += (~torch.isfinite(g)).sum()
        return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)

    def take_nonfinite(self) -> float:
        """Collective: the non-finite gradient elements zeroed since the last call, summed over ranks."""
        n = float(self.all_reduce(self.nonfinite.clone().reshape(1))[0])
        self.nonfinite.zero_()
        return n

    def restore(self) -> dict[str, torch.Tensor]:
        """Continue from Ray Train's checkpoint if there is one; returns this rank's extra state."""
        import ray.train
        from safetensors.torch import load_file

        ckpt = ray.train.get_checkpoint()
        if not ckpt:
            return {}
        with rank_checkpoint(ckpt, self.rank, self.zero3) as d:
            self.engine.load_checkpoint(d, tag="ds")
            restore_ema(d, [n for n, _ in self.net.named_parameters()], self.ema, self.rank, self.zero3)
            state = load_file(_rank_state_file(d, self.rank))
        self.generator.set_state(state.pop("generator"))
        self.step = int(state.pop("step"))
        return state

    def gathered(self, params=None):
        """Full parameters (``params``, default all) in a context (a collective under ZeRO-3, where each rank holds
        a partition)."""
        import deepspeed

        params = list(self.engine.module.parameters() if params is None else params)
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.zero3 else contextlib.nullcontext()

    def end_step(self) -> tuple[bool, bool]:
        """After an optimizer step: count it, run the post-step hooks (in registration order, on every rank:
        a hook may be a collective), update the EMA (under ZeRO-3 from this rank's partitions: no gather), fail
        where a test planted it; returns (log now, checkpoint now), from ``log_every``, ``checkpoint_every`` and
        the last step."""
        self.step += 1
        for hook in self.post_step_hooks:
            hook(self)
        self.ema.update(self.engine.module.parameters(), self.step)
        if self.cfg.ema == "power" and snapshot_due(self.cfg, self.step, self.global_batch()):
            self.snapshot()
        self.maybe_fail()
        checkpoint = self.checkpoint_due()
        return checkpoint or self.step % self.cfg.log_every == 0 or self.report_due(), checkpoint

    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.optim.grad_accum * self.world

    def snapshot(self) -> None:
        """Collective under ZeRO-3: every profile of the power EMA, gathered a parameter at a time, written by
        rank 0 to ``OUT/phema/`` (:func:`ambient_ray.stages.phema.write_snapshot`, atomically; a step re-run after
        a restart writes the same name again, so a resumed run leaves one file per profile and snapshot step)."""
        from ambient_ray.stages.phema import write_snapshot

        names = [n for n, _ in self.net.named_parameters()]
        out = storage.normalize(self.cfg.out)
        for k, std in enumerate(self.ema.stds):
            tensors = self.ema.export(keep=self.rank == 0, profile=k)
            if self.rank == 0:
                write_snapshot(out, dict(zip(names, tensors)), std, self.ema.gammas[k], self.step, self.global_batch())

    def checkpoint_due(self) -> bool:
        return self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps

    def report_due(self) -> bool:
        """Whether this step reports to Ray Train without a checkpoint (``report_every``, not a checkpoint step)."""
        r = self.cfg.report_every
        return bool(r) and self.step % r == 0 and not self.checkpoint_due()

    def report(self, metrics: dict) -> None:
        """Report metrics without a checkpoint to Ray Train; every rank calls it (it is a barrier)."""
        import ray.train

        ray.train.report(metrics)

    def maybe_fail(self) -> None:
        """Tests: a planted failure at ``debug_fail_at_step``, once per output folder."""
        if self.cfg.debug_fail_at_step is None or self.step != self.cfg.debug_fail_at_step:
            return
        marker = storage.join(storage.normalize(self.cfg.out), "_debug_failed")
        if not storage.exists(marker):
            if self.rank == 0:
                storage.write_bytes(marker, b"1")
            raise RuntimeError(f"debug_fail_at_step={self.step}: planted failure")

    def all_reduce(self, t: torch.Tensor, op: Literal["sum", "max"] = "sum") -> torch.Tensor:
        """Sum (or ``op="max"``: the largest of) a float64 tensor over the ranks."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        t = t.double().to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.cpu()

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def log(self, metrics: dict) -> None:
        """MLflow metrics of this step, from rank 0 (``step`` is the step, not a metric)."""
        tracking.log_metrics(*self.mlflow, {k: v for k, v in metrics.items() if k != "step"}, self.step)

    def log_files(self, files: dict[str, bytes], artifact_path: str | None = None) -> None:
        """MLflow artifacts (name -> bytes) from rank 0 (e.g. a sample grid)."""
        tracking.log_files(*self.mlflow, files, artifact_path)

    def save_and_report(
        self, metrics: dict, state: dict[str, torch.Tensor] | None = None, files: dict[str, str] | None = None
    ) -> None:
        """Checkpoint (DeepSpeed state, EMA and raw weights + ``model.json``, this rank's state and under ZeRO-3
        its EMA partitions, rank 0's ``files``) and report it with ``metrics`` to Ray Train. Collective: under
        ZeRO-3 the full weights and EMA are gathered one parameter at a time."""
        import ray.train
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as d:
            self.engine.save_checkpoint(d, tag="ds")
            own = {"generator": self.generator.get_state(), "step": torch.tensor(self.step), **(state or {})}
            save_file(own, _rank_state_file(d, self.rank))
            names = [n for n, _ in self.net.named_parameters()]
            raw = {}
            for n, p in self.engine.module.named_parameters():  # one parameter whole at a time
                with self.gathered([p]):
                    if self.rank == 0:
                        raw[n] = p.detach().float().cpu().clone()
            save_ema(d, names, self.ema, self.rank, self.zero3)
            if self.rank == 0:
                save_file(raw, os.path.join(d, "model.safetensors"))
                with open(os.path.join(d, "model.json"), "w") as f:
                    json.dump(self.meta, f)
                for name, text in (files or {}).items():
                    with open(os.path.join(d, name), "w") as f:
                        f.write(text)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class ForcedWeightNorm:
    """Post-step hook: EDM2's forced weight normalisation (Karras et al. 2024, Sec. 2.3 and App. B.2) of the
    optimizer's *master* weights, every output row back to unit magnitude after each optimizer step.

    DeepSpeed rewrites the module's weights from its fp32 master copy after every step, so normalising the
    module's weights (or doing it inside ``forward``) is lost at ZeRO >= 1. Here each rank takes its own piece
    of every weight's master copy (ZeRO 1/2 and the bf16 optimizer: ``p._hp_mapping``'s fragment of the flat
    fp32 partition; ZeRO-3: ``safe_get_local_fp32_param``, the rank's flat slice; otherwise, fp32 without
    ZeRO: the parameter itself, whole on every rank), adds up the squares of each row's elements it holds,
    sums the row sums over the ranks in one all-reduce (of one float per output row of all the weights:
    the same collective, in the same order, on every rank), and scales its piece by
    :func:`~ambient_ray.models.edm2.row_scale`; then the module's (lower-precision or partitioned) copy is
    scaled alike, so the next forward sees the normalised weights too."""

    def __init__(self, w: Worker, weights: list[torch.nn.Parameter]):
        self.weights = weights
        shapes = [tuple(p.ds_shape) if w.zero3 else tuple(p.shape) for p in weights]
        self.rows = [s[0] for s in shapes]
        self.fan_in = [math.prod(s[1:]) for s in shapes]
        self.offset = [0, *np.cumsum(self.rows).tolist()]
        self.mode = "zero3" if w.zero3 else ("hp" if any(hasattr(p, "_hp_mapping") for p in weights) else "plain")
        fan = torch.tensor(self.fan_in, dtype=torch.float32).repeat_interleave(torch.tensor(self.rows))
        self.fan_rows = fan.to(w.device)  # the fan-in of every row of every weight, in order

    def pieces(self, w: Worker):
        """(index, parameter, flat fp32 master piece, its first element's index in the flat parameter)."""
        from deepspeed.utils import safe_get_local_fp32_param

        for i, p in enumerate(self.weights):
            if self.mode == "plain":
                yield i, p, p.data.view(-1), 0
            elif self.mode == "hp":
                m = getattr(p, "_hp_mapping", None)
                if m is not None:
                    yield i, p, m.get_hp_fragment().view(-1), m.lp_fragment_address.start
            else:
                s = p.ds_tensor.numel()
                start = dist_rank(p) * s
                n = max(0, min(s, p.ds_numel - start))  # the last ranks' slices end in padding
                if n:
                    yield i, p, safe_get_local_fp32_param(p).view(-1)[:n], start

    @torch.no_grad()
    def __call__(self, w: Worker) -> None:
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        pieces = list(self.pieces(w))
        sums = torch.zeros(self.offset[-1], dtype=torch.float32, device=w.device)
        for i, _, frag, start in pieces:
            for row, lo, hi, count in _row_spans(start, frag.numel(), self.fan_in[i]):
                part = frag[lo:hi].float().view(count, -1).square().sum(1)
                sums[self.offset[i] + row : self.offset[i] + row + count] += part.to(sums.device)
        if self.mode != "plain" and w.world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        scale = row_scale(sums, self.fan_rows)
        for i, p, frag, start in pieces:
            for row, lo, hi, count in _row_spans(start, frag.numel(), self.fan_in[i]):
                k = scale[self.offset[i] + row : self.offset[i] + row + count].to(frag.device, frag.dtype)
                frag[lo:hi].view(count, -1).mul_(k[:, None])
            if self.mode == "zero3":
                full = safe_get_local_fp32_param(p).view(-1)
                full[: frag.numel()] = frag
                safe_set_local_fp32_param(p, full)
                p.ds_tensor.data.view(-1)[: frag.numel()].copy_(frag)
        for i, p in enumerate(self.weights):
            # the module's whole copies: every parameter under ZeRO 1/2, and under ZeRO-3 the small ones it
            # keeps gathered between steps (ds_persist), which it refreshed from the partitions before this hook
            whole = self.mode == "hp" or (self.mode == "zero3" and getattr(p, "ds_persist", False))
            if whole and p.data.numel() == math.prod(shape := (self.rows[i], self.fan_in[i])):
                k = scale[self.offset[i] : self.offset[i + 1]].to(p.device, p.dtype)
                p.data.view(shape).mul_(k[:, None])


def _row_spans(start: int, n: int, fan_in: int) -> list[tuple[int, int, int, int]]:
    """Elements [start, start + n) of a row-major (rows, fan_in) weight as runs of rows: (first row, piece start,
    piece end, rows in the run), the partial first row, the whole rows, the partial last row."""
    spans, pos = [], 0
    head = min(n, (-start) % fan_in)
    if head:
        spans.append((start // fan_in, 0, head, 1))
        pos = head
    full = (n - pos) // fan_in
    if full:
        spans.append(((start + pos) // fan_in, pos, pos + full * fan_in, full))
        pos += full * fan_in
    if pos < n:
        spans.append(((start + pos) // fan_in, pos, n, 1))
    return spans


def dist_rank(p) -> int:
    import torch.distributed as dist

    return dist.get_rank(group=getattr(p, "ds_process_group", None))


def _rank_state_file(d: str, rank: int) -> str:
    return os.path.join(d, f"rank-{rank:04d}.safetensors")


def snapshot_due(cfg: EngineConfig, step: int, global_batch: int) -> bool:
    """Power EMA snapshots: after the step whose images cross a multiple of ``ema_snapshot_every``, and the last."""
    n = cfg.ema_snapshot_every
    if cfg.ema != "power" or n is None:
        return False
    return step == cfg.steps or step * global_batch // n > (step - 1) * global_batch // n


def save_ema(d: str, names: list[str], ema, rank: int, zero3: bool) -> None:
    """A checkpoint's EMA files in folder ``d``. Collective under ZeRO-3 (every profile is gathered a parameter
    at a time). Rank 0 writes ``ema.safetensors`` (the first profile: what sampling loads) and, with several
    profiles (the power EMA), ``ema-profiles.safetensors`` (profile k's tensors as ``k/NAME``); under ZeRO-3
    every rank also writes its own partitions of every profile (``ema-rank-NNNN.safetensors``), which a restore
    on as many ranks loads alone. Each file carries the EMA's kind (and profiles) in its metadata."""
    from safetensors.torch import save_file

    keep = rank == 0
    full = [dict(zip(names, ema.export(keep=keep, profile=k))) for k in range(len(ema.profiles))]
    if zero3:
        part = {_profile_key(k, n): t.cpu().contiguous() for k, p in enumerate(ema.profiles) for n, t in zip(names, p)}
        save_file(part, _ema_rank_file(d, rank), metadata={**ema.meta(), **ema.describe()})
    if keep:
        save_file(full[0], os.path.join(d, "ema.safetensors"), metadata=ema.describe())
        if len(full) > 1:
            more = {_profile_key(k, n): t for k in range(1, len(full)) for n, t in full[k].items()}
            save_file(more, os.path.join(d, "ema-profiles.safetensors"), metadata=ema.describe())


_RANK_FILE = re.compile(r"(?:zero_pp_rank_|^rank-|^ema-rank-)(\d+)")


def rank_files(names: list[str], rank: int, zero3: bool) -> list[str]:
    """The files of a checkpoint (paths relative to it) that ``rank`` reads to restore: every rank's own
    files (DeepSpeed's ``zero_pp_rank_R_*``, ``rank-RRRR``, ``ema-rank-RRRR``) for this rank only, no raw-weights
    export (``model.safetensors``), and under ZeRO-3, where the rank's own EMA partitions are there, not the
    gathered EMA either; the small shared files (DeepSpeed's ``mp_rank_00_model_states.pt``, JSON) for all."""
    have_own = zero3 and any(n == f"ema-rank-{rank:04d}.safetensors" for n in names)
    keep = []
    for n in names:
        base = n.rsplit("/", 1)[-1]
        m = _RANK_FILE.search(base)
        if m and int(m.group(1)) != rank:
            continue
        if base == "model.safetensors" or (have_own and base in ("ema.safetensors", "ema-profiles.safetensors")):
            continue
        keep.append(n)
    return keep


@contextlib.contextmanager
def rank_checkpoint(ckpt, rank: int, zero3: bool):
    """A local folder holding only :func:`rank_files` of a Ray Train checkpoint (where ``Checkpoint.as_directory``
    would download every rank's shards on every worker: 1/world of the optimizer states is what a rank needs)."""
    import pyarrow.fs as pafs

    fs, root = ckpt.filesystem, ckpt.path.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    names = [i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File]
    with tempfile.TemporaryDirectory() as d:
        for n in rank_files(names, rank, zero3):
            dest = os.path.join(d, n)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            pafs.copy_files(f"{root}/{n}", dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield d


def restore_ema(d: str, names: list[str], ema, rank: int, zero3: bool) -> None:
    """The EMA from a checkpoint folder ``d`` written by :func:`save_ema`, bit for bit: under ZeRO-3 this rank's
    own partitions where they were cut for it, else the gathered files a tensor at a time (under ZeRO-3, from any
    world size: this rank's slices). A checkpoint of another EMA kind or other profiles is refused."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    own = _ema_rank_file(d, rank)
    if zero3 and os.path.exists(own) and ema.fits(_metadata(own)):
        ema.check(_metadata(own))
        part = load_file(own)
        for k in range(len(ema.profiles)):
            ema.load_partitions((part[_profile_key(k, n)] for n in names), profile=k)
        return
    for k in range(len(ema.profiles)):
        path = os.path.join(d, "ema.safetensors" if k == 0 else "ema-profiles.safetensors")
        if not os.path.exists(path):
            raise ConfigError(f"config key 'ema': the checkpoint in {d} has no {os.path.basename(path)} for {ema.kind}")
        with safe_open(path, framework="pt") as f:
            ema.check(f.metadata())
            ema.load((f.get_tensor(_profile_key(k, n)) for n in names), profile=k)


def _profile_key(k: int, name: str) -> str:
    return name if k == 0 else f"{k}/{name}"


def _ema_rank_file(d: str, rank: int) -> str:
    return os.path.join(d, f"ema-rank-{rank:04d}.safetensors")


def _metadata(path: str) -> dict[str, str] | None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata()


def progress_line(name: str, text: str) -> None:
    """The job's progress line from rank 0: a log record, not print (Ray Train's patched print also
    tees to a stdout that a library has wrapped, and the driver would show every line twice)."""
    import logging

    logging.getLogger(f"ambient_ray.{name}").info(text)


# ------------------------------------------------------------------------------ driver


def latest_checkpoint(out: str) -> str | None:
    """The newest Ray Train checkpoint folder under OUT/ray/train, if any."""
    root = storage.join(storage.normalize(out), "ray", "train")
    files = storage.list_files(root, ("model.json",))
    ckpts = sorted({f.rsplit("/", 2)[-2] for f in files if "/checkpoint_" in f})
    return storage.join(root, ckpts[-1]) if ckpts else None


def check_resume(cfg: EngineConfig, out: str, meta: dict) -> None:
    """Refuse an ``out`` that holds a run unless resuming, and a resume with another model (``meta``)."""
    ckpt = latest_checkpoint(out)
    started = storage.exists(storage.join(out, "ray", "train"))
    if started and not cfg.resume:
        raise ConfigError(f"{out} already holds a training run; pass --resume to continue it or use another --out")
    if cfg.resume and ckpt:
        saved = json.loads(storage.read_bytes(storage.join(ckpt, "model.json")))
        if saved.get("kind", "denoiser") != meta.get("kind", "denoiser"):
            raise ConfigError(
                f"the checkpoint in {ckpt} is a {saved.get('kind', 'denoiser')}, not a {meta.get('kind')}"
            )
        from ambient_ray.models.registry import config_of

        # both through the registry, so a checkpoint written before a key existed compares with its default
        was, now = (config_of(m).model_dump(mode="json", exclude={"preset"}) for m in (saved, meta))
        diff = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        if diff:
            details = ", ".join(f"model.{k}: checkpoint {was.get(k)!r} vs config {now.get(k)!r}" for k in diff)
            raise ConfigError(f"the checkpoint in {ckpt} was trained with another model config ({details})")


def check_init(cfg: EngineConfig, meta: dict) -> None:
    """Driver side of ``init_from``: the earlier output exists and holds a network of the same kind and arch
    whose parameters have this run's names and shapes (both networks built on the meta device: a key that
    changes no parameter shape, such as the DiT's ``img_resolution``, whose positions are a buffer, may
    differ); otherwise a ConfigError naming the first parameter that does not fit."""
    from ambient_ray.io import weights
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


def load_init(net: torch.nn.Module, uri: str) -> None:
    """Worker side of ``init_from``: the raw weights (``model.safetensors``, read as safetensors: nothing
    unpickled) into ``net``, the same on every rank; the EMA, built from ``net`` afterwards, starts from them."""
    from ambient_ray.io import weights

    training = net.training
    weights.load_into(net, weights.model_dir(uri)[0], "model")
    net.train(training)


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
    data_fs, data_path = storage.filesystem(data_dir(cfg.data))
    ds = ray.data.read_parquet(data_path, filesystem=data_fs, file_extensions=["parquet"])
    ds = ds.select_columns(columns)
    ds = stream(ds) if stream else ds.materialize()
    # the workers' pass over the rows runs with the dataset's own Data context: no progress bar for it
    # (its bar would stay on the job's output, redrawn by an idle process)
    ds.context.enable_progress_bars = False
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=elastic_workers(cfg),
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets={"train": ds},
        # explicit options: Train's defaults pass the deprecated ExecutionOptions.exclude_resources
        # streamed: Ray Train's streaming_split(equal=True), so every worker steps through as many rows
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"] if stream else [], execution_options=ray.data.ExecutionOptions()
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


def stream_batches(batch_size: int, name: str = "train"):
    """Worker side of streaming: this worker's share of the Ray Data shard ``name`` as numpy batches, epoch
    after epoch, forever; yields ``(batch, epoch)``."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    epoch = 0
    while True:
        rows = 0
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
            rows += len(next(iter(batch.values())))
            yield batch, epoch
        if rows == 0:
            raise RuntimeError("this worker's share of the training data is empty (fewer rows than workers?)")
        epoch += 1


def train(
    cfg: EngineConfig,
    worker: Callable[[dict], None],
    meta: dict,
    per_row: dict[str, dict],
    columns: list[str],
    *,
    stage: str,
    tags: dict,
    headline: str,
    artifacts: Callable[[str, str], dict[str, bytes]],
    extra: dict,
    callbacks: list | None = None,
    stream: Callable | None = None,
    costs: perf.Costs | None = None,
) -> TrainingResult:
    """A training stage's driver, after its own checks: refuse a clash with an earlier run, save the resolved
    config, open the MLflow run (params: the config, and the run's size: ``parameters``, FLOPs per image from
    ``costs``, ``world_size``, ``global_batch``; for a transformer ``active_parameters``, ``tokens_per_image`` and
    ``tokens_per_step``, the global batch's kept tokens), :func:`fit` ``worker`` (each worker gets ``per_row``: ``{name:
    {id: value}}``; the run's ``checkpoint`` tag follows each checkpoint's URI), export the last checkpoint's
    weights to ``OUT/model/``, write and log the stage's ``artifacts(out, ckpt)``, register ``OUT/model`` as a
    version in the MLflow model registry, close the run and write ``summary.json`` (``extra`` added to it).
    Returns the summary."""
    from ambient_ray import config as cfgmod

    out = storage.normalize(cfg.out)
    check_resume(cfg, out, meta)
    if cfg.init_from and not (cfg.resume and latest_checkpoint(out)):  # a resumed run continues its own weights
        check_init(cfg, meta)
    cfgmod.save_resolved(cfg, out)
    size = {"world_size": cfg.num_workers, "global_batch": cfg.batch_size * cfg.optim.grad_accum * cfg.num_workers}
    params = {**cfgmod.flatten(cfg), **size, **(costs.params(size["global_batch"]) if costs else {})}
    run_id, uri = tracking.start_run(cfg.mlflow, out, params=params, tags={"stage": stage, **tags})
    print(headline + (f"; MLflow run {run_id} at {uri}" if run_id else "; MLflow off"))
    loop_config = {"cfg": cfg.model_dump(mode="json"), **per_row, "mlflow_run_id": run_id, "mlflow_uri": uri}
    loop_config["costs"] = dataclasses.asdict(costs) if costs else None
    if run_id:
        callbacks = [*(callbacks or []), checkpoint_tag(run_id, uri, out)]
    t0 = time.perf_counter()
    result = fit(cfg, worker, loop_config, columns, callbacks, stream)
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
        **{"metrics": result.metrics, **extra},
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


def export_weights(out: str, ckpt: str | None) -> None:
    """Copy the inference weights of the last checkpoint to ``OUT/model/``."""
    if ckpt:
        for name in ("ema.safetensors", "model.safetensors", "model.json"):
            storage.write_bytes(storage.join(out, "model", name), storage.read_bytes(storage.join(ckpt, name)))
