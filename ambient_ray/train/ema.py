"""Exponential moving averages of the weights, in fp32 on the training device, chosen by ``ema``.

An EMA is updated after every optimizer step (after the post-step hooks, so it averages the weights as they
will be used) and saved as ``ema.safetensors``, the full weights that sampling loads. ``warmup`` is the EMA of
the first wave: decay min(ema_decay, (1 + t)/(10 + t)) after the t-th optimizer step. ``power`` is EDM2's
power-function EMA (:class:`PowerEMA`, Sec. 3.1 of Karras et al. 2024): one profile per σ_rel in ``ema_stds``,
all tracked at once; ``ema.safetensors`` is the first, and the engine writes snapshots of every profile for the
post-hoc reconstruction (:mod:`ambient_ray.diffusion.phema`, ``ambient-ray phema``).

What each rank holds depends on the ZeRO stage. Under ZeRO 0/1/2 the module's parameters are whole on every
rank, and so is the EMA (:class:`Whole`). Under ZeRO-3 a rank holds only its flat partition of each
parameter, and the EMA is of that partition alone (:class:`Partitions`, :class:`ShardedWarmupEMA`,
:class:`ShardedPowerEMA`): updated from the local
partition with no communication, saved per rank, and gathered into the full weights only when a checkpoint
exports ``ema.safetensors``, one parameter at a time. Pure torch and ``torch.distributed``: the DeepSpeed
attributes it reads (``ds_tensor``, ``ds_numel``, ``ds_shape``, ``ds_process_group``) are plain attributes.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from ambient_ray.config import ConfigError
from ambient_ray.diffusion import phema
from ambient_ray.models.weights import partition_span
from ambient_ray.registry import Registry


class Whole:
    """Where each rank holds whole parameters (ZeRO 0/1/2): an EMA tensor per parameter, of its full shape."""

    def __init__(self, device: torch.device):
        self.device = device

    def local(self, params: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """fp32 views (or copies) of the parameters on the EMA's device, one at a time (a bf16 run's fp32 copies of
        every parameter at once would be 4 bytes per parameter on top of the EMA itself)."""
        for p in params:
            yield p.detach().float().to(self.device)

    def cut(self, tensors: Iterable[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Full saved EMA tensors copied into ``like`` (the EMA of those parameters) a tensor at a time, in place:
        never a second EMA beside the first. A failed load leaves ``like`` part-copied (the restore fails)."""

        def fit(i: int, t: torch.Tensor) -> torch.Tensor:
            if tuple(t.shape) != tuple(like[i].shape):
                raise ValueError(f"saved EMA tensors that do not fit the {len(like)} parameters")
            return t

        return fill(like, tensors, fit, lambda n: f"saved EMA tensors that do not fit the {len(like)} parameters")

    def stream(self, tensors: list[torch.Tensor], keep: bool) -> Iterator[torch.Tensor | None]:
        """Each full tensor in turn (None where not ``keep``); no communication."""
        for e in tensors:
            yield e.cpu().contiguous() if keep else None

    def shapes(self, tensors: list[torch.Tensor]) -> list[tuple[int, ...]]:
        return [tuple(e.shape) for e in tensors]


def fill(
    like: list[torch.Tensor],
    tensors: Iterable[torch.Tensor],
    fit: Callable[[int, torch.Tensor], torch.Tensor],
    wrong_count: Callable[[int], str],
) -> list[torch.Tensor]:
    """Copy saved tensors into ``like`` in place, one at a time: the i-th through ``fit(i, t)`` (what of it goes
    into ``like[i]``; it raises where ``t`` does not fit); a ValueError of ``wrong_count(n)`` where ``tensors`` holds
    n != len(like). Returns ``like``."""
    n = 0
    for t in tensors:
        if n < len(like):
            like[n].copy_(fit(n, t))
        n += 1
    if n != len(like):
        raise ValueError(wrong_count(n))
    return like


class Partitions:
    """Where each rank holds its ZeRO-3 partition of each parameter, and the EMA only that partition's.

    DeepSpeed ZeRO-3 splits each parameter, flattened and padded to a multiple of the partition group's size
    W, into W equal slices: rank r holds elements [r·s, (r + 1)·s) in ``p.ds_tensor`` (s elements, the padding
    at the end of the last ranks' slices), ``p.ds_numel`` and ``p.ds_shape`` are the whole parameter's, and the
    group is ``p.ds_process_group``. An EMA tensor here is the fp32 EMA of this rank's real elements of one
    parameter (no padding; empty where a small parameter has none here). ``rank``, ``world`` and ``group``
    default to the parameters' partition group.
    """

    def __init__(self, params: list[torch.Tensor], device: torch.device, rank=None, world=None, group=None):
        if group is None and params:
            group = getattr(params[0], "ds_process_group", None)
        self.device, self.group = device, group
        self.rank = dist.get_rank(group) if rank is None else rank
        self.world = dist.get_world_size(group) if world is None else world
        self.layout: list[tuple[int, int, int, torch.Size]] = []  # per parameter: start, real count, slice, shape
        for p in params:
            size = p.ds_tensor.numel()
            if size * self.world < p.ds_numel:
                raise ValueError(f"a partition of {size} elements on {self.world} ranks cannot hold {p.ds_numel}")
            self.layout.append((*partition_span(p, self.rank), size, torch.Size(p.ds_shape)))

    def local(self, params: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """This rank's real elements of each parameter (``p.ds_tensor``), fp32 on the EMA's device, one at a time
        (measured: holding them all at once was the peak of a bf16 step, 4 bytes per partitioned parameter)."""
        for p, (_, count, _, _) in zip(params, self.layout):
            yield p.ds_tensor.detach().narrow(0, 0, count).float().to(self.device)

    def cut(self, tensors: Iterable[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's slices of full EMA tensors (any world size may have written them) copied into ``like`` (this
        rank's EMA tensors) a tensor at a time, in place. A failed load leaves ``like`` part-copied."""

        def fit(i: int, t: torch.Tensor) -> torch.Tensor:
            start, count, _, shape = self.layout[i]
            if t.numel() != shape.numel():
                raise ValueError(f"an EMA tensor of shape {tuple(t.shape)} for a parameter of shape {tuple(shape)}")
            return t.reshape(-1).narrow(0, start, count)

        return fill(like, tensors, fit, lambda n: f"{n} EMA tensors for {len(self.layout)} parameters")

    def own(self, tensors: Iterable[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's own saved partitions, checked against the layout, copied into ``like`` in place."""
        wrong = "saved EMA partitions that do not fit this rank's partitions"

        def fit(i: int, t: torch.Tensor) -> torch.Tensor:
            if t.numel() != self.layout[i][1]:
                raise ValueError(wrong)
            return t.reshape(-1)

        return fill(like, tensors, fit, lambda n: wrong)

    def meta(self) -> dict[str, str]:
        return {"rank": str(self.rank), "world": str(self.world)}

    def fits(self, meta: dict[str, str] | None) -> bool:
        return (meta or {}).get("rank") == str(self.rank) and (meta or {}).get("world") == str(self.world)

    def shapes(self, tensors=None) -> list[tuple[int, ...]]:
        return [tuple(shape) for *_, shape in self.layout]

    @torch.no_grad()
    def stream(self, tensors: list[torch.Tensor], keep: bool) -> Iterator[torch.Tensor | None]:
        """Collective over the partition group (every rank iterates to the end): the full tensors from every
        rank's partitions in turn, one all-gather per parameter (one whole parameter at a time); None where
        not ``keep``."""
        for e, (_, count, size, shape) in zip(tensors, self.layout):
            mine = torch.zeros(size, dtype=torch.float32, device=self.device)
            mine[:count] = e
            if self.world == 1:
                slices = [mine]
            else:
                slices = [torch.empty_like(mine) for _ in range(self.world)]
                dist.all_gather(slices, mine, group=self.group)
            yield torch.cat(slices)[: shape.numel()].view(shape).cpu() if keep else None


class _EMA:
    """What the engine uses of every EMA: ``profiles`` (a list of EMA tensor lists, each one tensor per
    parameter as :attr:`space` holds it; the first is what ``ema.safetensors`` exports and sampling loads),
    :meth:`update`, :meth:`load`, :meth:`export` and :meth:`describe` (metadata saved with the state)."""

    kind = ""
    space: Whole | Partitions
    profiles: list[list[torch.Tensor]]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return self.profiles[0]

    def load(self, tensors: Iterable[torch.Tensor], profile: int = 0) -> None:
        """Profile ``profile`` from the full EMA tensors (under ZeRO-3, from any world size: this rank's slices)."""
        self.profiles[profile] = self.space.cut(tensors, self.profiles[profile])

    def export(self, keep: bool = True, profile: int = 0) -> list[torch.Tensor]:
        """The full EMA of profile ``profile`` as fp32 CPU tensors, [] unless ``keep``. Under ZeRO-3 a collective
        (every rank takes part), gathered parameter by parameter; else no communication."""
        return [t for t in self.stream(keep, profile) if t is not None]

    def stream(self, keep: bool = True, profile: int = 0) -> Iterator[torch.Tensor | None]:
        """:meth:`export` one tensor at a time (None where not ``keep``; every rank iterates to the end): what
        a file written a tensor at a time takes, without the whole EMA held at once."""
        return self.space.stream(self.profiles[profile], keep)

    def shapes(self) -> list[tuple[int, ...]]:
        """The full shape of each EMA tensor (of each parameter)."""
        return self.space.shapes(self.profiles[0])

    def describe(self) -> dict[str, str]:
        return {"ema": self.kind}

    def check(self, meta: dict[str, str] | None) -> None:
        """Refuse saved EMA state (``meta`` from :meth:`describe`) of another kind or other profiles."""
        mine, saved = self.describe(), meta or {}
        if saved.get("ema", mine["ema"]) != mine["ema"]:
            raise ConfigError(f"config key 'ema': the checkpoint holds a {saved['ema']!r} EMA, not {mine['ema']!r}")
        if saved.get("stds", mine.get("stds")) != mine.get("stds"):
            raise ConfigError(f"config key 'ema_stds': the checkpoint tracks {saved['stds']}, not {mine['stds']}")


class _Sharded:
    """The ZeRO-3 side of an EMA over :class:`Partitions`: its layout, and its own saved partitions."""

    space: Partitions

    rank = property(lambda self: self.space.rank)
    world = property(lambda self: self.space.world)
    group = property(lambda self: self.space.group)
    layout = property(lambda self: self.space.layout)

    def meta(self) -> dict[str, str]:
        """What a saved partition was cut for (saved beside it): the rank and the partition group's size."""
        return self.space.meta()

    def fits(self, meta: dict[str, str] | None) -> bool:
        """Whether partitions saved with ``meta`` are this rank's (the same rank in a group of the same size)."""
        return self.space.fits(meta)

    def load_partitions(self, tensors: Iterable[torch.Tensor], profile: int = 0) -> None:
        """This rank's own saved partitions (``tensors`` as saved, where :meth:`fits` their ``meta``)."""
        self.profiles[profile] = self.space.own(tensors, self.profiles[profile])


class WarmupEMA(_EMA):
    """θ_ema ← d·θ_ema + (1 − d)·θ with d = min(decay, (1 + t)/(10 + t)), t = optimizer steps taken (from 1)."""

    kind = "warmup"

    def __init__(self, params: Iterable[torch.Tensor], device: torch.device, decay: float, space=None):
        self.decay = decay
        self.space = space or Whole(device)
        self.profiles = [[t.clone() for t in self.space.local(params)]]

    @torch.no_grad()
    def update(self, params: Iterable[torch.Tensor], step: int) -> None:
        d = warmup_decay(self.decay, step)
        for e, x in zip(self.tensors, self.space.local(params)):
            e.mul_(d).add_(x, alpha=1 - d)


def warmup_decay(decay: float, step: int) -> float:
    return min(decay, (1 + step) / (10 + step))


class ShardedWarmupEMA(_Sharded, WarmupEMA):
    """:class:`WarmupEMA` of this rank's ZeRO-3 partition of each parameter (:class:`Partitions`), never of the
    whole parameter: updated from ``p.ds_tensor`` with no communication, gathered only at export."""

    def __init__(self, params, device, decay: float, rank=None, world=None, group=None):
        params = list(params)
        super().__init__(params, device, decay, Partitions(params, device, rank, world, group))


class PowerEMA(_EMA):
    """Power-function EMAs (EDM2 Sec. 3.1), one profile per σ_rel in ``stds``, all updated after every step:
    θ̂ ← β_t θ̂ + (1 − β_t) θ, β_t = (1 − 1/t)^(γ+1), t = optimizer steps taken (from 1; time in steps, see
    :mod:`ambient_ray.diffusion.phema`)."""

    kind = "power"

    def __init__(self, params: Iterable[torch.Tensor], device: torch.device, stds: Sequence[float], space=None):
        self.stds = [float(s) for s in stds]
        self.gammas = [phema.gamma_of(s) for s in self.stds]
        self.space = space or Whole(device)
        self.profiles = [[] for _ in self.stds]
        for t in self.space.local(params):
            for profile in self.profiles:
                profile.append(t.clone())

    @torch.no_grad()
    def update(self, params: Iterable[torch.Tensor], step: int) -> None:
        betas = [phema.power_beta(gamma, step) for gamma in self.gammas]
        for i, xi in enumerate(self.space.local(params)):  # a parameter at a time, into every profile
            for b, profile in zip(betas, self.profiles):
                profile[i].mul_(b).add_(xi, alpha=1 - b)

    def describe(self) -> dict[str, str]:
        return {"ema": self.kind, "stds": json.dumps(self.stds)}


class ShardedPowerEMA(_Sharded, PowerEMA):
    """:class:`PowerEMA` of this rank's ZeRO-3 partitions (:class:`Partitions`), as :class:`ShardedWarmupEMA`."""

    def __init__(self, params, device, stds: Sequence[float], rank=None, world=None, group=None):
        params = list(params)
        super().__init__(params, device, stds, Partitions(params, device, rank, world, group))


EMAS: Registry[Callable[..., _EMA]] = Registry("ema")
EMAS.register(
    "warmup",
    lambda params, device, cfg, sharded=False: (ShardedWarmupEMA if sharded else WarmupEMA)(
        params, device, cfg.ema_decay
    ),
)
EMAS.register(
    "power",
    lambda params, device, cfg, sharded=False: (ShardedPowerEMA if sharded else PowerEMA)(params, device, cfg.ema_stds),
)
