"""Config and driver side of ``ambient-ray distill``: Denoising Score Distillation's Phase II (seed paper 004,
Sec. 3.2, on SiD's generator loss) of any denoiser ambient-ray trains into a one-step generator.

The driver reads the teacher's ``model.json`` (any ``ddpmpp``, ``edm2`` or ``dit`` denoiser, of pixels or
latents), resolves σ_n (``distill.sigma_n``, else the teacher's ``noisy.sigma_n`` from Phase I, else each data
row's ``sigma_n`` or σ_min annotation), and hands the workers the rows' labels and σ_n (the data batch is used only
for them, as in the reference), or none: a run without ``data`` draws labels uniformly and takes one σ_n.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
from pydantic import Field

from ambient_ray.config import ConfigError, Strict, flag
from ambient_ray.train.config import EngineConfig, OptimConfig, data_field
from ambient_ray.train.prepared import Prepared


class DistillSection(Strict):
    """DSD's Phase II knobs (docs/stages/distill.md)."""

    way: Literal["auto", "adjusted", "standard"] = Field(
        "auto",
        description="how the fake score and the generator see G's samples corrupted to σ_n, ỹ = G(z) + σ_n·ε (DSD "
        "Sec. 3.2): adjusted, the fake score graded by the Phase-I loss and the generator step on G(z); standard, the "
        "EDM loss on ỹ and the generator step on ỹ (σ_n = 0: plain SiD either way); auto: the teacher's Phase-I way "
        "(noisy.way in its model.json), else adjusted",
        json_schema_extra=flag("--way", choices=("auto", "adjusted", "standard")),
    )
    sigma_n: float | None = Field(
        None,
        ge=0,
        description="the adjusted way's σ_n (the [-1, 1] data scale); default: the teacher's (noisy.sigma_n of a "
        "Phase-I teacher), else each data row's sigma_n or σ_min annotation",
        json_schema_extra=flag("--sigma-n"),
    )
    alpha: float = Field(1.2, description="α of SiD's generator loss (SiD, DSD: 1.2; 0.5-1.0 for other domains)")
    sigma_init: float = Field(2.5, gt=0, description="σ_init: G(z) = D(σ_init·z; σ_init) (DSD, SiD)")
    t_max: float = Field(
        0.8, gt=0, le=1, description="the generator step's σ: t ~ U[0, t_max] on the EDM ρ=7 schedule (σ ≤ ≈24.4)"
    )
    fake_lr: float | None = Field(None, gt=0, description="the fake score's learning rate (default: optim.lr)")
    p_mean: float = Field(-1.2, description="the fake-score step's σ: the log-normal's mean of ln σ")
    p_std: float = Field(1.2, gt=0, description="the fake-score step's σ: the standard deviation of ln σ")
    teacher_weights: Literal["ema", "raw"] = Field("ema", description="the teacher's weights (all three start there)")
    eval_every: int = Field(
        0,
        ge=0,
        description="every this many steps (a multiple of log_every's reporting steps), proximal FD: the EMA "
        "generator's samples re-noised to σ_n against the noisy training rows (0: off)",
    )
    eval_images: int = Field(256, ge=8, description="samples (and noisy rows at most) of each proximal FD")
    eval_reference: str | None = Field(
        None,
        description="clean rows (a dataset) to measure FD against beside proximal FD at each evaluation (an "
        "experiment's check of the pick; real noisy data has none)",
    )
    features: str = Field(
        "pixels",
        description="the feature spec of proximal FD (pixels, net@FOLDER, inception@WEIGHTS: evaluate's features)",
    )


class DistillOptim(OptimConfig):
    """The generator's optimizer, with SiD's and DSD's defaults: Adam, lr 1e-5, no warm-up, decay or clipping."""

    lr: float = Field(1e-5, gt=0, description="learning rate (SiD/DSD: 1e-5; AFHQ 5e-6)")
    betas: tuple[float, float] = Field((0.0, 0.999), description="Adam's (β₁, β₂) (CIFAR: β₁ 0; FFHQ/CelebA: 0.9)")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear learning-rate warm-up (0: none)")
    name: Literal["adamw", "adam"] = Field("adam", description="optimizer")
    decay: Literal["none", "cosine", "linear", "inv_sqrt"] = Field("none", description="learning-rate schedule")
    grad_clip: float = Field(0.0, ge=0, description="0 disables clipping (SiD clips none)")


class DistillConfig(EngineConfig):
    """Config of ``ambient-ray distill`` (the engine's keys, the teacher, the ``distill`` section)."""

    teacher: str = Field(
        ...,
        description="the teacher: an 'ambient-ray train' output (or its model folder) of any objective and arch",
        json_schema_extra=flag("--teacher"),
    )
    data: str | None = data_field(required=False)
    objective: str = Field("distill", description="the training objective: distill (the only one here)")
    distill: DistillSection = Field(default_factory=DistillSection)
    optim: DistillOptim = Field(
        default_factory=DistillOptim,
        description="the generator's optimizer; the fake score takes the same with β₁ 0 and distill.fake_lr",
    )
    sample_grid: int = Field(16, ge=0, description="one-step samples drawn from the EMA generator at the end (0: none)")


@dataclasses.dataclass
class DistillRows:
    """What the workers of a distillation get: the teacher (its model folder and ``model.json``), the σ_n of a
    run without rows, and with ``data`` each row's class label and σ_n (by id)."""

    teacher: str
    teacher_meta: dict
    sigma_n: float
    labels: dict[str, int] | None = None
    row_sigma_n: dict[str, float] | None = None
    reference: str | None = None  # the noisy rows of proximal FD (the data), or None


def teacher_sigma_n(meta: dict) -> float | None:
    noisy = meta.get("noisy") or {}
    return float(noisy["sigma_n"]) if noisy.get("sigma_n") else None


def prepare(cfg: DistillConfig) -> Prepared:
    """The driver side: the teacher (a denoiser, not itself a generator), σ_n, the rows' labels and σ_n."""
    from ambient_ray.io import storage
    from ambient_ray.models import registry, weights
    from ambient_ray.train.tasks.denoiser_data import denoiser_costs

    # absolute: the workers run elsewhere (their own folder) and read the teacher, the rows, and write OUT/picked
    cfg.out = storage.normalize(cfg.out)
    cfg.data = storage.normalize(cfg.data) if cfg.data else None
    if cfg.distill.eval_reference:
        cfg.distill.eval_reference = storage.normalize(cfg.distill.eval_reference)
    try:
        d, tmeta = weights.model_dir(cfg.teacher)
    except FileNotFoundError as e:
        raise ConfigError(f"config key 'teacher': {e}") from None
    if tmeta.get("kind", "denoiser") != "denoiser":
        raise ConfigError(f"config key 'teacher': {d} holds a {tmeta.get('kind')}, not a denoiser")
    if tmeta.get("one_step"):
        raise ConfigError(f"config key 'teacher': {d} is already a distilled one-step generator")
    if tmeta.get("masked"):
        raise ConfigError(f"config key 'teacher': {d} is a network of masked data (it takes a mask); not supported")
    d_cfg = cfg.distill
    if d_cfg.way == "auto":  # the teacher's way (a Phase-I teacher says which), else DSD's default
        d_cfg.way = (tmeta.get("noisy") or {}).get("way", "adjusted")
    sigma_n = d_cfg.sigma_n if d_cfg.sigma_n is not None else teacher_sigma_n(tmeta)
    rows = DistillRows(d, tmeta, float(sigma_n or 0.0))
    label_dim = int(tmeta["model"].get("label_dim", 0) or 0)
    if registry.takes_captions(registry.arch_of(tmeta)) and not cfg.data:
        raise ConfigError("config key 'data': a teacher of captions distils on the rows' caption embeddings")
    how = f"teacher {d} ({registry.arch_of(tmeta)})"
    columns: list[str] = []
    if cfg.data:
        from ambient_ray.data.metadata import load_metadata
        from ambient_ray.data.noisy import noisy_shape
        from ambient_ray.train.tasks.denoiser_config import TrainConfig
        from ambient_ray.train.tasks.denoiser_data import resolve_sigmas

        meta = load_metadata(cfg.data, ("sigma_n",) if noisy_shape(cfg.data) is not None else ())
        ids = meta["id"].tolist()
        if "sigma_n" in meta:
            sn = meta["sigma_n"].to_numpy(dtype=np.float64, na_value=0.0)
        else:  # Ambient-o's σ_min annotations: the noise level above which a row is trusted
            probe = TrainConfig.model_validate({"data": cfg.data, "out": cfg.out})
            sn = resolve_sigmas(meta, probe)[0].astype(np.float64)
        if d_cfg.sigma_n is not None:
            sn = np.where(sn > 0, d_cfg.sigma_n, 0.0)
        rows.row_sigma_n = dict(zip(ids, sn.tolist()))
        if label_dim:
            rows.labels = dict(zip(ids, meta["label"].fillna(0).astype(int).tolist())) if "label" in meta else None
        rows.reference = cfg.data if (sn > 0).any() else None
        if registry.takes_captions(registry.arch_of(tmeta)):
            columns = ["id", "caption_emb", "caption_mask"]
        how += f"; {len(ids)} rows of {cfg.data} ({int((sn > 0).sum())} with σ_n > 0)"
        rows.sigma_n = float(np.median(sn[sn > 0])) if (sn > 0).any() else rows.sigma_n
    known = rows.sigma_n > 0 or (rows.row_sigma_n and max(rows.row_sigma_n.values()) > 0)
    if d_cfg.way == "adjusted" and not known:
        raise ConfigError(
            "config key 'distill.way': the adjusted way re-noises the generator's samples to σ_n, and none is known "
            "(the teacher is no Phase-I teacher and no data row has σ_n): set distill.sigma_n or --way standard"
        )
    how += f"; {d_cfg.way} way, σ_n = {rows.sigma_n:g}" + (" (plain SiD)" if not known else "")
    if d_cfg.eval_every and tmeta.get("latents"):
        raise ConfigError(
            "config key 'distill.eval_every': proximal FD re-noises pixels to σ_n, and this teacher generates VAE "
            "latents; evaluate the decoded samples with 'ambient-ray evaluate' instead"
        )
    if d_cfg.eval_every and not rows.reference:
        raise ConfigError("config key 'distill.eval_every': proximal FD needs the noisy training rows: set data")
    from ambient_ray.train.tasks.distill import generator_meta

    gmeta = generator_meta(cfg, rows)
    return Prepared(
        meta=gmeta,
        rows=rows,
        columns=columns,
        tags={"teacher": d, "way": d_cfg.way},
        headline=f"distill: {how}",
        extra={"teacher": d, "way": d_cfg.way, "sigma_n": rows.sigma_n},
        costs=denoiser_costs(tmeta) if cfg.mlflow.enabled else None,
        parts={"fake_score": tmeta},
        params={"sigma_n": rows.sigma_n},
    )
