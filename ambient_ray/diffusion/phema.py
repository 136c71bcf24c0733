"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", Sec. 3 and App. C), written from the paper's math. Pure numpy/torch.

**The profile.** A power-function EMA at time t averages the training trajectory θ(τ), 0 ≤ τ ≤ t, with the
weight profile p(τ; γ, t) = (γ+1) τ^γ / t^(γ+1). Its relative standard deviation (std of τ under p, over t) is
σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3))) (:func:`sigma_rel`; :func:`gamma_of` inverts it on the branch
γ > (√5 − 3)/2, where σ_rel falls from its maximum 0.3003 to 0 as γ grows).

**Time is in optimizer steps** throughout: θ_τ are the weights after step τ = 1, 2, ..., and the update after
step t is θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t with β_t = (1 − 1/t)^(γ+1) (:func:`power_beta`; β_1 = 0, so the
initial weights get no weight). Unrolled, θ_τ's weight in θ̂_t is w_τ = (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1)
(:func:`discrete_profile`): exactly the integral of p over (τ−1, τ]. The discrete EMA *is* the continuous
one of the piecewise-constant trajectory, with no approximation.

**Post hoc** (Sec. 3.2): snapshots θ̂_i of profiles (γ_i, t_i) approximate a target (γ_r, t_r) by the
least-squares combination Σ x_i θ̂_i that makes Σ x_i w_i closest to w_r: A x = b, A_ij = ⟨w_i, w_j⟩,
b_i = ⟨w_i, w_r⟩ (:func:`solve`), here with Σ x_i = 1 added (a plain solve leaves the sum free, and a sum off
1 scales the weights themselves, which on a short run costs more than the whole profile mismatch). The inner
products here are the **exact discrete ones over steps**
(:func:`gram`), not the continuous integral: with a = γ+1, for two profiles at times s ≤ t the later one is the
earlier one scaled, w^(t)(τ) = (s/t)^a w^(s)(τ) for τ ≤ s, so every inner product is a scaled
G_ab(T) = Σ_{τ≤T} w_a^(T)(τ) w_b^(T)(τ), and one pass over τ (a running log-sum-exp) gives G_ab at every T.
The continuous closed form ⟨p_i, p_j⟩ = a_i a_j T^(a_i+a_j−1) / ((a_i+a_j−1) t_i^(a_i) t_j^(a_j)), T = min(t_i,
t_j) (:func:`inner_continuous`) is what the discrete one tends to for large t (relative difference O(1/t)).

:func:`combine` applies the weights to snapshot tensors one tensor at a time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

GAMMA_AT_MAX = (math.sqrt(5) - 3) / 2  # argmax of σ_rel(γ): (γ+1)² + (γ+1) − 1 = 0
SIGMA_REL_MAX = math.sqrt((GAMMA_AT_MAX + 1) / ((GAMMA_AT_MAX + 2) ** 2 * (GAMMA_AT_MAX + 3)))  # 0.30028


def sigma_rel(gamma: float) -> float:
    """σ_rel of the power profile with exponent γ (Sec. 3.1)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(std: float) -> float:
    """The exponent γ with σ_rel(γ) = ``std`` (bisection to float precision on γ > γ at σ_rel's maximum)."""
    if not 0 < std < SIGMA_REL_MAX:
        raise ValueError(f"a power-function EMA's σ_rel is in (0, {SIGMA_REL_MAX:.4f}); got {std}")
    lo, hi = GAMMA_AT_MAX, 1.0
    while sigma_rel(hi) > std:  # σ_rel ~ γ^-1 for large γ
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if sigma_rel(mid) > std else (lo, mid)
    return (lo + hi) / 2


def power_beta(gamma: float, step: int) -> float:
    """β_t = (1 − 1/t)^(γ+1): the decay of the update after optimizer step t ≥ 1."""
    if step < 1:
        raise ValueError(f"steps count from 1; got {step}")
    return (1 - 1 / step) ** (gamma + 1)


def discrete_profile(gamma: float, t: int) -> np.ndarray:
    """w_τ, τ = 1..t: the weight of the weights after step τ in the power EMA after step t (sums to 1)."""
    a = gamma + 1
    tau = np.arange(t + 1, dtype=np.float64) / t
    return np.diff(tau**a)


def inner_continuous(gi: float, ti: float, gj: float, tj: float) -> float:
    """⟨p(·; γ_i, t_i), p(·; γ_j, t_j)⟩ = ∫ p_i p_j dτ in closed form (time in the same unit as t)."""
    ai, aj, T = gi + 1, gj + 1, min(ti, tj)
    return ai * aj / (ai + aj - 1) * T ** (ai + aj - 1) / (ti**ai * tj**aj)


@functools.lru_cache(maxsize=8)
def _log_increments(a: float, n: int) -> np.ndarray:
    """log(τ^a − (τ−1)^a) for τ = 1..n, without overflow: a·log τ + log(1 − (1 − 1/τ)^a)."""
    tau = np.arange(1, n + 1, dtype=np.float64)
    out = np.zeros(n)
    if n > 1:
        t = tau[1:]
        out[1:] = a * np.log(t) + np.log(-np.expm1(a * np.log1p(-1 / t)))
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=16)
def _self_products(a: float, b: float, n: int) -> np.ndarray:
    """G_ab(T) = Σ_{τ≤T} w_a^(T)(τ) w_b^(T)(τ) for T = 1..n (index T − 1), by a running log-sum-exp
    (cached: :func:`solve` asks for each pair of exponents three times; the array is read-only)."""
    acc = np.logaddexp.accumulate(_log_increments(a, n) + _log_increments(b, n))
    out = np.exp(acc - (a + b) * np.log(np.arange(1, n + 1, dtype=np.float64)))
    out.flags.writeable = False
    return out


def gram(profiles: Sequence[tuple[float, int]], others: Sequence[tuple[float, int]] | None = None) -> np.ndarray:
    """The exact discrete inner products ⟨w_i, w_j⟩ over steps between ``profiles`` (rows) and ``others``
    (columns; default ``profiles``), each given as (γ, t) with t ≥ 1 an integer step."""
    others = profiles if others is None else others
    ai, ti = (np.array(v, dtype=np.float64) for v in zip(*profiles))
    aj, tj = (np.array(v, dtype=np.float64) for v in zip(*others))
    ai, aj = ai + 1, aj + 1
    if (np.concatenate([ti, tj]) < 1).any() or (np.round(ti) != ti).any() or (np.round(tj) != tj).any():
        raise ValueError("profile times are whole optimizer steps >= 1")
    T = np.minimum.outer(ti, tj)
    n = int(T.max())
    G = np.empty_like(T)
    for a in np.unique(ai):  # one pass over τ per pair of exponents
        for b in np.unique(aj):
            here = (ai[:, None] == a) & (aj[None, :] == b)
            if here.any():
                G[here] = _self_products(min(a, b), max(a, b), n)[T[here].astype(np.int64) - 1]
    return (T / ti[:, None]) ** ai[:, None] * (T / tj[None, :]) ** aj[None, :] * G


def solve(snapshots: Sequence[tuple[float, int]], target: tuple[float, int]) -> tuple[np.ndarray, float]:
    """Least-squares weights x (Sec. 3.2) of the snapshot profiles (γ_i, t_i) for the target (γ_r, t_r), and the
    relative residual ‖Σ x_i w_i − w_r‖ / ‖w_r‖ of the profile fit (0: exact; 1: nothing of it).

    The weights are constrained to sum to 1 (every profile sums to 1, so then does the fit): a constant
    trajectory is reconstructed exactly, and the error of a reconstruction is Σ_τ Δw_τ (θ_τ − c) for any c,
    bounded by ‖Δw‖₁ · max_τ |θ_τ − θ_t| (the drift of the weights, not their size). Solved through the KKT
    system [[A, 1], [1ᵀ, 0]] [x; λ] = [b; 1] with least squares (minimum norm where nearby snapshots make A
    close to singular)."""
    if not snapshots:
        raise ValueError("no snapshots to reconstruct from")
    n = len(snapshots)
    A = gram(snapshots)
    b = gram(snapshots, [target])[:, 0]
    c = gram([target])[0, 0]
    scale = np.abs(A).max()  # the constraint row on the scale of A, for the conditioning of the solve
    K = np.block([[A, np.full((n, 1), scale)], [np.full((1, n), scale), np.zeros((1, 1))]])
    x = np.linalg.lstsq(K, np.concatenate([b, [scale]]), rcond=None)[0][:n]
    resid2 = float(x @ A @ x - 2 * x @ b + c)
    return x, math.sqrt(max(resid2, 0.0) / c)


def combine(
    names: Sequence[str], sources: Sequence[Callable[[str], torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Σ_i weights[i] · sources[i](name) for each name, summed in float64 one tensor at a time (each source
    gives one tensor of one snapshot, e.g. a safetensors ``safe_open(...).get_tensor``); fp32 results."""
    if len(sources) != len(weights):
        raise ValueError(f"{len(weights)} weights for {len(sources)} snapshots")
    out = {}
    for name in names:
        acc = None
        for get, x in zip(sources, weights):
            t = get(name).double() * float(x)
            acc = t if acc is None else acc.add_(t)
        out[name] = acc.float()
    return out
