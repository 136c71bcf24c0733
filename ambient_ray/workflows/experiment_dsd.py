"""The DSD experiment: Denoising Score Distillation (seed paper 004) at our scale, through the stages.

``ambient-ray experiment-dsd --config jobs/configs/experiment_dsd.yaml --out URI``
(``python -m jobs.experiment_dsd`` runs the same as a Ray job)

The dataset is split once into a training part and a held-out part, as in the experiment stage
(:mod:`ambient_ray.workflows.experiment`, whose runner, fingerprints, done-markers, MLflow tree and statistics this
reuses). For every seed and every noise level σ_n in ``sigmas``, ``corrupt`` observes each training image only as
y = x + σ_n·z (``noise:sigma=S``, clean fraction 0). Arms per (σ_n, seed):

- ``observations``: the noisy rows themselves, evaluated as if they were samples (0 network evaluations);
- ``ambient-full`` and ``ambient-truncated``: one Phase-I teacher (``objective: noisy``, ``noisy.way: adjusted``)
  sampled by Heun to 0 and by Heun to σ_n then D(x_{σ_n}; σ_n);
- ``dsd-adjusted``: that teacher distilled (``distill``, way adjusted) into a one-step generator;
- ``dsd-standard``: a second Phase-I teacher with ``noisy.way: standard``, distilled with way standard;
- ``oracle``: plain EDM training on the clean training part (once per seed, not per σ_n), Heun.

The ``train`` section is shared by both teachers and the oracle; the ``sample`` section's sampler knobs by every
sampler. Every sample set is evaluated: FD against the clean training part and against the held-out part,
proximal FD (the samples noised like the data, ``noise:sigma=σ_n``, against the noisy training rows), k-NN
precision and recall; the sample stage's network evaluations per image (``nfe``) and seconds per 1,000 images
(``seconds_per_1000_images``) ride along. A DSD arm's one-step samples are of the final EMA generator; its
``picked/`` generator (the best proximal FD over the distillation's evaluations, ``distill.eval_every``) is
evaluated too (``picked_*``), and its ``proximal.json`` (FD against the clean training part at each evaluation)
gives ``picked_step``, ``picked_fd_at_step`` (the FD at the picked step) and ``best_fd_over_evals`` (the best FD
over those evaluations): the paper's check that the checkpoint proximal FD picks is close to the best by FD.

Outputs under OUT: ``prep/`` (clean splits, features), ``seed-<s>/sigma-<σ>/`` (noisy data),
``runs/sigma-<σ>/observations/seed-<s>/``, ``runs/sigma-<σ>/teacher-<way>/seed-<s>/`` (``train``,
``samples-<sampler>``, ``eval-<sampler>``, ``distill``, ``samples-one-step``, ``eval-one-step``,
``samples-picked``, ``eval-picked``, ``result.json``), ``runs/oracle/seed-<s>/``, ``results.json``,
``results.md`` (mean ± standard error over seeds per (σ_n, arm), the paper's orderings checked) and
``results.png`` (FD against σ_n per arm). MLflow: one parent run, one child run per teacher (or oracle, or
observation set) with its stage runs under it. A re-run skips every finished step.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from ambient_ray import config as cfgmod
from ambient_ray.config import Strict, csv, flag
from ambient_ray.io import shards, storage, tracking
from ambient_ray.io.tracking import MlflowConfig
from ambient_ray.stages import registry
from ambient_ray.workflows import experiment

ARMS: tuple[str, ...] = ("observations", "ambient-full", "ambient-truncated", "dsd-adjusted", "dsd-standard", "oracle")
TEACHER_ARMS = {  # the arms each Phase-I teacher serves: way -> {arm: how it is sampled}
    "adjusted": {"ambient-full": "ambient-full", "ambient-truncated": "ambient-truncated", "dsd-adjusted": "dsd"},
    "standard": {"dsd-standard": "dsd"},
}
DSD_ARMS = ("dsd-adjusted", "dsd-standard")
TABLE_METRICS = ("fd", "fd_holdout", "proximal_fd", "nfe", "seconds_per_1000_images")
PICK_METRICS = ("picked_step", "picked_fd_at_step", "best_fd_over_evals", "best_fd_step", "picked_fd", "fd")
EVAL_METRICS = ("fd", "fd_holdout", "proximal_fd", "precision", "recall")


class DsdExperimentConfig(Strict):
    """Config of ``ambient-ray experiment-dsd``; the stage sections hold keys of those stages' configs."""

    kind: Literal["dsd"] = Field("dsd", description="the experiment's kind (this stage: experiment-dsd)")
    dataset: str = Field(
        "digits", description="built-in name or URI of the clean images", json_schema_extra=flag("--dataset")
    )
    sigmas: list[float] = Field(
        default_factory=lambda: [0.1, 0.2, 0.4],
        min_length=1,
        description="noise levels σ_n of the observations (corrupt's noise:sigma=S, the [-1, 1] scale), one noisy "
        "dataset per σ_n and seed",
        json_schema_extra=flag("--sigmas", "comma-separated noise levels, e.g. 0.1,0.2", parse=csv(float)),
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="every arm runs once per seed (its own noise and models); the tables report mean ± standard "
        "error over them",
        json_schema_extra=flag("--seeds", "comma-separated seeds, e.g. 0,1,2", parse=csv(int)),
    )
    arms: list[str] = Field(
        default_factory=lambda: list(ARMS),
        min_length=1,
        description="arms, of " + ", ".join(ARMS),
        json_schema_extra=flag("--arms", "comma-separated arms: " + ",".join(ARMS), parse=csv()),
    )
    oracle_sampler: str = Field("heun", description="the oracle's sampler (its network saw clean images)")
    picked_tolerance: float = Field(
        0.1,
        ge=0.0,
        description="'picked ≈ best' holds when the FD at the step proximal FD picked is within this fraction of "
        "the best FD over the distillation's evaluations (mean over seeds)",
    )
    holdout: float = Field(0.2, gt=0.0, lt=1.0, description="fraction held out as the second FD reference")
    image_size: int | None = Field(None, ge=4, description="resize the images (corrupt's source.image_size)")
    features: str | None = Field(None, description="feature spec for FD (default: train the in-project net)")
    samples: int = Field(300, ge=2, description="samples per (model, sampler); the observations: this many rows")
    out: str = Field(..., description="output URI", json_schema_extra=flag("--out"))
    features_stage: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray features'")
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="keys of 'ambient-ray train', shared by both teachers and the oracle (objective and "
        "noisy.way: set by the arm)",
    )
    distill: dict[str, Any] = Field(
        default_factory=dict,
        description="keys of 'ambient-ray distill', shared by both DSD arms (distill.eval_every > 0: the picked "
        "generator; distill.way, eval_reference and features: set by the experiment)",
    )
    sample: dict[str, Any] = Field(
        default_factory=dict, description="keys of 'ambient-ray sample' (sampler knobs; the sampler name: set here)"
    )
    evaluate: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray evaluate'")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @field_validator("sigmas")
    @classmethod
    def _sigmas(cls, v: list[float]) -> list[float]:
        bad = [s for s in v if not 0.0 < s < 2.0]
        if bad:
            raise ValueError(f"a noise level σ_n is in (0, 2) (the [-1, 1] data scale): got {bad}")
        return experiment.unique(v)

    _lists = experiment.lists_validator(ARMS)

    @field_validator("oracle_sampler")
    @classmethod
    def _oracle_sampler(cls, v: str) -> str:
        if v in ("one-step", "ambient-truncated"):
            raise ValueError(f"{v!r} is not for the oracle's network (plain EDM on clean images): e.g. heun")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DsdExperimentConfig:
        dsd = [a for a in self.arms if a in DSD_ARMS]
        sec = self.distill.get("distill")
        every = sec.get("eval_every", 0) if isinstance(sec, dict) else 0
        if dsd and not (isinstance(every, int) and every > 0):
            raise ValueError(
                f"the arms {', '.join(dsd)} evaluate the generator proximal FD picks: set distill.distill.eval_every "
                "to a positive number of steps (a multiple of distill.log_every, at most distill.steps)"
            )
        return self

    def ways(self) -> list[str]:
        """The Phase-I teachers this config trains (per σ_n and seed)."""
        return [w for w, arms in TEACHER_ARMS.items() if set(arms) & set(self.arms)]


def spec(sigma: float) -> str:
    """The corruption of the noisy data at σ_n = ``sigma``."""
    return f"noise:sigma={sigma:g}"


SECTIONS = {"train": "train", "distill": "distill", "sample": "sample", "evaluate": "evaluate"}
SECTIONS["features_stage"] = "features"
_ALSO_OWNED = {  # keys the experiment sets itself in each section, besides the keys that wire the stage
    "train": ("rows", "seed", "resume", "objective"),
    "distill": ("seed", "resume", "objective"),
    "sample": ("num", "seed", "one_step"),
    "evaluate": (
        *("reference", "reference_where", "holdout", "holdout_where", "train", "train_where", "features"),
        *("proximal", "proximal_reference", "proximal_where", "max_samples"),
    ),
    "features_stage": ("where",),
}
_NESTED_OWNED = (  # (section, sub-section, key, what sets it)
    ("train", "noisy", "way", "the arm: adjusted or standard"),
    ("distill", "distill", "way", "the arm: adjusted or standard"),
    ("distill", "distill", "eval_reference", "the clean training part"),
    ("distill", "distill", "features", "the experiment's features"),
    ("sample", "sampler", "name", "the arm / oracle_sampler"),
)


def _owned(section: str) -> set[str]:
    return registry.owned(SECTIONS[section], *_ALSO_OWNED[section])


def train_flags(cfg: DsdExperimentConfig, way: str | None) -> dict:
    """A teacher's train keys (the noisy objective, ``way``), or the oracle's (None: the plain EDM loss)."""
    if way is None:
        return {**cfg.train, "objective": "ambient"}  # every row clean: the plain EDM loss
    return {**cfg.train, "objective": "noisy", "noisy": experiment.over(cfg.train.get("noisy", {}), {"way": way})}


def distill_flags(cfg: DsdExperimentConfig, way: str, clean: str, features: str) -> dict:
    sub = experiment.over(cfg.distill.get("distill", {}), {"way": way, "eval_reference": clean, "features": features})
    return {**cfg.distill, "distill": sub}


def sample_flags(cfg: DsdExperimentConfig, sampler: str) -> dict:
    return {**cfg.sample, "sampler": experiment.over(cfg.sample.get("sampler", {}), {"name": sampler})}


def check(cfg: DsdExperimentConfig) -> None:
    """Refuse bad stage sections (as each arm will build them) before any work starts."""
    experiment.refuse_owned(
        [(s, getattr(cfg, s), _owned(s)) for s in SECTIONS],
        [(s, getattr(cfg, s), sub, key, where) for s, sub, key, where in _NESTED_OWNED],
        experiment.OWNER,
    )

    def build(section: str, keys: dict) -> Any:
        return experiment.check_section(SECTIONS[section], section, keys, experiment.OWNER)

    build("features_stage", cfg.features_stage)
    build("evaluate", {**cfg.evaluate, "proximal": spec(cfg.sigmas[0])})
    for way in [None, *cfg.ways()] if "oracle" in cfg.arms else cfg.ways():
        build("train", train_flags(cfg, way))
    for way in ("adjusted", "standard"):
        if f"dsd-{way}" in cfg.arms:
            d = build("distill", distill_flags(cfg, way, "x", "pixels"))
            if d.distill.eval_every > d.steps:
                raise cfgmod.ConfigError(
                    f"config key 'distill.distill.eval_every': {d.distill.eval_every} is past distill.steps "
                    f"({d.steps}): no evaluation, no picked generator"
                )
    samplers = {"one-step"} if set(DSD_ARMS) & set(cfg.arms) else set()
    samplers |= {a for a in ("ambient-full", "ambient-truncated") if a in cfg.arms}
    samplers |= {cfg.oracle_sampler} if "oracle" in cfg.arms else set()
    for sampler in sorted(samplers):
        build("sample", sample_flags(cfg, sampler))


# ------------------------------------------------------------------------------ running the stages


def _best(evals: list[dict], picked: dict | None) -> dict[str, float]:
    """From ``proximal.json`` (each evaluation's step, proximal FD and FD vs the clean part) and ``picked.json``:
    the picked step, the FD there, the best FD over the evaluations and its step."""
    rows = [e for e in evals if "fd" in e]
    if not rows or not picked:
        return {}
    best = min(rows, key=lambda e: e["fd"])
    at = next((e for e in rows if e["step"] == picked["step"]), None)
    out = {"picked_step": float(picked["step"]), "best_fd_over_evals": float(best["fd"])}
    out["best_fd_step"] = float(best["step"])
    if at is not None:
        out["picked_fd_at_step"] = float(at["fd"])
    return out


class Runner(experiment.Runner):
    """The experiment stage's runner (steps, fingerprints, reuse of finished steps, MLflow children), plus the
    units of this experiment: a set of observations, a Phase-I teacher with its samplers and distillation, the
    oracle."""

    folder = staticmethod(lambda stage: registry.get(stage).folder)

    def _ecfg(self, parent, samples: str, out: str, label: str, refs: dict, data: str | None, sigma: float | None):
        flags = {
            **self.cfg.evaluate,
            "samples": samples,
            "out": out,
            "mlflow": self.mlflow_for(parent, f"evaluate {label}"),
            "reference": refs["clean"],
            "reference_where": "quality=clean",
            "holdout": refs["holdout"],
            "holdout_where": "quality=clean",
            "features": refs["features"],
            "max_samples": self.cfg.samples,
        }
        if sigma is not None:
            flags |= {"proximal": spec(sigma), "proximal_reference": data, "proximal_where": "quality=corrupted"}
        return self.build("evaluate", flags)

    def _eval_print(self, ecfg, sample_fp: str, refs: dict, data: str | None) -> str:
        pr = self.prints
        inputs = (pr[refs["clean"]], pr[refs["holdout"]], pr[refs["features"]]) + ((pr[data],) if data else ())
        return self.print_of(ecfg, sample_fp, *inputs, exclude={"proximal_reference"})

    def _unit(self, out: str, fps: list[str], label: str, params: dict, tags: dict, work) -> list[dict]:
        """``work(child)`` (a list of results) under one MLflow child run, unless the unit finished with these
        fingerprints; results kept in ``out/result.json``."""
        fp = shards.fingerprint({"evaluate": fps})
        kept = self.finished(out, fp)
        if kept is not None:
            return kept["results"]
        with tracking.run(self.mlflow, out, name=label, parent=self.parent_id, params=params, tags=tags) as (
            child,
            uri,
        ):
            results = work(child)
            logged = {}
            for res in results:
                suffix = res["arm"] + (".picked" if res.get("picked") else "")
                logged.update({f"{m}.{suffix}": v for m, v in res["metrics"].items()})
            tracking.log_metrics(child, uri, logged)
        self.keep(out, fp, {"results": results})
        return results

    @staticmethod
    def _entry(sigma, arm, seed, e: dict, s: dict | None) -> dict:
        metrics = {m: float(e["metrics"][m]) for m in EVAL_METRICS if m in e["metrics"]}
        metrics["nfe"] = float(s["nfe"]) if s else 0.0
        metrics["seconds_per_1000_images"] = float(s["seconds_per_1000_images"]) if s else 0.0
        return {"sigma": sigma, "arm": arm, "seed": seed, "metrics": metrics}

    def observations(self, sigma: float, seed: int, data: str, refs: dict) -> list[dict]:
        """The noisy rows themselves as samples: evaluate alone."""
        out = storage.join(self.out, "runs", f"sigma-{sigma:g}", "observations", f"seed-{seed}")
        e_out = storage.join(out, self.folder("evaluate"))
        label = f"observations σ={sigma:g} seed {seed}"
        fp = self._eval_print(self._ecfg(None, data, e_out, label, refs, data, sigma), self.prints[data], refs, data)

        def work(child) -> list[dict]:
            ecfg = self._ecfg(child, data, e_out, label, refs, data, sigma)
            e = self.step("evaluate", e_out, fp, lambda: self.call("evaluate", ecfg))
            return [self._entry(sigma, "observations", seed, e, None)]

        params = {"arm": "observations", "sigma_n": sigma, "seed": seed, "data": data}
        return self._unit(out, [fp], label, params, {"stage": "experiment-arm", "arm": "observations"}, work)

    def model(
        self, *, way: str | None, sigma: float | None, seed: int, data: str, refs: dict, arms: list[str]
    ) -> list[dict]:
        """train -> (sample -> evaluate) per sampler of ``arms``, and for a DSD arm distill -> (sample -> evaluate)
        of the final and the picked generator. ``way`` None: the oracle (plain EDM on ``data``, the clean part)."""
        cfg = self.cfg
        name = "oracle" if way is None else f"teacher-{way}"
        parts = ["runs"] + ([f"sigma-{sigma:g}"] if sigma is not None else []) + [name, f"seed-{seed}"]
        out = storage.join(self.out, *parts)
        label = name + (f" σ={sigma:g}" if sigma is not None else "") + f" seed {seed}"
        t_out = storage.join(out, self.folder("train"))
        d_out = storage.join(out, self.folder("distill"))
        prox = None if way is None else data  # the oracle: no noisy rows of its own, no proximal FD
        samplers = [cfg.oracle_sampler] if way is None else [TEACHER_ARMS[way][a] for a in arms if a in cfg.arms]
        plain = [s for s in samplers if s != "dsd"]
        dsd_arm = next((a for a in arms if a in DSD_ARMS and a in cfg.arms), None)
        pr = self.prints

        def s_out(tag: str) -> str:
            return storage.join(out, f"{self.folder('sample')}-{tag}")

        def e_out(tag: str) -> str:
            return storage.join(out, f"{self.folder('evaluate')}-{tag}")

        def tcfg(parent):
            keys = {**train_flags(cfg, way), "data": data, "out": t_out, "seed": seed}
            return self.build("train", {**keys, "mlflow": self.mlflow_for(parent, f"train {label}")})

        def dcfg(parent):
            keys = {**distill_flags(cfg, way, refs["clean"], refs["features"]), "teacher": self.loc(t_out)}
            keys |= {"data": data, "out": d_out, "seed": seed, "mlflow": self.mlflow_for(parent, f"distill {label}")}
            return self.build("distill", keys)

        def scfg(parent, sampler: str, tag: str):
            ckpt = self.loc(t_out) if tag in plain else self.loc(d_out)
            ckpt = storage.join(ckpt, "picked") if tag == "picked" else ckpt
            keys = {**sample_flags(cfg, sampler), "checkpoint": ckpt, "out": s_out(tag), "num": cfg.samples}
            keys |= {"seed": seed, "mlflow": self.mlflow_for(parent, f"sample {tag} {label}")}
            return self.build("sample", keys)

        def ecfg(parent, tag: str):
            return self._ecfg(parent, self.loc(s_out(tag)), e_out(tag), f"{tag} {label}", refs, prox, sigma)

        train_fp = self.print_of(tcfg(None), pr[data])
        # tag -> (sampler, the fingerprint of what it samples)
        plan = {s: (s, train_fp) for s in plain}
        distill_fp = None
        if dsd_arm:
            inputs = (train_fp, pr[data], pr[refs["clean"]], pr[refs["features"]])
            distill_fp = self.print_of(dcfg(None), *inputs, exclude={"teacher"})
            plan |= {"one-step": ("one-step", distill_fp), "picked": ("one-step", distill_fp + ":picked")}
        sample_fps = {t: self.print_of(scfg(None, s, t), src) for t, (s, src) in plan.items()}
        eval_fps = {t: self._eval_print(ecfg(None, t), sample_fps[t], refs, prox) for t in plan}

        def work(child) -> list[dict]:
            trained = self.step("train", t_out, train_fp, lambda: self.call("train", tcfg(child)))
            if distill_fp:
                self.step("distill", d_out, distill_fp, lambda: self.call("distill", dcfg(child)))
            done = {}
            for tag, (sampler, _) in plan.items():
                s = self.step(
                    "sample",
                    s_out(tag),
                    sample_fps[tag],
                    lambda sm=sampler, t=tag: self.call("sample", scfg(child, sm, t)),
                )
                e = self.step(
                    "evaluate", e_out(tag), eval_fps[tag], lambda t=tag: self.call("evaluate", ecfg(child, t))
                )
                done[tag] = (e, s)
            results = []
            loss = trained.get("metrics", {}).get("loss")
            for arm in [a for a in arms if a in cfg.arms] if way else ["oracle"]:
                tag = "one-step" if arm in DSD_ARMS else (samplers[0] if way is None else TEACHER_ARMS[way][arm])
                res = self._entry(sigma, arm, seed, *done[tag])
                res |= {"sampler": plan[tag][0], "train_loss": loss, "mlflow_run_id": child}
                if arm in DSD_ARMS:
                    loc = self.loc(d_out)
                    p_json, e_json = storage.join(loc, "picked", "picked.json"), storage.join(loc, "proximal.json")
                    picked = json.loads(storage.read_bytes(p_json)) if storage.exists(p_json) else None
                    evals = json.loads(storage.read_bytes(e_json)) if storage.exists(e_json) else []
                    res["metrics"] |= _best(evals, picked)
                    pe, ps = done["picked"]
                    res["metrics"] |= {f"picked_{m}": v for m, v in self._entry(sigma, arm, seed, pe, ps)[
                        "metrics"].items() if m in EVAL_METRICS}  # fmt: skip
                    res["evaluations"] = evals
                results.append(res)
            return results

        params = {"arm": ",".join(arms), "way": way or "", "sigma_n": "" if sigma is None else sigma, "seed": seed}
        tags = {"stage": "experiment-arm", "arm": name, "sigma_n": "clean" if sigma is None else f"{sigma:g}"}
        return self._unit(out, [eval_fps[t] for t in plan], label, {**params, "data": data}, tags, work)


# ------------------------------------------------------------------------------ the tables


def _order(key: tuple) -> tuple:
    sigma, arm = key
    return (-1.0 if sigma is None else sigma, ARMS.index(arm) if arm in ARMS else len(ARMS))


def summarize(results: list[dict]) -> list[dict]:
    """One row per (σ_n, arm): mean ± standard error over seeds of every metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["sigma"], r["arm"]), []).append(r)
    rows = []
    for key in sorted(groups, key=_order):
        runs = sorted(groups[key], key=lambda r: r["seed"])
        names = sorted({m for r in runs for m in r["metrics"]})
        metrics = {m: experiment.mean_se([r["metrics"][m] for r in runs if m in r["metrics"]]) for m in names}
        rows.append({"sigma": key[0], "arm": key[1], "seeds": [r["seed"] for r in runs], "metrics": metrics})
    return rows


def orderings(table: list[dict], tolerance: float) -> list[dict]:
    """The paper's orderings at each σ_n, by mean FD against the clean training part: DSD < Truncated < Full <
    observations, adjusted < standard, and picked ≈ best (the FD at the picked step within ``tolerance`` of the
    best FD over the evaluations). Each: {sigma, claim, holds (None: an arm missing), values}."""
    out = []
    for sigma in sorted({row["sigma"] for row in table if row["sigma"] is not None}):
        fd = {
            row["arm"]: row["metrics"]["fd"]["mean"]
            for row in table
            if row["sigma"] == sigma and "fd" in row["metrics"]
        }
        chains = [
            (
                "DSD < Truncated < Full < observations",
                ["dsd-adjusted", "ambient-truncated", "ambient-full", "observations"],
            ),
            ("adjusted < standard (DSD)", ["dsd-adjusted", "dsd-standard"]),
        ]
        for claim, arms in chains:
            have = [a for a in arms if a in fd]
            holds = all(fd[a] < fd[b] for a, b in zip(have, have[1:])) if len(have) == len(arms) else None
            out.append({"sigma": sigma, "claim": claim, "holds": holds, "values": {a: fd[a] for a in have}})
        for row in table:
            m = row["metrics"]
            if row["sigma"] != sigma or row["arm"] not in DSD_ARMS:
                continue
            if "picked_fd_at_step" not in m or "best_fd_over_evals" not in m:
                out.append({"sigma": sigma, "claim": f"picked ≈ best ({row['arm']})", "holds": None, "values": {}})
                continue
            at, best = m["picked_fd_at_step"]["mean"], m["best_fd_over_evals"]["mean"]
            gap = (at - best) / best if best > 0 else 0.0
            out.append(
                {
                    "sigma": sigma,
                    "claim": f"picked ≈ best ({row['arm']})",
                    "holds": gap <= tolerance,
                    "values": {"picked_fd_at_step": at, "best_fd_over_evals": best, "relative_gap": gap},
                }
            )
    return out


def _cell(e: dict | None, digits: int) -> str:
    return "—" if e is None else f"{e['mean']:.{digits}f} ± {e['se']:.{digits}f}"


def _sig(s: float | None) -> str:
    return "clean" if s is None else f"{s:g}"


def markdown(table: list[dict], checks: list[dict], cfg: DsdExperimentConfig, minutes: float) -> str:
    """``results.md``: the main table, the DSD arms' pick table and the paper's orderings."""
    heads = {
        "fd": "FD (clean train) ↓",
        "fd_holdout": "FD (held-out) ↓",
        "proximal_fd": "proximal FD (noise:sigma=σ_n) ↓",
        "nfe": "NFE",
        "seconds_per_1000_images": "s / 1,000 images",
    }
    lines = [
        f"dataset {cfg.dataset}, observations y = x + σ_n·z (noise:sigma=σ_n), seeds "
        f"{','.join(map(str, cfg.seeds))}: mean ± standard error over seeds ({minutes:.0f} min). FD against the "
        "clean training part and the held-out part; proximal FD: the samples noised to σ_n against the noisy "
        "training rows (the observations arm: the noisy rows noised once more; the oracle: none).",
        "",
        "| σ_n | arm | " + " | ".join(heads[m] for m in TABLE_METRICS) + " |",
        "|---|---|" + "---|" * len(TABLE_METRICS),
    ]
    for row in table:
        cells = [
            _cell(row["metrics"].get(m), 1 if m in ("nfe", "seconds_per_1000_images") else 3) for m in TABLE_METRICS
        ]
        lines.append(f"| {_sig(row['sigma'])} | {row['arm']} | " + " | ".join(cells) + " |")
    dsd = [row for row in table if row["arm"] in DSD_ARMS]
    if dsd:
        lines += [
            "",
            "The DSD arms' pick: proximal FD picks a step among the distillation's evaluations; FD at that step and "
            "the best FD over the evaluations (against the clean training part, the distill stage's "
            "eval_images), and the evaluate stage's FD of the picked and the final generator:",
            "",
            "| σ_n | arm | picked step | FD at picked step | best FD over evaluations | its step | FD (picked) | "
            "FD (final) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in dsd:
            cells = [
                _cell(row["metrics"].get(m), 0 if m in ("picked_step", "best_fd_step") else 3) for m in PICK_METRICS
            ]
            lines.append(f"| {_sig(row['sigma'])} | {row['arm']} | " + " | ".join(cells) + " |")
    if checks:
        lines += ["", "The paper's orderings (seed paper 004), by mean FD against the clean training part:", ""]
        for c in checks:
            verdict = {True: "agrees", False: "disagrees", None: "not checked (an arm is missing)"}[c["holds"]]
            values = ", ".join(
                f"{k} {v:.3g}" if k == "relative_gap" else f"{k} {v:.3f}" for k, v in c["values"].items()
            )
            lines.append(f"- σ_n = {c['sigma']:g}, {c['claim']}: {verdict}" + (f" ({values})" if values else ""))
    return "\n".join(lines) + "\n"


COLOURS = {
    "observations": "#7f7f7f",
    "ambient-full": "#ff7f0e",
    "ambient-truncated": "#9467bd",
    "dsd-adjusted": "#1b9e77",
    "dsd-standard": "#d62728",
    "oracle": "#1f77b4",
}


def plot(table: list[dict], title: str) -> bytes:
    """FD against σ_n per arm (± SE); the DSD arms' picked generators dashed; the oracle a line with its band."""
    from ambient_ray.io import plots

    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    curves: dict[str, list[tuple[float, float, float]]] = {}
    for row in table:
        m = row["metrics"]
        colour = COLOURS.get(row["arm"], "#666")
        if row["sigma"] is None:
            if "fd" in m:
                e = m["fd"]
                ax.axhline(e["mean"], color=colour, lw=1.2, label=row["arm"])
                ax.axhspan(e["mean"] - e["se"], e["mean"] + e["se"], color=colour, alpha=0.15)
            continue
        for metric, name in (("fd", row["arm"]), ("picked_fd", f"{row['arm']} (picked)")):
            if metric in m:
                curves.setdefault(name, []).append((row["sigma"], m[metric]["mean"], m[metric]["se"]))
    for name, pts in curves.items():
        pts.sort()
        x, y, se = (np.array(v) for v in zip(*pts))
        arm = name.split(" ")[0]
        ls = "--" if name.endswith("(picked)") else "-"
        ax.errorbar(x, y, yerr=se, capsize=3, marker="o", ls=ls, color=COLOURS.get(arm, "#666"), label=name)
    ax.set_xlabel("σ_n (observation noise, [-1, 1] scale)")
    ax.set_ylabel("FD vs clean training part (lower is better)", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return plots.figure_png(fig)


# ------------------------------------------------------------------------------ driver


def run(cfg: DsdExperimentConfig, progress: bool = True) -> dict:
    """Run every (σ_n, arm, seed); returns {"out", "table", "checks", "markdown", "mlflow_run_id", "minutes",
    "ran", "reused"} ("ran": the steps done by this call, those skipped as finished left out)."""
    check(cfg)
    r = Runner(cfg, progress)
    storage.check_reachable(r.out)
    cfgmod.save_resolved(cfg, r.out)
    t0 = time.perf_counter()
    sig = ",".join(f"{s:g}" for s in cfg.sigmas)
    tags = {"stage": "experiment-dsd", "dataset": cfg.dataset, "sigma_n": sig}
    ways = cfg.ways()
    per = len(ways) + ("observations" in cfg.arms)
    total = len(cfg.seeds) * (len(cfg.sigmas) * per + ("oracle" in cfg.arms))
    results: list[dict] = []
    with experiment.parent_run(r, cfg, "experiment-dsd", tags):
        print(
            f"experiment-dsd: {total} units (arms {','.join(cfg.arms)}) on {cfg.dataset}, σ_n {sig} -> {r.out}"
            + (f"; MLflow run {r.parent_id}" if r.parent_id else "")
        )
        refs = r.clean_refs()  # the clean splits, as the other experiments make them
        clean = refs["clean"]
        k = 0

        def done(what: str, got: list[dict]) -> None:
            nonlocal k
            k += 1
            print(f"experiment-dsd: [{k}/{total}] {what}")
            for res in got:
                results.append(res)
                m = res["metrics"]
                print(
                    f"experiment-dsd:   {res['arm']} σ_n={_sig(res['sigma'])} seed {res['seed']}: FD {m['fd']:.2f} "
                    f"(held-out {m['fd_holdout']:.2f}), proximal FD {m.get('proximal_fd', float('nan')):.2f}, "
                    f"NFE {m['nfe']:g}, {m['seconds_per_1000_images']:.2f} s / 1,000 images"
                )

        for seed in cfg.seeds:
            if "oracle" in cfg.arms:
                done(f"oracle, seed {seed}", r.model(way=None, sigma=None, seed=seed, data=clean, refs=refs, arms=[]))
            for sigma in cfg.sigmas:
                data = r.corrupt(
                    f"seed-{seed}/sigma-{sigma:g}",
                    part="train",
                    clean_fraction=0.0,
                    seed=seed,
                    corruptions=[spec(sigma)],
                )
                if "observations" in cfg.arms:
                    done(f"observations, σ_n={sigma:g}, seed {seed}", r.observations(sigma, seed, data, refs))
                for way in ways:
                    arms = list(TEACHER_ARMS[way])
                    got = r.model(way=way, sigma=sigma, seed=seed, data=data, refs=refs, arms=arms)
                    done(f"teacher ({way}), σ_n={sigma:g}, seed {seed}", got)
        minutes = (time.perf_counter() - t0) / 60
        table = summarize(results)
        checks = orderings(table, cfg.picked_tolerance)
        md = markdown(table, checks, cfg, minutes)
        png = plot(table, f"{cfg.dataset}, DSD at σ_n {sig}, {len(cfg.seeds)} seeds")
        flat = {}
        for row in table:
            for m in ("fd", "fd_holdout", "proximal_fd", "picked_fd"):
                if m in row["metrics"]:
                    flat[f"{m}.{row['arm']}.{_sig(row['sigma'])}"] = row["metrics"][m]["mean"]
        tables = {"table": table, "checks": checks}
        experiment.publish(r, cfg, results, minutes, tables, md, png, flat)
    return experiment.finish(r, tables, md, minutes)


def report(cfg: DsdExperimentConfig, s: dict) -> None:
    """The command line's lines after a run."""
    experiment.report_tables("experiment-dsd", s)
