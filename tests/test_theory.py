"""The theory as a tool: the bounds against direct evaluation, Theorem 4.2 and the lemmas on random inputs, the
KDE bound and the n^(-1/2) rate in simulation, the crossover with a mean-preserving and a shifted corruption, the
classifier link, and ``ambient-ray theory`` as documented."""

from __future__ import annotations

import json
import math
import pathlib
import shlex
import time

import numpy as np
import pytest
from scipy.stats import norm

from ambient_ray.theory import bounds, densities, simulation
from ambient_ray.theory.bounds import Setting

ROOT = pathlib.Path(__file__).parents[1]
P0 = densities.triangle(0.0, 0.5, 1.0)
NARROW = densities.triangle(0.25, 0.5, 0.75)  # the same mean as P0, half the width
SHIFTED = densities.triangle(0.5, 0.75, 1.0)  # the mean moved by 0.25


# ------------------------------------------------------------------------------ the calculator


def test_bounds_agree_with_the_formulas_written_out_at_hand_picked_inputs():
    """Theorem 4.1 (both forms), Theorem 4.2, U₁, U₂ and λ̄ against the formulas evaluated by hand."""
    n, lam, delta, s = 100, 2.0, 0.1, 0.5
    big_l = 200  # ⌈100·max(2, 1)⌉
    explicit = lam / (2 * big_l) + 1 / (2 * big_l * s**2 * math.sqrt(2 * math.pi * math.e))
    explicit += math.sqrt(math.log(2 * big_l / delta) / (4 * math.pi * s**2 * n))
    assert bounds.kde_bound(s, n, lam, delta, "explicit") == pytest.approx(explicit, rel=1e-12)
    assert explicit == pytest.approx(0.005 + 0.0024197 + 0.162484, abs=2e-6)  # the numbers, to the hand's precision
    rate = 1 / n + 1 / (s**2 * n) + math.sqrt((math.log(n) + math.log(lam) + math.log(2 / delta)) / (s**2 * n))
    assert bounds.kde_bound(s, n, lam, delta, "rate") == pytest.approx(rate, rel=1e-12)
    assert bounds.kde_bound(s, n, 0.3, delta, "rate") == pytest.approx(  # log(1 ∨ λ) = 0 for λ < 1
        1 / n + 1 / (s**2 * n) + math.sqrt((math.log(n) + math.log(2 / delta)) / (s**2 * n)), rel=1e-12
    )
    st = Setting(n1=50, n2=150, lambda1=4.0, lambda2=1.0, d_tv=0.4, diameter=2.0, delta=0.05)
    assert st.lambda_mix == pytest.approx((50 * 4 + 150 * 1) / 200)
    assert bounds.u1(s, st) == pytest.approx(bounds.kde_bound(s, 50, 4.0, 0.05))
    for sig, shrink in ((0.5, 1.0), (4.0, 2.0 / 8.0)):  # min(1, D/(2σ)): 1 below σ = D/2, D/(2σ) above
        expected = bounds.kde_bound(sig, 200, 1.75, 0.05) + shrink * (150 / 200) * 0.4
        assert bounds.u2(sig, st) == pytest.approx(expected, rel=1e-12)
    assert bounds.contraction_bound(0.25, 0.5, 1.0) == pytest.approx(0.5)
    assert bounds.contraction_bound(5.0, 0.5, 1.0) == pytest.approx(0.05)
    assert bounds.vacuous(bounds.u1(np.array([1e-3, 100.0]), st)).tolist() == [True, False]


@pytest.mark.parametrize("form", bounds.FORMS)
@pytest.mark.parametrize(
    "setting",
    [
        Setting(100, 900, 4.0, 16.0, 1 / 3),
        Setting(500, 4500, 4.0, 4.0, 0.05),
        Setting(20, 2000, 1.0, 1.0, 0.9, diameter=3.0),
        Setting(1000, 10, 2.0, 50.0, 1.0),
    ],
)
def test_the_closed_form_crossover_is_where_the_bounds_cross(setting, form):
    """The quadratic's σ* agrees with a bisection of U₁ − U₂, and U₂ < U₁ just above it (≥ just below)."""
    closed = bounds.crossover(setting, form)
    bisected = bounds.crossover_bisect(lambda x: bounds.u1(x, setting, form) - bounds.u2(x, setting, form), hi=1e6)
    assert closed.method == "closed form" and bisected.method == "bisection"
    if not closed.exists:
        assert not bisected.exists
        return
    assert closed.sigma == pytest.approx(bisected.sigma, rel=1e-6, abs=1e-4)
    if closed.sigma > 0:
        diff = lambda x: float(bounds.u1(x, setting, form) - bounds.u2(x, setting, form))  # noqa: E731
        assert diff(closed.sigma * 1.001) > 0 >= diff(closed.sigma * 0.999)
        assert all(diff(x) > 0 for x in closed.sigma * np.geomspace(1.01, 1e4, 50))


def test_a_measured_bias_curve_gives_the_crossover_by_bisection():
    """With another bias than Theorem 4.2's (e.g. from a classifier), no closed form: bisection finds σ*."""
    st = Setting(100, 900, 4.0, 4.0, 0.5)
    found = bounds.crossover(st, "explicit", bias=lambda s: np.minimum(0.5, 0.05 / np.asarray(s) ** 2))
    assert found.method == "bisection" and found.exists
    x = found.sigma
    u = lambda s: bounds.u1(s, st) - bounds.u2(s, st, bias=lambda t: np.minimum(0.5, 0.05 / t**2))  # noqa: E731
    assert u(x * 1.01) > 0 >= u(x * 0.99)


def test_bad_settings_are_refused():
    for kw, word in ((dict(d_tv=1.5), "d_TV"), (dict(delta=0.0), "δ"), (dict(n1=0), "n1"), (dict(diameter=0), "D")):
        with pytest.raises(ValueError, match=word):
            Setting(**{**dict(n1=10, n2=10, lambda1=1.0, lambda2=1.0, d_tv=0.5), **kw})
    with pytest.raises(ValueError, match="σ"):
        bounds.kde_bound(0.0, 10, 1.0, 0.1)


# ------------------------------------------------------------------------------ Theorem 4.2 and the lemmas


def test_two_point_masses_exact_tv_and_the_contraction_is_tight_at_large_sigma_up_to_sqrt_2_over_pi():
    atoms, p, q = np.array([0.0, 1.0]), np.array([1.0, 0.0]), np.array([0.0, 1.0])
    for s in (0.05, 0.3, 1.0, 7.0):
        assert simulation.atomic_tv(atoms, p, q, s) == pytest.approx(2 * norm.cdf(1 / (2 * s)) - 1, abs=1e-6)
    assert densities.two_point_tv(1.0, 0.3) == pytest.approx(2 * norm.cdf(1 / 0.6) - 1)
    ratios = [densities.two_point_tv(1.0, s) / bounds.contraction_bound(s, 1.0, 1.0) for s in (10.0, 100.0, 1e4)]
    assert np.all(np.diff(ratios) > 0) and ratios[-1] == pytest.approx(math.sqrt(2 / math.pi), rel=1e-6)


def test_theorem_4_2_holds_on_random_atomic_distributions():
    rows = simulation.contraction_check(trials=40, atoms=6, diameter=1.0, sigmas=(0.05, 0.2, 0.5, 1.0, 4.0))
    sigma, d0, noised, bound = rows.T
    assert np.all(noised <= bound + 1e-9) and np.all(noised <= d0 + 1e-9)  # contraction, and never an increase
    assert np.all(noised[sigma == 4.0] < noised[sigma == 0.05])
    rows = simulation.contraction_check(trials=10, atoms=4, diameter=3.0, sigmas=(1.0, 10.0), seed=1)
    assert np.all(rows[:, 2] <= rows[:, 3] + 1e-9)


def test_the_lipschitz_lemmas():
    """Lemma A.5: a KDE is 1/(σ²√(2πe))-Lipschitz, attained by one sample; Lemma A.6: noise keeps p's constant."""
    rng = np.random.default_rng(0)
    for s in (0.05, 0.2, 1.0):
        many = simulation.lipschitz_checks(P0, P0.sample(200, rng), s)
        one = simulation.lipschitz_checks(P0, np.array([0.5]), s)
        assert many["kde"] <= many["kde_lemma"] * (1 + 1e-6)
        assert one["kde"] == pytest.approx(one["kde_lemma"], rel=2e-3)  # a grid point lands near the steepest slope
        assert many["noised"] <= many["density"] * (1 + 1e-3)
    assert P0.lipschitz == pytest.approx(4.0, rel=1e-6) and NARROW.lipschitz == pytest.approx(16.0, rel=1e-6)


# ------------------------------------------------------------------------------ the simulation


def test_kde_bound_holds_in_all_but_a_delta_fraction_of_seeds_and_tv_decays_like_one_over_root_n():
    sig = np.array([0.05, 0.1, 0.3, 1.0, 3.0])
    delta = 0.1
    means = []
    for n in (100, 400, 1600, 6400):
        sim = simulation.simulate(P0, NARROW, n, 0, sig, seeds=60, seed=n)
        bound = bounds.kde_bound(sig, n, P0.lipschitz, delta, "explicit")
        assert (sim.tv1 > bound).mean(axis=0).max() <= delta
        means.append(sim.mean1)
    slopes = np.polyfit(np.log([100, 400, 1600, 6400]), np.log(np.array(means)), 1)[0]
    assert np.all(np.abs(slopes + 0.5) < 0.08), slopes


def test_mean_preserving_corruption_crosses_over_a_shifted_one_does_not_whatever_the_bound_says():
    sig = np.geomspace(0.01, 100, 30)
    narrow = simulation.simulate(P0, NARROW, 100, 900, sig, seeds=60)
    shifted = simulation.simulate(P0, SHIFTED, 100, 900, sig, seeds=60, seed=1)
    crossed = simulation.observed_crossover(sig, narrow.mean1, narrow.mean2)
    assert 0.1 < crossed < 10  # Algorithm 2 better above σ ≈ 1, for good
    assert np.all(narrow.wins2[sig > 3 * crossed] > 0.75)  # per seed: Algorithm 1's lucky draws win some
    assert np.all(narrow.wins2[sig < crossed / 3] < 0.1)
    assert simulation.observed_crossover(sig, shifted.mean1, shifted.mean2) == math.inf
    assert np.all(shifted.mean2 > shifted.mean1)  # the bias decays like 1/σ, as fast as the KDE error
    for q in (NARROW, SHIFTED):  # the bounds cross in both cases (the 1/N term wins as σ → ∞)
        st = Setting(100, 900, P0.lipschitz, q.lipschitz, densities.tv(P0, q))
        assert bounds.crossover(st, "explicit").exists


def test_simulated_bias_obeys_theorem_4_2_and_the_mixture_identity():
    sig = np.geomspace(0.05, 20, 12)
    sim = simulation.simulate(P0, SHIFTED, 10, 30, sig, seeds=2)
    d0 = densities.tv(P0, SHIFTED)
    assert d0 == pytest.approx(0.6, abs=1e-4)  # ½∫|p₀ − q₀| for these two triangles, by hand: 1 − 0.4
    np.testing.assert_allclose(sim.bias, 0.75 * sim.tv_pq, rtol=1e-9)  # d_TV(p̃_σ, p_σ) = (n₂/N)·d_TV(p_σ, q_σ)
    assert np.all(sim.tv_pq <= bounds.contraction_bound(sig, d0, 1.0) + 1e-6)


def test_the_bayes_classifier_accuracy_is_half_plus_half_tv_and_tau_maps_to_one_minus_two_tau():
    rng = np.random.default_rng(3)
    sig = np.geomspace(0.02, 5, 25)
    sim = simulation.simulate(P0, SHIFTED, 1, 0, sig, seeds=1)
    for j in (0, 10, 20):
        s = sig[j]
        acc = simulation.bayes_accuracy(P0, SHIFTED, s)
        g = densities.Grid.around(0.0, 1.0, s, 1 / 2000)  # the grid bayes_accuracy integrates on
        ps, qs = densities.noised(P0, g), densities.noised(SHIFTED, g)
        assert acc == pytest.approx(0.5 + 0.5 * g.tv(ps, qs), abs=1e-12)  # ½∫max(p, q) = ½ + ½·½∫|p − q|
        assert acc == pytest.approx(0.5 + 0.5 * sim.tv_pq[j], abs=1e-4)  # the simulation's coarser grid
        # the same by Monte Carlo: classify noised samples of each by which noised density is larger
        xp = P0.sample(40_000, rng) + s * rng.standard_normal(40_000)
        xq = SHIFTED.sample(40_000, rng) + s * rng.standard_normal(40_000)
        says_p = lambda x: np.interp(x, g.x, ps) > np.interp(x, g.x, qs)  # noqa: E731
        mc = 0.5 * (says_p(xp).mean() + (~says_p(xq)).mean())
        assert mc == pytest.approx(acc, abs=0.01)
    tau = 0.4  # the classifier's mean P(clean) on corrupted samples reaching τ: accuracy 1 − τ, TV = 1 − 2τ
    at = simulation.sigma_at_tv(sig, sim.tv_pq, 1 - 2 * tau)
    accs = np.array([simulation.bayes_accuracy(P0, SHIFTED, s) for s in sig])
    assert at == pytest.approx(simulation.sigma_at_tv(sig, 2 * accs - 1, 1 - 2 * tau), rel=1e-3)
    assert accs[sig < at].min() > 1 - tau > accs[sig > at * 1.2].max()


def test_density_specs_and_their_errors():
    mix = densities.parse("mixture:means=0.3/0.7,stds=0.05/0.1,weights=1/3")
    assert mix.mean == pytest.approx((0.3 + 3 * 0.7) / 4, abs=0.01)
    blur = densities.parse("blurred:width=0.1", base=P0)
    assert 0 < densities.tv(P0, blur) < 0.2 and blur.pdf.max() < P0.pdf.max()
    assert densities.parse("uniform:lo=0,hi=2").diameter == 2.0
    for spec, word in (
        ("triangle:lo=0,peak=2,hi=1", "peak"),
        ("gamma:k=1", "unknown kind"),
        ("mixture:means=0.5", "stds"),
        ("triangle:lo=0,top=1", "unknown key"),
        ("blurred:width=0.1", "only a q0"),
    ):
        with pytest.raises(ValueError, match=word):
            densities.parse(spec)


# ------------------------------------------------------------------------------ the command


def test_the_default_run_finishes_in_under_20_cpu_seconds(tmp_path):
    from ambient_ray.stages import theory

    t = time.process_time()
    s = theory.run(theory.TheoryConfig(out=str(tmp_path), mlflow=dict(enabled=False)))
    cpu = time.process_time() - t
    assert cpu < 20, f"{cpu:.1f} CPU seconds"
    assert s["simulated"]["kde_bound_violations"] <= 0.1 and s["crossover"]["explicit"] != "inf"
    assert 0.3 < s["simulated"]["crossover"] < 3


def documented() -> list[str]:
    text = (ROOT / "docs" / "theory.md").read_text()
    block = text.split("<!-- tested: theory -->", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines() if line.startswith("ambient-ray ")]


def test_the_documented_commands_print_draw_and_log_to_mlflow(mlflow_server, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from ambient_ray import cli

    monkeypatch.chdir(tmp_path)
    lines = documented()
    assert [shlex.split(line)[1] for line in lines] == ["theory", "theory"]
    for line in lines:
        assert cli.main(shlex.split(line)[1:] + ["--set", "mlflow.experiment=tests-theory"]) == 0, line
    text = capsys.readouterr().out
    assert "bound crossover σ* (explicit)" in text and "simulated crossover" in text
    first = json.loads((tmp_path / "theory.json").read_text())
    assert (tmp_path / "theory.png").read_bytes()[:4] == b"\x89PNG"
    shifted = json.loads((tmp_path / "runs" / "theory-shifted" / "theory.json").read_text())
    assert first["simulated"]["crossover"] != "inf" and shifted["simulated"]["crossover"] == "inf"
    run = MlflowClient().get_run(shifted["mlflow_run_id"])
    assert run.data.params["q0"] == "triangle:lo=0.5,peak=0.75,hi=1" and "crossover_explicit" in run.data.metrics
    arts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"theory.png", "theory.json"} <= arts
    assert first["mlflow_run_id"] != shifted["mlflow_run_id"]


def test_a_bad_density_spec_is_a_usage_error(tmp_path, capsys):
    from ambient_ray import cli

    assert cli.main(["theory", "--q0", "triangle:lo=0,peak=3", "--out", str(tmp_path)]) == 2
    assert "p0'/'q0'" in capsys.readouterr().err
