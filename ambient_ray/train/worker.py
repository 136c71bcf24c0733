"""One Ray Train worker's engine (:class:`Worker`): its device, the task's named parts (:mod:`ambient_ray.train.parts`:
a DeepSpeed engine, schedule, EMA and post-step hooks per trained part), the step counter, checkpoints (every trained
part's DeepSpeed state and EMA, the export part's inference weights, each rank's random and task state) that a
restarted or ``--resume``d run continues from exactly, metrics summed over ranks, MLflow from rank 0.

The EMA per rank: under ZeRO 0/1/2 every rank holds the whole module and the whole fp32 EMA. Under ZeRO-3 a
rank holds only its partition of each parameter, and of the EMA only that partition's (built after
``deepspeed.initialize``, updated from ``p.ds_tensor`` with no communication); the full EMA, like the full
raw weights, is gathered only when a checkpoint is saved, one parameter at a time, into ``ema.safetensors``
(what sampling loads) beside each rank's own partitions (``ema-rank-NNNN.safetensors``), which a restore on
as many ranks loads alone; any other restore slices its partitions out of ``ema.safetensors``
(:mod:`ambient_ray.io.checkpoint`). The power EMA (``ema: power``) keeps several profiles this way (the others
in ``ema-profiles.safetensors``) and writes snapshots of the export part's profiles to ``OUT/phema/`` every
``ema_snapshot_every`` images (:meth:`Worker.snapshot`).

A step (:func:`ambient_ray.train.loop.steps`): :meth:`Worker.begin_step` counts it, each optimizer step of a part is
followed by :meth:`Worker.update` (its hooks, then its EMA), and :meth:`Worker.end_step` ends it (snapshots,
whether to log and checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Callable, Literal

import torch

from ambient_ray.io import checkpoint, storage, tracking
from ambient_ray.io.snapshots import write_snapshot
from ambient_ray.models.weights import full_shape
from ambient_ray.train import perf
from ambient_ray.train.config import EngineConfig
from ambient_ray.train.parts import FrozenPart, Part, TrainedPart, build


def worker_cpus(cfg: EngineConfig, config: dict) -> float:
    """The CPUs Ray gave this worker: the driver's resolved ``cpus_per_worker`` (the loop config's; the driver asks
    Ray for exactly that many per worker), else the config's number (1 for ``auto`` outside a driver)."""
    resolved = config.get("cpus_per_worker", cfg.cpus_per_worker)
    return 1.0 if resolved == "auto" else float(resolved)


def setup_threads(cpus: float) -> int:
    """The worker's thread setup, in one place: one torch intra-op thread per whole CPU it holds (at least 1);
    returns that count. (No OpenMP wait policy is set: benchmarks/threads_under_load.py found PASSIVE slower, quiet
    and loaded; what keeps a worker's throughput on shared cores is the CPU ``cpus_per_worker: auto`` leaves free.)"""
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    return n


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """glibc's malloc: every allocation of at least ``threshold`` bytes (a tensor of 256k fp32 elements) its own
    memory map, given back to the system when freed. By default glibc raises this threshold to the largest block
    freed so far (up to 32 MB), so a training step's transient tensors (gathered layers, gradients before their
    reduction, activations) land in the heap afterwards and stay in the process when freed: measured on EDM2-XS
    under ZeRO-3 with offload, 1.2 GiB per rank above the live tensors, 0.4 GiB with this. Returns whether it was
    set (False off glibc)."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


class Worker:
    """One Ray Train worker's engine: device, the task's parts, checkpoints, metrics.

    ``parts``: what builds the task's ``{name: Part}`` (or one network: the part ``net``, exported), called here
    under ``torch.manual_seed(cfg.seed)`` (identical initial weights on every rank) and, under ZeRO-3, inside
    ``deepspeed.zero.Init`` (:func:`ambient_ray.train.parts.build`: no rank holds the whole fp32 network); the
    parts themselves, built already, are taken as they are (whole on every rank until DeepSpeed partitions
    them). ``meta`` is the export part's ``model.json``. ``engine``, ``ema``, ``scheduler`` and ``net`` are the
    export part's.
    """

    def __init__(
        self,
        cfg: EngineConfig,
        parts: Callable[[], dict[str, Part] | torch.nn.Module] | dict[str, Part] | torch.nn.Module,
        meta: dict,
        config: dict,
    ):
        import deepspeed
        import ray.train

        self.cfg, self.meta = cfg, meta
        map_large_allocations()  # host memory: large freed tensors go back to the system
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        cuda = cfg.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        if self.device.type == "cpu":  # one intra-op thread per CPU the worker holds
            setup_threads(worker_cpus(cfg, config))
            # DeepSpeed's CPU shared-memory all-reduce op serves only its inference_all_reduce; training's
            # collectives go through gloo. Left on, it is JIT-compiled at the first run (about a minute per
            # virtual environment) and loaded by every worker.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.zero3 = cfg.zero_stage == 3
        if not isinstance(parts, (dict, torch.nn.Module)):
            parts = build(self, parts)
        if isinstance(parts, torch.nn.Module):
            parts = {"net": Part(parts, export=True)}
        exported = [n for n, p in parts.items() if p.export]
        if len(exported) != 1 or not parts[exported[0]].trained:
            raise ValueError(f"a task needs exactly one trained part marked export; got {exported or 'none'}")
        self.main = exported[0]
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=self.device)
        fresh = ray.train.get_checkpoint() is None  # init_from only on a fresh start
        self.parts: dict[str, TrainedPart | FrozenPart] = {
            name: TrainedPart(self, name, p, load_init if fresh else None) if p.trained else FrozenPart(self, name, p)
            for name, p in parts.items()
        }
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

    # the export part's pieces, as a one-network task knows them
    @property
    def engine(self):
        return self.parts[self.main].engine

    @property
    def ema(self):
        return self.parts[self.main].ema

    @property
    def scheduler(self):
        return self.parts[self.main].scheduler

    @property
    def net(self) -> torch.nn.Module:
        return self.parts[self.main].net

    @property
    def post_step_hooks(self) -> list:
        return self.parts[self.main].hooks

    def trained(self) -> list[TrainedPart]:
        """The trained parts in their declared order (the order of every collective over them)."""
        return [p for p in self.parts.values() if p.trained]

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

    def ema_weights(self, part: str | None = None) -> dict[str, torch.Tensor] | None:
        """The full EMA weights of ``part`` (default the export part) by parameter name as fp32 CPU tensors on
        rank 0, None elsewhere. Under ZeRO-3 a collective (every rank takes part in the gather, a parameter at a
        time); otherwise no communication."""
        if not self.zero3 and self.rank != 0:
            return None
        p = self.parts[part or self.main]
        tensors = p.ema.export(keep=self.rank == 0)
        return dict(zip(p.names(), tensors)) if self.rank == 0 else None

    def _guard(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient hook (``grad_guard``): non-finite elements counted (no device sync) and set to 0, as EDM2 does."""
        self.nonfinite += (~torch.isfinite(g)).sum()
        return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)

    def take_nonfinite(self) -> float:
        """Collective: the non-finite gradient elements zeroed since the last call, summed over ranks."""
        n = float(self.all_reduce(self.nonfinite.clone().reshape(1))[0])
        self.nonfinite.zero_()
        return n

    def restore(self, ckpt=None) -> dict[str, torch.Tensor]:
        """Continue from ``ckpt`` (a Ray Train ``Checkpoint``; default Ray Train's, if there is one): every trained
        part's DeepSpeed state and EMA, this rank's random state and step; returns this rank's task state."""
        import ray.train
        from safetensors.torch import load_file

        ckpt = ckpt or ray.train.get_checkpoint()
        if not ckpt:
            return {}
        with checkpoint.rank_checkpoint(ckpt, self.rank, self.zero3) as d:
            for p in self.trained():
                pd = checkpoint.part_dir(d, p.name, p.part.export)
                p.engine.load_checkpoint(pd, tag="ds")
                if p.ema is not None:
                    checkpoint.restore_ema(pd, p.names(), p.ema, self.rank, self.zero3)
            state = load_file(checkpoint.state_file(d, self.rank))
        self.generator.set_state(state.pop("generator"))
        self.step = int(state.pop("step"))
        for p in self.trained():  # a checkpoint of one part per step has no counts: its step
            p.updates = int(state.pop(f"updates.{p.name}", self.step))
        return state

    def gathered(self, params=None):
        """Full parameters (``params``, default all of the export part's) in a context (a collective under ZeRO-3,
        where each rank holds a partition)."""
        import deepspeed

        params = list(self.engine.module.parameters() if params is None else params)
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.zero3 else contextlib.nullcontext()

    def begin_step(self) -> None:
        """Count the step about to be taken (the hooks and EMAs of its updates see it)."""
        self.step += 1

    def update(self, name: str) -> None:
        """After an optimizer step of part ``name``: its post-step hooks (in registration order, on every rank: a
        hook may be a collective), then its EMA (under ZeRO-3 from this rank's partitions: no gather)."""
        p = self.parts[name]
        p.updates += 1
        for hook in p.hooks:
            hook(self)
        if p.ema is not None:
            p.ema.update(p.engine.module.parameters(), p.updates)

    def end_step(self) -> tuple[bool, bool]:
        """After a step's updates: snapshots of the power EMA, a failure where a test planted it; returns (log
        now, checkpoint now), from ``log_every``, ``checkpoint_every`` and the last step."""
        if self.cfg.ema == "power" and snapshot_due(self.cfg, self.step, self.global_batch()):
            self.snapshot()
        self.maybe_fail()
        checkpoint_now = self.checkpoint_due()
        return checkpoint_now or self.step % self.cfg.log_every == 0 or self.report_due(), checkpoint_now

    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.optim.grad_accum * self.world

    def snapshot(self) -> None:
        """Collective under ZeRO-3: every profile of the export part's power EMA, gathered a parameter at a time,
        written by rank 0 to ``OUT/phema/`` (:func:`ambient_ray.io.snapshots.write_snapshot`, atomically; a step
        re-run after a restart writes the same name again, so a resumed run leaves one file per profile and
        snapshot step)."""
        names = self.parts[self.main].names()
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

    def save(self, d: str, state: dict[str, torch.Tensor] | None = None, files: dict[str, str] | None = None) -> None:
        """Write a checkpoint into local folder ``d`` (:mod:`ambient_ray.io.checkpoint`'s layout): every trained
        part's DeepSpeed state, EMA and raw weights (+ its ``model.json``: the export part's ``meta``), this rank's
        state, rank 0's ``files``. Collective: under ZeRO-3 the full weights and EMA are gathered one parameter
        at a time."""
        from safetensors.torch import save_file

        own = {"generator": self.generator.get_state(), "step": torch.tensor(self.step), **(state or {})}
        if len(self.trained()) > 1:
            own.update({f"updates.{p.name}": torch.tensor(p.updates) for p in self.trained()})
        for p in self.trained():
            pd = checkpoint.part_dir(d, p.name, p.part.export)
            os.makedirs(pd, exist_ok=True)
            p.engine.save_checkpoint(pd, tag="ds")
            self.write_raw(p, os.path.join(pd, "model.safetensors"))
            if p.ema is not None:
                checkpoint.save_ema(pd, p.names(), p.ema, self.rank, self.zero3)
            meta = self.meta if p.part.export else p.part.meta
            if self.rank == 0 and meta is not None:
                with open(os.path.join(pd, "model.json"), "w") as f:
                    json.dump(meta, f)
        save_file(own, checkpoint.state_file(d, self.rank))
        if self.rank == 0:
            for name, text in (files or {}).items():
                with open(os.path.join(d, name), "w") as f:
                    f.write(text)

    def write_raw(self, p: TrainedPart, path: str) -> None:
        """Part ``p``'s raw weights as fp32 safetensors at ``path`` on rank 0, written a parameter at a time as each
        is gathered (a collective under ZeRO-3): no rank ever holds the whole fp32 network."""
        from ambient_ray.io.safetensors_stream import write_streamed

        params = list(p.engine.module.named_parameters())

        def gathered():
            for _, t in params:
                with self.gathered([t]):  # one parameter whole at a time
                    yield t.detach().float() if self.rank == 0 else None

        specs = [(n, torch.float32, full_shape(t)) for n, t in params]
        write_streamed(path if self.rank == 0 else None, specs, gathered())

    def save_and_report(
        self, metrics: dict, state: dict[str, torch.Tensor] | None = None, files: dict[str, str] | None = None
    ) -> None:
        """Checkpoint (:meth:`save`) and report it with ``metrics`` to Ray Train."""
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            self.save(d, state, files)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def load_init(net: torch.nn.Module, uri: str) -> None:
    """Worker side of ``init_from``: the raw weights (``model.safetensors``, read as safetensors: nothing
    unpickled) into ``net``, the same on every rank; the EMA, built from ``net`` afterwards, starts from them."""
    from ambient_ray.models import weights

    training = net.training
    weights.load_into(net, weights.model_dir(uri)[0], "model")
    net.train(training)


def snapshot_due(cfg: EngineConfig, step: int, global_batch: int) -> bool:
    """Power EMA snapshots: after the step whose images cross a multiple of ``ema_snapshot_every``, and the last."""
    n = cfg.ema_snapshot_every
    if cfg.ema != "power" or n is None:
        return False
    return step == cfg.steps or step * global_batch // n > (step - 1) * global_batch // n


def progress_line(name: str, text: str) -> None:
    """The job's progress line from rank 0: a log record, not print (Ray Train's patched print also
    tees to a stdout that a library has wrapped, and the driver would show every line twice)."""
    import logging

    logging.getLogger(f"ambient_ray.{name}").info(text)
