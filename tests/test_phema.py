"""EDM2's power-function EMA and post-hoc EMA (ambient_ray.diffusion.phema, train.ema.PowerEMA, ``ambient-ray
phema``): the math against analytic facts, a reconstruction on a synthetic trajectory with a bound it must meet,
the ZeRO-3 partitions' EMA against the full one, checkpoints that restore every profile bit for bit, the stage's
errors, and one real training run (two Ray Train workers, ZeRO-3, a planted failure) whose middle profile is
reconstructed from the snapshots of the outer two."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ambient_ray.config import ConfigError
from ambient_ray.diffusion import phema
from ambient_ray.train.ema import EMAS, PowerEMA, ShardedPowerEMA
from tests.test_ema_sharded import SHAPES, joined, partitions

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("gamma", [0.0, 2.5, 6.94, 16.97, 60.0])
def test_sigma_rel_of_a_profile_computed_numerically_equals_the_formula(gamma):
    t = 7.0
    tau = np.linspace(0, t, 2_000_001)
    p = (gamma + 1) * tau**gamma / t ** (gamma + 1)
    mass = np.trapezoid(p, tau)
    mean = np.trapezoid(tau * p, tau)
    std = math.sqrt(np.trapezoid((tau - mean) ** 2 * p, tau))
    assert mass == pytest.approx(1, abs=1e-6)
    assert std / t == pytest.approx(phema.sigma_rel(gamma), rel=1e-5)
    if gamma > 0:  # and γ comes back from σ_rel
        assert phema.gamma_of(phema.sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-12)


def test_gamma_of_the_papers_profiles_and_the_range():
    # EDM2 Sec. 3.1: σ_rel 0.05 and 0.10 are γ = 16.97 and 6.94
    assert phema.gamma_of(0.05) == pytest.approx(16.97, abs=0.005)
    assert phema.gamma_of(0.10) == pytest.approx(6.94, abs=0.005)
    assert phema.SIGMA_REL_MAX == pytest.approx(0.30028, abs=1e-5)
    assert phema.sigma_rel(0.0) == pytest.approx(1 / math.sqrt(12))  # γ = 0: the uniform average
    for bad in (0.0, -0.1, 0.31):
        with pytest.raises(ValueError, match="σ_rel is in"):
            phema.gamma_of(bad)


def test_the_ema_recurrence_gives_the_discrete_profile_and_the_gram_matrix_its_products():
    """The weights after step τ = basis vector e_τ: the power EMA after step t then *is* its weight vector."""
    T = 30
    ema = PowerEMA([torch.zeros(T, dtype=torch.float64)], CPU, [0.05, 0.10])
    for step in range(1, T + 1):
        ema.update([torch.eye(T, dtype=torch.float64)[step - 1]], step)
        if step in (11, T):
            for k, s in enumerate(ema.stds):
                w = phema.discrete_profile(phema.gamma_of(s), step)
                np.testing.assert_allclose(ema.profiles[k][0][:step].numpy(), w, rtol=1e-5, atol=1e-7)
                assert w.sum() == pytest.approx(1, abs=1e-12)
    profiles = [(phema.gamma_of(0.05), 11), (phema.gamma_of(0.1), 30), (phema.gamma_of(0.05), 30), (3.0, 1)]
    W = np.array([np.pad(phema.discrete_profile(g, t), (0, T - t)) for g, t in profiles])
    np.testing.assert_allclose(phema.gram(profiles), W @ W.T, rtol=1e-11, atol=1e-15)
    # the continuous closed form is their limit for long runs (relative difference O(1/t))
    g1, g2 = phema.gamma_of(0.05), phema.gamma_of(0.10)
    for t, tol in ((100, 1e-2), (100_000, 1e-5)):
        exact = phema.gram([(g1, t)], [(g2, t // 2)])[0, 0]
        assert exact == pytest.approx(phema.inner_continuous(g1, t, g2, t // 2), rel=tol)


def test_a_target_equal_to_a_snapshot_gets_weight_one_on_it():
    g1, g2 = phema.gamma_of(0.05), phema.gamma_of(0.10)
    snaps = [(g, t) for t in range(50, 501, 50) for g in (g1, g2)]
    x, resid = phema.solve(snaps, (g2, 300))
    assert resid < 1e-6
    i = snaps.index((g2, 300))
    assert x[i] == pytest.approx(1, abs=1e-6) and np.abs(np.delete(x, i)).max() < 1e-6


def test_reconstruction_of_a_third_tracked_profile_on_a_synthetic_trajectory():
    """A random-walk trajectory of 400 steps (drift + noise, 64 elements); profiles 0.05 and 0.10 snapshotted
    every 40 steps; 0.075 tracked directly. The error is Σ_τ Δw_τ θ_τ with Δw = Σ x_i w_i − w_r, and Σ_τ Δw_τ = 0
    (the weights sum to 1), so |θ_rec − θ_direct| ≤ ‖Δw‖₁ · max_τ |θ_τ − θ_T| elementwise (+ fp32 rounding of
    400 EMA updates, < 1e-5 here):
    that bound is the test's tolerance (measured: error 0.014, bound >= 0.075, the tracked profiles 7.6 apart)."""
    g = torch.Generator().manual_seed(0)
    T, every = 400, 40
    theta = torch.cumsum(0.05 + torch.randn(T, 64, generator=g, dtype=torch.float64), 0).float()
    direct = PowerEMA([torch.zeros(64)], CPU, [0.05, 0.075, 0.10])
    snaps, tensors = [], []
    for step in range(1, T + 1):
        direct.update([theta[step - 1]], step)
        if step % every == 0:
            for k in (0, 2):
                snaps.append((direct.gammas[k], step))
                tensors.append(direct.profiles[k][0].clone())
    x, resid = phema.solve(snaps, (phema.gamma_of(0.075), T))
    rec = phema.combine(["w"], [lambda _, t=t: t for t in tensors], x)["w"]
    W = np.array([np.pad(phema.discrete_profile(gm, t), (0, T - t)) for gm, t in snaps])
    dw = np.abs(x @ W - phema.discrete_profile(phema.gamma_of(0.075), T)).sum()
    assert sum(x) == pytest.approx(1, abs=1e-9)
    bound = dw * (theta - theta[-1]).abs().max(0).values + 1e-5
    err = (rec - direct.profiles[1][0]).abs()
    gap = (direct.profiles[0][0] - direct.profiles[2][0]).abs()
    print(
        f"phema synthetic: residual {resid:.2e}, ‖Δw‖₁ {dw:.2e}, max error {err.max():.2e} (bound "
        f"{bound.min():.2e}..{bound.max():.2e}), tracked profiles' gap {gap.max():.2e}"
    )
    assert 0.001 < resid < 0.02 and dw < 0.02  # measured: 0.0084, 0.0084
    assert (err <= bound).all()
    assert err.max() < gap.max() / 20


# ------------------------------------------------------------------------------ the EMA under ZeRO-3


@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_power_emas_partitions_are_the_full_power_ema_cut_into_partitions(world):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=g) for s in SHAPES]
    stds = [0.05, 0.075, 0.10]
    full = PowerEMA(weights, CPU, stds)
    emas = [ShardedPowerEMA(partitions(weights, r, world), CPU, stds, rank=r, world=world) for r in range(world)]
    for step in range(1, 25):
        weights = [w + 0.1 * torch.randn(w.shape, generator=g) for w in weights]
        full.update(weights, step)
        for r, e in enumerate(emas):
            e.update(partitions(weights, r, world), step)
    for k in range(3):
        parts = [type("V", (), {"tensors": e.profiles[k]})() for e in emas]
        for got, want in zip(joined(parts), full.profiles[k]):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same fp32 operations, element by element
    assert not torch.equal(full.profiles[0][0], full.profiles[2][0])
    if world == 1:
        assert all(torch.equal(a, b) for a, b in zip(emas[0].export(profile=2), full.export(profile=2)))


def _gloo(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    return dist


@pytest.mark.parametrize("zero3", [False, True])
def test_a_checkpoint_restores_every_profile_bit_for_bit(tmp_path, zero3):
    """The engine's save_ema / restore_ema: a restored EMA continues exactly as the one never stopped (under
    ZeRO-3 from this rank's own partitions, and from the gathered files when those are not this rank's)."""
    from types import SimpleNamespace

    from safetensors import safe_open

    from ambient_ray.io.checkpoint import restore_ema, save_ema

    g = torch.Generator().manual_seed(3)
    names = [f"p{i}" for i in range(len(SHAPES))]
    cfg = SimpleNamespace(ema_stds=[0.05, 0.10, 0.2])
    dist = _gloo(tmp_path) if zero3 else None
    try:
        make = (lambda w: partitions(w, 0, 1)) if zero3 else (lambda w: w)
        traj = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(12)]
        a = EMAS.get("power")(make(traj[0]), CPU, cfg, sharded=zero3)
        for step in range(1, 7):
            a.update(make(traj[step]), step)
        saved = [[t.clone() for t in prof] for prof in a.profiles]
        d = tmp_path / "ckpt"
        d.mkdir()
        save_ema(str(d), names, a, 0, zero3)
        with safe_open(str(d / "ema.safetensors"), "pt") as f:  # what sampling loads: the first profile
            assert f.metadata() == {"ema": "power", "stds": "[0.05, 0.1, 0.2]"}
            assert all(torch.equal(f.get_tensor(n).reshape(-1), t.reshape(-1)) for n, t in zip(names, a.tensors))
        for path in ("own partitions", "gathered files") if zero3 else ("gathered files",):
            if path == "gathered files":
                (d / "ema-rank-0000.safetensors").unlink(missing_ok=True)
            b = EMAS.get("power")(make([torch.zeros(s) for s in SHAPES]), CPU, cfg, sharded=zero3)
            restore_ema(str(d), names, b, 0, zero3)
            assert all(torch.equal(x, y) for k in range(3) for x, y in zip(saved[k], b.profiles[k])), path
            if path == "own partitions" or not zero3:  # and both continue alike
                for step in range(7, 12):
                    for e in (a, b):
                        e.update(make(traj[step]), step)
                assert all(torch.equal(x, y) for k in range(3) for x, y in zip(a.profiles[k], b.profiles[k]))
        other = EMAS.get("power")(make(traj[0]), CPU, SimpleNamespace(ema_stds=[0.05, 0.10]), sharded=zero3)
        with pytest.raises(ConfigError, match="ema_stds"):
            restore_ema(str(d), names, other, 0, zero3)
        warm = EMAS.get("warmup")(make(traj[0]), CPU, SimpleNamespace(ema_decay=0.9), sharded=zero3)
        with pytest.raises(ConfigError, match="config key 'ema'"):
            restore_ema(str(d), names, warm, 0, zero3)
    finally:
        if dist is not None:
            dist.destroy_process_group()


def test_snapshots_fall_on_the_steps_whose_images_cross_a_multiple():
    from ambient_ray.train.config import EngineConfig
    from ambient_ray.train.worker import snapshot_due

    cfg = EngineConfig(data="d", out="o", steps=20, ema="power", ema_snapshot_every=100)
    due = [s for s in range(1, 21) if snapshot_due(cfg, s, 48)]  # 48 images a step: 96, 144 crosses 100, ...
    assert due == [3, 5, 7, 9, 11, 13, 15, 17, 19, 20]  # and the last step
    assert not any(snapshot_due(cfg.model_copy(update={"ema": "warmup"}), s, 48) for s in range(1, 21))
    assert not any(snapshot_due(cfg.model_copy(update={"ema_snapshot_every": None}), s, 48) for s in range(1, 21))


# ------------------------------------------------------------------------------ the stage's errors (no Ray)


def _fake_run(tmp_path, stds=(0.05, 0.10), steps=(10, 20, 30)):
    from ambient_ray.io.snapshots import write_snapshot

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.json").write_text(json.dumps({"kind": "denoiser", "arch": "ddpmpp"}))
    ema = PowerEMA([torch.zeros(3)], CPU, stds)
    for step in range(1, max(steps) + 1):
        ema.update([torch.full((3,), float(step))], step)
        if step in steps:
            for k, s in enumerate(stds):
                write_snapshot(str(run), {"w": ema.profiles[k][0]}, s, ema.gammas[k], step, 16)
    return str(run), ema


def test_the_stage_reconstructs_and_refuses_what_it_cannot(tmp_path):
    from safetensors.torch import load_file

    from ambient_ray.io.snapshots import list_snapshots
    from ambient_ray.stages.phema import PhemaConfig
    from ambient_ray.stages.phema import run as phema_run

    run, ema = _fake_run(tmp_path)
    snaps = list_snapshots(run)
    assert [(s["std"], s["step"], s["nimg"]) for s in snaps][:2] == [(0.05, 10, 160), (0.1, 10, 160)]
    out = str(tmp_path / "out")
    s = phema_run(PhemaConfig(run=run, std=0.10, out=out))  # a tracked profile: itself, exactly
    assert s["at"] == 30 and s["residual"] < 1e-6
    torch.testing.assert_close(load_file(f"{out}/ema.safetensors")["w"], ema.profiles[1][0], rtol=1e-6, atol=1e-5)
    assert json.loads(open(f"{out}/model.json").read())["arch"] == "ddpmpp"
    assert len(json.loads(open(f"{out}/phema.json").read())["weights"]) == 6
    with pytest.raises(ConfigError, match="config key 'std'.*0.3003"):
        phema_run(PhemaConfig(run=run, std=0.4, out=out))
    with pytest.raises(ConfigError, match="config key 'at': step 31 is after the last snapshot"):
        phema_run(PhemaConfig(run=run, std=0.07, at=31, out=out))
    with pytest.raises(ConfigError, match="config key 'at': no snapshot at or before step 9"):
        phema_run(PhemaConfig(run=run, std=0.07, at=9, out=out))
    with pytest.raises(ConfigError, match="not representable.*max_residual"):  # far outside 0.05..0.10
        phema_run(PhemaConfig(run=run, std=0.28, out=out, profiles=[0.10]))
    with pytest.raises(ConfigError, match="config key 'profiles'"):
        phema_run(PhemaConfig(run=run, std=0.07, out=out, profiles=[0.2]))
    with pytest.raises(FileNotFoundError, match="no power-EMA snapshots"):
        phema_run(PhemaConfig(run=str(tmp_path / "empty"), std=0.07, out=out))


# end to end: tests/test_edm2.py reconstructs a profile of a real ZeRO-3 EDM2 run with `ambient-ray phema`
