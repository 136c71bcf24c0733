"""Sample-quality metrics on feature vectors, in pure torch/numpy (no Ray): issue 5 groundwork.

Every metric takes (N, D) feature arrays (from whichever feature network) and is checked against an
analytic answer in ``tests/test_metrics.py``.

- Fréchet distance (Heusel et al. 2017): ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}) between Gaussians
  fitted to the two feature sets (FID with Inception features, FD_DINOv2 with DINOv2 features); the trace
  of the square root from the eigenvalues of the symmetric Σ₁^{1/2} Σ₂ Σ₁^{1/2}, stable for singular Σ.
- k-NN precision and recall (Kynkäänniemi et al. 2019): the share of generated samples inside the
  union of real samples' k-NN balls, and the share of real samples inside the generated ones'.
- Vendi score (Friedman and Dieng 2023): exp of the entropy of the eigenvalues of K/n, K the cosine
  similarity matrix: 1 for n identical samples, n for n orthogonal ones.
- Memorization: each generated sample's distance to its nearest training sample over the distance
  to the second nearest; a ratio below 1/3 flags a (near-)copy; the share flagged.
- Nearest-neighbour similarity (Somepalli et al. 2023, as in Ambient Diffusion, Daras et al. 2023, Fig. 6):
  each generated sample's top-k cosine similarities to the training set (L2-normalised features, blocks of a
  matrix product); the top-1 values' mean, median and the share above a threshold (0.95 in DINOv2 features
  reads as a copy).
"""

from __future__ import annotations

import numpy as np
import torch


def _as64(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    return x


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased) of (N, D) features."""
    x = _as64(features)
    return x.mean(0).numpy(), torch.cov(x.T).reshape(x.shape[1], x.shape[1]).numpy()


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with the solver's rounding removed: those within n·ε·max|λ| of 0
    (numerically zero, possibly negative; their square roots would be rounding noise of ~√ε) set to 0."""
    tol = len(w) * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(_psd_eigenvalues(w))) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """Tr((Σ₁Σ₂)^{1/2}) of two covariance matrices, computed stably.

    Σ₁Σ₂ is similar to the symmetric PSD matrix M = Σ₁^{1/2} Σ₂ Σ₁^{1/2} (M = Σ₁^{1/2} (Σ₁Σ₂) Σ₁^{-1/2}), so
    both have the same non-negative eigenvalues λᵢ and Tr((Σ₁Σ₂)^{1/2}) = Σᵢ √λᵢ. The eigenvalues of M come from
    a symmetric eigensolver, which stays accurate when Σ₁ or Σ₂ is singular (fewer samples than features,
    constant features), where the general matrix square root of Σ₁Σ₂ is ill-conditioned.
    """
    r1 = _psd_sqrt(np.asarray(sigma1, dtype=np.float64))
    m = r1 @ np.asarray(sigma2, dtype=np.float64) @ r1
    return float(np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh((m + m.T) / 2.0))).sum())


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}): the Fréchet distance (squared 2-Wasserstein) between Gaussians
    N(μ₁, Σ₁) and N(μ₂, Σ₂), as in FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule
    converge to a local Nash equilibrium"). The trace of the square root is
    :func:`trace_sqrt_product` (symmetric form, finite for singular covariances)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: means {mu1.shape} {mu2.shape}, covariances {s1.shape} {s2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))


def frechet_distance(features_a, features_b) -> float:
    """FD between two (N, D) feature sets."""
    return frechet_distance_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


def _kth_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row."""
    if not 1 <= k < len(x):
        raise ValueError(f"k must be in [1, {len(x) - 1}] for {len(x)} samples (got {k})")
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the row itself at distance 0


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """k-NN precision (fake inside the real manifold) and recall (real inside the fake manifold)."""
    r, f = _as64(real), _as64(fake)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature sizes differ: {r.shape[1]} vs {f.shape[1]}")
    rr, rf = _kth_radius(r, k), _kth_radius(f, k)
    precision = (torch.cdist(f, r) <= rr.unsqueeze(0)).any(dim=1).double().mean()
    recall = (torch.cdist(r, f) <= rf.unsqueeze(0)).any(dim=1).double().mean()
    return float(precision), float(recall)


def vendi_score(features) -> float:
    """exp(−Σ λᵢ log λᵢ), λ the eigenvalues of K/n with K the cosine similarity of the rows."""
    x = _as64(features)
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    lam = torch.linalg.eigvalsh(x @ x.T / len(x)).clamp(min=0)
    lam = lam[lam > 1e-12]
    return float(torch.exp(-(lam * lam.log()).sum()))


def memorization(generated, training, threshold: float = 1.0 / 3.0) -> tuple[float, np.ndarray]:
    """(share of generated samples with d₁/d₂ < threshold, the ratios), d₁ and d₂ the distances to
    the nearest and second nearest training samples."""
    g, t = _as64(generated), _as64(training)
    d = torch.cdist(g, t).topk(2, dim=1, largest=False).values
    ratio = d[:, 0] / d[:, 1].clamp(min=1e-12)
    return float((ratio < threshold).double().mean()), ratio.numpy()


# at most this many similarity entries (generated rows x training rows) per block: 2^25 float64 = 256 MiB
SIMILARITY_BLOCK = 2**25


def nearest_cosine(
    generated, training, k: int = 3, *, device: str = "cpu", block: int = SIMILARITY_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices), both (N, min(k, M)): each generated row's k most similar training rows (of M) by
    cosine similarity, most similar first. Rows are L2-normalised (a zero row has similarity 0 to everything),
    so a similarity is a dot product; the products are taken for blocks of generated rows at a time, each block
    times the whole training set holding at most ``block`` entries, so 10⁴ x 10⁵ rows fit in memory."""
    g, t = _as64(generated), _as64(training)
    if g.shape[1] != t.shape[1]:
        raise ValueError(f"feature sizes differ: {g.shape[1]} vs {t.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    k = min(k, len(t))
    t = (t / t.norm(dim=1, keepdim=True).clamp(min=1e-12)).to(device)
    rows = max(1, block // len(t))
    sims, idx = [], []
    for s in range(0, len(g), rows):
        x = g[s : s + rows].to(device)
        x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
        top = (x @ t.T).clamp(-1.0, 1.0).topk(k, dim=1)
        sims.append(top.values.cpu())
        idx.append(top.indices.cpu())
    return torch.cat(sims).numpy(), torch.cat(idx).numpy()


def similarity_summary(top1, threshold: float = 0.95) -> dict[str, float]:
    """``top1_mean``, ``top1_median`` and ``share_above`` (the share of values > ``threshold``) of the
    generated samples' top-1 similarities to the training set."""
    top1 = np.asarray(top1, dtype=np.float64).reshape(-1)
    if not len(top1) or not np.isfinite(top1).all():
        raise ValueError("top-1 similarities must be a non-empty array of finite values")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"a cosine similarity threshold is in [-1, 1] (got {threshold})")
    return {
        "top1_mean": float(top1.mean()),
        "top1_median": float(np.median(top1)),
        "share_above": float((top1 > threshold).mean()),
    }
