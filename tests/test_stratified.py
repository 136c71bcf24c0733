"""The streaming σ-first sampler against the in-memory one: same σ law, (σ, stratum) and row pairing, crops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ambient_ray.diffusion import ambient as A
from ambient_ray.diffusion import stratified as S

LAMBDA = 4.0
CROP = A.CropTable(sigmas=[0.05, 0.15, 0.3], sizes=[8, 16, 24])
N_DRAWS = 200_000
CHUNK = 8192


def hand_made():
    """5 σ_min values (one of them 0) and two groups with crops: 7 strata, 540 rows, shuffled row order."""
    groups = [  # (σ_min, σ_max, rows)
        (0.0, 0.0, 40),
        (0.05, 0.0, 60),
        (0.2, 0.0, 80),
        (0.5, 0.0, 100),
        (1.0, 0.0, 120),
        (0.5, 0.1, 50),  # crops below 0.1, whole above buffer(0.5)
        (2.0, 0.3, 90),  # crops below 0.3, whole above buffer(2.0)
    ]
    smin = torch.cat([torch.full((n,), a) for a, _, n in groups])
    smax = torch.cat([torch.full((n,), b) for _, b, n in groups])
    perm = torch.randperm(len(smin), generator=torch.Generator().manual_seed(7))
    edges = S.grid_edges([a for a, _, _ in groups], [b for _, b, _ in groups], LAMBDA)
    return smin[perm], smax[perm], edges


def draw_both(smin, smax, edges, n=N_DRAWS, seed=0):
    ref = A.SigmaSampler(smin, smax, lambda_max=LAMBDA, crop=CROP)
    strat, ids = S.StratifiedSigmaSampler.from_annotations(smin, smax, lambda_max=LAMBDA, edges=edges, crop=CROP)
    streams = S.StratumStreams.from_ids(ids, seed=seed)
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    out = {"ref": [], "strat": []}
    for _ in range(n // CHUNK + 1):
        s, i, c = ref.sample(CHUNK, g1)
        out["ref"].append((s, i, c))
        s, k, c = strat.sample(CHUNK, g2)
        out["strat"].append((s, streams.batch(k), c, k))
    cat = {name: [torch.cat(x)[:n] for x in zip(*v)] for name, v in out.items()}
    return ref, strat, ids, cat


@pytest.fixture(scope="module")
def both():
    smin, smax, edges = hand_made()
    ref, strat, ids, cat = draw_both(smin, smax, edges)
    return smin, smax, ids, ref, strat, cat


def homogeneity(a: np.ndarray, b: np.ndarray, min_total: int = 20) -> float:
    """p-value of a chi-square test that two count vectors come from the same distribution (sparse cells dropped)."""
    keep = (a + b) >= min_total
    return float(stats.chi2_contingency(np.stack([a[keep], b[keep]]))[1])


def sigma_buckets(smin, smax):
    """Quantile buckets of the log-normal, plus every threshold and crop bound (so pairing changes on a bucket edge)."""
    q = np.exp(-1.2 + 1.2 * stats.norm.ppf(np.linspace(0, 1, 25)[1:-1]))
    marks = np.concatenate([A.buffer_sigma(smin, LAMBDA).numpy(), smax.numpy(), CROP.sigmas])
    return np.unique(np.concatenate([q, marks[marks > 0]]))


def test_strata_are_the_grid_groups(both):
    smin, smax, ids, *_ = both
    assert len(torch.unique(ids)) == 7
    # rows of a stratum share their annotation exactly (grid edges: nothing is rounded)
    for k in torch.unique(ids):
        rows = ids == k
        assert len(torch.unique(smin[rows])) == 1 and len(torch.unique(smax[rows])) == 1


def test_sigma_marginals_agree(both):
    *_, ref, strat, cat = both
    s_ref, s_str = cat["ref"][0].numpy(), cat["strat"][0].numpy()
    ks = stats.ks_2samp(np.log(s_ref), np.log(s_str))
    assert ks.pvalue > 1e-3, ks
    # clean rows make every σ eligible: no redraws, and the marginal is the EDM log-normal itself
    assert ref.coverage.redraws == 0 and strat.coverage.redraws == 0
    assert stats.kstest(np.log(s_str), "norm", args=(-1.2, 1.2)).pvalue > 1e-3
    p = homogeneity(ref.coverage.draws.numpy(), strat.coverage.draws.numpy())
    assert p > 1e-3, p


def test_sigma_stratum_pairs_and_rows_agree(both):
    smin, smax, ids, ref, strat, cat = both
    edges = sigma_buckets(smin, smax)
    nb, k = len(edges) + 1, int(ids.max()) + 1

    def table(sig, stratum):
        return np.bincount(np.digitize(sig.numpy(), edges) * k + stratum.numpy(), minlength=nb * k)

    a, b = table(cat["ref"][0], ids[cat["ref"][1]]), table(cat["strat"][0], cat["strat"][3])
    p = homogeneity(a, b)
    assert p > 1e-3, p
    # the stream's row is in the drawn stratum, and rows come up as often as SigmaSampler picks them
    assert (ids[cat["strat"][1]] == cat["strat"][3]).all()
    n = len(smin)
    rows_ref = np.bincount(cat["ref"][1].numpy(), minlength=n)
    rows_str = np.bincount(cat["strat"][1].numpy(), minlength=n)
    for s_k in torch.unique(ids):  # a stream serves each row once per pass: within a stratum counts differ by <= 1
        c = rows_str[(ids == s_k).numpy()]
        assert c.max() - c.min() <= 1
    # so the streamed counts are (nearly) the expected ones, and SigmaSampler's multinomial counts must fit them
    p_rows = float(stats.chisquare(rows_ref, rows_str * rows_ref.sum() / rows_str.sum()).pvalue)
    assert p_rows > 1e-3, p_rows
    # the test has power: pairing strata uniformly regardless of n_k is refused
    wrong = table(cat["strat"][0], torch.where(cat["strat"][3] == cat["strat"][3].max(), 0, cat["strat"][3]))
    assert homogeneity(a, wrong) < 1e-6


def check_eligible(sig, rows, crop, smin, smax, exact=True):
    """Whole only above the row's buffer; a crop only at σ <= the row's σ_max (and, unrounded, only when not whole)."""
    t = A.buffer_sigma(smin, LAMBDA)[rows]
    via_crop = crop > 0
    assert (sig[~via_crop] > t[~via_crop]).all()
    assert (sig[via_crop] <= smax[rows][via_crop]).all()
    if exact:
        assert (sig[via_crop] <= t[via_crop]).all()
    assert (crop[via_crop] == CROP(sig[via_crop])).all()


def test_no_row_below_its_buffer_unless_through_a_crop(both):
    smin, smax, ids, ref, strat, cat = both
    check_eligible(cat["ref"][0], cat["ref"][1], cat["ref"][2], smin, smax)
    check_eligible(cat["strat"][0], cat["strat"][1], cat["strat"][2], smin, smax)
    # continuous annotations under the default (rounding) edges keep the guarantee w.r.t. the raw values
    g = torch.Generator().manual_seed(1)
    cs_min = torch.where(torch.rand(3000, generator=g) < 0.2, 0.0, torch.rand(3000, generator=g) * 3)
    cs_max = torch.where(torch.rand(3000, generator=g) < 0.3, torch.rand(3000, generator=g) * 0.4, 0.0)
    sampler, cids = S.StratifiedSigmaSampler.from_annotations(cs_min, cs_max, lambda_max=LAMBDA, crop=CROP)
    streams = S.StratumStreams.from_ids(cids, seed=3)
    assert len(sampler.active) < 1000  # far fewer strata than rows
    sig, k, crop = sampler.sample(20_000, g)
    rows = streams.batch(k)
    assert (crop > 0).any() and (crop == 0).any()
    check_eligible(sig, rows, crop, cs_min, cs_max, exact=False)


def test_crop_fractions_agree(both):
    *_, ref, strat, cat = both
    c_ref, c_str = (cat["ref"][2] > 0).numpy(), (cat["strat"][2] > 0).numpy()
    assert 0.02 < c_ref.mean() < 0.5
    p = homogeneity(np.bincount(c_ref, minlength=2), np.bincount(c_str, minlength=2))
    assert p > 1e-3, p
    p_buckets = homogeneity(ref.coverage.crop_draws.numpy(), strat.coverage.crop_draws.numpy())
    assert p_buckets > 1e-3, p_buckets
    # donut counts are the in-memory sampler's
    assert [(d["eligible_full"], d["eligible_crops"]) for d in strat.donut()] == [
        (d["eligible_full"], d["eligible_crops"]) for d in ref.donut()
    ]


def test_rounding_goes_up_for_the_threshold_and_down_for_the_crop_bound():
    edges = [0.1, 0.2, 0.4, 0.8]
    smin = torch.tensor([0.0, 0.05, 0.1, 0.15, 0.5, 0.9, 0.0, 0.0, 0.0])
    smax = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.3, 5.0])
    ids, table = S.strata_of(smin, smax, lambda_max=math.inf, edges=edges)  # no buffer: t = σ_min
    t, sm = table[ids, 0], table[ids, 1]
    assert t.tolist() == pytest.approx([0.0, 0.1, 0.1, 0.2, 0.8, math.inf, 0.0, 0.0, 0.0])
    assert sm.tolist() == pytest.approx([0.0] * 6 + [0.0, 0.2, 0.8])
    # in general, under the default edges: t rounds up to the next level, σ_max down to the previous one
    g = torch.Generator().manual_seed(0)
    smin, smax = torch.rand(5000, generator=g) * 5, torch.rand(5000, generator=g) * 2
    ids, table = S.strata_of(smin, smax, lambda_max=LAMBDA)
    t_raw, t, sm = A.buffer_sigma(smin, LAMBDA), table[ids, 0], table[ids, 1]
    levels = torch.cat([torch.zeros(1), torch.tensor(S.DEFAULT_EDGES, dtype=torch.float32)])
    assert (t >= t_raw).all() and (sm <= smax).all()
    assert (levels[torch.searchsorted(levels, t) - 1] < t_raw).all()  # the level below t is below the raw t
    nxt = levels[(torch.searchsorted(levels, sm, right=True)).clamp(max=len(levels) - 1)]
    assert ((nxt > smax) | (sm == levels[-1])).all()  # and the level above σ_max is above the raw value
    # one row at a time routes to the same stratum as the whole column
    assert all(int(S.strata_of(smin[i], smax[i], LAMBDA)[0]) == int(ids[i]) for i in range(0, 5000, 499))


def test_state_restore_continues_the_same_stream():
    smin, smax, edges = hand_made()
    sampler, ids = S.StratifiedSigmaSampler.from_annotations(smin, smax, lambda_max=LAMBDA, edges=edges, crop=CROP)
    streams = S.StratumStreams.from_ids(ids, seed=11)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):  # past the end of a pass for the big strata
        streams.batch(sampler.sample(300, g)[1])
    assert max(streams.epoch.values()) >= 1
    s_state, st_state, g_state = sampler.state_dict(), streams.state_dict(), g.get_state()
    after = []
    for _ in range(2):
        s, k, c = sampler.sample(500, g)
        after.append((s, streams.batch(k), c))

    sampler2, _ = S.StratifiedSigmaSampler.from_annotations(smin, smax, lambda_max=LAMBDA, edges=edges, crop=CROP)
    streams2 = S.StratumStreams.from_ids(ids, seed=0)  # the seed comes back with the state
    sampler2.load_state_dict(s_state)
    streams2.load_state_dict(st_state)
    g2 = torch.Generator()
    g2.set_state(g_state)
    for s, rows, c in after:
        s2, k2, c2 = sampler2.sample(500, g2)
        assert torch.equal(s, s2) and torch.equal(c, c2) and torch.equal(rows, streams2.batch(k2))
    assert sampler2.state_dict()["draws"].tolist() == sampler.state_dict()["draws"].tolist()
    # each pass serves every row of the stratum once, and the next pass is reshuffled
    k = int(ids[0])
    n_k = int((ids == k).sum())
    fresh = S.StratumStreams.from_ids(ids, seed=2)
    p1, p2 = fresh.take(k, n_k), fresh.take(k, n_k)
    assert sorted(p1.tolist()) == sorted(p2.tolist()) == (ids == k).nonzero().flatten().tolist()
    assert not torch.equal(p1, p2)
    assert [fresh.next(k) for _ in range(3)] == S.StratumStreams.from_ids(ids, seed=2).take(k, 2 * n_k + 3)[
        -3:
    ].tolist()
    bad = dict(st_state, sizes=st_state["sizes"] + 1)
    with pytest.raises(ValueError, match="other strata"):
        streams2.load_state_dict(bad)


def test_two_strata_posterior_is_analytic():
    t1, t2, n1, n2 = 0.1, 0.5, 30, 90
    sampler = S.StratifiedSigmaSampler(torch.tensor([t1, t2]), torch.zeros(2), torch.tensor([n1, n2]))
    sig = torch.tensor([0.05, 0.1, 0.11, 0.3, 0.5, 0.51, 2.0, 40.0])
    p1 = sampler.stratum_probs(sig)[:, 0]
    expect = [0.0, 0.0, 1.0, 1.0, 1.0, n1 / (n1 + n2), n1 / (n1 + n2), n1 / (n1 + n2)]
    assert p1.tolist() == pytest.approx(expect)
    assert sampler.eligible(sig).tolist() == [0, 0, n1, n1, n1, n1 + n2, n1 + n2, n1 + n2]
    # and the draws follow it: below t1 nothing (redrawn), between the thresholds only stratum 0
    s, k, c = sampler.sample(40_000, torch.Generator().manual_seed(0))
    assert (s > t1).all() and (c == 0).all() and sampler.coverage.redraws > 0
    mid, high = (s <= t2), (s > t2)
    assert (k[mid] == 0).all()
    frac = float((k[high] == 0).double().mean())
    assert frac == pytest.approx(n1 / (n1 + n2), abs=4 * math.sqrt(0.25 * 0.75 / int(high.sum())))


def test_redrawn_sigmas_agree_without_clean_rows():
    # no clean rows: σ in (0.02, buffer(0.3)] has nothing eligible and is redrawn in both samplers
    smin = torch.cat([torch.full((30,), 0.3), torch.full((50,), 1.0), torch.full((20,), 1.0)])
    smax = torch.cat([torch.zeros(80), torch.full((20,), 0.02)])
    edges = S.grid_edges([0.3, 1.0], [0.02], LAMBDA)
    ref, strat, ids, cat = draw_both(smin, smax, edges, n=40_000, seed=4)
    gap = (cat["strat"][0] > 0.02) & (cat["strat"][0] <= A.buffer_sigma(0.3, LAMBDA))
    assert not gap.any()
    assert stats.ks_2samp(np.log(cat["ref"][0].numpy()), np.log(cat["strat"][0].numpy())).pvalue > 1e-3
    r1, r2 = ref.coverage.redraws, strat.coverage.redraws
    assert r1 > 10_000 and r2 > 10_000
    tot1, tot2 = int(ref.coverage.draws.sum()), int(strat.coverage.draws.sum())
    assert homogeneity(np.array([r1, tot1 - r1]), np.array([r2, tot2 - r2])) > 1e-3


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="edges"):
        S.strata_of(torch.zeros(2), edges=[0.5, 0.1])
    with pytest.raises(ValueError, match="crop table"):
        S.StratifiedSigmaSampler(torch.zeros(1), torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match="no stratum"):
        S.StratifiedSigmaSampler(torch.tensor([math.inf]), torch.zeros(1), torch.ones(1))
    with pytest.raises(KeyError):
        S.StratumStreams({0: torch.arange(3)}).next(1)
