"""The masked experiment: Ambient Diffusion (Daras et al. 2023, seed paper 003) at our scale, through the stages.

``ambient-ray experiment-masked --config jobs/configs/experiment_masked.yaml --out URI``
(``python -m jobs.experiment --config jobs/configs/experiment_masked.yaml --out URI`` runs the same: the config's
``kind: masked`` picks this stage)

The dataset is split once into a training part and a held-out part, as in the experiment stage
(:mod:`ambient_ray.workflows.experiment`, whose runner, fingerprints, MLflow tree and statistics this reuses). For
every seed and every missing probability p, ``corrupt`` hides each pixel of every training image with probability
p (``mask:p=P``: a ``mask`` column, the hidden pixels zeroed). Arms, with the same network, optimiser and steps
(the ``train`` section is shared):

- ``ambient``: ``objective: masked`` with δ > 0 (``delta``; ``delta_per_p`` per p: the paper's 0.3 at p = 0.9):
  each observed pixel is hidden once more and graded all the same (Eq. 3.2);
- ``naive``: ``objective: masked`` with δ = 0: graded on the observed pixels it sees, nothing to learn the hidden
  ones from;
- ``oracle``: the clean training part, the plain EDM loss; once per seed, not per p.

Each model of a masked arm is sampled with every sampler in ``samplers`` (``fixed-mask``, Eq. 3.3;
``reconstruction-guidance``, Eq. 3.4); the oracle with ``oracle_sampler`` (Heun). Every (model, sampler) is
evaluated: FD against the clean training part and against the held-out part, k-NN precision and recall, and the
memorization test (each sample's top-1 cosine similarity to the clean training images in
``memorization.features``, and the share above ``memorization.threshold``).

The ``memorization`` block trains on a small training set (the first ``memorization.rows`` images of the training
part), long enough (``memorization.train``: its own keys over the train section) that plain training on the
clean images copies them: its ``clean`` arm (plain loss, ``oracle_sampler``) against ``ambient`` at each of its
p (``memorization.sampler``), the similarity taken to those clean images, the held-out part as the no-copy
baseline.

Outputs under OUT: ``prep/`` (clean splits, features, the small clean set), ``seed-<s>/p-<p>/`` (masked data),
``seed-<s>/memorization/p-<p>/``, ``runs/p-<p>/<arm>/seed-<s>/`` and ``runs/oracle/seed-<s>/`` (``train``,
``samples-<sampler>``, ``eval-<sampler>``, ``result.json``), ``runs/memorization/...``, ``results.json``,
``results.md`` (mean ± standard error over seeds per (p, arm, sampler); ambient − naive paired by seed; the
memorization table) and ``results.png`` (FD against p per arm and sampler; copies against p). MLflow: one
parent run, one child run per trained model (its metrics as ``METRIC.SAMPLER``) with its stage runs under it.
A re-run skips every finished step (the experiment stage's done-markers and fingerprints).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from ambient_ray import config as cfgmod
from ambient_ray.config import Strict, csv, flag
from ambient_ray.io import shards, storage, tracking
from ambient_ray.io.tracking import MlflowConfig
from ambient_ray.stages import registry
from ambient_ray.workflows import chain, experiment

ARMS: tuple[str, ...] = ("ambient", "naive", "oracle")
MASKED_SAMPLERS: tuple[str, ...] = ("fixed-mask", "reconstruction-guidance")
MAIN, MEMO = "main", "memorization"  # the two blocks of arms
TABLE_METRICS = ("fd", "fd_holdout", "precision", "recall", "memorization_top1_mean", "memorization_share_above")
MEMO_METRICS = ("memorization_top1_mean", "memorization_share_above", "holdout_share_above", "fd")


def _probabilities(v: list[float]) -> list[float]:
    bad = [p for p in v if not 0.0 < p < 1.0]
    if bad:
        raise ValueError(f"a missing probability is in (0, 1): got {bad}")
    return experiment.unique(v)


class MemorizationBlock(Strict):
    """The memorization arms: a small training set, trained long, clean against ambient at each p."""

    run: bool = Field(True, description="run the memorization block (false: the main arms alone)")
    rows: int = Field(
        100,
        ge=8,
        description="training images: the first this many of the training part (clean and masked; at 100 digits "
        "and 800 steps the clean arm copied 51 % of its samples, at 300 digits and 1,000 steps 7 %)",
    )
    p: list[float] | None = Field(
        None, description="missing probabilities of its ambient arms (default: the experiment's p; []: clean alone)"
    )
    seeds: list[int] | None = Field(None, description="its seeds (default: the experiment's seeds)")
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="keys of 'ambient-ray train' over the train section for this block (steps: long enough "
        "that the clean arm copies its training images)",
    )
    samples: int = Field(200, ge=2, description="samples per (arm, seed) of this block")
    sampler: str = Field("fixed-mask", description="the sampler of its ambient arms (one of the masked samplers)")
    features: str = Field(
        "pixels",
        description="feature spec of the similarity test of both blocks (evaluate's memorization.features): "
        "pixels, net@FOLDER, dinov2@WEIGHTS, ...",
    )
    threshold: float = Field(
        0.98,
        ge=-1.0,
        le=1.0,
        description="a sample whose top-1 cosine similarity to the training images is above this counts as a "
        "copy (both blocks; 0.98 in pixels of the 8x8 digits: about 1 % of held-out digits against 100 "
        "training images, 15 % against 1,438; the paper's 0.95 is for DINOv2 features)",
    )

    @field_validator("p")
    @classmethod
    def _p(cls, v: list[float] | None) -> list[float] | None:
        return None if v is None else _probabilities(v)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        return None if v is None else experiment.unique(v)

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str) -> str:
        if v not in MASKED_SAMPLERS:
            raise ValueError(f"the ambient arms sample with a masked sampler: one of {', '.join(MASKED_SAMPLERS)}")
        return v


class MaskedExperimentConfig(Strict):
    """Config of ``ambient-ray experiment-masked``; the stage sections hold keys of those stages' configs."""

    kind: Literal["masked"] = Field(
        "masked",
        description="the experiment's kind: 'python -m jobs.experiment' runs a config with kind: masked as this stage",
    )
    dataset: str = Field(
        "digits", description="built-in name or URI of the clean images", json_schema_extra=flag("--dataset")
    )
    p: list[float] = Field(
        default_factory=lambda: [0.4, 0.6, 0.8, 0.9],
        min_length=1,
        description="probabilities that a pixel is missing (corrupt's mask:p=P), one masked dataset per p and seed",
        json_schema_extra=flag("--p", "comma-separated missing probabilities, e.g. 0.4,0.8", parse=csv(float)),
    )
    delta: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="δ of the ambient arms (train's masked.delta): each observed pixel hidden again with this "
        "probability (the naive arm: 0)",
        json_schema_extra=flag("--delta"),
    )
    delta_per_p: dict[float, float] = Field(
        default_factory=lambda: {0.9: 0.3},
        description="δ at a given p, over delta (the paper: 0.3 at p = 0.9)",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="every arm runs once per seed (its own masks and model); the tables report mean ± standard "
        "error over them",
        json_schema_extra=flag("--seeds", "comma-separated seeds, e.g. 0,1,2", parse=csv(int)),
    )
    arms: list[str] = Field(
        default_factory=lambda: list(ARMS),
        description="arms of the main block, of " + ", ".join(ARMS) + " ([]: the memorization block alone)",
        json_schema_extra=flag("--arms", "comma-separated arms: " + ",".join(ARMS), parse=csv()),
    )
    samplers: list[str] = Field(
        default_factory=lambda: list(MASKED_SAMPLERS),
        min_length=1,
        description="samplers of the ambient and naive models, each evaluated: " + ", ".join(MASKED_SAMPLERS),
        json_schema_extra=flag("--samplers", "comma-separated: " + ",".join(MASKED_SAMPLERS), parse=csv()),
    )
    oracle_sampler: str = Field(
        "heun", description="the sampler of the models trained on clean images (oracle, memorization's clean)"
    )
    holdout: float = Field(0.2, gt=0.0, lt=1.0, description="fraction held out as the second FD reference")
    image_size: int | None = Field(None, ge=4, description="resize the images (corrupt's source.image_size)")
    features: str | None = Field(None, description="feature spec for FD (default: train the in-project net)")
    samples: int = Field(300, ge=2, description="samples per (model, sampler) of the main block")
    out: str = Field(..., description="output URI", json_schema_extra=flag("--out"))
    features_stage: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray features'")
    train: dict[str, Any] = Field(
        default_factory=dict, description="keys of 'ambient-ray train', shared by every arm (objective and δ: set here)"
    )
    sample: dict[str, Any] = Field(
        default_factory=dict, description="keys of 'ambient-ray sample' (sampler knobs; the sampler name: set here)"
    )
    evaluate: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray evaluate'")
    memorization: MemorizationBlock = Field(default_factory=MemorizationBlock)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @field_validator("p")
    @classmethod
    def _p(cls, v: list[float]) -> list[float]:
        return _probabilities(v)

    _lists = experiment.lists_validator(ARMS)

    @field_validator("samplers")
    @classmethod
    def _samplers(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in MASKED_SAMPLERS]
        if bad:
            raise ValueError(
                f"{bad}: the masked arms sample with a masked sampler, of {', '.join(MASKED_SAMPLERS)} "
                "(the oracle's is oracle_sampler)"
            )
        return experiment.unique(v)

    @field_validator("oracle_sampler")
    @classmethod
    def _oracle_sampler(cls, v: str) -> str:
        if v in MASKED_SAMPLERS:
            raise ValueError(f"{v!r} is for a network trained on masked data; the oracle's network takes no mask")
        return v

    @field_validator("delta_per_p")
    @classmethod
    def _deltas(cls, v: dict[float, float]) -> dict[float, float]:
        bad = {p: d for p, d in v.items() if not 0.0 < d < 1.0}
        if bad:
            raise ValueError(f"δ is in (0, 1) (the naive arm is δ = 0): got {bad}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MaskedExperimentConfig:
        if not self.arms and not self.memorization.run:
            raise ValueError("nothing to run: no arms and memorization.run is false")
        return self

    def delta_at(self, p: float) -> float:
        return self.delta_per_p.get(p, self.delta)

    def memo_p(self) -> list[float]:
        return self.p if self.memorization.p is None else self.memorization.p

    def memo_seeds(self) -> list[int]:
        return self.seeds if self.memorization.seeds is None else self.memorization.seeds


def spec(p: float) -> str:
    """The corruption of the masked data at ``p``."""
    return f"mask:p={p:g}"


SECTIONS = {"train": "train", "sample": "sample", "evaluate": "evaluate", "features_stage": "features"}
_ALSO_OWNED = {  # keys the experiment sets itself in each section, besides the keys that wire the stage
    "train": ("rows", "seed", "resume", "objective"),
    "sample": ("num", "seed"),
    "evaluate": ("reference", "reference_where", "holdout", "holdout_where", "train", "train_where", "features"),
    "features_stage": ("where",),
}
# keys inside a section's sub-sections that the experiment sets itself: (section, sub-section, key, where to set it)
_NESTED_OWNED = (
    ("train", "masked", "delta", "delta / delta_per_p"),
    ("sample", "sampler", "name", "samplers / oracle_sampler / memorization.sampler"),
    ("evaluate", "memorization", "features", "memorization.features"),
    ("evaluate", "memorization", "threshold", "memorization.threshold"),
)


def _owned(section: str) -> set[str]:
    return registry.owned(SECTIONS[section], *_ALSO_OWNED[section])


def train_flags(cfg: MaskedExperimentConfig, block: str, delta: float | None) -> dict:
    """The train keys of a model of ``block``: the train section (with the memorization block's keys over it),
    the masked objective with ``delta`` (None: the plain loss on clean images)."""
    keys = {**cfg.train, **(cfg.memorization.train if block == MEMO else {})}
    if delta is None:
        return {**keys, "objective": "ambient"}  # every row clean: the plain EDM loss
    return {**keys, "objective": "masked", "masked": experiment.over(keys.get("masked", {}), {"delta": delta})}


def sample_flags(cfg: MaskedExperimentConfig, sampler: str) -> dict:
    return {**cfg.sample, "sampler": experiment.over(cfg.sample.get("sampler", {}), {"name": sampler})}


def evaluate_flags(cfg: MaskedExperimentConfig) -> dict:
    mem = cfg.memorization
    memo = experiment.over(cfg.evaluate.get("memorization", {}), {"features": mem.features, "threshold": mem.threshold})
    return {**cfg.evaluate, "memorization": memo}


def check(cfg: MaskedExperimentConfig) -> None:
    """Refuse bad stage sections (as each arm and sampler will build them) before any work starts."""
    memo = cfg.memorization.train
    experiment.refuse_owned(
        [(s, getattr(cfg, s), _owned(s)) for s in SECTIONS] + [("memorization.train", memo, _owned("train"))],
        [(s, getattr(cfg, s), sub, key, where) for s, sub, key, where in _NESTED_OWNED]
        + [("memorization.train", memo, "masked", "delta", "delta")],
        experiment.OWNER,
    )

    def build(section: str, keys: dict, label: str) -> None:
        experiment.check_section(SECTIONS[section], label, keys, experiment.OWNER)

    build("features_stage", cfg.features_stage, "features_stage")
    build("evaluate", evaluate_flags(cfg), "evaluate")
    blocks = ([MAIN] if cfg.arms else []) + ([MEMO] if cfg.memorization.run else [])
    for block in blocks:
        for delta in (None, cfg.delta, 0.0):
            build("train", train_flags(cfg, block, delta), "train" if block == MAIN else "memorization.train")
    for sampler in sorted({cfg.oracle_sampler, *cfg.samplers, cfg.memorization.sampler}):
        build("sample", sample_flags(cfg, sampler), "sample")


# ------------------------------------------------------------------------------ running the stages


class Runner(experiment.Runner):
    """The experiment stage's runner (steps, fingerprints, reuse of finished steps, MLflow children), plus one
    trained model evaluated under several samplers."""

    def model(
        self,
        *,
        block: str,
        p: float | None,
        arm: str,
        seed: int,
        data: str,
        delta: float | None,
        samplers: list[str],
        num: int,
        refs: dict,
        copies_of: str,
    ) -> list[dict]:
        """train -> (sample -> evaluate per sampler) for one (arm, p, seed); one result per sampler (also in
        result.json). ``copies_of``: the clean images the similarity test compares the samples with."""
        cfg = self.cfg
        parts = ["runs"] + ([MEMO] if block == MEMO else []) + ([f"p-{p:g}"] if p is not None else []) + [arm]
        out = storage.join(self.out, *parts, f"seed-{seed}")
        label = f"{MEMO} " if block == MEMO else ""
        label += f"{arm}" + (f" p={p:g}" if p is not None else "") + f" seed {seed}"
        t_out = storage.join(out, registry.get("train").folder)

        def outs(sampler: str) -> dict[str, str]:
            return {
                "train": t_out,
                "sample": storage.join(out, f"{registry.get('sample').folder}-{sampler}"),
                "evaluate": storage.join(out, f"{registry.get('evaluate').folder}-{sampler}"),
            }

        def links(parent, sampler: str) -> dict[str, dict]:
            return chain.wire(
                data,
                outs(sampler),
                mlflow=lambda stage: self.mlflow_for(parent, f"{stage} {label}"),
                where=self.loc,
            )

        def tcfg(parent):
            keys = {**train_flags(cfg, block, delta), **links(parent, samplers[0])["train"], "seed": seed}
            return self.build("train", keys)

        def scfg(parent, sampler: str):
            keys = {**sample_flags(cfg, sampler), **links(parent, sampler)["sample"], "num": num, "seed": seed}
            return self.build("sample", keys)

        def ecfg(parent, sampler: str):
            flags = {
                **evaluate_flags(cfg),
                **links(parent, sampler)["evaluate"],
                "reference": refs["clean"],
                "reference_where": "quality=clean",
                "holdout": refs["holdout"],
                "holdout_where": "quality=clean",
                "train": copies_of,
                "train_where": "quality=clean",
                "features": refs["features"],
            }
            return self.build("evaluate", flags)

        pr = self.prints
        train_fp = self.print_of(tcfg(None), pr[data])
        sample_fps = {s: self.print_of(scfg(None, s), train_fp) for s in samplers}
        inputs = (pr[refs["clean"]], pr[refs["holdout"]], pr[refs["features"]], pr[copies_of])
        eval_fps = {s: self.print_of(ecfg(None, s), sample_fps[s], *inputs) for s in samplers}
        model_fp = shards.fingerprint({"evaluate": [eval_fps[s] for s in samplers]})
        kept = self.finished(out, model_fp)
        if kept is not None:
            return kept["results"]
        params = {"block": block, "arm": arm, "p": "" if p is None else p, "seed": seed, "data": data}
        params["delta"] = "" if delta is None else delta
        tags = {"stage": "experiment-arm", "arm": arm, "block": block, "p": "clean" if p is None else f"{p:g}"}
        results = []
        with tracking.run(self.mlflow, out, name=label, parent=self.parent_id, params=params, tags=tags) as (
            child,
            uri,
        ):
            t0 = time.perf_counter()
            trained = self.step("train", t_out, train_fp, lambda: self.call("train", tcfg(child)))
            logged: dict[str, float] = {}
            for sampler in samplers:
                o = outs(sampler)
                r = self.step(
                    "sample", o["sample"], sample_fps[sampler], lambda sm=sampler: self.call("sample", scfg(child, sm))
                )
                e = self.step(
                    "evaluate",
                    o["evaluate"],
                    eval_fps[sampler],
                    lambda sm=sampler: self.call("evaluate", ecfg(child, sm)),
                )
                values = dict(e["metrics"])
                baseline = (e.get("details", {}).get("memorization_similarity") or {}).get("holdout") or {}
                if "share_above" in baseline:
                    values["holdout_share_above"] = baseline["share_above"]
                results.append(
                    {
                        "block": block,
                        "p": p,
                        "arm": arm,
                        "delta": delta,
                        "sampler": sampler,
                        "seed": seed,
                        "metrics": values,
                        "train_loss": trained["metrics"].get("loss"),
                        "mlflow_run_id": child,
                    }
                )
                logged.update({f"{m}.{sampler}": v for m, v in values.items()})
                tracking.log_files(child, uri, {f"grid-{sampler}.png": storage.read_bytes(r["grid"])})
            seconds = time.perf_counter() - t0
            for res in results:
                res["seconds"] = seconds / len(results)
            tracking.log_metrics(child, uri, logged)
        self.keep(out, model_fp, {"results": results})
        return results


# ------------------------------------------------------------------------------ the tables


def _key(r: dict) -> tuple:
    return (r["block"], r["p"], r["arm"], r["sampler"])


def _order(key: tuple) -> tuple:
    block, p, arm, sampler = key
    return (block != MAIN, -1.0 if p is None else p, ARMS.index(arm) if arm in ARMS else len(ARMS), sampler)


def summarize(results: list[dict]) -> list[dict]:
    """One row per (block, p, arm, sampler): mean ± standard error over seeds of every metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(_key(r), []).append(r)
    rows = []
    for key in sorted(groups, key=_order):
        runs = sorted(groups[key], key=lambda r: r["seed"])
        block, p, arm, sampler = key
        entry: dict[str, Any] = {"block": block, "p": p, "arm": arm, "sampler": sampler, "delta": runs[0]["delta"]}
        names = sorted({m for r in runs for m in r["metrics"]})
        metrics = {}
        for m in names:
            vals = [r["metrics"][m] for r in runs if m in r["metrics"]]
            metrics[m] = experiment.mean_se(vals)
        entry["metrics"] = metrics
        rows.append(entry)
    return rows


def paired(results: list[dict]) -> list[dict]:
    """Per (p, sampler) of the main block: ambient − naive of FD and held-out FD, seed by seed (the two arms of a
    seed share its masked data and sampler noise), mean ± standard error over seeds."""
    by = {(r["p"], r["arm"], r["sampler"], r["seed"]): r["metrics"] for r in results if r["block"] == MAIN}
    rows = []
    for p, sampler in sorted({(k[0], k[2]) for k in by if k[1] == "ambient"}):
        seeds = sorted(
            s for q, a, m, s in by if (q, a, m) == (p, "ambient", sampler) and (p, "naive", sampler, s) in by
        )
        if not seeds:
            continue
        diff = {
            m: experiment.mean_se([by[(p, "ambient", sampler, s)][m] - by[(p, "naive", sampler, s)][m] for s in seeds])
            for m in experiment.PAIRED_METRICS
        }
        rows.append({"p": p, "sampler": sampler, **diff})
    return rows


def _cell(e: dict | None, digits: int) -> str:
    return "—" if e is None else f"{e['mean']:.{digits}f} ± {e['se']:.{digits}f}"


def _deltas(cfg: MaskedExperimentConfig) -> str:
    extra = ", ".join(f"{d:g} at p = {p:g}" for p, d in sorted(cfg.delta_per_p.items()))
    return f"δ = {cfg.delta:g}" + (f" ({extra})" if extra else "")


def markdown(table: list[dict], diffs: list[dict], cfg: MaskedExperimentConfig, minutes: float) -> str:
    """``results.md``: the main table, ambient − naive paired by seed, and the memorization table."""
    mem = cfg.memorization
    thr = f"{mem.threshold:g}"
    heads = {
        "fd": "FD (clean train) ↓",
        "fd_holdout": "FD (held-out) ↓",
        "precision": "precision ↑",
        "recall": "recall ↑",
        "memorization_top1_mean": "top-1 similarity",
        "memorization_share_above": f"copies (> {thr})",
    }
    lines = [
        f"dataset {cfg.dataset}, pixels missing with probability p (mask:p=P), {_deltas(cfg)}, seeds "
        f"{','.join(map(str, cfg.seeds))}: mean ± standard error over seeds ({minutes:.0f} min). Similarity: each "
        f"sample's top-1 cosine similarity to the clean training images in {mem.features}.",
        "",
    ]
    main = [row for row in table if row["block"] == MAIN]
    if main:
        lines += [
            "| p | arm | δ | sampler | " + " | ".join(heads[m] for m in TABLE_METRICS) + " |",
            "|---|---|---|---|" + "---|" * len(TABLE_METRICS),
        ]
        for row in main:
            cells = [_cell(row["metrics"].get(m), 2 if m.startswith("fd") else 3) for m in TABLE_METRICS]
            p = "clean" if row["p"] is None else f"{row['p']:g}"
            d = "—" if row["delta"] is None else f"{row['delta']:g}"
            lines.append(f"| {p} | {row['arm']} | {d} | {row['sampler']} | " + " | ".join(cells) + " |")
    if diffs:
        lines += [
            "",
            "Paired by seed, ambient minus naive (negative: the further mask helps):",
            "",
            "| p | sampler | FD − naive | held-out FD − naive |",
            "|---|---|---|---|",
        ]
        for d in diffs:
            lines.append(f"| {d['p']:g} | {d['sampler']} | " + " | ".join(experiment.paired_cells(d)) + " |")
    memo = [row for row in table if row["block"] == MEMO]
    if memo:
        steps_ = {**cfg.train, **mem.train}.get("steps", "the train section's")
        lines += [
            "",
            f"Memorization: {mem.rows} training images, {steps_} steps; copies: samples whose top-1 similarity is "
            f"above {thr}; held-out copies: the same share for real images never trained on (the no-copy baseline):",
            "",
            f"| p | arm | sampler | top-1 similarity | copies (> {thr}) | held-out copies | FD (clean train) ↓ |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in memo:
            cells = [_cell(row["metrics"].get(m), 2 if m == "fd" else 3) for m in MEMO_METRICS]
            p = "clean" if row["p"] is None else f"{row['p']:g}"
            lines.append(f"| {p} | {row['arm']} | {row['sampler']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


COLOURS = {"ambient": "#1b9e77", "naive": "#d62728", "oracle": "#1f77b4", "clean": "#1f77b4"}
STYLES = {"fixed-mask": "-", "reconstruction-guidance": "--"}


def plot(table: list[dict], title: str) -> bytes:
    """FD against p per (arm, sampler), the oracle as a line with its ± SE band; with the memorization block, the
    share of copies against p beside it (the clean arm and the held-out baseline as lines)."""
    from ambient_ray.io import plots

    plt = plots.pyplot()
    wanted = [
        (MAIN, "fd", "FD vs clean training part (lower is better)"),
        (MEMO, "memorization_share_above", "share of copies (memorization block)"),
    ]
    wanted = [w for w in wanted if any(row["block"] == w[0] for row in table)]
    fig, axes = plt.subplots(1, len(wanted), figsize=(5 * len(wanted) + 0.5, 3.6), squeeze=False)
    for ax, (block, metric, ylabel) in zip(axes[0], wanted):
        rows = [row for row in table if row["block"] == block and metric in row["metrics"]]
        curves: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for row in rows:
            e = row["metrics"][metric]
            if row["p"] is None:  # trained on clean images: a horizontal line and its band
                ax.axhline(e["mean"], color=COLOURS.get(row["arm"], "#666"), lw=1.2, label=f"{row['arm']}")
                ax.axhspan(e["mean"] - e["se"], e["mean"] + e["se"], color=COLOURS.get(row["arm"], "#666"), alpha=0.15)
                continue
            curves.setdefault((row["arm"], row["sampler"]), []).append((row["p"], e["mean"], e["se"]))
        for (arm, sampler), pts in curves.items():
            pts.sort()
            x, y, se = (np.array(v) for v in zip(*pts))
            ax.errorbar(
                x,
                y,
                yerr=se,
                capsize=3,
                marker="o",
                ls=STYLES.get(sampler, ":"),
                color=COLOURS.get(arm, "#666"),
                label=f"{arm}, {sampler}",
            )
        if block == MEMO:
            base = [
                row["metrics"]["holdout_share_above"]["mean"] for row in rows if "holdout_share_above" in row["metrics"]
            ]
            if base:
                ax.axhline(float(np.mean(base)), color="black", ls=":", lw=1, label="held-out images")
        ax.set_xlabel("p (probability a pixel is missing)")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return plots.figure_png(fig)


# ------------------------------------------------------------------------------ driver


def run(cfg: MaskedExperimentConfig, progress: bool = True) -> dict:
    """Run every (arm, p, seed) of both blocks; returns {"out", "table", "markdown", "mlflow_run_id", "minutes",
    "ran"} ("ran": the steps done by this call, those skipped as finished left out)."""
    check(cfg)
    r = Runner(cfg, progress)
    storage.check_reachable(r.out)
    cfgmod.save_resolved(cfg, r.out)
    t0 = time.perf_counter()
    mem = cfg.memorization
    tags = {"stage": "experiment-masked", "dataset": cfg.dataset, "p": ",".join(f"{p:g}" for p in cfg.p)}
    masked_arms = [a for a in cfg.arms if a != "oracle"]
    n_main = len(cfg.seeds) * (len(cfg.p) * len(masked_arms) + ("oracle" in cfg.arms))
    n_memo = len(cfg.memo_seeds()) * (1 + len(cfg.memo_p())) if mem.run else 0
    results: list[dict] = []
    with experiment.parent_run(r, cfg, "experiment-masked", tags):
        print(
            f"experiment-masked: {n_main} models (arms {','.join(cfg.arms) or 'none'}) + {n_memo} of the memorization "
            f"block on {cfg.dataset}, p {','.join(f'{p:g}' for p in cfg.p)} -> {r.out}"
            + (f"; MLflow run {r.parent_id}" if r.parent_id else "")
        )
        unused = sorted(set(cfg.delta_per_p) - set(cfg.p) - set(cfg.memo_p()))
        if unused:  # the shipped 0.9 when --p leaves it out, or a typo of a p
            print(f"experiment-masked: delta_per_p at p = {', '.join(f'{p:g}' for p in unused)}: no arm runs there")
        refs = r.clean_refs()
        clean = refs["clean"]
        k, total = 0, n_main + n_memo

        def one(block: str, p: float | None, arm: str, seed: int, data: str, **kw) -> None:
            nonlocal k
            k += 1
            what = f"{MEMO} " if block == MEMO else ""
            print(
                f"experiment-masked: [{k}/{total}] {what}{arm}"
                + (f", p={p:g}" if p is not None else "")
                + f", seed {seed}"
            )
            for res in r.model(block=block, p=p, arm=arm, seed=seed, data=data, refs=refs, **kw):
                results.append(res)
                m = res["metrics"]
                print(
                    f"experiment-masked: {what}{arm}"
                    + (f" p={p:g}" if p is not None else "")
                    + f" seed {seed}, {res['sampler']}: FD {m['fd']:.2f} (held-out {m['fd_holdout']:.2f}), "
                    f"precision {m['precision']:.3f}, recall {m['recall']:.3f}, top-1 similarity "
                    f"{m.get('memorization_top1_mean', float('nan')):.3f}"
                )

        for seed in cfg.seeds if cfg.arms else []:
            if "oracle" in cfg.arms:
                one(MAIN, None, "oracle", seed, clean, delta=None, samplers=[cfg.oracle_sampler],
                    num=cfg.samples, copies_of=clean)  # fmt: skip
            for p in cfg.p if masked_arms else []:
                data = r.corrupt(
                    f"seed-{seed}/p-{p:g}", part="train", clean_fraction=0.0, seed=seed, corruptions=[spec(p)]
                )
                for arm in masked_arms:
                    delta = cfg.delta_at(p) if arm == "ambient" else 0.0
                    one(MAIN, p, arm, seed, data, delta=delta, samplers=cfg.samplers, num=cfg.samples, copies_of=clean)
        if mem.run:
            small = r.corrupt(f"prep/{MEMO}-clean", **experiment.CLEAN_SPLIT, limit=mem.rows)
            for seed in cfg.memo_seeds():
                one(MEMO, None, "clean", seed, small, delta=None, samplers=[cfg.oracle_sampler], num=mem.samples,
                    copies_of=small)  # fmt: skip
                for p in cfg.memo_p():
                    data = r.corrupt(
                        f"seed-{seed}/{MEMO}/p-{p:g}",
                        part="train",
                        clean_fraction=0.0,
                        seed=seed,
                        corruptions=[spec(p)],
                        limit=mem.rows,
                    )
                    one(MEMO, p, "ambient", seed, data, delta=cfg.delta_at(p), samplers=[mem.sampler],
                        num=mem.samples, copies_of=small)  # fmt: skip
        minutes = (time.perf_counter() - t0) / 60
        table = summarize(results)
        diffs = paired(results)
        md = markdown(table, diffs, cfg, minutes)
        png = plot(table, f"{cfg.dataset}, {_deltas(cfg)}, {len(cfg.seeds)} seeds")
        flat = {}
        for row in table:
            p = "clean" if row["p"] is None else f"{row['p']:g}"
            for m in ("fd", "fd_holdout", "memorization_share_above"):
                if m in row["metrics"]:
                    flat[f"{m}.{row['block']}.{row['arm']}.{p}.{row['sampler']}"] = row["metrics"][m]["mean"]
        tables = {"table": table, "paired": diffs}
        experiment.publish(r, cfg, results, minutes, tables, md, png, flat)
    return experiment.finish(r, tables, md, minutes)


def report(cfg: MaskedExperimentConfig, s: dict) -> None:
    """The command line's lines after a run."""
    experiment.report_tables("experiment-masked", s)
