"""A task's named networks (:class:`Part`) and what the engine makes of each on a worker: a trained part gets
its own DeepSpeed engine (its ZeRO partitions, optimizer, learning-rate schedule), its own fp32 EMA and its own
post-step hooks (EDM2's forced weight normalisation where it has magnitude-preserving weights); a frozen part
runs without gradients, in bf16 where the run is bf16, and under ZeRO-3 partitioned by a DeepSpeed engine with no
optimizer (gathered a layer at a time for its forward: no full fp32 replica per rank).

This file and :mod:`ambient_ray.train.weight_norm` are the DeepSpeed glue of the engine.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ambient_ray.models.edm2 import mp_weights, normalize
from ambient_ray.registry import Registry
from ambient_ray.train.config import EngineConfig, OptimConfig
from ambient_ray.train.ema import EMAS
from ambient_ray.train.schedules import lr_lambda
from ambient_ray.train.weight_norm import ForcedWeightNorm


@dataclasses.dataclass
class Part:
    """One named network of a task (``Task.parts()``: ``{name: Part}``).

    ``trained``: updated by its own optimizer (``optim``, default the run's ``optim`` section) under the run's
    ZeRO stage, with an EMA (``ema``) and checkpointed; otherwise frozen (never checkpointed: the task rebuilds
    it, e.g. a teacher from its weights). Exactly one trained part is ``export``: its weights are ``OUT/model/``
    (what ``model.json`` describes and ``weights.load`` serves) and it takes the run's ``init_from``; the
    others may set ``meta`` (their own ``model.json`` in their checkpoint folder) and ``init_from``."""

    module: torch.nn.Module
    trained: bool = True
    optim: OptimConfig | None = None
    ema: bool = True
    export: bool = False
    meta: dict | None = None
    init_from: str | None = None


OPTIMIZERS: Registry[Callable] = Registry("optim.name")
OPTIMIZERS.register("adamw", torch.optim.AdamW)
OPTIMIZERS.register("adam", torch.optim.Adam)


DEEPSPEED_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam"}  # offloaded states: DeepSpeed builds its CPU Adam


def deepspeed_config(cfg: EngineConfig, bf16: bool, optim: OptimConfig | None = None) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if cfg.reduce_bucket_size:
        zero["reduce_bucket_size"] = cfg.reduce_bucket_size
    if cfg.zero3_live_parameters and cfg.zero_stage == 3:
        zero["stage3_max_live_parameters"] = zero["stage3_max_reuse_distance"] = cfg.zero3_live_parameters
    if cfg.offload_params and cfg.zero_stage == 3:  # ZeRO-Infinity: the partitions live in CPU memory
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    ds = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    o = optim or cfg.optim
    ds["gradient_clipping"] = o.grad_clip  # always: DeepSpeed's own default clips at 1.0, so 0 must be said
    if cfg.offload_optimizer:  # DeepSpeed builds its CPU Adam for offloaded states
        ds["optimizer"] = {
            "type": DEEPSPEED_OPTIMIZERS[o.name],
            "params": {"lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay},
        }
    return ds


class TrainedPart:
    """A trained part on one worker: ``engine`` (DeepSpeed's), ``scheduler``, ``ema`` (None if the part keeps
    none), ``hooks`` (post-step, in order), ``updates`` (its optimizer steps so far: the EMA's clock)."""

    def __init__(self, w, name: str, part: Part, init: Callable[[torch.nn.Module, str], None] | None = None):
        import deepspeed

        cfg, net = w.cfg, part.module
        self.name, self.part, self.net, self.trained = name, part, net, True
        uri = part.init_from or (cfg.init_from if part.export else None)
        if uri and init is not None:  # before DeepSpeed; a partitioned build loads each rank's partitions only
            init(net, uri)
        mp = mp_weights(net)
        if mp:  # forced weight normalisation starts from unit-magnitude rows (the same on every rank)
            normalize_built(mp)
        # fp32, on the device: of the full weights, or under ZeRO-3 of this rank's partitions (after initialize)
        self.ema = None if w.zero3 or not part.ema else EMAS.get(cfg.ema)(net.parameters(), w.device, cfg)
        params = [p for p in net.parameters() if p.requires_grad]
        o = part.optim or cfg.optim
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
            config=deepspeed_config(cfg, w.bf16, o),
            dist_init_required=False,
        )
        mmap_loads(self.engine)
        if w.zero3 and part.ema:  # the partitions exist from here on
            self.ema = EMAS.get(cfg.ema)(self.engine.module.parameters(), w.device, cfg, sharded=True)
        self.hooks: list[Callable] = [ForcedWeightNorm(w, mp)] if mp else []  # before the EMA update of every step
        if cfg.grad_guard:
            for p in params:
                p.register_hook(w._guard)
        self.updates = 0

    def names(self) -> list[str]:
        return [n for n, _ in self.net.named_parameters()]


def mmap_loads(engine) -> None:
    """Make ``engine`` restore its checkpoint files memory-mapped (``torch.load(mmap=True)``): a rank's optimizer
    file (its fp32 master weights and Adam states, 12·P/N bytes) is read page by page as DeepSpeed copies it into
    the engine's own buffers, never held whole in anonymous memory beside them; with DeepSpeed's own loader a
    restore needed that much host memory on top of the run's peak on every rank at once."""

    def load(path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False, mmap=True)

    engine.checkpoint_engine.load = load


def build(w, parts: Callable[[], dict[str, Part] | torch.nn.Module]) -> dict[str, Part] | torch.nn.Module:
    """A task's parts built on worker ``w``: under ZeRO-3 inside ``deepspeed.zero.Init`` (the partitioned build:
    each module's parameters are cut into this rank's partitions as soon as the module is built, so no rank
    holds more of the whole fp32 network than its largest module; with ``offload_params`` the partitions go to
    CPU memory), else as they are."""
    import deepspeed

    if not w.zero3:
        return parts()
    # zero.Init replaces torch.Tensor.__new__ (bf16: new tensors in the run's dtype); torch._dynamo, when first
    # imported under it (timm imports torchvision, which imports it), refuses that signature: import it first
    import torch._dynamo  # noqa: F401

    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(w.cfg, w.bf16)):
        return parts()


@torch.no_grad()
def normalize_built(weights: list[torch.nn.Parameter]) -> None:
    """EDM2's forced weight normalisation of freshly built (or loaded) weights, a parameter at a time: a ZeRO-3
    partitioned one gathered, normalised on rank 0 and cut back into every rank's partition (DeepSpeed's
    ``GatheredParameters`` with ``modifier_rank=0``); any other in place."""
    import deepspeed

    for p in weights:
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(normalize(p.data.float()).to(p.dtype))


class FrozenPart:
    """A frozen part on one worker: ``engine`` is what the task calls (the module, or under ZeRO-3 DeepSpeed's
    engine holding its partitions), without gradients and in eval mode."""

    def __init__(self, w, name: str, part: Part):
        import deepspeed

        self.name, self.part, self.net, self.trained, self.ema = name, part, part.module, False, None
        net = part.module.requires_grad_(False).eval()
        if w.zero3:  # partitioned like the trained parts; DeepSpeed gathers each layer for its forward
            ds = deepspeed_config(w.cfg, w.bf16)
            ds.pop("optimizer", None)
            ds["zero_optimization"] = {"stage": 3}
            self.engine = deepspeed.initialize(model=net, config=ds, dist_init_required=False)[0]
            self.engine.eval()
        else:
            self.engine = net.to(w.device, dtype=torch.bfloat16 if w.bf16 else None)
