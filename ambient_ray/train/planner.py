"""The memory planner (``ambient-ray plan``): per-GPU memory of training a registry preset under DeepSpeed ZeRO.

Counts come from the network built on the meta device (no memory, no weights): the exact parameter count,
the largest layer (what ZeRO-3 gathers at once) and the parameters ZeRO-3 keeps whole on every rank. (Not
from DeepSpeed's ``*_all_live`` estimators: on a meta model every ``data_ptr`` is 0 and they count 128.)
Activations are measured on the meta device too: the bytes the forward saves for backward
(``torch.autograd.graph.saved_tensors_hooks``), and with activation checkpointing the bytes saved outside the
checkpointed blocks, the blocks' inputs and one block's recomputation. FLOPs per image from
``torch.utils.flop_counter.FlopCounterMode`` on the same meta model (:func:`flops_per_image`).

Model states per GPU (P parameters, N data-parallel ranks, w = 2 bytes in bf16 mixed precision, 4 in fp32,
Adam/AdamW: two fp32 states), at the optimizer step, its peak (:func:`model_states`):

    params  w·P whole (ZeRO 0-2); ZeRO-3: w·P/N, and the persistent parameters (<= 1e5 elements) whole
            on every rank from the forward until the step
    grads   ZeRO-0: w·P, and in bf16 the optimizer's fp32 copy 4·P; ZeRO-1/2: the fp32 partition 4·P/N;
            ZeRO-3: the partition buffer w·P/N and, during the step (the persistent ones released), the
            fp32 copy the step reads 4·P/N
    master  fp32 copy, 4·P (ZeRO-0 bf16; fp32 ZeRO-0 steps on the module itself) or 4·P/N (ZeRO >= 1)
    Adam    8·P, or 8·P/N (ZeRO >= 1)

i.e. fp32: 16, 4 + 16/N, 4 + 16/N, 24/N bytes per parameter; bf16: 20, 2 + 16/N, 2 + 16/N, 20/N (ZeRO-3 with
few persistent parameters). These are
measured (tensor storages per rank, DeepSpeed 0.19 on CPU over gloo, fp32 and bf16, 2 ranks; the fp32 ones
by ``tests/test_planner.py``). DeepSpeed's count-based estimators (``estimate_zero2_model_states_mem_needs``
in ``deepspeed.runtime.zero.stage_1_and_2``, ``estimate_zero3_model_states_mem_needs`` in
``deepspeed.runtime.zero.stage3``) assume bf16 mixed precision: 2 + 18/N and 18/N + 4·largest layer; the plan
shows them beside ours. Optimizer offload (``--offload``, the engine's ``offload_optimizer``): the host holds the
fp32 master weights, the Adam states and the fp32 gradient partition, 16·P/N per rank, and under ZeRO-1/2 a
second fp32 gradient partition, 20·P/N; the GPU the parameters (ZeRO-1/2: whole, w·P; ZeRO-3: the partition, the
persistent ones and the partition's gradients, w·P/N + w·persistent + w·P/N). Parameter offload
(``--offload-params``, ZeRO-3, the engine's ``offload_params``) moves the partition of the parameters, w·P/N, to
the host. Measured on CPU (fp32, 2 ranks, every combination): within 2.4% (``tests/test_planner.py``).

DeepSpeed's working buffers on top (its config defaults; the engine's ``deepspeed_config`` sets none): the
gradient reduce bucket of ``reduce_bucket_size`` elements in the gradient dtype (5e8: 1 GB in bf16, 2 GB in
fp32; ZeRO-3 allocates it once, ZeRO-1/2 at every backward), and under ZeRO-3 the gathered parameters
(:func:`gathered_bytes`: kept from the forward for the backward, the whole network below 1e9 parameters, and
DeepSpeed's 4·largest layer). The EMA (:mod:`ambient_ray.train.ema`, in fp32 on the
device): one copy per profile, whole on every rank under ZeRO 0-2, this rank's partition under ZeRO-3.

A distillation (``--distill``: :mod:`ambient_ray.train.tasks.distill`, three copies of the preset) is a task of
several parts (:func:`parts_bytes`): the generator and the fake score trained, each its own engine with its own
model states as above (the generator with the EMA, the fake score without), and the frozen teacher, its weights
only: w·P whole under ZeRO 0-2, w·P/N and its persistent parameters whole under ZeRO-3. Buffers
(:func:`task_buffers`): ZeRO-1/2 allocate a trained engine's reduce bucket at its backward and free it at the
end, and the two backwards never overlap: one bucket; ZeRO-3 allocates one per trained engine with its optimizer
and keeps it: two (the teacher's engine has no optimizer); the gathered layers are one network's at a time.
Activations (:func:`generator_step`): the generator step's, G's training forward and the fake score's and the
teacher's forwards on its output, alive together; those two run in eval mode with frozen parameters, so they save
only what their input's gradient needs (measured: about 0.65x a training forward for EDM2-XXL and MicroDiT-XL/2 in
bf16), and are not checkpointed (the networks checkpoint in training mode only).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ambient_ray.config import ConfigError
from ambient_ray.train.plan_config import PlanConfig, Precision

GIB = 2**30
STAGES = (0, 1, 2, 3)
# DeepSpeed's ZeRO config defaults (deepspeed.runtime.zero.config.DeepSpeedZeroConfig), which the engine keeps
REDUCE_BUCKET = int(5e8)  # reduce_bucket_size
MAX_LIVE = int(1e9)  # stage3_max_live_parameters (and stage3_max_reuse_distance, also 1e9)
PERSISTENCE_THRESHOLD = int(1e5)  # stage3_param_persistence_threshold: parameters this small stay whole
EMA_COPIES = {"warmup": 1, "power": 2}  # fp32 copies per rank: the power EMA tracks ema_stds' two profiles


def dtype_bytes(precision: Precision) -> int:
    return 2 if precision == "bf16" else 4


# ------------------------------------------------------------------------------ the network on the meta device


def resolve(preset: str) -> str:
    """The denoiser arch whose presets hold ``preset`` (every registered arch is searched)."""
    from ambient_ray.models import registry

    found = [name for name in registry.names("denoiser") if preset in registry.ARCHS.get(name).presets]
    if not found:
        known = ", ".join(p for name in registry.names("denoiser") for p in registry.ARCHS.get(name).presets)
        raise ConfigError(f"config key 'model': unknown preset {preset!r}; the denoiser presets are {known}")
    if len(found) > 1:
        raise ConfigError(f"config key 'model': preset {preset!r} is in several archs ({', '.join(found)})")
    return found[0]


def preset_meta(preset: str, **model) -> dict:
    """``model.json`` of a preset at its paper setting (the arch module's ``PAPER_INTERFACE`` where it has
    one, e.g. EDM2's 64x64x4 latents with 1000 classes), with ``model`` keys (None: left to the preset)."""
    from ambient_ray.models import registry

    arch = resolve(preset)
    paper = getattr(sys.modules[registry.ARCHS.get(arch).config.__module__], "PAPER_INTERFACE", {})
    given = {k: v for k, v in model.items() if v is not None}
    return {"kind": "denoiser", "arch": arch, "model": {"preset": preset, **paper, **given}, "sigma_data": 0.5}


def meta_model(meta: dict, **model) -> nn.Module:
    """The network of ``meta`` (``model`` keys overridden) on the meta device, buffers included."""
    from ambient_ray.models import registry

    meta = {**meta, "model": {**meta["model"], **model}}
    with torch.device("meta"):
        net = registry.build(meta)
    return net.to("meta")  # a buffer built on an explicit device (e.g. fixed Fourier features) too


@dataclass(frozen=True)
class Counts:
    params: int  # exact, shared parameters once
    largest_layer: int  # most parameters one module holds itself (DeepSpeed's largest_layer_params)
    persistent: int  # parameters of at most stage3_param_persistence_threshold elements: whole on every rank
    active: int | None = None  # parameters active per token where the network says (``active_parameters()``)


def counts(net: nn.Module) -> Counts:
    """Parameter counts of a (meta-device) network. A network whose parameters are not all active per token
    (a mixture of experts) reports its active count through an ``active_parameters()`` method."""
    params = list(net.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules())
    persistent = sum(p.numel() for p in params if p.numel() <= PERSISTENCE_THRESHOLD)
    active = net.active_parameters() if callable(getattr(net, "active_parameters", None)) else None
    return Counts(sum(p.numel() for p in params), largest, persistent, active)


def _inputs(meta: dict, batch: int, mask_ratio: float = 0.0) -> tuple:
    """The arch's example inputs on the meta device; with ``mask_ratio`` > 0 (a transformer) the kept token
    indices of patch masking among them, so the backbone runs on those tokens only."""
    from ambient_ray.models.registry import config_of, example_inputs

    return tuple(t.to("meta") for t in example_inputs(config_of(meta), batch, mask_ratio=mask_ratio))


def flops_per_image(meta: dict, mask_ratio: float = 0.0) -> int:
    """FLOPs of one image's forward (two per multiply-add; EDM2's paper counts one), on the meta device, with
    ``mask_ratio`` of a transformer's patches dropped before its backbone. Training costs about 3x this per
    image (4x with activation checkpointing)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = meta_model(meta).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(*_inputs(meta, 1, mask_ratio))
    return int(fc.get_total_flops())


# ------------------------------------------------------------------------------ activations


class _Saved:
    """Bytes the forward saves for backward (parameters excluded, a storage counted once), attributed to the
    module that was running: per module, the most one call saved."""

    def __init__(self, net: nn.Module):
        self.params = {id(p) for p in net.parameters()}
        self.seen: set[tuple[int, int]] = set()  # (id of the base tensor, its storage's bytes)
        self.keep: list[torch.Tensor] = []  # saved tensors stay alive: their ids stay unique
        self.total = 0
        self.per_call: dict[str, int] = {}
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self._start: dict[str, list[int]] = {}
        self.handles = []
        for name, m in net.named_modules():
            self.handles.append(m.register_forward_pre_hook(self._pre(name)))
            self.handles.append(m.register_forward_hook(self._post(name)))

    def _key(self, t: torch.Tensor) -> tuple[int, int]:
        base = t._base if t._base is not None else t
        return id(base), base.untyped_storage().nbytes()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in self.params:
            key, nbytes = self._key(t)
            if key not in self.seen:
                self.seen.add(key)
                self.keep.append(base)
                self.total += nbytes
        return t

    def _pre(self, name):
        def hook(_module, args):
            self._start.setdefault(name, []).append(self.total)
            self.inputs[name] = [a for a in args if isinstance(a, torch.Tensor)]

        return hook

    def _post(self, name):
        def hook(_module, _args, _out):
            used = self.total - self._start[name].pop()
            self.per_call[name] = max(self.per_call.get(name, 0), used)

        return hook

    def input_bytes(self, names: list[str]) -> int:
        """Bytes of the modules' inputs not already saved (a storage once)."""
        total, seen = 0, set(self.seen)
        for name in names:
            for t in self.inputs.get(name, []):
                key, nbytes = self._key(t)
                if key not in seen:
                    seen.add(key)
                    total += nbytes
        return total


def _saved(
    meta: dict, batch: int, precision: Precision, mask_ratio: float = 0.0, frozen: bool = False, **model
) -> _Saved:
    """What a training forward saves; ``frozen``: a frozen network's in eval mode, its parameters out of the graph
    and its input (the image) requiring a gradient, as the score networks of a distillation's generator step."""
    net = meta_model(meta, **model).to(torch.bfloat16 if precision == "bf16" else torch.float32)
    net = net.eval().requires_grad_(False) if frozen else net.train()
    s = _Saved(net)
    inputs = list(_inputs(meta, batch, mask_ratio))
    if frozen:
        inputs[0] = inputs[0].detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(s.pack, lambda t: t):
        net(*inputs)
    for h in s.handles:
        h.remove()
    return s


@dataclass(frozen=True)
class Activations:
    saved: int  # bytes one micro-batch's forward saves for backward, without checkpointing
    checkpointed: int | None  # with checkpointing: saved outside the blocks + their inputs + one block's recompute
    option: str | None  # the model config key that turns checkpointing on; None: the arch has none
    recompute: int = 0  # the largest block's own saved bytes (recomputed in backward, one block at a time)
    frozen: int | None = None  # a frozen copy's forward for its input's gradient (eval mode); measured for --distill


def generator_step(act: Activations, checkpoint: bool) -> int | None:
    """A distillation's peak activations, its generator step's: G's training forward (checkpointed or not) and the
    fake score's and the teacher's forwards on G's noised output, all saved at once for one backward. Those two run
    in eval mode with their parameters out of the graph, so they save only what their input's gradient needs
    (``act.frozen``), and the networks checkpoint only in training mode: checkpointing leaves them whole. The
    fake-score step (G under no_grad, the fake score's training forward: ``act.saved`` or ``act.checkpointed``)
    is always less."""
    a = act.checkpointed if checkpoint else act.saved
    return None if a is None or act.frozen is None else a + 2 * act.frozen


CHECKPOINT_KEY = "checkpoint_blocks"


def activations(
    meta: dict, batch: int, precision: Precision = "bf16", mask_ratio: float = 0.0, frozen: bool = False
) -> Activations:
    """Activation bytes of one micro-batch of ``batch`` per GPU, measured on the meta device (a transformer's
    backbone on the tokens patch masking keeps at ``mask_ratio``); ``frozen``: also a frozen copy's forward for
    its input's gradient (:func:`generator_step`).

    With checkpointing (the arch's ``checkpoint_blocks``) the blocks run inside ``torch.utils.checkpoint``
    and save nothing through this hook: they are the outermost modules that saved bytes without it and none
    with it. Their inputs stay alive for the recomputation, and backward recomputes one block at a time, so
    the peak adds the largest block's own saved bytes (measured without checkpointing)."""
    off = {CHECKPOINT_KEY: False} if _has_checkpoint(meta) else {}
    plain = _saved(meta, batch, precision, mask_ratio, **off)
    still = _saved(meta, batch, precision, mask_ratio, frozen=True, **off).total if frozen else None
    if not _has_checkpoint(meta):
        return Activations(plain.total, None, None, frozen=still)
    ck = _saved(meta, batch, precision, mask_ratio, **{CHECKPOINT_KEY: True})
    silent = {n for n, used in plain.per_call.items() if used > 0 and ck.per_call.get(n, 0) == 0}
    blocks = [n for n in silent if _parent(n) not in silent]
    if not blocks:  # the option changed nothing this hook can see
        return Activations(plain.total, plain.total, CHECKPOINT_KEY, frozen=still)
    recompute = max(plain.per_call[n] for n in blocks)
    return Activations(plain.total, ck.total + ck.input_bytes(blocks) + recompute, CHECKPOINT_KEY, recompute, still)


def _parent(name: str) -> str | None:
    return name.rsplit(".", 1)[0] if "." in name else ("" if name else None)


def _has_checkpoint(meta: dict) -> bool:
    from ambient_ray.models import registry

    return CHECKPOINT_KEY in registry.ARCHS.get(registry.arch_of(meta)).config.model_fields


# ------------------------------------------------------------------------------ model states, buffers, EMA


@dataclass(frozen=True)
class States:
    gpu: int  # bytes per GPU at the optimizer step: parameters, gradients, master weights, optimizer states
    cpu: int  # bytes per rank in host memory (offloaded optimizer states, offloaded parameter partitions)
    buffers: int  # DeepSpeed's working buffers on the GPU (reduce bucket; ZeRO-3's gathered parameters)
    deepspeed: int | None = None  # DeepSpeed's own estimate of ``gpu`` (bf16, ZeRO-2/3), for comparison


def model_states(
    c: Counts,
    stage: int,
    world: int,
    precision: Precision = "bf16",
    offload: bool = False,
    offload_params: bool = False,
    bucket: int = REDUCE_BUCKET,
    live: int = MAX_LIVE,
) -> States:
    """Per-rank bytes of the model states under ZeRO ``stage`` on ``world`` data-parallel ranks (the
    formulas of the module docstring); ``offload``: DeepSpeed's ZeRO-Offload of the optimizer states (the
    engine's ``offload_optimizer``, stage >= 1); ``offload_params``: ZeRO-Infinity's parameter offload (the
    engine's ``offload_params``, stage 3); ``bucket``: the reduce bucket's elements (the engine's
    ``reduce_bucket_size``); ``live``: ZeRO-3's most parameters kept gathered (the engine's
    ``zero3_live_parameters``)."""
    if stage not in STAGES:
        raise ConfigError(f"config key 'zero_stage': {stage} is not a ZeRO stage (0-3)")
    if offload and stage == 0:
        raise ConfigError("config key 'offload': optimizer offload needs ZeRO stage >= 1")
    if offload_params and stage != 3:
        raise ConfigError("config key 'offload_params': parameter offload needs ZeRO stage 3")
    p, w, n = c.params, dtype_bytes(precision), world
    bf16 = precision == "bf16"
    shard = p if stage == 0 else p / n
    params = w * p / n if stage == 3 else w * p
    # ZeRO-3: the small parameters are whole on every rank from the forward until the step, which releases
    # them and in their place reads an fp32 copy of the gradient partition: the peak is the larger of the two
    whole, step_copy = (w * c.persistent, 4 * p / n) if stage == 3 else (0, 0)
    if stage == 0:
        grads = w * p + (4 * p if bf16 else 0)
    elif stage < 3:
        grads = 4 * p / n
    else:
        grads = w * p / n
    master = 4 * shard if (bf16 or stage > 0) else 0
    adam = 8 * shard
    buffers = 0 if stage == 0 else w * bucket
    if stage == 3:
        buffers += gathered_bytes(c, w, live)
    ds = _deepspeed_estimate(c, stage, n, offload, offload_params) if bf16 else None
    host = w * p / n if offload_params else 0  # ZeRO-Infinity: this rank's parameter partitions in host memory
    gpu_params = 0 if offload_params else params
    if offload:  # the host holds the fp32 master weights, the Adam states and the fp32 gradient partition
        if stage == 3:  # the GPU its partitions (unless offloaded), the persistent ones and the gradient partition
            return States(int(gpu_params + whole + w * p / n), int(host + 16 * p / n), int(buffers), ds)
        # ZeRO-1/2: the whole parameters on the GPU; the host a second fp32 gradient partition too (measured)
        return States(int(params), int(20 * p / n), int(buffers), ds)
    return States(int(gpu_params + grads + master + adam + max(whole, step_copy)), int(host), int(buffers), ds)


def gathered_bytes(c: Counts, w: int, live: int = MAX_LIVE) -> int:
    """ZeRO-3's gathered parameters at their peak, between a step's forward and its backward: DeepSpeed keeps every
    parameter it gathered for the forward until the backward has used it again (``stage3_max_reuse_distance``,
    1e9 elements by default), up to ``stage3_max_live_parameters`` (1e9) elements in the compute dtype (``w``
    bytes): the whole network below a billion parameters (measured: EDM2-XS on 2 CPU ranks held its whole fp32
    model gathered from the second step's forward on); plus DeepSpeed's own term for gathering a layer, 4 bytes
    per parameter of the largest. ``live``: that limit where the run sets it (the engine's
    ``zero3_live_parameters`` sets both)."""
    return int(w * min(c.params, live) + 4 * c.largest_layer)


def _deepspeed_estimate(c: Counts, stage: int, world: int, offload: bool, offload_params: bool = False) -> int | None:
    """DeepSpeed's count-based estimate of the GPU's model states (bf16 mixed precision), without its
    largest-layer term (a buffer here); None for stages it has no estimator for."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # as the engine does: no probing, no warning
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(c.params, world, 1, cpu_offload=offload)[1]
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, largest = estimate_zero3_model_states_mem_needs(
            c.params, c.largest_layer, world, 1, cpu_offload=offload, cpu_offload_params=offload_params
        )
        return gpu - largest
    return None


def ema_bytes(c: Counts, stage: int, world: int, copies: int = 1) -> int:
    """fp32 EMA bytes per rank: ``copies`` profiles, of the whole model (ZeRO 0-2) or this rank's partition
    (ZeRO-3, :class:`ambient_ray.train.ema.Partitions`)."""
    per_copy = c.params if stage < 3 else math.ceil(c.params / world)
    return 4 * copies * per_copy


def frozen_bytes(c: Counts, stage: int, world: int, precision: Precision = "bf16") -> int:
    """Per-rank bytes of a frozen part (:class:`ambient_ray.train.parts.Part` with ``trained=False``): its weights in
    the run's precision (w·P), whole under ZeRO 0-2; under ZeRO-3 this rank's partition and the persistent
    parameters whole (w·P/N + w·persistent; its layers gathered for the forward are a buffer,
    :func:`task_buffers`). No gradients, master copy, optimizer state or EMA."""
    w = dtype_bytes(precision)
    if stage < 3:
        return w * c.params
    return int(w * c.params / world + w * c.persistent)


PartSpec = tuple  # a task's part as the planner sees it: (Counts, trained) or (Counts, trained, keeps an EMA)


def task_buffers(
    parts: dict[str, PartSpec],
    stage: int,
    precision: Precision = "bf16",
    bucket: int = REDUCE_BUCKET,
    live: int = MAX_LIVE,
) -> int:
    """DeepSpeed's working buffers of a task's engines on one rank, at their peak (one part: as
    :func:`model_states`). ZeRO-0: none. ZeRO-1/2: one reduce bucket: each trained engine allocates its own at its
    backward's first gradient and frees it when the backward ends (``setup_buckets``, ``_release_ipg_buffers``
    in DeepSpeed's ``stage_1_and_2``), and no two trained engines run a backward at once (a distillation's
    generator step passes through the fake score's inputs, its parameters out of the graph). ZeRO-3: a reduce
    bucket per trained engine, allocated with its optimizer and kept (``stage3``; a frozen part's engine has no
    optimizer, so none), and the gathered parameters (:func:`gathered_bytes`) of one network at
    a time, the largest: the networks run one after another, each releasing its layers after use."""
    trained = [p[0] for p in parts.values() if p[1]]
    if stage == 0 or not trained:
        return 0
    w = dtype_bytes(precision)
    if stage < 3:
        return w * bucket
    gathered = max(gathered_bytes(p[0], w, live) for p in parts.values())
    return len(trained) * w * bucket + gathered


@dataclass(frozen=True)
class PartsBytes:
    """Per-rank bytes of a task's parts (:func:`parts_bytes`)."""

    states: dict[str, int]  # per part: a trained one's model states, a frozen one's weights
    ema: int  # the fp32 EMAs of the trained parts that keep one
    buffers: int  # DeepSpeed's working buffers (:func:`task_buffers`)
    cpu: int = 0  # host memory per rank: the offloaded optimizer states and parameter partitions
    deepspeed: dict[str, int | None] | None = None  # DeepSpeed's estimate of each trained part's states

    @property
    def total(self) -> int:
        """GPU bytes without activations."""
        return sum(self.states.values()) + self.ema + self.buffers


def parts_bytes(
    parts: dict[str, PartSpec],
    stage: int,
    world: int,
    precision: Precision = "bf16",
    ema: str = "warmup",
    offload: bool = False,
    offload_params: bool = False,
    bucket: int = REDUCE_BUCKET,
    live: int = MAX_LIVE,
) -> PartsBytes:
    """Per-rank bytes of a task's parts (``{name: (counts, trained[, keeps an EMA])}``, as its
    :class:`ambient_ray.train.parts.Part`): a trained part has its own DeepSpeed engine, so its own model states
    (:func:`model_states`) and, unless it keeps none, its own EMA (:func:`ema_bytes`, ``ema``'s copies); a frozen
    part its weights (:func:`frozen_bytes`); the engines' buffers :func:`task_buffers`. Activations are not
    included. A distillation: ``{"generator": (c, True), "fake_score": (c, True, False), "teacher": (c, False)}``."""
    states, emas, cpu, ds = {}, 0, 0, {}
    for name, (c, trained, *keeps) in parts.items():
        if trained:
            s = model_states(c, stage, world, precision, offload, offload_params, bucket, live)
            states[name], cpu, ds[name] = s.gpu, cpu + s.cpu, s.deepspeed
            emas += ema_bytes(c, stage, world, EMA_COPIES[ema]) if (keeps[0] if keeps else True) else 0
        else:
            frozen = frozen_bytes(c, stage, world, precision)
            moved = int(dtype_bytes(precision) * c.params / world) if offload_params else 0  # its partition
            states[name], cpu = frozen - moved, cpu + moved
    return PartsBytes(states, emas, task_buffers(parts, stage, precision, bucket, live), cpu, ds)


# ------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Choice:
    stage: int
    nodes: int
    checkpoint: bool
    total: int  # bytes per GPU


def recommend(
    per_gpu: Callable[[int, int, bool], int],
    budget: float,
    nodes: int | None = None,
    max_nodes: int = 64,
    checkpoint: tuple[bool, ...] = (False, True),
) -> Choice | None:
    """The cheapest setting whose per-GPU bytes ``per_gpu(stage, nodes, checkpoint)`` fit ``budget``: the
    fewest nodes (``nodes`` if given), then without activation checkpointing if it fits (recomputation costs
    a forward), then the lowest ZeRO stage (the least communication). None if nothing fits."""
    for n in [nodes] if nodes else range(1, max_nodes + 1):
        for ck in checkpoint:
            for stage in STAGES:
                total = per_gpu(stage, n, ck)
                if total <= budget:
                    return Choice(stage, n, ck, int(total))
    return None


PAPER_GLOBAL_BATCH = {"edm2": 2048, "dit": 2048}  # EDM2 Table 1; MicroDiT, every phase
PAPER_EMA = {"edm2": "power"}
PAPER_MASK_RATIO = {"dit": 0.75}  # MicroDiT's pretraining phases (256² and 512², 75% of patches dropped)


@dataclass(frozen=True)
class Plan:
    cfg: PlanConfig
    meta: dict
    counts: Counts
    activations: Activations
    flops: int  # forward FLOPs per image, patch-masked at mask_ratio
    ema: str
    nodes: int  # the node count of the table: the recommendation's, or --nodes
    choice: Choice | None
    rows: dict[int, dict[str, int | None]]  # per stage: the table's bytes
    mask_ratio: float = 0.0  # a transformer's patch masking (the activations and FLOPs are of the kept tokens)
    tokens: int | None = None  # tokens the backbone runs on per image (None: not a transformer)
    tokens_all: int | None = None  # ... without patch masking
    active_per_token: int | None = None  # parameters an image token passes through (a mixture of experts)

    def per_gpu(self, stage: int, nodes: int, checkpoint: bool) -> int:
        return per_gpu_bytes(self.cfg, self.counts, self.activations, self.ema, stage, nodes, checkpoint)


def task_parts(c: Counts, distill: bool = False) -> dict[str, PartSpec]:
    """The parts of training a preset (one network), or of distilling it (:mod:`ambient_ray.train.tasks.distill`:
    the generator with the EMA, the fake score without, both trained; the frozen teacher)."""
    if distill:
        return {"generator": (c, True, True), "fake_score": (c, True, False), "teacher": (c, False)}
    return {"net": (c, True)}


def step_activations(act: Activations, checkpoint: bool, distill: bool = False) -> int | None:
    """The activations at a step's peak: one training forward's, or a distillation's :func:`generator_step`."""
    if distill:
        return generator_step(act, checkpoint)
    return act.checkpointed if checkpoint else act.saved


def offload_allows(cfg: PlanConfig, stage: int) -> bool:
    """Whether ``stage`` can run the plan's offload: optimizer offload needs stage >= 1, parameter offload stage 3."""
    return not ((cfg.offload and stage == 0) or (cfg.offload_params and stage != 3))


def plan_parts_bytes(cfg: PlanConfig, c: Counts, ema: str, stage: int, world: int) -> PartsBytes:
    """:func:`parts_bytes` of the plan's task (training or distilling the preset) with the plan's settings."""
    return parts_bytes(
        task_parts(c, cfg.distill),
        stage,
        world,
        cfg.precision,
        ema,
        cfg.offload,
        cfg.offload_params,
        cfg.reduce_bucket or REDUCE_BUCKET,
        cfg.live_params or MAX_LIVE,
    )


def per_gpu_bytes(
    cfg: PlanConfig, c: Counts, act: Activations, ema: str, stage: int, nodes: int, checkpoint: bool
) -> int:
    if not offload_allows(cfg, stage):
        return 1 << 62  # never chosen
    a = step_activations(act, checkpoint, cfg.distill)
    if a is None:
        return 1 << 62
    return plan_parts_bytes(cfg, c, ema, stage, cfg.gpus * nodes).total + a


def plan(cfg: PlanConfig) -> Plan:
    """Count, measure and recommend (seconds: the meta device, no Ray)."""
    meta = preset_meta(cfg.model, img_resolution=cfg.resolution, in_channels=cfg.channels, label_dim=cfg.label_dim)
    try:
        net = meta_model(meta)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config key 'model': preset {cfg.model!r} at this interface: {e}") from None
    c = counts(net)
    from ambient_ray.models.registry import config_of, tokens_per_image

    if cfg.distill and cfg.mask_ratio:
        raise ConfigError("config key 'mask_ratio' (--mask-ratio): a distillation runs the whole network (no masking)")
    mask = PAPER_MASK_RATIO.get(meta["arch"], 0.0) if cfg.mask_ratio is None else cfg.mask_ratio
    mask = 0.0 if cfg.distill else mask
    try:
        tokens, tokens_all = tokens_per_image(config_of(meta), mask), tokens_per_image(config_of(meta))
    except ConfigError as e:
        raise ConfigError(f"config key 'mask_ratio' (--mask-ratio): preset {cfg.model!r}: {e}") from None
    act = activations(meta, cfg.batch, cfg.precision, mask, frozen=cfg.distill)
    auto = "warmup" if cfg.distill else PAPER_EMA.get(meta["arch"], "warmup")  # distill: the engine's default
    ema = auto if cfg.ema == "auto" else cfg.ema
    options = (False, True) if act.checkpointed is not None else (False,)

    def fits(stage: int, nodes: int, checkpoint: bool) -> int:
        return per_gpu_bytes(cfg, c, act, ema, stage, nodes, checkpoint)

    budget = cfg.gpu_mem * GIB * (1 - cfg.headroom)
    choice = recommend(fits, budget, cfg.nodes, cfg.max_nodes, options)
    nodes = cfg.nodes or (choice.nodes if choice else 1)
    rows = {}
    for stage in STAGES:
        if not offload_allows(cfg, stage):
            continue
        pb = plan_parts_bytes(cfg, c, ema, stage, cfg.gpus * nodes)
        if cfg.distill:
            states = {
                "generator: model states": pb.states["generator"],
                "fake score: model states": pb.states["fake_score"],
                "  DeepSpeed's estimate, each": pb.deepspeed["generator"],
                "teacher: frozen weights": pb.states["teacher"],
            }
        else:
            states = {"model states": pb.states["net"], "  DeepSpeed's estimate": pb.deepspeed["net"]}
        rows[stage] = {
            **states,
            "DeepSpeed buffers": pb.buffers,
            "EMA (generator)" if cfg.distill else "EMA": pb.ema,
            "activations": step_activations(act, False, cfg.distill),
            "  with checkpointing": step_activations(act, True, cfg.distill),
            "total": fits(stage, nodes, False),
            "  with checkpointing ": fits(stage, nodes, True) if act.checkpointed is not None else None,
            "host memory per node (offload)": pb.cpu * cfg.gpus if cfg.offload or cfg.offload_params else None,
        }
    per_token = net.active_parameters(per_token=True) if c.active is not None else None
    flops = flops_per_image(meta, mask)
    return Plan(cfg, meta, c, act, flops, ema, nodes, choice, rows, mask, tokens, tokens_all, per_token)


def _gib(b: int | None) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def format_plan(p: Plan) -> str:
    """The plan as plain aligned text."""
    cfg, c = p.cfg, p.counts
    from ambient_ray.models.registry import config_of, takes_captions

    mc = config_of(p.meta)
    labels = getattr(mc, "label_dim", 0)
    if takes_captions(p.meta["arch"]):
        cond = f", captions of {mc.caption_tokens} tokens x {mc.caption_dim} (with their mask)"
    else:
        cond = f", {labels} classes" if labels else ", unconditional"
    lines = [f"{cfg.model} (arch {p.meta['arch']}): {c.params:,} parameters (exact)"]
    if cfg.distill:
        lines.append(
            "  distillation (--distill): three networks of this preset, a generator and a fake score trained (each "
            f"its own DeepSpeed engine and Adam; the generator's EMA) and the teacher frozen ({cfg.precision} weights)"
        )
    if c.active is not None:
        per_token = p.active_per_token
        lines.append(
            f"  {c.active:,} active ({c.active / c.params:.0%}: each expert counted at the share of tokens it takes)"
            + (
                f"; {per_token:,} per image token (without adaLN, the conditioning and caption-side layers)"
                if per_token is not None
                else ""
            )
        )
    lines += [
        f"  largest layer {c.largest_layer:,}; ZeRO-3 keeps {c.persistent:,} whole on every rank "
        f"(tensors of <= {PERSISTENCE_THRESHOLD:,} elements)",
        f"  input {mc.img_resolution}x{mc.img_resolution}x{mc.in_channels}{cond}"
        + f"; forward {p.flops / 1e9:,.1f} GFLOPs per image ({p.flops / 2e9:,.1f} G multiply-adds)",
    ]
    if p.tokens is not None:
        lines.append(
            f"  patch masking {p.mask_ratio:.0%} (--mask-ratio): the backbone runs on {p.tokens} of {p.tokens_all} "
            f"tokens per image (the patch mixer on all); activations and FLOPs counted so"
        )
    world = cfg.gpus * p.nodes
    lines.append(
        f"per GPU in GiB: {cfg.precision}{', optimizer offloaded to CPU' if cfg.offload else ''}"
        f"{', parameters offloaded to CPU' if cfg.offload_params else ''}, "
        f"{cfg.gpus} GPUs x {p.nodes} node{'s' if p.nodes > 1 else ''} = {world} ranks, micro-batch {cfg.batch}, "
        f"{'generator ' if cfg.distill else ''}EMA {p.ema} ({EMA_COPIES[p.ema]} fp32 "
        f"cop{'ies' if EMA_COPIES[p.ema] > 1 else 'y'})"
    )
    stages = list(p.rows)
    names = [k for k in next(iter(p.rows.values())) if any(p.rows[s][k] is not None for s in stages)]
    width = max(len(n) for n in names) + 2
    lines.append(" " * width + "".join(f"{'ZeRO-' + str(s):>10s}" for s in stages))
    for name in names:
        lines.append(f"{name.rstrip():<{width}s}" + "".join(f"{_gib(p.rows[s][name]):>10s}" for s in stages))
    budget = cfg.gpu_mem * (1 - cfg.headroom)
    a = p.activations
    if cfg.distill:
        ck = f", {_gib(a.checkpointed)} checkpointed" if a.checkpointed is not None else ""
        lines.append(
            f"(activations: the generator step's, G's training forward ({_gib(a.saved)} GiB{ck}) and the fake "
            f"score's and the teacher's forwards on its output, {_gib(a.frozen)} GiB each: in eval mode, saved for "
            "their input's gradient only and never checkpointed; the fake-score step holds one training forward's)"
        )
    if p.activations.option is None:
        lines.append(f"(arch {p.meta['arch']} has no activation checkpointing option)")
    else:
        lines.append(
            f"(checkpointing: model.{p.activations.option}; backward recomputes one block at a time, the largest "
            f"saving {_gib(p.activations.recompute)} GiB)"
        )
    ch = p.choice
    if ch is None:
        where = f"{cfg.nodes} node(s)" if cfg.nodes else f"up to {cfg.max_nodes} nodes"
        lines.append(
            f"recommended: nothing fits {budget:.1f} GiB per GPU ({cfg.gpu_mem:g} GiB less {cfg.headroom:.0%}) "
            f"on {where}; lower --batch or try --offload"
        )
        return "\n".join(lines)
    lines.append(
        f"recommended: ZeRO-{ch.stage} on {ch.nodes} node{'s' if ch.nodes > 1 else ''} of {cfg.gpus} GPUs, "
        f"{'with' if ch.checkpoint else 'no'} activation checkpointing: {ch.total / GIB:.1f} of {budget:.1f} GiB "
        f"per GPU ({cfg.gpu_mem:g} GiB less {cfg.headroom:.0%} headroom)"
        + (f"; set model.{p.activations.option}=true" if ch.checkpoint else "")
    )
    glob = cfg.global_batch or (None if cfg.distill else PAPER_GLOBAL_BATCH.get(p.meta["arch"]))
    if glob:
        per_step = cfg.batch * cfg.gpus * ch.nodes
        accum = max(1, math.ceil(glob / per_step))
        exact = "" if accum * per_step == glob else f" (not exact: {accum * per_step} images per step)"
        lines.append(
            f"  global batch {glob} = micro-batch {cfg.batch} x {cfg.gpus * ch.nodes} ranks x {accum} "
            f"accumulation step{'s' if accum > 1 else ''} (optim.grad_accum={accum}){exact}"
        )
    return "\n".join(lines)
