"""Sample-quality metrics against analytic answers (issue 5 groundwork)."""

import numpy as np
import pytest

from ambient_ray.evaluation.metrics import (
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    memorization,
    precision_recall,
    vendi_score,
)


def test_fd_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(frechet_distance(x, x)) < 1e-6


def test_fd_matches_the_closed_form_for_gaussians():
    """Diagonal covariances: FD = ‖μ₁ − μ₂‖² + Σ (√s₁ − √s₂)²; a full pair: commuting matrices."""
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))  # same eigenvectors: Σ₁Σ₂ commute
    c1, c2 = q @ np.diag(s1) @ q.T, q @ np.diag(s2) @ q.T
    assert frechet_distance_from_stats(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-7)
    # from samples of those Gaussians, within sampling error
    rng = np.random.default_rng(2)
    a = rng.multivariate_normal(mu1, c1, size=200_000)
    b = rng.multivariate_normal(mu2, c2, size=200_000)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    mu, cov = gaussian_stats(a)
    assert np.allclose(mu, mu1, atol=0.02) and np.allclose(cov, c1, atol=0.05)


def test_precision_recall_on_planted_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 2))
    same = rng.normal(size=(400, 2))
    far = rng.normal(size=(400, 2)) + 50.0
    p, r = precision_recall(real, same, k=3)
    assert p > 0.9 and r > 0.9
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    half = np.concatenate([same[:200], far[:200]])  # half of the fakes off the real manifold
    p, r = precision_recall(real, half, k=3)
    assert 0.4 < p < 0.55 and r > 0.8
    collapsed = real[:1] + 0.01 * rng.normal(size=(400, 2))  # mode collapse: precise, no recall
    p, r = precision_recall(real, collapsed, k=3)
    assert p == 1.0 and r < 0.1
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(real[:3], same[:3], k=3)


def test_vendi_score_counts_distinct_samples():
    n = 16
    assert vendi_score(np.ones((n, 5))) == pytest.approx(1.0, abs=1e-9)
    assert vendi_score(np.eye(n)) == pytest.approx(float(n), rel=1e-9)
    two = np.repeat(np.eye(2), n // 2, axis=0)  # two equal groups of identical rows
    assert vendi_score(two) == pytest.approx(2.0, rel=1e-9)


def test_memorization_flags_a_planted_copy():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 16))
    generated = rng.normal(size=(50, 16))
    generated[7] = train[42] + 1e-3 * rng.normal(size=16)  # a near-copy
    share, ratio = memorization(generated, train)
    assert np.argmin(ratio) == 7 and ratio[7] < 0.01
    assert share == pytest.approx(1 / 50)
    with pytest.raises(ValueError, match="NaN"):
        memorization(np.full((3, 16), np.nan), train)


def _fd_with_scipy_sqrtm(mu1, s1, mu2, s2) -> float:
    """The former implementation's formula (scipy's general matrix square root of Σ₁Σ₂): the reference."""
    from scipy import linalg

    covmean = np.real(linalg.sqrtm(s1 @ s2))
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


@pytest.mark.parametrize("dim", [2, 8, 64])
def test_fd_matches_the_former_sqrtm_values_on_well_conditioned_covariances(dim):
    rng = np.random.default_rng(dim)
    worst = 0.0
    for _ in range(5):
        a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
        s1, s2 = a @ a.T / dim + 0.5 * np.eye(dim), b @ b.T / dim + 0.5 * np.eye(dim)
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        new, old = frechet_distance_from_stats(mu1, s1, mu2, s2), _fd_with_scipy_sqrtm(mu1, s1, mu2, s2)
        worst = max(worst, abs(new - old) / abs(old))
    assert worst < 1e-6


def test_fd_of_diagonal_covariances_is_analytic():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.0, 5.0, size=16), rng.uniform(0.0, 5.0, size=16)
    a[:4] = 0.0  # singular too: zero variances
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fd_of_rank_deficient_covariances_is_finite_and_silent():
    """Fewer samples than features (rank-deficient covariances): scipy's sqrtm of Σ₁Σ₂ warns 'Matrix is
    singular'; the symmetric form gives a finite value, with no warning at all."""
    import warnings

    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fd = frechet_distance(x, y)
        same = frechet_distance(x, x)
    assert np.isfinite(fd) and fd > 0
    assert abs(same) < 1e-8
    # rank 3 of 32, the exact answer known: Σ₁ = Σ₂ = P (a projection) and shifted means give ‖Δμ‖² only
    q, _ = np.linalg.qr(rng.normal(size=(32, 3)))
    p = q @ q.T
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert frechet_distance_from_stats(np.zeros(32), p, np.ones(32), p) == pytest.approx(32.0, abs=1e-8)
        # and 4·P against P: Tr(4P + P − 2·2P) = Tr(P) = 3
        assert frechet_distance_from_stats(np.zeros(32), 4 * p, np.zeros(32), p) == pytest.approx(3.0, abs=1e-8)
