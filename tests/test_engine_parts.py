"""The engine's pluggable parts in pure torch: learning-rate schedules against their closed forms, the
warm-up EMA against the recurrence, the registries that choose them, and the checkpoint files a rank restores."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch

from ambient_ray.train.config import EngineConfig, OptimConfig
from ambient_ray.train.ema import EMAS, WarmupEMA
from ambient_ray.train.parts import OPTIMIZERS
from ambient_ray.train.schedules import SCHEDULES, lr_lambda


def test_warmup_then_cosine_and_linear_reach_zero_at_the_last_step():
    for decay, mid in (("cosine", 0.5), ("linear", 0.5), ("none", 1.0)):
        f = lr_lambda(OptimConfig(decay=decay, warmup_steps=10), steps=110)
        assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
        assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(mid)
        assert f(110) == pytest.approx(0.0 if decay != "none" else 1.0, abs=1e-12)


def test_inv_sqrt_is_edm2s_decay_after_the_reference_step():
    o = OptimConfig(decay="inv_sqrt", warmup_steps=0, ref_steps=100)
    f = lr_lambda(o, steps=10_000)
    assert f(0) == f(50) == f(100) == 1.0
    for t in (400, 2500, 9900):
        assert f(t) == pytest.approx(1 / math.sqrt(t / 100))


def test_warmup_ema_follows_its_recurrence():
    p = [torch.zeros(3)]
    ema = WarmupEMA(p, torch.device("cpu"), decay=0.9)
    expect = torch.zeros(3)
    for step in range(1, 30):
        p[0] = torch.full((3,), float(step))
        ema.update(p, step)
        d = min(0.9, (1 + step) / (10 + step))
        expect = d * expect + (1 - d) * p[0]
    torch.testing.assert_close(ema.tensors[0], expect)
    ema.load([torch.ones(3, dtype=torch.float64)])
    assert ema.tensors[0].dtype == torch.float32 and ema.tensors[0].tolist() == [1.0, 1.0, 1.0]


def test_the_registries_choose_by_config_key_and_name_the_known_ones():
    assert SCHEDULES.names() == ["cosine", "inv_sqrt", "linear", "none"]
    assert OPTIMIZERS.get("adam") is torch.optim.Adam and EMAS.names() == ["power", "warmup"]
    with pytest.raises(KeyError, match="unknown optim.decay 'step'; registered: cosine, inv_sqrt, linear, none"):
        SCHEDULES.get("step")
    cfg = EngineConfig(data="d", out="o", optim={"name": "adam", "decay": "inv_sqrt"})
    assert (cfg.optim.name, cfg.optim.decay, cfg.ema) == ("adam", "inv_sqrt", "warmup")


def test_post_step_hooks_run_in_order_before_the_ema_sees_the_weights():
    """A step: count it, run the part's hooks in registration order, then average the weights they left."""
    from types import SimpleNamespace

    from ambient_ray.train.parts import Part, TrainedPart
    from ambient_ray.train.worker import Worker

    net = torch.nn.Linear(2, 1, bias=False)
    w = Worker.__new__(Worker)  # the step bookkeeping alone: no Ray Train context, no DeepSpeed engine
    w.cfg = EngineConfig(data="d", out="o", steps=10, log_every=5, checkpoint_every=10, ema_decay=0.0)
    w.zero3, w.step, w.main = False, 0, "net"
    part = TrainedPart.__new__(TrainedPart)
    part.name, part.part, part.net, part.trained, part.updates = "net", Part(net, export=True), net, True, 0
    part.engine = SimpleNamespace(module=net)
    part.ema = WarmupEMA(net.parameters(), torch.device("cpu"), decay=0.0)  # decay 0: the EMA is the weights
    w.parts = {"net": part}
    calls = []

    def renormalise(worker):
        calls.append(("renormalise", worker.step))
        with torch.no_grad():
            net.weight.div_(net.weight.norm())

    part.hooks = [renormalise, lambda worker: calls.append(("count", worker.step))]

    def end_step():  # the loop's bookkeeping around one optimizer step of the part
        w.begin_step()
        w.update("net")
        return w.end_step()

    with torch.no_grad():
        net.weight.fill_(3.0)
    assert end_step() == (False, False)
    assert calls == [("renormalise", 1), ("count", 1)]
    torch.testing.assert_close(w.ema.tensors[0].norm(), torch.tensor(1.0))
    for _ in range(4):
        log_now, checkpoint_now = end_step()
    assert (w.step, log_now, checkpoint_now) == (5, True, False) and len(calls) == 10


def test_grad_guard_zeroes_and_counts_nonfinite_gradient_elements():
    """grad_guard's hook (opt-in): NaN/Inf gradient elements become 0 and are counted across backward passes;
    finite elements pass unchanged."""
    from ambient_ray.train.worker import Worker

    w = Worker.__new__(Worker)
    w.nonfinite = torch.zeros((), dtype=torch.float64)
    p = torch.nn.Parameter(torch.ones(4))
    p.register_hook(w._guard)
    (p * torch.tensor([1.0, float("nan"), float("inf"), 2.0])).sum().backward()
    assert p.grad.tolist() == [1.0, 0.0, 0.0, 2.0] and float(w.nonfinite) == 2
    (p * torch.tensor([-float("inf"), 3.0, 3.0, 3.0])).sum().backward()
    assert p.grad.tolist() == [1.0, 3.0, 3.0, 5.0] and float(w.nonfinite) == 3
    assert not EngineConfig(data="d", out="o").grad_guard  # off unless a config turns it on


def test_a_rank_restores_from_its_own_files_only(tmp_path):
    """The files rank 1 of 2 copies out of a Ray Train checkpoint: its own DeepSpeed shard, state and EMA partition,
    the shared small files, not rank 0's nor the raw-weights export (and under ZeRO-3, not the gathered EMA)."""
    import ray.train

    from ambient_ray.io.checkpoint import rank_checkpoint, rank_files

    names = [
        "ds/mp_rank_00_model_states.pt",
        "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "ds/zero_pp_rank_0_mp_rank_00_model_states.pt",
        "ds/zero_pp_rank_1_mp_rank_00_model_states.pt",
        "rank-0000.safetensors",
        "rank-0001.safetensors",
        "ema-rank-0000.safetensors",
        "ema-rank-0001.safetensors",
        "ema.safetensors",
        "model.safetensors",
        "model.json",
        "coverage.json",
    ]
    shared = ["ds/mp_rank_00_model_states.pt", "model.json", "coverage.json"]
    own = [
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "ds/zero_pp_rank_1_mp_rank_00_model_states.pt",
        "rank-0001.safetensors",
        "ema-rank-0001.safetensors",
    ]
    assert sorted(rank_files(names, 1, zero3=True)) == sorted(shared + own)
    zero2 = [n for n in names if not n.startswith("ema-rank")]
    assert sorted(rank_files(zero2, 1, zero3=False)) == sorted(
        shared + [n for n in own if not n.startswith("ema-rank")] + ["ema.safetensors"]
    )
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_text(n)
    with rank_checkpoint(ray.train.Checkpoint.from_directory(str(tmp_path)), 1, zero3=True) as d:
        got = sorted(str(p.relative_to(d)) for p in pathlib.Path(d).rglob("*") if p.is_file())
        assert got == sorted(shared + own)
        assert (pathlib.Path(d) / "rank-0001.safetensors").read_text() == "rank-0001.safetensors"


def test_deepspeed_is_told_grad_clip_0_since_its_own_default_clips_at_1():
    """``optim.grad_clip: 0`` means no clipping; DeepSpeed's default for a config without ``gradient_clipping`` is
    1.0 (deepspeed.runtime.constants.GRADIENT_CLIPPING_DEFAULT), so the key is always written (issue 33 found the
    distillation, which clips nothing, clipped at norm 1)."""
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    from ambient_ray.train.parts import deepspeed_config

    assert GRADIENT_CLIPPING_DEFAULT == 1.0  # what an absent key would give
    for clip in (0.0, 0.5):
        cfg = EngineConfig(data="d", out="o", optim={"grad_clip": clip})
        assert deepspeed_config(cfg, bf16=False)["gradient_clipping"] == clip
    other = OptimConfig(grad_clip=0.0)
    assert deepspeed_config(EngineConfig(data="d", out="o"), False, other)["gradient_clipping"] == 0.0
