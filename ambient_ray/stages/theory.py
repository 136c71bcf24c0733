"""``ambient-ray theory``: what Ambient-o's theory says for given numbers, checked against a 1-D simulation, and
(``--curves DATASET``) what it says about an annotated dataset.

Prints the bounds U₁(σ), U₂(σ) and their crossover σ* (:mod:`ambient_ray.theory.bounds`), simulates both algorithms
on the 1-D densities p₀, q₀ (:mod:`ambient_ray.theory.simulation`) and prints where the real TVs cross; writes
``OUT/theory.png`` (both bounds and both simulated TVs against σ, the crossovers marked) and ``OUT/theory.json``,
and logs them to MLflow (a new run each time). With ``--curves``: d_TV(p_σ, q_σ) estimated per corrupted set from
the noise classifier's curves, the fitted contraction, and σ_min as the theory reads it against what annotation
chose (``OUT/theory-curves.png``; :mod:`ambient_ray.theory.annotation`).

Where (n₁, n₂, λ₁, λ₂, d_TV, D) are not given, they come from the simulation's p₀ and q₀ (λ = max |p'|,
d_TV by quadrature, D the supports' diameter), so bare ``ambient-ray theory`` bounds and simulates the same thing.
"""

from __future__ import annotations

import json
import math
import time
from typing import Literal

from pydantic import Field, model_validator

from ambient_ray.config import Strict, flag
from ambient_ray.io.tracking import MlflowConfig


class TheoryConfig(Strict):
    """``ambient-ray theory``: the bounds, the crossover and the simulated curves."""

    n1: int = Field(100, ge=1, description="n₁: clean samples (of p₀)", json_schema_extra=flag("--n1"))
    n2: int = Field(
        900,
        ge=0,
        description="n₂: corrupted samples (of q₀); the default 100 + 900 is the paper's 10 % clean, 90 % corrupted",
        json_schema_extra=flag("--n2"),
    )
    lambda1: float | None = Field(
        None,
        ge=0,
        description="λ₁: p₀'s Lipschitz constant (None: measured on p0)",
        json_schema_extra=flag("--lambda1"),
    )
    lambda2: float | None = Field(
        None,
        ge=0,
        description="λ₂: q₀'s Lipschitz constant (None: measured on q0)",
        json_schema_extra=flag("--lambda2"),
    )
    d_tv: float | None = Field(
        None,
        ge=0,
        le=1,
        description="d_TV(p₀, q₀) before noise (None: computed from p0 and q0)",
        json_schema_extra=flag("--d-tv"),
    )
    diameter: float | None = Field(
        None,
        gt=0,
        description="D: the supports' diameter (None: that of p0 and q0)",
        json_schema_extra=flag("--diameter"),
    )
    delta: float = Field(
        0.1, gt=0, lt=1, description="δ: the bounds hold with probability 1 − δ", json_schema_extra=flag("--delta")
    )
    form: Literal["explicit", "rate"] = Field(
        "explicit",
        description="Theorem 4.1 with the proof's explicit constants, or its ≲ rate with constants 1 (the plot's; "
        "both crossovers are printed)",
        json_schema_extra=flag("--form"),
    )
    p0: str = Field(
        "triangle:lo=0,peak=0.5,hi=1",
        description="the target density: triangle:lo=,peak=,hi= | uniform:lo=,hi= | "
        "mixture:means=a/b,stds=a/b[,weights=]",
        json_schema_extra=flag("--p0", metavar="SPEC"),
    )
    q0: str = Field(
        "triangle:lo=0.25,peak=0.5,hi=0.75",
        description="the corrupted density: a spec as p0, or blurred:width=W (p0 blurred); the default is a narrower "
        "triangle with p0's mean",
        json_schema_extra=flag("--q0", metavar="SPEC"),
    )
    sigma_lo: float = Field(0.01, gt=0, description="smallest σ of the curves", json_schema_extra=flag("--sigma-lo"))
    sigma_hi: float = Field(100.0, gt=0, description="largest σ of the curves", json_schema_extra=flag("--sigma-hi"))
    points: int = Field(50, ge=3, description="σ values (log-spaced)", json_schema_extra=flag("--points"))
    seeds: int = Field(100, ge=1, description="simulated data sets per algorithm", json_schema_extra=flag("--seeds"))
    seed: int = Field(0, description="the simulation's random seed", json_schema_extra=flag("--seed"))
    curves: str | None = Field(
        None,
        description="an annotated dataset (annotate's OUT): d_TV(p_σ, q_σ) from its classifier curves",
        json_schema_extra=flag("--curves", metavar="DATASET"),
    )
    out: str = Field(".", description="where theory.png and theory.json go", json_schema_extra=flag("--out"))
    mlflow: MlflowConfig = Field(default_factory=lambda: MlflowConfig(run_name="theory"))

    @model_validator(mode="after")
    def _range(self):
        if self.sigma_hi <= self.sigma_lo:
            raise ValueError(f"sigma_hi ({self.sigma_hi}) must exceed sigma_lo ({self.sigma_lo})")
        return self


def run(cfg: TheoryConfig) -> dict:
    """Bounds, crossover, simulation (and the annotated dataset's curves); returns the summary (also theory.json)."""
    import numpy as np

    from ambient_ray.config import ConfigError
    from ambient_ray.config import flatten as flat
    from ambient_ray.io import plots, storage, tracking
    from ambient_ray.theory import annotation, bounds, densities, simulation

    t0 = time.perf_counter()
    try:
        p0 = densities.parse(cfg.p0)
        q0 = densities.parse(cfg.q0, base=p0)
    except ValueError as e:
        raise ConfigError(f"config key 'p0'/'q0': {e}") from None
    measured = {
        "lambda1": p0.lipschitz,
        "lambda2": q0.lipschitz,
        "d_tv": densities.tv(p0, q0),
        "diameter": max(p0.hi, q0.hi) - min(p0.lo, q0.lo),
    }
    given = {k: getattr(cfg, k) for k in measured}
    used = {k: given[k] if given[k] is not None else v for k, v in measured.items()}
    setting = bounds.Setting(cfg.n1, cfg.n2, delta=cfg.delta, **used)
    sig = np.geomspace(cfg.sigma_lo, cfg.sigma_hi, cfg.points)
    sim = simulation.simulate(p0, q0, cfg.n1, cfg.n2, sig, seeds=cfg.seeds, seed=cfg.seed)
    cross = {f: bounds.crossover(setting, f) for f in bounds.FORMS}
    u1, u2 = bounds.u1(sig, setting, cfg.form), bounds.u2(sig, setting, cfg.form)
    u1_kde = bounds.u1(sig, setting, "explicit")  # the one with the proof's constants: what must hold
    observed = simulation.observed_crossover(sig, sim.mean1, sim.mean2)
    summary = {
        "out": storage.normalize(cfg.out),
        "setting": {"n1": cfg.n1, "n2": cfg.n2, "delta": cfg.delta, **used, "lambda_mix": setting.lambda_mix},
        "measured_on": {k: ("given" if given[k] is not None else "p0/q0") for k in measured},
        "p0": p0.name,
        "q0": q0.name,
        "form": cfg.form,
        "sigmas": sig.tolist(),
        "u1": u1.tolist(),
        "u2": u2.tolist(),
        "vacuous_below": {  # the largest σ at which each bound is still ≥ 1
            "u1": _last(sig, bounds.vacuous(u1)),
            "u2": _last(sig, bounds.vacuous(u2)),
        },
        "crossover": {f: _num(c.sigma) for f, c in cross.items()},
        "crossover_roots": {f: list(c.roots) for f, c in cross.items()},
        "simulated": {
            "seeds": cfg.seeds,
            "tv1": sim.mean1.tolist(),
            "tv2": sim.mean2.tolist(),
            "wins2": sim.wins2.tolist(),
            "bias": sim.bias.tolist(),
            "tv_pq": sim.tv_pq.tolist(),
            "crossover": _num(observed),
            "kde_bound_violations": float((sim.tv1 > u1_kde).mean(axis=0).max()),
            "u1_over_tv1": _ratio_range(u1, sim.mean1),
            "u2_over_tv2": _ratio_range(u2, sim.mean2),
        },
    }
    files = {
        "theory.png": plots.theory_plot(
            sig,
            {f"U₁ ({cfg.form})": u1, f"U₂ ({cfg.form})": u2},
            {"Algorithm 1 (simulated)": sim.mean1, "Algorithm 2 (simulated)": sim.mean2},
            {f"bound σ* ({cfg.form})": cross[cfg.form].sigma, "simulated σ*": observed},
            title=f"n₁={cfg.n1}, n₂={cfg.n2}, p₀={p0.name}, q₀={q0.name}",
        )
    }
    if cfg.curves:
        try:
            found = annotation.read(cfg.curves)
        except ValueError as e:
            raise ConfigError(f"config key 'curves': {e}") from None
        summary["curves"] = found.to_dict()
        files["theory-curves.png"] = plots.tv_curves_plot(found)
    marker = storage.join(cfg.out, "mlflow_run.json")
    if storage.exists(marker):  # each call is a new run: the theory has nothing to resume
        storage.delete(marker)
    with tracking.run(cfg.mlflow, cfg.out, params=flat(cfg)) as handle:
        summary["mlflow_run_id"], summary["mlflow_uri"] = handle.run_id, handle.uri
        summary["seconds"] = time.perf_counter() - t0
        files["theory.json"] = json.dumps(summary, indent=1, default=_num).encode()
        for name, data in files.items():
            storage.write_bytes(storage.join(cfg.out, name), data)
        metrics = {f"crossover_{f}": c.sigma for f, c in cross.items() if math.isfinite(c.sigma)} | used
        if math.isfinite(observed):
            metrics["crossover_simulated"] = observed
        tracking.log_metrics(handle.run_id, handle.uri, metrics)
        for i in range(len(sig)):  # the curves against σ, one step per σ (σ itself as a metric)
            values = {"sigma": sig[i], "u1": u1[i], "u2": u2[i], "tv1_simulated": sim.mean1[i]}
            values["tv2_simulated"] = sim.mean2[i]
            tracking.log_metrics(handle.run_id, handle.uri, {k: float(v) for k, v in values.items()}, step=i)
        tracking.log_files(handle.run_id, handle.uri, files)
    return summary


def _num(v):
    """JSON-safe numbers: inf as the string 'inf'."""
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else "-inf"
    return float(v) if hasattr(v, "__float__") else v


def _last(sig, flags) -> float:
    import numpy as np

    idx = np.flatnonzero(flags)
    return float(sig[idx[-1]]) if idx.size else 0.0


def _ratio_range(bound, simulated) -> list[float]:
    """[min, max] of bound ÷ simulated TV over the σ where the bound is not vacuous (how far apart they are)."""
    import numpy as np

    b, s = np.asarray(bound), np.asarray(simulated)
    sel = (b < 1) & (s > 0)
    return [float((b[sel] / s[sel]).min()), float((b[sel] / s[sel]).max())] if sel.any() else []
