"""The engine's config: what every model trained on the engine shares (data, outputs, Ray Train, DeepSpeed,
checkpoints, EMA, MLflow), and the driver-side check that a run's data and DeepSpeed options agree."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ambient_ray.config import ConfigError, Strict, flag
from ambient_ray.data.metadata import one_shape
from ambient_ray.io.tracking import MlflowConfig


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0, description="peak learning rate (reached after warm-up; 'decay' scales it)")
    betas: tuple[float, float] = Field((0.9, 0.99), description="Adam's (β₁, β₂)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay (decoupled with adamw, an L2 term with adam)")
    warmup_steps: int = Field(
        50, ge=0, description="optimizer steps of linear learning-rate warm-up from lr/warmup_steps to lr (0: none)"
    )
    name: Literal["adamw", "adam"] = Field("adamw", description="optimizer (DeepSpeed's CPU Adam under offload)")
    decay: Literal["none", "cosine", "linear", "inv_sqrt"] = Field(
        "cosine", description="learning-rate schedule after warm-up (ambient_ray.train.schedules)"
    )
    ref_steps: int = Field(10_000, ge=1, description="inv_sqrt: t_ref, the step where the decay starts")
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    grad_accum: int = Field(
        1,
        ge=1,
        description="micro-batches accumulated per optimizer step (global batch: batch_size × grad_accum × "
        "num_workers)",
    )


def data_field(required: bool):
    """The ``data`` key (``--data``): required by a stage whose objectives read rows; optional in the engine, where
    None is a run without a dataset (an objective that draws no rows)."""
    what = "dataset URI (a corrupt/annotate output folder or Parquet shards)"
    if not required:
        return Field(None, description=what + "; None: a run without a dataset", json_schema_extra=flag("--data"))
    return Field(..., description=what, json_schema_extra=flag("--data"))


class EngineConfig(Strict):
    """What every model trained on the engine shares: data, outputs, Ray Train, DeepSpeed, checkpoints, MLflow."""

    data: str | None = data_field(required=False)
    out: str = Field(..., description="output URI for checkpoints, weights and plots", json_schema_extra=flag("--out"))
    objective: str = Field(
        "ambient",
        description="the training objective (ambient_ray.train.objectives.OBJECTIVES); each training stage has its own",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    batch_size: int = Field(32, ge=1, description="micro-batch per worker")
    steps: int = Field(200, ge=1, description="optimizer steps", json_schema_extra=flag("--steps"))
    num_workers: int = Field(
        1,
        ge=1,
        description="Ray Train workers (data-parallel ranks, batch_size rows each per micro-batch)",
        json_schema_extra=flag("--num-workers", "Ray Train workers"),
    )
    min_workers: int | None = Field(
        None,
        ge=1,
        description="elastic (zero_stage 0 only): a run that loses workers restarts from its last checkpoint on as "
        "many as fit, at least this many (Ray Train's ScalingConfig(num_workers=(min, max))); None: num_workers always",
    )
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL collectives); false: CPU workers (gloo)")
    cpus_per_worker: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto",
        description="CPUs Ray reserves per worker; a CPU worker runs this many torch threads (the integer part, at "
        "least 1). auto: the most whole CPUs per worker with which every worker fits and each node keeps one CPU "
        "free (for the driver, Ray's daemons, the worker's own data and gloo threads, other jobs): 1 on a 2-core "
        "machine; resolved by the driver (resolve_cpus_per_worker)",
    )
    zero_stage: int = Field(
        2,
        ge=0,
        le=3,
        description="DeepSpeed ZeRO stage: 0 plain data parallel; 1 shards the optimizer states, 2 also the "
        "gradients, 3 also the parameters",
        json_schema_extra=flag("--zero-stage", "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3)),
    )
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimizer states to CPU (stage >= 1)")
    offload_params: bool = Field(
        False,
        description="ZeRO-Infinity's parameter offload: each rank keeps its ZeRO-3 partitions of the parameters in "
        "CPU memory and gathers a layer at a time onto the GPU for its forward and backward (zero_stage 3)",
    )
    reduce_bucket_size: int | None = Field(
        None,
        ge=1,
        description="DeepSpeed's zero_optimization.reduce_bucket_size in elements: the gradient buffer each trained "
        "part's engine reduces through (ZeRO >= 1); None: DeepSpeed's default, 5e8 (2 GB in fp32, 1 GB in bf16, per "
        "rank; 'ambient-ray plan --reduce-bucket' shows the difference)",
    )
    zero3_live_parameters: int | None = Field(
        None,
        ge=1,
        description="ZeRO-3: the most parameters (elements) kept gathered, DeepSpeed's stage3_max_live_parameters "
        "and stage3_max_reuse_distance; None: DeepSpeed's 1e9, which keeps a network below a billion parameters "
        "gathered whole from each forward to its backward (w bytes per parameter per rank); lower it where memory "
        "is short, at the cost of gathering each layer again in the backward",
    )
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
    seed: int = Field(
        0, ge=0, description="seed of the initial weights (the same on every rank) and of each worker's draws"
    )
    log_every: int = Field(10, ge=1, description="print and log metrics (to MLflow) every this many steps")
    checkpoint_every: int = Field(
        100, ge=1, description="checkpoint (and report to Ray Train) every this many steps, and at the last step"
    )
    report_every: int | None = Field(
        None,
        ge=1,
        description="also report metrics (no checkpoint) to Ray Train every this many steps, with a validation loss "
        "(Ray Tune's early stopping reads them)",
    )
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints Ray Train keeps (the oldest are deleted)")
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
    if cfg.zero_stage != 3 and cfg.offload_params:
        raise ConfigError(
            f"config key 'offload_params': needs zero_stage 3 (the parameters' partitions), not {cfg.zero_stage}"
        )
    if cfg.min_workers is not None and cfg.min_workers > cfg.num_workers:
        raise ConfigError(f"config key 'min_workers': {cfg.min_workers} is more than num_workers={cfg.num_workers}")
    if cfg.min_workers is not None and cfg.min_workers < cfg.num_workers and cfg.zero_stage > 0:
        # DeepSpeed refuses a ZeRO >= 1 checkpoint saved on another number of ranks
        raise ConfigError("config key 'min_workers': fewer workers than num_workers needs zero_stage 0")
    return h, c


def workers_that_fit(cpus: float, nodes: list[tuple[float, float]], use_gpu: bool = False) -> int:
    """How many workers of ``cpus`` CPUs each fit on ``nodes`` (each live node's (CPUs, GPUs)) while each node
    keeps one CPU out of the workers' hands; with ``use_gpu`` only nodes with GPUs count, one worker a GPU."""
    c = max(1, int(cpus))
    return sum(
        (int(n) - 1) // c if not use_gpu else min((int(n) - 1) // c, int(g))
        for n, g in nodes
        if n >= 2 and (g >= 1 or not use_gpu)
    )


def resolve_cpus_per_worker(
    value: float | str, num_workers: int, nodes: list[tuple[float, float]], use_gpu: bool = False
) -> float:
    """The CPUs each of ``num_workers`` workers asks Ray for: ``value`` itself when it is a number; for ``auto``
    the most whole CPUs with which every worker fits on the nodes (``nodes``: each live node's (CPUs, GPUs); a GPU
    worker only on a node with a free GPU) while each node keeps one CPU out of the workers' hands
    (:func:`workers_that_fit`), at least 1: 1 on a 2-core machine, 15 on a 16-core one, 7 per worker for 2 workers
    on it, 10 for each of 4 GPU workers on a 44-CPU node with 4 GPUs. Where even 1 does not fit yet (an
    autoscaling cluster before its nodes start), 1.

    The spare CPU is what keeps a worker's throughput when the cores are shared: a worker whose torch threads
    span every core waits, at each parallel op, on a thread that the driver, Ray's daemons, a Ray Data read
    task or another job has preempted (benchmarks/threads_under_load.py measured the demo's network 2-20x
    slower at 2 threads than at 1 on a 2-core machine beside CPU-bound neighbours)."""
    if value != "auto":
        return float(value)
    most = max((int(n) - 1 for n, g in nodes if g >= 1 or not use_gpu), default=1)
    for c in range(max(most, 1), 0, -1):
        if workers_that_fit(c, nodes, use_gpu) >= num_workers:
            return float(c)
    return 1.0
