"""The ZeRO-3 EMA of each rank's partition (ambient_ray.train.ema.ShardedWarmupEMA) in pure torch, against the
full :class:`WarmupEMA`: partitions cut by hand the way DeepSpeed cuts them, no process group, no Ray.
(The gather at export runs in tests/test_train.py, on two Ray Train workers under ZeRO-3.)"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ambient_ray.train.ema import EMAS, ShardedWarmupEMA, WarmupEMA

SHAPES = [(3, 5), (2,), (4, 2, 3), (1,), (7,)]  # 15 and 7 elements leave padding, 2 and 1 leave ranks empty


def partitions(full: list[torch.Tensor], rank: int, world: int) -> list[SimpleNamespace]:
    """DeepSpeed ZeRO-3's view of ``full`` on ``rank``: each tensor flattened, padded to a multiple of
    ``world`` and cut into ``world`` equal slices; the padding holds garbage (DeepSpeed leaves it unset)."""
    out = []
    for t in full:
        size = math.ceil(t.numel() / world)
        flat = torch.full((size * world,), float("nan"))
        flat[: t.numel()] = t.reshape(-1)
        out.append(
            SimpleNamespace(
                ds_tensor=flat[rank * size : (rank + 1) * size].clone(), ds_numel=t.numel(), ds_shape=t.shape
            )
        )
    return out


def joined(emas: list[ShardedWarmupEMA]) -> list[torch.Tensor]:
    """The ranks' partitions put back together by hand (what the export's all-gather does)."""
    return [torch.cat([e.tensors[i] for e in emas]).view(SHAPES[i]) for i in range(len(SHAPES))]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_partitions_ema_is_the_full_ema_cut_into_partitions(world):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=g) for s in SHAPES]
    full = WarmupEMA(weights, torch.device("cpu"), decay=0.8)
    emas = [
        ShardedWarmupEMA(partitions(weights, r, world), torch.device("cpu"), 0.8, rank=r, world=world)
        for r in range(world)
    ]
    assert [e.tensors[1].numel() for e in emas] == ([2] if world == 1 else [1, 1] if world == 2 else [1, 1, 0, 0])
    for step in range(1, 40):  # (1 + t)/(10 + t) reaches 0.8 at t = 35: both branches of the decay
        weights = [w + 0.1 * torch.randn(w.shape, generator=g) for w in weights]
        full.update(weights, step)
        for r, e in enumerate(emas):
            e.update(partitions(weights, r, world), step)
    for got, want in zip(joined(emas), full.tensors):
        assert torch.isfinite(got).all()  # the padding never reached the EMA
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    if world == 1:  # the export of one rank needs no process group
        for got, want in zip(emas[0].export(), full.tensors):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert emas[0].export(keep=False) == []


def test_loading_keeps_this_ranks_slice_of_a_full_ema_from_any_world_size():
    g = torch.Generator().manual_seed(1)
    saved = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]  # e.g. gathered on 4 ranks
    emas = [
        ShardedWarmupEMA(partitions([torch.zeros(s) for s in SHAPES], r, 3), torch.device("cpu"), 0.9, rank=r, world=3)
        for r in range(3)
    ]
    for e in emas:
        e.load(iter(saved))  # a generator, one tensor at a time, as the engine reads ema.safetensors
        assert all(t.dtype == torch.float32 for t in e.tensors)
    for got, want in zip(joined(emas), saved):
        torch.testing.assert_close(got, want.float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        emas[0].load([torch.zeros(16)] + saved[1:])
    with pytest.raises(ValueError, match="4 EMA tensors for 5"):
        emas[0].load(saved[:4])


def test_own_partitions_load_only_on_the_rank_and_world_they_were_cut_for():
    weights = [torch.arange(math.prod(s), dtype=torch.float32).view(s) for s in SHAPES]
    a = ShardedWarmupEMA(partitions(weights, 1, 2), torch.device("cpu"), 0.9, rank=1, world=2)
    b = ShardedWarmupEMA(partitions([w * 0 for w in weights], 1, 2), torch.device("cpu"), 0.9, rank=1, world=2)
    assert a.meta() == {"rank": "1", "world": "2"} and b.fits(a.meta())
    assert not b.fits({"rank": "0", "world": "2"}) and not b.fits({"rank": "1", "world": "4"}) and not b.fits(None)
    b.load_partitions(t.clone() for t in a.tensors)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    with pytest.raises(ValueError, match="do not fit"):
        b.load_partitions(a.tensors[::-1])
    with pytest.raises(ValueError, match="cannot hold"):
        ShardedWarmupEMA([SimpleNamespace(ds_tensor=torch.zeros(2), ds_numel=5, ds_shape=(5,))], None, 0.9, 0, 2)


def test_the_registry_builds_the_sharded_ema_for_zero3(tmp_path):
    """``sharded=True`` (the engine under ZeRO-3): rank and world from the parameters' group (here the
    default group of a one-rank gloo process group, torn down after)."""
    import torch.distributed as dist

    cfg = SimpleNamespace(ema_decay=0.5)
    assert isinstance(EMAS.get("warmup")([torch.ones(3)], torch.device("cpu"), cfg), WarmupEMA)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        e = EMAS.get("warmup")(partitions([torch.ones(3)], 0, 1), torch.device("cpu"), cfg, sharded=True)
        assert isinstance(e, ShardedWarmupEMA) and (e.rank, e.world, e.decay) == (0, 1, 0.5)
        assert e.export()[0].tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()
