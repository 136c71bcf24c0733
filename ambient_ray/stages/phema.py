"""The phema stage: post-hoc EMA (EDM2 Sec. 3.2) from the power-EMA snapshots a training run wrote.

A run trained with ``ema: power`` writes every ``ema_snapshot_every`` images, for each tracked profile,
``OUT/phema/<std>-<step, 10 digits>.safetensors`` (:func:`ambient_ray.io.snapshots.write_snapshot`): the full EMA
of that profile after that optimizer step, with the profile (σ_rel, γ) and the time (step, images, global batch) in
the safetensors metadata. ``ambient-ray phema --run OUT --std S [--at STEP] --out DIR`` solves for the
least-squares combination of the snapshots (at steps ≤ ``at``) whose averaging profile is closest to the power
profile of σ_rel ``S`` at step ``at`` (:func:`ambient_ray.diffusion.phema.solve`; exact inner products over steps),
refuses a fit that leaves more than ``max_residual`` of the profile unexplained, and writes ``DIR/ema.safetensors``
(the combination, summed one tensor at a time), ``DIR/model.json`` (the run's) and ``DIR/phema.json`` (the weights
used), so ``ambient-ray sample --checkpoint DIR`` draws from it.
"""

from __future__ import annotations

import json
import os
import tempfile

from pydantic import Field

from ambient_ray.config import ConfigError, Strict, csv, flag
from ambient_ray.io import storage
from ambient_ray.io.snapshots import list_snapshots


class PhemaConfig(Strict):
    """Config of ``ambient-ray phema``."""

    run: str = Field(
        ...,
        description="training output folder of a run with ema: power (its phema/ snapshots)",
        json_schema_extra=flag("--run"),
    )
    std: float = Field(..., gt=0, description="σ_rel of the EMA to reconstruct", json_schema_extra=flag("--std"))
    at: int | None = Field(
        None,
        ge=1,
        description="the optimizer step to reconstruct the EMA at (default: the last snapshot's)",
        json_schema_extra=flag("--at"),
    )
    out: str = Field(
        ..., description="output folder (ema.safetensors, model.json, phema.json)", json_schema_extra=flag("--out")
    )
    profiles: list[float] | None = Field(
        None,
        description="use only the snapshots of these tracked σ_rel (default: all)",
        json_schema_extra=flag("--profiles", "comma-separated σ_rel, e.g. 0.05,0.1", parse=csv(float)),
    )
    max_residual: float = Field(
        0.05,
        gt=0,
        description="refuse a reconstruction whose profile fit leaves more than this relative L2 residual",
    )


# ------------------------------------------------------------------------------ the stage


def choose(cfg: PhemaConfig, snaps: list[dict]) -> tuple[list[dict], int, list[float], float]:
    """The snapshots used, the target step, their weights and the fit's relative residual (ConfigErrors name the
    key that cannot be met)."""
    from ambient_ray.diffusion import phema

    where = storage.join(storage.normalize(cfg.run), "phema")
    if not snaps:
        raise FileNotFoundError(f"no power-EMA snapshots in {where} (train with ema: power and ema_snapshot_every set)")
    tracked = sorted({s["std"] for s in snaps})
    if cfg.profiles is not None:
        missing = [p for p in cfg.profiles if not any(abs(p - t) < 1e-9 for t in tracked)]
        if missing:
            raise ConfigError(f"config key 'profiles': {missing} not tracked; the run has snapshots of {tracked}")
        snaps = [s for s in snaps if any(abs(p - s["std"]) < 1e-9 for p in cfg.profiles)]
    if not 0 < cfg.std < phema.SIGMA_REL_MAX:
        raise ConfigError(f"config key 'std': {cfg.std} is no power-function EMA's σ_rel (0 < σ_rel < 0.3003)")
    last = max(s["step"] for s in snaps)
    at = last if cfg.at is None else cfg.at
    if at > last:
        raise ConfigError(f"config key 'at': step {at} is after the last snapshot (step {last}) in {where}")
    used = [s for s in snaps if s["step"] <= at]
    if not used:
        raise ConfigError(
            f"config key 'at': no snapshot at or before step {at} (the first is at step "
            f"{min(s['step'] for s in snaps)})"
        )
    gamma = phema.gamma_of(cfg.std)
    x, resid = phema.solve([(s["gamma"], s["step"]) for s in used], (gamma, at))
    if resid > cfg.max_residual:
        raise ConfigError(
            f"config key 'std': σ_rel {cfg.std} at step {at} is not representable by the {len(used)} snapshots of "
            f"{sorted({s['std'] for s in used})} (relative residual of the profile fit {resid:.3g} > max_residual "
            f"{cfg.max_residual}); choose a σ_rel nearer the tracked ones, snapshot more often, or raise max_residual"
        )
    return used, at, [float(v) for v in x], resid


def model_json(run: str) -> bytes:
    """The run's ``model.json`` (its exported ``model/``, else its latest checkpoint's)."""
    from ambient_ray.io.checkpoint import latest_checkpoint
    from ambient_ray.models.weights import model_dir

    try:
        d, _ = model_dir(run)
        return storage.read_bytes(storage.join(d, "model.json"))
    except FileNotFoundError:
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            raise FileNotFoundError(f"no model.json in {run}: neither an exported model/ nor a checkpoint") from None
        return storage.read_bytes(storage.join(ckpt, "model.json"))


def run(cfg: PhemaConfig) -> dict:
    """Reconstruct and write; returns a summary (out, std, gamma, at, residual, weights per snapshot)."""
    from safetensors import safe_open
    from safetensors.torch import save

    from ambient_ray.diffusion import phema

    out = storage.normalize(cfg.out)
    storage.check_reachable(out)
    used, at, x, resid = choose(cfg, list_snapshots(cfg.run))
    meta_json = model_json(cfg.run)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, s in enumerate(used):  # local files are memory-mapped; S3 ones copied to disk, one at a time
            if storage.is_s3(s["uri"]):
                path = os.path.join(tmp, f"{i}.safetensors")
                with open(path, "wb") as f:
                    f.write(storage.read_bytes(s["uri"]))
            else:
                path = storage.filesystem(s["uri"])[1]
            files.append(safe_open(path, framework="pt"))
        names = list(files[0].keys())
        for s, f in zip(used, files):
            if sorted(f.keys()) != sorted(names):
                raise ValueError(f"{s['uri']} holds other tensors than {used[0]['uri']}: snapshots of two models?")
        ema = phema.combine(names, [f.get_tensor for f in files], x)
        del files
    gamma = phema.gamma_of(cfg.std)
    summary = {
        "out": out,
        "run": storage.normalize(cfg.run),
        "std": cfg.std,
        "gamma": gamma,
        "at": at,
        "residual": resid,
        "weights": [{"std": s["std"], "step": s["step"], "weight": w, "snapshot": s["uri"]} for s, w in zip(used, x)],
    }
    info = {"std": repr(cfg.std), "gamma": repr(gamma), "step": str(at), "residual": repr(resid)}
    storage.write_bytes(storage.join(out, "ema.safetensors"), save(ema, metadata={"ema": "phema", **info}))
    storage.write_bytes(storage.join(out, "model.json"), meta_json)
    storage.write_bytes(storage.join(out, "phema.json"), json.dumps(summary, indent=1).encode())
    return summary
