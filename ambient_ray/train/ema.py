"""Exponential moving averages of the weights, in fp32 on the training device, chosen by ``ema``.

An EMA is updated after every optimizer step (after the post-step hooks, so it averages the weights as they
will be used) and saved as ``ema.safetensors``, the full weights that sampling loads. ``warmup`` is the EMA of
the first wave: decay min(ema_decay, (1 + t)/(10 + t)) after the t-th optimizer step.

What each rank holds depends on the ZeRO stage. Under ZeRO 0/1/2 the module's parameters are whole on every
rank, and so is the EMA (:class:`WarmupEMA`). Under ZeRO-3 a rank holds only its flat partition of each
parameter, and the EMA is of that partition alone (:class:`ShardedWarmupEMA`): updated from the local
partition with no communication, saved per rank, and gathered into the full weights only when a checkpoint
exports ``ema.safetensors``, one parameter at a time. Pure torch and ``torch.distributed``: the DeepSpeed
attributes it reads (``ds_tensor``, ``ds_numel``, ``ds_shape``, ``ds_process_group``) are plain attributes.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist

from ambient_ray.registry import Registry


class WarmupEMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ with d = min(decay, (1 + t)/(10 + t)), t = optimizer steps taken (from 1)."""

    def __init__(self, params: Iterable[torch.Tensor], device: torch.device, decay: float):
        self.decay = decay
        self.tensors = [p.detach().clone().float().to(device) for p in params]

    @torch.no_grad()
    def update(self, params: Iterable[torch.Tensor], step: int) -> None:
        d = warmup_decay(self.decay, step)
        for e, p in zip(self.tensors, params):
            e.mul_(d).add_(p.detach().float(), alpha=1 - d)

    def load(self, tensors: Iterable[torch.Tensor]) -> None:
        self.tensors = [t.float().to(e.device) for t, e in zip(tensors, self.tensors)]

    def export(self, keep: bool = True) -> list[torch.Tensor]:
        """The full EMA as fp32 CPU tensors (every rank holds it: no communication); [] unless ``keep``."""
        return [e.cpu().contiguous() for e in self.tensors] if keep else []


def warmup_decay(decay: float, step: int) -> float:
    return min(decay, (1 + step) / (10 + step))


class ShardedWarmupEMA:
    """:class:`WarmupEMA` of this rank's ZeRO-3 partition of each parameter, never of the whole parameter.

    DeepSpeed ZeRO-3 splits each parameter, flattened and padded to a multiple of the partition group's size
    W, into W equal slices: rank r holds elements [r·s, (r + 1)·s) in ``p.ds_tensor`` (s elements, the padding
    at the end of the last ranks' slices), ``p.ds_numel`` and ``p.ds_shape`` are the whole parameter's, and the
    group is ``p.ds_process_group``. ``tensors`` holds, per parameter, the fp32 EMA of this rank's real
    elements (no padding; empty where a small parameter has none here). ``rank``, ``world`` and ``group``
    default to the parameters' partition group.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        device: torch.device,
        decay: float,
        rank: int | None = None,
        world: int | None = None,
        group=None,
    ):
        params = list(params)
        if group is None and params:
            group = getattr(params[0], "ds_process_group", None)
        self.decay, self.device, self.group = decay, device, group
        self.rank = dist.get_rank(group) if rank is None else rank
        self.world = dist.get_world_size(group) if world is None else world
        self.layout: list[tuple[int, int, int, torch.Size]] = []  # per parameter: start, real count, slice, shape
        for p in params:
            size = p.ds_tensor.numel()
            if size * self.world < p.ds_numel:
                raise ValueError(f"a partition of {size} elements on {self.world} ranks cannot hold {p.ds_numel}")
            start = min(self.rank * size, p.ds_numel)
            self.layout.append((start, min(size, p.ds_numel - start), size, torch.Size(p.ds_shape)))
        with torch.no_grad():
            self.tensors = [self._local(p, count).clone() for p, (_, count, _, _) in zip(params, self.layout)]

    def _local(self, p: torch.Tensor, count: int) -> torch.Tensor:
        return p.ds_tensor.detach().narrow(0, 0, count).float().to(self.device)

    @torch.no_grad()
    def update(self, params: Iterable[torch.Tensor], step: int) -> None:
        """From this rank's partitions (``p.ds_tensor``), after the optimizer step wrote them: no communication."""
        d = warmup_decay(self.decay, step)
        for e, p, (_, count, _, _) in zip(self.tensors, params, self.layout):
            e.mul_(d).add_(self._local(p, count), alpha=1 - d)

    def load(self, tensors: Iterable[torch.Tensor]) -> None:
        """From the full EMA (any world size may have written it), one parameter at a time: keep this rank's slice."""
        loaded = []
        for t, (start, count, _, shape) in zip(tensors, self.layout):
            if t.numel() != shape.numel():
                raise ValueError(f"an EMA tensor of shape {tuple(t.shape)} for a parameter of shape {tuple(shape)}")
            loaded.append(t.reshape(-1).narrow(0, start, count).float().to(self.device).clone())
        if len(loaded) != len(self.layout):
            raise ValueError(f"{len(loaded)} EMA tensors for {len(self.layout)} parameters")
        self.tensors = loaded

    def meta(self) -> dict[str, str]:
        """What a saved partition was cut for (saved beside it): the rank and the partition group's size."""
        return {"rank": str(self.rank), "world": str(self.world)}

    def fits(self, meta: dict[str, str] | None) -> bool:
        """Whether partitions saved with ``meta`` are this rank's (the same rank in a group of the same size)."""
        return (meta or {}).get("rank") == str(self.rank) and (meta or {}).get("world") == str(self.world)

    def load_partitions(self, tensors: Iterable[torch.Tensor]) -> None:
        """This rank's own saved partitions (``tensors`` as saved, where :meth:`fits` their ``meta``)."""
        loaded = [t.float().reshape(-1).to(self.device).clone() for t in tensors]
        if [t.numel() for t in loaded] != [count for _, count, _, _ in self.layout]:
            raise ValueError("saved EMA partitions that do not fit this rank's partitions")
        self.tensors = loaded

    @torch.no_grad()
    def export(self, keep: bool = True) -> list[torch.Tensor]:
        """Collective over the partition group: the full EMA as fp32 CPU tensors, gathered parameter by parameter
        (one all-gather of each parameter's slices: at most one whole parameter is on the device at a time).
        Every rank takes part; only where ``keep`` are the tensors kept and returned ([] elsewhere)."""
        out = []
        for e, (_, count, size, shape) in zip(self.tensors, self.layout):
            mine = torch.zeros(size, dtype=torch.float32, device=self.device)
            mine[:count] = e
            if self.world == 1:
                slices = [mine]
            else:
                slices = [torch.empty_like(mine) for _ in range(self.world)]
                dist.all_gather(slices, mine, group=self.group)
            if keep:
                out.append(torch.cat(slices)[: shape.numel()].view(shape).cpu())
        return out


EMAS: Registry[Callable[..., WarmupEMA | ShardedWarmupEMA]] = Registry("ema")
EMAS.register(
    "warmup",
    lambda params, device, cfg, sharded=False: (ShardedWarmupEMA if sharded else WarmupEMA)(
        params, device, cfg.ema_decay
    ),
)
