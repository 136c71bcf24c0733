"""The experiment stage: Ambient-o Table 2a at our scale, through the pipeline's own stages.

``ambient-ray experiment --dataset digits --corruption blur:sigma=S --clean-fraction 0.1 --seeds 0,1,2 --out URI``

The dataset is split once (by a hash of the id, the same for every seed) into a training part and a
held-out part. Per seed, ``corrupt`` keeps ``clean_fraction`` of the training part clean and corrupts
the rest. Arms, with the same network, optimiser, steps and sampler (the ``train`` and ``sample``
sections are shared; only the data and its annotation differ):

- ``only-clean``: the clean rows alone (``train --set rows=quality=clean``);
- ``all-data``: every row treated as clean (plain EDM on the mixed data);
- ``ambient-fixed``: one σ_min for all corrupted rows of a corruption set (``annotate --mode per-dataset``
  with the same noise classifier);
- ``ambient-o``: a σ_min per sample (``annotate --mode per-sample``, Eq. 3.2);
- ``ambient-fixed:per-spec`` (not run by default): one σ_min per corruption spec (``annotate --mode
  per-dataset --set sets=corruption``). It is told which rows share a corruption, so it is not a
  competitor but a bound: the per-sample arms at their best, with a perfect grouping of the rows;
- ``oracle``: the whole training part clean (``corrupt --clean-fraction 1``).

Each (arm, seed) then runs ``sample`` and ``evaluate``: FD against the clean training part and
against the held-out part, k-NN precision and recall, the memorization share (against the arm's own
training rows), and the arm's mean σ_min. The features are the in-project feature network trained on
the clean training part (``ambient-ray features``) unless ``features`` names others.

Outputs under OUT: ``prep/`` (splits, features), ``seed-<s>/`` (mixed data, classifier,
annotations), ``runs/<arm>/seed-<s>/`` (train, samples, eval, ``result.json``), ``results.json``,
``results.md`` (mean ± standard error over seeds) and ``results.png``. MLflow: one parent run; one
child run per (arm, seed) holding its metrics, with the stage runs nested under it.

Resuming (:mod:`ambient_ray.io.shards`): every step (each corrupt split, the feature net, each
seed's classifier and annotations, and each arm's train, sample and evaluate) leaves a done-marker
``_step.json`` in its folder with the fingerprint of its resolved config chained with the steps it
reads from. A re-run skips every step whose fingerprint is unchanged and redoes exactly those whose
config or inputs changed (a changed train key: every arm's train, sample and evaluate; nothing before).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from ambient_ray import config as cfgmod
from ambient_ray.config import Strict, csv, flag
from ambient_ray.diffusion.threshold_rules import RULES
from ambient_ray.io import shards, storage, tracking
from ambient_ray.io.tracking import MlflowConfig
from ambient_ray.stages import registry
from ambient_ray.workflows import chain, steps

ARMS: tuple[str, ...] = ("only-clean", "all-data", "ambient-fixed", "ambient-o", "oracle")
PER_SPEC = "ambient-fixed:per-spec"  # one σ_min per corruption spec: told the grouping, a bound (run on request)
# keys of the stage configs that hold a path: left out of the steps' fingerprints, which chain the
# fingerprints of the steps they read from instead, so the same work in two experiment folders has one print
PATH_KEYS = frozenset(
    (
        "data",
        "out",
        "classifier",
        "curves_from",
        "checkpoint",
        "samples",
        "reference",
        "holdout",
        "train",
        "features",
        "dataset",
    )
)


def arm_rule(arm: str) -> str | None:
    """``ambient-o:RULE`` -> RULE (an ambient-o arm with that per-sample estimator); None for other arms."""
    return arm.split(":", 1)[1] if arm.startswith("ambient-o:") else None


def arm_annotation(arm: str) -> tuple[str, str] | None:
    """The annotate ``mode`` and ``sets`` of an arm that trains on σ_min annotations; None for the others."""
    if arm in ("ambient-fixed", PER_SPEC):
        return "per-dataset", "corruption" if arm == PER_SPEC else "all"
    if arm == "ambient-o" or arm_rule(arm):
        return "per-sample", "all"
    return None


TABLE_METRICS = ("fd", "fd_holdout", "precision", "recall", "memorization", "mean_sigma_min")


class ExperimentConfig(Strict):
    """Config of ``ambient-ray experiment``; the stage sections hold keys of those stages' configs."""

    dataset: str = Field(
        "digits", description="built-in name or URI of the clean images", json_schema_extra=flag("--dataset")
    )
    corruption: list[str] = Field(
        default_factory=lambda: ["blur:sigma=1"],
        min_length=1,
        description="corruption specs of the mixed data (corrupt's corruptions: its corrupted rows split among them)",
        json_schema_extra=flag("--corruption", "corruption spec (repeatable)"),
    )
    clean_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="fraction of the training images each seed's mixed data keeps clean",
        json_schema_extra=flag("--clean-fraction"),
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="every arm runs once per seed (its own mixed data, classifier and model); the table "
        "reports mean ± standard error over them",
        json_schema_extra=flag("--seeds", "comma-separated seeds, e.g. 0,1,2", parse=csv(int)),
    )
    arms: list[str] = Field(
        default_factory=lambda: list(ARMS),
        min_length=1,
        description="arms, of " + ", ".join(ARMS) + f", {PER_SPEC}; ambient-o:RULE is ambient-o with another "
        "per-sample σ_min estimator (annotate's rule: " + ", ".join(RULES) + "); plain ambient-o uses annotate.rule",
        json_schema_extra=flag(
            "--arms", "comma-separated arms: " + ",".join(ARMS) + f", {PER_SPEC}, ambient-o:RULE", parse=csv()
        ),
    )
    reuse: list[str] = Field(
        default_factory=list,
        description="earlier experiments' OUT folders: a step whose fingerprint matches one finished there "
        "(only-clean and oracle, the clean splits and the feature net do not depend on the corruption) "
        "is taken from there instead of being run; those folders must stay",
        json_schema_extra=flag(
            "--reuse", "an earlier experiment's OUT to take matching steps from (repeatable)", repeat=True
        ),
    )
    holdout: float = Field(0.2, gt=0.0, lt=1.0, description="fraction held out as the second FD reference")
    image_size: int | None = Field(None, ge=4, description="resize the images (corrupt's source.image_size)")
    features: str | None = Field(None, description="feature spec for the metrics (default: train the in-project net)")
    samples: int | None = Field(None, ge=2, description="samples per (arm, seed) (default: the training part's size)")
    out: str = Field(..., description="output URI", json_schema_extra=flag("--out"))
    features_stage: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray features'")
    classifier: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray train-classifier'")
    annotate: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray annotate'")
    rule_annotate: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per rule: annotate keys over the annotate section for the ambient-o:RULE arm, e.g. "
        "{smoothed: {grid: lognormal, grid_points: 2048}} (the authors' dense grid for their rule only)",
    )
    train: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray train', shared by every arm")
    sample: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray sample'")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="keys of 'ambient-ray evaluate'")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @field_validator("seeds", "arms")
    @classmethod
    def _unique(cls, v: list) -> list:
        return unique(v)

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in ARMS and a != PER_SPEC and arm_rule(a) not in RULES]
        if bad:
            raise ValueError(
                f"unknown arms {bad}: expected {', '.join(ARMS)}, {PER_SPEC}, or ambient-o:RULE with RULE one of "
                f"{', '.join(RULES)}"
            )
        return v


SECTIONS = {  # each stage section of the config: the registered stage it configures
    "classifier": "train-classifier",
    "annotate": "annotate",
    "train": "train",
    "sample": "sample",
    "evaluate": "evaluate",
    "features_stage": "features",
}
_ALSO_OWNED = {  # keys the experiment sets itself in each section, besides the keys that wire the stage
    "classifier": ("seed",),
    "annotate": ("curves_from", "mode", "sets", "seed"),
    "train": ("rows", "seed", "resume"),
    "sample": ("num", "seed"),
    "evaluate": ("reference", "reference_where", "holdout", "holdout_where", "train", "train_where", "features"),
    "features_stage": ("where",),
}


OWNER = "the experiment itself (per arm and seed)"  # who sets the keys a section's stage is wired by


def _owned(section: str) -> set[str]:
    return registry.owned(SECTIONS[section], *_ALSO_OWNED[section])


def check(cfg: ExperimentConfig) -> None:
    """Refuse bad stage sections and corruption specs before any work starts."""
    from ambient_ray.corruptions import parse

    for spec in cfg.corruption:
        parse(spec)
    dummy = {"data": "x", "out": "x", "checkpoint": "x", "samples": "x", "reference": "x"}
    for section, stage in SECTIONS.items():
        model = registry.get(stage).model()
        fill = {k: v for k, v in dummy.items() if k in model.model_fields}
        cfgmod.build_section(
            model,
            section,
            getattr(cfg, section),
            owned=_owned(section),
            owner=OWNER,
            fill=fill,
        )
    for rule, keys in cfg.rule_annotate.items():
        if rule not in RULES:
            raise cfgmod.ConfigError(f"config key 'rule_annotate.{rule}': not a rule; one of {', '.join(RULES)}")
        cfgmod.build_section(
            registry.get("annotate").model(),
            f"rule_annotate.{rule}",
            {**cfg.annotate, **keys},
            owned=_owned("annotate"),
            owner=OWNER,
            fill={"data": "x", "out": "x"},
        )


def unique(v: list) -> list:
    """A config list's entries, refused when one repeats."""
    if len(set(v)) != len(v):
        raise ValueError(f"repeated entries in {v}")
    return v


def lists_validator(arms: tuple[str, ...]) -> Any:
    """A preset config's validator of ``seeds`` (no repeats) and ``arms`` (some of ``arms``, no repeats)."""

    def lists(cls, v: list, info: ValidationInfo) -> list:
        bad = [a for a in v if a not in arms] if info.field_name == "arms" else []
        if bad:
            raise ValueError(f"unknown arms {bad}: expected some of {', '.join(arms)}")
        return unique(v)

    return field_validator("seeds", "arms")(lists)


def over(sub: Any, keys: dict) -> Any:
    """A sub-section with ``keys`` set in it; anything but a mapping unchanged (its stage's config refuses it)."""
    return {**sub, **keys} if isinstance(sub, dict) else sub


def refuse_owned(owned: list[tuple[str, dict, set[str]]], nested: list[tuple[str, dict, str, str, str]], owner: str):
    """Refuse the keys an experiment preset sets itself: ``owned``, (label, a section's keys, the keys ``owner``
    sets in it); ``nested``, (label, a section's keys, sub-section, key, what sets it)."""
    for label, keys, mine in owned:
        clash = sorted(mine & set(keys))
        if clash:
            raise cfgmod.ConfigError(f"config key '{label}.{clash[0]}': set by {owner}")
    for label, keys, sub, key, where in nested:
        value = keys.get(sub)
        if isinstance(value, dict) and key in value:
            raise cfgmod.ConfigError(f"config key '{label}.{sub}.{key}': set by the experiment (from {where})")


_PLACEHOLDERS = dict.fromkeys(("data", "out", "checkpoint", "samples", "reference", "dataset", "teacher"), "x")


def check_section(stage: str, label: str, keys: dict, owner: str) -> Any:
    """The config of the registered ``stage`` from the keys of the config section ``label`` (its paths
    placeholders), as a preset's run will build it: a bad key refused before any work starts."""
    model = registry.get(stage).model()
    fill = {k: v for k, v in _PLACEHOLDERS.items() if k in model.model_fields}
    return cfgmod.build_section(model, label, keys, owned=set(), owner=owner, fill=fill)


# the clean splits of the experiment presets: no row is corrupted at clean fraction 1, so the corruption list is
# neither used nor fingerprinted; the experiment stage's default keeps these splits the very steps of its prep/
CLEAN_SPLIT = {"part": "train", "clean_fraction": 1.0, "seed": 0, "corruptions": ["blur:sigma=1"]}


# ------------------------------------------------------------------------------ running the stages


class Runner:
    """Runs the stages of one experiment, each into its own folder, skipping those finished with the same
    fingerprint (its resolved config chained with the fingerprints of the steps it reads from)."""

    def __init__(self, cfg: ExperimentConfig, progress: bool):
        self.cfg, self.progress = cfg, progress
        self.out = storage.normalize(cfg.out)
        self.mlflow = cfg.mlflow.model_dump()
        self.parent_id: str | None = None
        self.uri: str | None = None
        self.prints: dict[str, str] = {}  # output URI (or feature spec) -> the fingerprint of what made it
        self.ran: list[str] = []  # the steps this run did (not skipped as finished), in order
        self.reuse = [storage.normalize(u) for u in getattr(cfg, "reuse", ())]  # a config without reuse: none
        self.reused: list[str] = []  # the steps taken from a folder in ``reuse``
        self.at: dict[str, str] = {}  # a step's folder here -> where its finished output is (there, if reused)

    def mlflow_for(self, parent: str | None, name: str) -> dict:
        return tracking.child(self.mlflow, name, parent)

    def find(self, out: str, fp: str) -> dict | None:
        """The summary of the step ``out`` if it finished with fingerprint ``fp`` here, or at the same place
        in one of the ``reuse`` folders; else None. A step taken from a reuse folder gets a marker here that
        says where its output is (``reused_from``, which :meth:`loc` returns), so a later experiment that
        reuses this one finds it too."""
        rel = out[len(self.out) + 1 :]
        kept = shards.done(out, steps.STEP, fp)
        for src in self.reuse:
            if kept is not None:
                break
            there = storage.join(src, rel)
            kept = shards.done(there, steps.STEP, fp)
            if kept is not None:
                kept = {**kept, "reused_from": kept.get("reused_from", there)}
                shards.mark_done(out, steps.STEP, fp, kept)
        self.at[out] = out if kept is None else kept.get("reused_from", out)
        if self.at[out] != out:
            self.prints[self.at[out]] = fp
            self.reused.append(rel)
        return kept

    def loc(self, out: str) -> str:
        """Where the finished step ``out`` is: ``out`` itself, or the reuse folder it was taken from."""
        return self.at.get(out, out)

    def print_of(self, cfg, *inputs: str, exclude=()) -> str:
        """A step's fingerprint: its resolved config less paths, chained with the fingerprints of its inputs."""
        return shards.config_print(cfg, *inputs, exclude=PATH_KEYS | set(exclude))

    def step(self, stage: str, out: str, fp: str, work) -> dict:
        """``work()`` (a run of the registered ``stage``) into the folder ``out``, unless it finished with
        fingerprint ``fp`` (here, or in a reuse folder); its summary. The folder is emptied first unless the
        stage resumes in place (shard by shard: corrupt, annotate)."""
        self.prints[out] = fp
        clear = not registry.get(stage).resumes_in_place
        summary, ran = steps.run(out, fp, work, clear=clear, find=lambda: self.find(out, fp))
        if ran:
            self.ran.append(storage.join(out)[len(self.out) + 1 :])
        return summary

    def build(self, stage: str, flags: dict):
        """The config of a run of the registered ``stage`` from ``flags``."""
        return cfgmod.build(registry.get(stage).model(), flags=flags)

    def call(self, stage: str, cfg):
        return registry.get(stage).call(cfg, progress=self.progress)

    def finished(self, out: str, fp: str) -> dict | None:
        """The summary of the unit ``out`` (an arm, a model: steps under one MLflow child run) if it finished
        with fingerprint ``fp``, here or in a reuse folder (then its ``result.json`` copied here); else None."""
        kept = self.find(out, fp)
        if kept is not None and "reused_from" in kept:
            shards.write_json(storage.join(out, "result.json"), kept)
        return kept

    def keep(self, out: str, fp: str, summary: dict) -> None:
        """The unit ``out`` finished: ``summary`` in its ``result.json`` and its done-marker (fingerprint ``fp``)."""
        shards.write_json(storage.join(out, "result.json"), summary)
        shards.mark_done(out, steps.STEP, fp, summary)

    def corrupt(
        self,
        name: str,
        *,
        part: str,
        clean_fraction: float,
        seed: int,
        corruptions: list[str] | None = None,
        limit: int | None = None,
    ) -> str:
        """A split of the dataset corrupted by ``corruptions`` (default: the config's ``corruption``) into
        OUT/``name``; ``limit``: only the first rows of the part (source.limit)."""
        out = storage.join(self.out, name)
        source = {
            "dataset": self.cfg.dataset,
            "holdout": self.cfg.holdout,
            "part": part,
            "image_size": self.cfg.image_size,
        }
        if limit is not None:
            source["limit"] = limit
        flags = {
            "source": source,
            "corruptions": corruptions or self.cfg.corruption,
            "clean_fraction": clean_fraction,
            "seed": seed,
            "out": out,
            "overwrite": True,
        }
        ccfg = self.build("corrupt", flags)

        def work() -> dict:
            res = self.call("corrupt", ccfg)
            return {"out": res.out, "rows_out": res.rows_out, "rows_quarantined": res.rows_quarantined}

        # at clean_fraction 1 no row is corrupted: the split is the same under every corruption
        fp = self.print_of(ccfg, exclude={"corruptions"} if clean_fraction == 1.0 else ())
        self.step("corrupt", out, fp, work)
        return self.loc(out)

    def features(self, clean_train: str) -> str:
        if self.cfg.features:
            self.prints[self.cfg.features] = shards.fingerprint(self.cfg.features)
            return self.cfg.features
        out = storage.join(self.out, "prep", registry.get("features").folder)
        flags = {**self.cfg.features_stage, "dataset": clean_train, "where": "quality=clean", "out": out}
        fcfg = self.build("features", flags)

        def work() -> dict:
            s = self.call("features", fcfg)
            print(f"experiment: feature net trained ({s['task']}), held-out accuracy {s['accuracy']:.3f}")
            return dict(s)

        self.step("features", out, self.print_of(fcfg, self.prints[clean_train]), work)
        spec = f"net@{self.loc(out)}"
        self.prints[spec] = self.prints[out]
        return spec

    def clean_refs(self) -> dict:
        """The experiment presets' references (``prep/``): {"clean": the clean training part, "holdout": the
        held-out part, "features": the feature spec (trained on the clean part unless the config names one)}."""
        clean = self.corrupt("prep/clean-train", **CLEAN_SPLIT)
        holdout = self.corrupt("prep/clean-holdout", **{**CLEAN_SPLIT, "part": "holdout"})
        return {"clean": clean, "holdout": holdout, "features": self.features(clean)}

    def classifier(self, data: str, seed: int) -> str:
        out = storage.join(self.out, f"seed-{seed}", registry.get("train-classifier").folder)
        flags = {
            **self.cfg.classifier,
            "data": data,
            "out": out,
            "kind": "noise",
            "seed": seed,
            "mlflow": self.mlflow_for(self.parent_id, f"classifier seed {seed}"),
        }
        ccfg = self.build("train-classifier", flags)
        self.step(
            "train-classifier", out, self.print_of(ccfg, self.prints[data]), lambda: self.call("train-classifier", ccfg)
        )
        return self.loc(out)

    def annotate(
        self,
        data: str,
        classifier: str,
        mode: str,
        seed: int,
        rule: str | None = None,
        curves: str | None = None,
        sets: str = "all",
    ) -> tuple[str, float]:
        """σ_min per dataset or per sample (with ``rule``, else the annotate section's); ``curves``: an
        annotate output of the same seed whose curves to reuse (annotate checks they match); ``sets``: the
        per-dataset pooling, all corrupted rows as one set (every arm but the per-spec bound) or one set per
        corruption spec."""
        name = (
            f"{registry.get('annotate').folder}-{mode}"
            + (f"-{rule}" if rule else "")
            + ("-per-spec" if sets == "corruption" else "")
        )
        out = storage.join(self.out, f"seed-{seed}", name)
        mlflow = self.mlflow_for(self.parent_id, f"{name} seed {seed}")
        links = chain.wire(data, {"annotate": out}, classifier=classifier, mlflow=lambda _: mlflow)
        flags = {
            **self.cfg.annotate,
            **links["annotate"],
            "curves_from": curves,
            "mode": mode,
            "sets": sets,
            "seed": seed,
            "overwrite": True,
        }
        if rule:
            flags = {**flags, **self.cfg.rule_annotate.get(rule, {}), "rule": rule}
        acfg = self.build("annotate", flags)
        fp = self.print_of(acfg, self.prints[data], self.prints[classifier])

        def work() -> dict:
            s = self.call("annotate", acfg)
            return {"out": s["out"], "mean_sigma_min": s["mean_sigma_min"]}

        # annotate keeps curves of the same plan (a new τ or mode) and overwrites the rest on its own
        sigma = float(self.step("annotate", out, fp, work)["mean_sigma_min"])
        return self.loc(out), sigma

    def rows_print(self, data: str, where: str) -> str:
        """The fingerprint of what a step reads of ``data`` through the filter ``where`` (FIELD=V1[,V2]): the
        selected rows' ids and image bytes in order. The clean rows of a seed are the same under every
        corruption, so only-clean's runs get the same print in every experiment."""
        import hashlib

        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from ambient_ray.data.metadata import data_dir, parse_filter

        field, values = parse_filter(where)
        h = hashlib.sha256(where.encode())
        for f in sorted(storage.list_files(data_dir(data), (".parquet",))):
            fs, path = storage.filesystem(f)
            t = pq.read_table(path, filesystem=fs, columns=["id", field, "image"])
            t = t.filter(pc.is_in(t.column(field), pa.array(sorted(values))))
            for rid, img in zip(t.column("id").to_pylist(), t.column("image").to_pylist()):
                h.update(rid.encode() + b"\0" + hashlib.sha256(img).digest())
        return h.hexdigest()[:16]

    def arm(self, arm: str, seed: int, data: str, rows: str | None, refs: dict, sigma: float | None) -> dict:
        """train -> sample -> evaluate for one (arm, seed); returns its result (also in result.json).

        Each of the three steps is skipped when it finished with the same fingerprint (here or in a reuse
        folder), so a changed evaluate key re-evaluates without retraining, and a changed train key redoes
        all three. A filtered arm (only-clean) is fingerprinted by the rows it reads, not by ``data``."""
        out = storage.join(self.out, "runs", arm, f"seed-{seed}")
        outs = {stage: storage.join(out, registry.get(stage).folder) for stage in ("train", "sample", "evaluate")}

        def links(parent) -> dict[str, dict]:  # each step reads where the step before it finished (maybe reused)
            return chain.wire(
                data, outs, mlflow=lambda stage: self.mlflow_for(parent, f"{stage} {arm} seed {seed}"), where=self.loc
            )

        def tcfg(parent):
            return self.build("train", {**self.cfg.train, **links(parent)["train"], "rows": rows, "seed": seed})

        def scfg(parent):
            return self.build(
                "sample", {**self.cfg.sample, **links(parent)["sample"], "num": refs["num"], "seed": seed}
            )

        def ecfg(parent):
            flags = {
                **self.cfg.evaluate,
                **links(parent)["evaluate"],
                "reference": refs["clean"],
                "reference_where": "quality=clean",
                "holdout": refs["holdout"],
                "holdout_where": "quality=clean",
                "train": data,
                "train_where": rows,
                "features": refs["features"],
            }
            return self.build("evaluate", flags)

        p = self.prints
        data_fp = self.rows_print(data, rows) if rows else p[data]
        train_fp = self.print_of(tcfg(None), data_fp)
        sample_fp = self.print_of(scfg(None), train_fp)
        inputs = (sample_fp, data_fp, p[refs["clean"]], p[refs["holdout"]], p[refs["features"]])
        eval_fp = self.print_of(ecfg(None), *inputs)
        arm_fp = shards.fingerprint({"evaluate": eval_fp, "sigma": sigma})
        kept = self.finished(out, arm_fp)
        if kept is not None:
            return kept
        params = {"arm": arm, "seed": seed, "data": data, "rows": rows or ""}
        tags = {"stage": "experiment-arm", "arm": arm}
        # a redone arm logs into its own child run again (reopened from OUT/runs/ARM/seed-S/mlflow_run.json)
        with tracking.run(
            self.mlflow, out, name=f"{arm} seed {seed}", parent=self.parent_id, params=params, tags=tags
        ) as (child, uri):
            t0 = time.perf_counter()
            s = self.step("train", outs["train"], train_fp, lambda: self.call("train", tcfg(child)))
            r = self.step("sample", outs["sample"], sample_fp, lambda: self.call("sample", scfg(child)))
            e = self.step("evaluate", outs["evaluate"], eval_fp, lambda: self.call("evaluate", ecfg(child)))
            values = dict(e["metrics"])
            if sigma is not None:
                values["mean_sigma_min"] = sigma
            result = {
                "arm": arm,
                "seed": seed,
                "metrics": values,
                "seconds": time.perf_counter() - t0,
                "train_loss": s["metrics"].get("loss"),
                "mlflow_run_id": child,
            }
            tracking.log_metrics(child, uri, values)
            tracking.log_files(child, uri, {"grid.png": storage.read_bytes(r["grid"])})
        self.keep(out, arm_fp, result)
        return result


# ------------------------------------------------------------------------------ the table


def summarize(results: list[dict], arms: list[str]) -> dict:
    """Per arm and metric: mean, standard error over seeds (sample std / sqrt(n); 0 for one seed), n, values."""
    table: dict[str, dict] = {}
    for arm in arms:
        rows = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])
        entry: dict[str, dict] = {}
        for m in TABLE_METRICS:
            vals = [r["metrics"][m] for r in rows if m in r["metrics"]]
            if not vals:
                continue
            entry[m] = mean_se(vals)
        table[arm] = entry
    return table


def mean_se(vals: list[float]) -> dict:
    """{mean, se (sample std / sqrt(n); 0 for one value), n, values} of ``vals``."""
    n = len(vals)
    se = float(np.std(vals, ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return {"mean": float(np.mean(vals)), "se": se, "n": n, "values": vals}


PAIRED_METRICS = ("fd", "fd_holdout")
BASELINE = "only-clean"


def paired(results: list[dict], arms: list[str], base: str = BASELINE) -> dict:
    """Per arm (other than ``base``): the difference arm − base of each PAIRED_METRICS, seed by seed,
    then mean ± standard error over seeds. Arms of one seed share its data, classifier and sampler
    noise, so seed-to-seed swings common to all arms cancel here; an SE read off the per-arm table
    does not know that. Empty when ``base`` did not run."""
    by = {(r["arm"], r["seed"]): r["metrics"] for r in results}
    out: dict[str, dict] = {}
    for arm in arms:
        if arm == base:
            continue
        seeds = sorted(s for a, s in by if a == arm and (base, s) in by)
        if not seeds:
            continue
        out[arm] = {m: mean_se([by[(arm, s)][m] - by[(base, s)][m] for s in seeds]) for m in PAIRED_METRICS}
    return out


def paired_cells(d: dict) -> list[str]:
    """One arm's paired differences as table cells: mean ± SE of each PAIRED_METRICS."""
    return [f"{d[m]['mean']:+.2f} ± {d[m]['se']:.2f}" for m in PAIRED_METRICS]


def markdown(
    table: dict,
    cfg: ExperimentConfig,
    minutes: float,
    diffs: dict | None = None,
    arm_minutes: float | None = None,
    results: list[dict] | None = None,
) -> str:
    """``results.md``: the per-arm table, then the paired differences (each arm − only-clean, with the share
    of the only-clean → oracle gap it closes; each ambient-o arm − ambient-fixed), once each."""
    heads = {
        "fd": "FD (clean train) ↓",
        "fd_holdout": "FD (held-out) ↓",
        "precision": "precision ↑",
        "recall": "recall ↑",
        "memorization": "memorized",
        "mean_sigma_min": "mean σ_min",
    }
    results = results or []
    reused = sorted({f"{r['arm']} seed {r['seed']}" for r in results if "reused_from" in r})
    lines = [
        f"dataset {cfg.dataset}, corruption {', '.join(cfg.corruption)}, clean fraction {cfg.clean_fraction}, "
        f"seeds {','.join(map(str, cfg.seeds))}: mean ± standard error over seeds ({minutes:.0f} min"
        + (f"; the arms run here took {arm_minutes:.0f} min to train, sample and evaluate" if arm_minutes else "")
        + ")",
        "",
        "| arm | " + " | ".join(heads[m] for m in TABLE_METRICS) + " |",
        "|---|" + "---|" * len(TABLE_METRICS),
    ]
    if reused:
        lines.insert(1, f"\nTaken from the reuse folders (same fingerprint): {', '.join(reused)}.")
    for arm, entry in table.items():
        cells = []
        for m in TABLE_METRICS:
            e = entry.get(m)
            digits = 2 if m in ("fd", "fd_holdout", "mean_sigma_min") else 3
            cells.append("—" if e is None else f"{e['mean']:.{digits}f} ± {e['se']:.{digits}f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    oracle = (diffs or {}).get("oracle")
    if diffs:
        gap = oracle is not None and oracle["fd"]["mean"] < 0
        lines += [
            "",
            f"Paired by seed, each arm minus {BASELINE} (negative: better than filtering to the clean rows)"
            + ("; gap closed: the arm's FD difference as a share of the oracle's" if gap else "")
            + ":",
            "",
            f"| arm | FD − {BASELINE} | held-out FD − {BASELINE} |" + (" gap closed |" if gap else ""),
            "|---|---|---|" + ("---|" if gap else ""),
        ]
        for arm, d in diffs.items():
            cells = paired_cells(d)
            if gap:
                cells.append(f"{d['fd']['mean'] / oracle['fd']['mean']:.0%}")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    versus = paired(results, list(table), base="ambient-fixed") if "ambient-fixed" in table else {}
    versus = {a: d for a, d in versus.items() if arm_annotation(a)}
    if versus:
        lines += [
            "",
            "Paired by seed, per-sample annotation minus one σ_min for the set (negative: ambient-o better):",
            "",
            "| arm | FD − ambient-fixed | held-out FD − ambient-fixed |",
            "|---|---|---|",
        ]
        for arm, d in versus.items():
            lines.append(f"| {arm} | " + " | ".join(paired_cells(d)) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict, title: str) -> bytes:
    from ambient_ray.io import plots

    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    arms = list(table)
    for ax, m in zip(axes, ("fd", "fd_holdout")):
        means = [table[a].get(m, {}).get("mean", np.nan) for a in arms]
        ses = [table[a].get(m, {}).get("se", 0.0) for a in arms]
        ax.bar(
            range(len(arms)), means, yerr=ses, capsize=4, color=["#888", "#c44", "#d93", "#38c", "#4a4"][: len(arms)]
        )
        ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
        ax.set_ylabel("FD (lower is better)")
        ax.set_title("vs clean training part" if m == "fd" else "vs held-out part", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return plots.figure_png(fig)


# ------------------------------------------------------------------------------ driver


@contextlib.contextmanager
def parent_run(r: Runner, cfg, name: str, tags: dict) -> Iterator[None]:
    """The experiment's parent MLflow run (named ``cfg.mlflow.run_name``, else ``name``; every config key but
    mlflow's as a param), its id and URI in ``r.parent_id`` and ``r.uri``."""
    params = {k: v for k, v in cfgmod.flatten(cfg).items() if k.split(".")[0] != "mlflow"}
    name = cfg.mlflow.run_name or name
    with tracking.run(cfg.mlflow, r.out, name=name, parent="", params=params, tags=tags) as (r.parent_id, r.uri):
        yield


def publish(r: Runner, cfg, results: list[dict], minutes: float, tables: dict, md: str, png: bytes, flat: dict):
    """``results.json`` (the config, ``tables`` in order, every result), ``results.md`` and ``results.png`` under
    OUT, and on the parent MLflow run with the metrics ``flat``."""
    report = {"config": cfg.model_dump(mode="json"), **tables, "results": results, "minutes": minutes}
    report["mlflow_run_id"] = r.parent_id
    files = {"results.json": json.dumps(report, indent=1).encode(), "results.md": md.encode(), "results.png": png}
    for name, blob in files.items():
        storage.write_bytes(storage.join(r.out, name), blob)
    tracking.log_metrics(r.parent_id, r.uri, flat)
    tracking.log_files(r.parent_id, r.uri, files)


def report_tables(stage: str, s: dict) -> None:
    """A preset's command-line lines after a run (``stage``: its name): the minutes, the tables, the MLflow run."""
    from ambient_ray.stages import reports

    print(f"{stage}: {s['minutes']:.0f} min; tables: {s['out']}/results.md, results.json, results.png")
    reports.mlflow_line(s, tree=True)


def finish(r: Runner, tables: dict, md: str, minutes: float) -> dict:
    """Print ``results.md``; what a run returns: {"out", ``tables`` in order, "markdown", "mlflow_run_id",
    "mlflow_uri", "minutes", "ran", "reused"}."""
    print(md)
    return {
        "out": r.out,
        **tables,
        "markdown": md,
        "mlflow_run_id": r.parent_id,
        "mlflow_uri": r.uri,
        "minutes": minutes,
        "ran": r.ran,
        "reused": r.reused,
    }


def run(cfg: ExperimentConfig, progress: bool = True) -> dict:
    """Run every (arm, seed); returns {"out", "table", "markdown", "mlflow_run_id", "minutes", "ran"}
    ("ran": the steps done by this call, those skipped as finished left out)."""
    check(cfg)
    r = Runner(cfg, progress)
    storage.check_reachable(r.out)
    cfgmod.save_resolved(cfg, r.out)
    t0 = time.perf_counter()
    tags = {"stage": "experiment", "dataset": cfg.dataset, "corruption": ",".join(cfg.corruption)}
    with parent_run(r, cfg, "experiment", tags):
        print(
            f"experiment: {len(cfg.arms)} arms x {len(cfg.seeds)} seeds on {cfg.dataset}, {', '.join(cfg.corruption)}, "
            f"{cfg.clean_fraction:.0%} clean -> {r.out}" + (f"; MLflow run {r.parent_id}" if r.parent_id else "")
        )
        clean = r.corrupt("prep/clean-train", part="train", clean_fraction=1.0, seed=0)
        holdout = r.corrupt("prep/clean-holdout", part="holdout", clean_fraction=1.0, seed=0)
        from ambient_ray.data.metadata import load_metadata

        n_train = len(load_metadata(clean))
        refs = {"clean": clean, "holdout": holdout, "features": r.features(clean), "num": cfg.samples or n_train}
        results = []
        total, k = len(cfg.arms) * len(cfg.seeds), 0
        for seed in cfg.seeds:
            mixed = r.corrupt(f"seed-{seed}/mixed", part="train", clean_fraction=cfg.clean_fraction, seed=seed)
            annotated: dict[str, tuple[str, float]] = {}
            wanted = [a for a in cfg.arms if arm_annotation(a)]
            if wanted:
                clf = r.classifier(mixed, seed)
                curves = None  # the first annotation's curves serve the others (only the reading differs)
                for a in wanted:
                    mode, sets = arm_annotation(a)
                    annotated[a] = r.annotate(mixed, clf, mode, seed, rule=arm_rule(a), curves=curves, sets=sets)
                    curves = curves or annotated[a][0]
            for arm in cfg.arms:
                k += 1
                print(f"experiment: [{k}/{total}] {arm}, seed {seed}")
                if arm in annotated:
                    data, rows, sigma = annotated[arm][0], None, annotated[arm][1]
                elif arm == "oracle":
                    data, rows, sigma = clean, None, None
                else:
                    data, rows, sigma = mixed, ("quality=clean" if arm == "only-clean" else None), None
                res = r.arm(arm, seed, data, rows, refs, sigma)
                results.append(res)
                m = res["metrics"]
                print(
                    f"experiment: {arm}, seed {seed}: FD {m['fd']:.2f} (held-out {m['fd_holdout']:.2f}), "
                    f"precision {m['precision']:.3f}, recall {m['recall']:.3f}"
                )
        minutes = (time.perf_counter() - t0) / 60
        table = summarize(results, list(cfg.arms))
        diffs = paired(results, list(cfg.arms))
        ran = [x for x in results if "reused_from" not in x]
        md = markdown(table, cfg, minutes, diffs, sum(x.get("seconds", 0.0) for x in ran) / 60, results)
        png = plot(
            table, f"{cfg.dataset}, {', '.join(cfg.corruption)}, {cfg.clean_fraction:.0%} clean, {len(cfg.seeds)} seeds"
        )
        flat = {f"{m}.{arm}": e[m]["mean"] for arm, e in table.items() for m in e}
        publish(r, cfg, results, minutes, {"table": table, "paired": diffs}, md, png, flat)
    return finish(r, {"table": table}, md, minutes)
