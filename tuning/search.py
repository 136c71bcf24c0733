"""The tune stage: a Ray Tune search over Ambient-o's knobs (λ_max, τ, crop-size threshold ε, any training key).

``ambient-ray tune --space tuning/ambient_o.yaml --data URI --out URI --num-samples N
[--scheduler asha] [--searcher optuna]``

Once per search (the driver, into ``OUT/prep``): the shared noise classifier (``classifier`` if
given, else trained on the data with the ``classifier_train`` keys) and the annotation curves
(``annotate`` phase 1, the expensive part). Per trial (a Tune function trial, its out is
``OUT/trials/<trial_id>``): re-annotate with the trial's τ (and ε) from those curves (phase 2 only),
train on its own Ray Train run nested inside the trial (the trial is the Train driver; each report
of the workers reaches Tune through ``TuneReportCallback``), then sample and score FD against the
data's clean rows. Every step leaves a fingerprinted done-marker (:mod:`ambient_ray.io.shards`), so a
restarted or resumed trial continues where it was, and a search re-run into its ``out`` with another
config redoes its trials but keeps the classifier and curves when their own inputs are unchanged.

The intermediate metric is ``val_loss``: the denoising loss of the network at a fixed σ grid on
clean rows (:func:`ambient_ray.diffusion.edm.validation_losses`), comparable across trials, unlike the
training loss (another τ moves every σ_min, another λ_max the buffer). ASHA and the searcher both use
it; the best trial is the completed one with the lowest ``metric`` (``val_loss`` or ``fd``).

Outputs under OUT: ``tune.yaml`` (the resolved search config; ``--resume OUT`` reads it),
``tune/search/`` (Ray Tune's experiment state), ``trials/<id>/`` (annotated, train, samples, eval,
``result.json``), ``results.csv`` and ``results.md`` (every trial, sorted by the metric),
``best.yaml`` (the best trial's train config, which ``ambient-ray train --config`` takes as is),
``search.png`` (the metric against each searched key), ``summary.json``. MLflow: one parent run for
the search holding the best config, checkpoint URI and plot; a child run per trial with its
parameters, intermediate metrics and final metrics; the trial's stage runs nested under it.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from ray.tune import Callback

from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError
from ambient_ray.io import ray_runtime, shards, storage, tracking
from ambient_ray.stages import registry
from ambient_ray.workflows import chain
from ambient_ray.workflows import steps as stepsmod
from tuning import space as spacemod
from tuning.config import TuneConfig, check, load  # noqa: F401 (re-exported)

# ------------------------------------------------------------------------------ one trial (runs in a Tune trial actor)


def trial_dir(job: dict, trial_id: str) -> str:
    return storage.join(job["out"], "trials", trial_id)


def _mlflow(job: dict, parent: str | None, name: str) -> dict:
    return tracking.child(job["mlflow"], name, parent)


def trial_print(job: dict, config: dict) -> str:
    """A trial's fingerprint: its searched values within this search (the search's own fingerprint)."""
    return shards.fingerprint({"search": job["fingerprint"], "params": {k: config[k] for k in sorted(config)}})


def _step(folder: str, fp: str, work) -> dict:
    """``work()`` unless ``folder`` holds its done-marker with this fingerprint; its summary either way."""
    return stepsmod.run(folder, fp, work)[0]


def _stage(name: str, flags: dict):
    """The config of a run of the registered stage ``name``."""
    return cfgmod.build(registry.get(name).model(), flags=flags)


def trial(config: dict, job: dict | None = None, parent: str | None = None) -> None:
    """One trial: re-annotate with its τ, train (reporting to Tune), sample, score; result.json.

    Each step leaves its done-marker, so a trial restarted by Tune continues after its last finished step."""
    import ray.tune
    import torch
    from ray.tune.integration.ray_train import TuneReportCallback

    assert job is not None
    torch.set_num_threads(max(1, int(job["trial_cpus"])))  # sampling and FD in this process: its own CPUs
    trial_id = ray.tune.get_context().get_trial_id()
    out = trial_dir(job, trial_id)
    fp = trial_print(job, config)
    kept = shards.done(out, stepsmod.STEP, fp)
    if kept is not None:  # finished before an interruption: hand Tune its last result again
        ray.tune.report(kept["metrics"])
        return
    params = {k: config[k] for k in sorted(config)}
    over = spacemod.split(params)
    prep = storage.join(job["out"], "prep")
    # annotate -> train (-> sample -> evaluate, unless the trial scores no samples), each in its stage's folder
    outs = {s: storage.join(out, registry.get(s).folder) for s in chain.CHAIN[: 4 if job["samples"] else 2]}
    annotated, train_out = outs["annotate"], outs["train"]
    # the driver closes the run of a trial that failed or was stopped early (TrialRuns)
    with tracking.run(
        job["mlflow"],
        out,
        name=f"trial {trial_id}",
        parent=parent,
        params={**params, "trial_id": trial_id},
        tags={"stage": "tune-trial", "trial_id": trial_id},
        close_on_error=False,
    ) as handle:
        child = handle.run_id
        links = chain.wire(
            job["data"], outs, classifier=job["classifier"], mlflow=lambda stage: _mlflow(job, child, stage)
        )
        aflags = {
            **cfgmod.merge(job["annotate"], over.get("annotate", {})),
            **links["annotate"],
            "curves_from": storage.join(prep, registry.get("annotate").folder),
            "overwrite": True,
        }
        acfg = _stage("annotate", aflags)
        a_fp = shards.config_print(acfg, job["curves_fingerprint"])
        report = _step(annotated, a_fp, lambda: registry.get("annotate").call(acfg, progress=False))
        tflags = {
            **cfgmod.merge(job["train"], over.get("train", {})),
            **links["train"],
            "report_every": job["report_every"],
            "resume": storage.exists(storage.join(train_out, "ray", "train")),
        }
        tcfg = _stage("train", tflags)
        t_fp = shards.config_print(tcfg, a_fp)
        s = _step(train_out, t_fp, lambda: registry.get("train").call(tcfg, callbacks=[TuneReportCallback()]))
        metrics = {k: v for k, v in (s["metrics"] or {}).items() if isinstance(v, (int, float))}
        metrics.setdefault("val_loss", math.nan)  # a run resumed after its last step reports nothing new: unknown
        metrics.update({"step": tcfg.steps, "mean_sigma_min": float(report["mean_sigma_min"])})
        if job["samples"]:
            sflags = {**cfgmod.merge(job["sample"], over.get("sample", {})), **links["sample"], "num": job["samples"]}
            scfg = _stage("sample", sflags)
            s_fp = shards.config_print(scfg, t_fp)
            _step(outs["sample"], s_fp, lambda: registry.get("sample").call(scfg, progress=False))
            eflags = {
                **job["evaluate"],
                **links["evaluate"],
                "reference": job["data"],
                "reference_where": "quality=clean",
            }
            ecfg = _stage("evaluate", eflags)
            e_fp = shards.config_print(ecfg, s_fp)
            e = _step(outs["evaluate"], e_fp, lambda: registry.get("evaluate").call(ecfg, progress=False))
            metrics.update({k: v for k, v in e["metrics"].items() if k in ("fd", "precision", "recall")})
        metrics["completed"] = 1
        result = {
            "trial_id": trial_id,
            "params": params,
            "metrics": metrics,
            "checkpoint": s["checkpoint"],
            "model": storage.join(train_out, "model"),
            "annotated": annotated,
            "train_config": storage.join(train_out, "config.yaml"),
            "mlflow_run_id": child,
        }
        tracking.log_metrics(child, handle.uri, {k: v for k, v in metrics.items() if k != "step"}, step=tcfg.steps)
        handle.tags = {"checkpoint": s["checkpoint"] or ""}
    shards.write_json(storage.join(out, "result.json"), result)
    shards.mark_done(out, stepsmod.STEP, fp, result)
    ray.tune.report(metrics)


# ------------------------------------------------------------------------------ the driver's side


class TrialRuns(Callback):
    """A Tune callback (in the driver): each trial's intermediate results into its MLflow child run,
    and, for a trial stopped early or failed, its child and train runs closed as KILLED or FAILED."""

    def __init__(self, job: dict):
        self.job = job
        self.known: dict[tuple, tuple[str, str]] = {}

    def _run(self, trial, *sub: str) -> tuple[str | None, str | None]:
        """The MLflow run a trial's stage recorded in its ``mlflow_run.json`` (none yet: (None, None))."""
        key = (trial.trial_id, *sub)
        if key not in self.known:
            marker = storage.join(trial_dir(self.job, trial.trial_id), *sub, "mlflow_run.json")
            if not storage.exists(marker):
                return None, None
            m = json.loads(storage.read_bytes(marker))
            self.known[key] = (m["run_id"], m["tracking_uri"])
        return self.known[key]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        values = {k: v for k, v in result.items() if k.startswith("val_loss") or k in ("loss", "lr")}
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if values and "completed" not in result:  # the final result is logged by the trial itself
            tracking.log_metrics(*self._run(trial), values, step=int(result.get("step", 0)))

    def _close(self, trial, status: str, outcome: str) -> None:
        folder = trial_dir(self.job, trial.trial_id)
        if shards.done(folder, stepsmod.STEP, trial_print(self.job, trial.config)) is not None:
            return  # completed: the trial closed its own runs
        storage.write_bytes(storage.join(folder, "outcome.json"), json.dumps({"outcome": outcome}).encode())
        for sub in (("train",), ()):
            run_id, uri = self._run(trial, *sub)
            tracking.finish(run_id, uri, status=status, tags={"tune_outcome": outcome})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, "KILLED", "stopped-early")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED", "error")


def _dirname(trial) -> str:
    """A trial's folder under tune/search: its id (as under OUT/trials)."""
    return trial.trial_id


def resources(cfg: TuneConfig) -> tuple[dict, int]:
    """The trial's resources and the default concurrency; refuses a trial the cluster cannot hold."""
    import ray

    tcfg = base_train(cfg)
    cpus = ray.cluster_resources().get("CPU", 0)
    need = cfg.trial_cpus + tcfg.num_workers * tcfg.cpus_per_worker
    if need > cpus:
        raise ConfigError(
            f"a trial needs {need:g} CPUs (trial_cpus {cfg.trial_cpus:g} + train.num_workers {tcfg.num_workers} x "
            f"train.cpus_per_worker {tcfg.cpus_per_worker:g}) but the cluster has {cpus:g}"
        )
    res = {"CPU": cfg.trial_cpus}
    if cfg.trial_gpus:
        res["GPU"] = cfg.trial_gpus
    return res, max(1, int(cpus // need))


def base_train(cfg: TuneConfig):
    """The train section as a TrainConfig (placeholder data and out): its workers and steps."""
    return _stage("train", {"data": "x", "out": "x", **cfg.train})


def build_tuner(cfg: TuneConfig, job: dict, parent: str | None, resume: bool):
    """A new Tuner, or the interrupted one restored (finished trials are kept, not rerun)."""
    from ray import tune

    fs, path = storage.filesystem(storage.join(job["out"], "tune"))
    trial_resources, fits = resources(cfg)
    trainable = tune.with_resources(tune.with_parameters(trial, job=job, parent=parent), trial_resources)
    exp = f"{path}/search"
    if resume:
        if not tune.Tuner.can_restore(exp, storage_filesystem=fs):
            raise ConfigError(f"nothing to resume in {job['out']}: no Ray Tune experiment state under tune/search")
        print(f"tune: resuming the search in {job['out']} (finished trials are kept)")
        return tune.Tuner.restore(exp, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    steps = base_train(cfg).steps
    scheduler = None
    if cfg.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # max_t above the last step: ASHA stops any result at max_t, which would cut a trial before its FD
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=steps + 1,
            grace_period=cfg.grace_period or cfg.report_every,
            reduction_factor=cfg.reduction_factor,
        )
    search_alg = None
    if cfg.searcher == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(sampler=TPESampler(seed=cfg.seed))
    elif cfg.searcher == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        search_alg = HyperOptSearch(random_state_seed=cfg.seed)
    concurrency = cfg.max_concurrent_trials or fits
    flat = spacemod.flatten(cfg.space)
    return tune.Tuner(
        trainable,
        param_space=spacemod.to_tune(flat),
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=cfg.num_samples,
            max_concurrent_trials=concurrency,
            trial_dirname_creator=_dirname,
        ),
        run_config=tune.RunConfig(
            name="search",
            storage_path=path,
            storage_filesystem=fs,
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=cfg.trial_max_failures, fail_fast=cfg.fail_fast),
            callbacks=[TrialRuns(job)],
        ),
    )


NOT_SEARCH = {"out", "mlflow", "max_concurrent_trials", "trial_cpus", "trial_gpus", "trial_max_failures", "fail_fast"}
SEARCH = "_search"  # the search's done-marker: OUT/_search.json


def _prep_configs(cfg: TuneConfig, parent: str | None) -> tuple[Any, Any]:
    """The shared classifier's config (None when ``classifier`` is given) and the curves' annotate config."""
    prep = storage.join(cfg.out, "prep")
    mlflow = cfg.mlflow.model_dump()
    clf = None
    if not cfg.classifier:
        flags = {
            **cfg.classifier_train,
            "data": cfg.data,
            "out": storage.join(prep, registry.get("train-classifier").folder),
            "kind": "noise",
            "mlflow": tracking.child(mlflow, "classifier", parent),
        }
        clf = _stage("train-classifier", flags)
    curves = {"annotate": storage.join(prep, registry.get("annotate").folder)}
    links = chain.wire(
        cfg.data,
        curves,
        classifier=cfg.classifier or clf.out,
        mlflow=lambda _: tracking.child(mlflow, "annotate (curves)", parent),
    )
    return clf, _stage("annotate", {**cfg.annotate, **links["annotate"], "overwrite": True})


def fingerprints(cfg: TuneConfig) -> dict[str, str]:
    """Fingerprints (:mod:`ambient_ray.io.shards`) of the shared classifier, the curves, and the search
    (every key its trials depend on: all but ``out``, MLflow and the trials' resources)."""
    manifest = shards.read_marker(cfg.data, "_manifest")  # a corrupt output: the plan that made it
    data = (manifest or {}).get("fingerprint", "")
    clf_cfg, curves_cfg = _prep_configs(cfg, None)
    clf = shards.config_print(clf_cfg, data) if clf_cfg else shards.fingerprint(cfg.classifier)
    curves = shards.config_print(curves_cfg, data, clf)
    keep = cfg.model_dump(mode="json", exclude=NOT_SEARCH)
    search = shards.fingerprint({"config": keep, "data": data, "classifier": clf, "curves": curves})
    return {"classifier": clf, "curves": curves, "search": search}


def prepare(cfg: TuneConfig, job: dict, parent: str | None) -> None:
    """The shared classifier and the annotation curves, once per search (skipped when done with the same
    fingerprint, so a search redone for another train key keeps them)."""
    prints = fingerprints(cfg)
    clf, curves = _prep_configs(cfg, parent)
    if clf is not None:
        stepsmod.run(clf.out, prints["classifier"], lambda: registry.get("train-classifier").call(clf), clear=True)
        job["classifier"] = clf.out

    def annotate() -> dict:
        s = registry.get("annotate").call(curves, progress=True)
        return {"out": s["out"], "mean_sigma_min": s["mean_sigma_min"]}

    stepsmod.run(curves.out, prints["curves"], annotate)


def collect(job: dict, grid, metric: str) -> list[dict]:
    """One row per trial: its parameters, last reported metrics and how it ended; sorted by ``metric``."""
    rows = []
    for res in grid:
        m = dict(res.metrics or {})
        tid = os.path.basename(res.path.rstrip("/"))  # _dirname: the trial id
        final = shards.done(trial_dir(job, tid), stepsmod.STEP, trial_print(job, res.config or {}))
        if final:
            m.update(final["metrics"])
        outcome = storage.join(trial_dir(job, tid), "outcome.json")
        stopped = storage.exists(outcome) and json.loads(storage.read_bytes(outcome))["outcome"] == "stopped-early"
        status = "completed" if final else "error" if res.error else "stopped early" if stopped else "unfinished"
        rows.append(
            {
                "trial_id": tid,
                "status": status,
                "step": int(m.get("step", 0) or 0),
                **{f"param:{k}": v for k, v in (res.config or {}).items()},
                "val_loss": m.get("val_loss"),
                "fd": m.get("fd"),
                "mean_sigma_min": m.get("mean_sigma_min"),
                "checkpoint": final["checkpoint"] if final else None,
            }
        )

    def key(r):
        v = r.get(metric)
        return (r["status"] != "completed", v is None or not math.isfinite(v), v if v is not None else 0.0)

    return sorted(rows, key=key)


def tables(rows: list[dict]) -> tuple[str, str]:
    import csv
    import io

    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("—" if v is None else str(v))

    show = [c for c in cols if c != "checkpoint"]
    md = ["| " + " | ".join(c.removeprefix("param:") for c in show) + " |", "|" + "---|" * len(show)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in show) + " |" for r in rows]
    return buf.getvalue(), "\n".join(md) + "\n"


def plot(rows: list[dict], metric: str) -> bytes:
    """The metric against each searched key, one panel per key; completed trials filled, stopped ones hollow."""
    from ambient_ray.io import plots

    plt = plots.pyplot()
    keys = [k for k in rows[0] if k.startswith("param:")] if rows else []
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.4 * max(1, len(keys)), 3.0), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for status, style in (
            ("completed", {"c": "#38c"}),
            ("stopped early", {"facecolors": "none", "edgecolors": "#c44"}),
        ):
            pts = [(r[k], r[metric] if r[metric] is not None else r["val_loss"]) for r in rows if r["status"] == status]
            pts = [(x, y) for x, y in pts if isinstance(x, (int, float)) and y is not None and math.isfinite(y)]
            if pts:
                ax.scatter(*zip(*pts), label=status, **style)
        best = rows[0]
        if best["status"] == "completed" and isinstance(best[k], (int, float)) and best[metric] is not None:
            ax.scatter([best[k]], [best[metric]], marker="*", s=160, c="#d93", label="best", zorder=3)
        ax.set_xlabel(k.removeprefix("param:"), fontsize=8)
        ax.set_ylabel(metric + " (last reported)" if metric == "val_loss" else metric, fontsize=8)
        if "lambda_max" in k or "lr" in k.split(".")[-1]:
            ax.set_xscale("log")
        ys = [r[metric] if r[metric] is not None else r["val_loss"] for r in rows]
        ys = [y for y in ys if y is not None and math.isfinite(y) and y > 0]
        if ys and max(ys) > 100 * min(ys):  # a diverged trial (val_loss 1e12) would flatten the rest
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"search: {len(rows)} trials", fontsize=9)
    return plots.figure_png(fig)


def best_config(job: dict, best: dict) -> str:
    """The best trial's resolved train config as YAML for ``ambient-ray train --config`` (a fresh out, no resume)."""
    import yaml

    data = yaml.safe_load(storage.read_bytes(storage.join(trial_dir(job, best["trial_id"]), "train", "config.yaml")))
    data.update(
        {
            "out": storage.join(job["out"], "best", "train"),
            "resume": False,
            "report_every": None,
            "debug_fail_at_step": None,
        }
    )
    data["mlflow"] = {**data.get("mlflow", {}), "run_name": None, "parent_run_id": None}
    params = ", ".join(f"{k}={best[k]!r}" for k in best if k.startswith("param:"))
    head = (
        f"# best trial {best['trial_id']} of the search in {job['out']}: val_loss {best['val_loss']}, fd {best['fd']}\n"
        f"# searched: {params.replace('param:', '')}\n# its checkpoint: {best['checkpoint']}\n"
        f"# ambient-ray train --config best.yaml  (trains it again into 'out')\n"
    )
    return head + yaml.safe_dump(data, sort_keys=False)


def run(cfg: TuneConfig | None = None, resume: str | None = None) -> dict:
    """Run (or, with ``resume`` = a search's OUT, continue) a search; returns the summary.

    Into the ``out`` of an earlier search: a finished one with the same fingerprint (:func:`fingerprints`)
    is not run again (its recorded summary is returned); one of another config is redone, keeping
    its classifier and curves where their own fingerprints are unchanged; an unfinished one of the same
    config is refused (continue it with ``resume``)."""
    if resume:
        uri = storage.join(storage.normalize(resume), "tune.yaml")
        if not storage.exists(uri):
            raise ConfigError(f"--resume {resume}: no tune.yaml there; is it the --out of a search?")
        cfg = load(uri)
    assert cfg is not None
    out = storage.normalize(cfg.out)
    storage.check_reachable(out)
    # trials run in their own folders: every URI absolute, the tracking URI resolved here
    cfg = cfg.model_copy(
        update={
            "out": out,
            "data": storage.normalize(cfg.data),
            "classifier": storage.normalize(cfg.classifier) if cfg.classifier else None,
        }
    )
    prints = fingerprints(cfg)
    if not resume and storage.exists(storage.join(out, "tune.yaml")):
        kept = shards.done(out, SEARCH, prints["search"])
        if kept is not None:
            print(f"tune: the search in {out} finished with this very config; nothing to redo")
            return kept
        if not shards.manifest_changed(out, prints["search"]):
            raise ConfigError(f"{out} already holds a search; continue it with --resume {out}, or use another --out")
        print(
            f"tune: the config of the search in {out} changed since it ran: its trials are redone "
            "(the classifier and curves are kept where unchanged)"
        )
        for sub in ("tune", "trials", f"{SEARCH}.json", "mlflow_run.json"):  # a new search: a new MLflow run
            shards.clear(storage.join(out, sub))
    ray_runtime.ray_init(out)
    cfg.mlflow = cfg.mlflow.model_copy(
        update={"tracking_uri": tracking.tracking_uri(cfg.mlflow.tracking_uri) if cfg.mlflow.enabled else None}
    )
    resources(cfg)
    if not resume:
        cfgmod.save_resolved(cfg, out, "tune.yaml")
    shards.write_manifest(out, prints["search"])
    job = {**cfg.model_dump(mode="json"), "fingerprint": prints["search"], "curves_fingerprint": prints["curves"]}
    flat = spacemod.flatten(cfg.space)
    params = {
        "space": json.dumps(flat),
        "searcher": cfg.searcher,
        "scheduler": cfg.scheduler,
        "num_samples": cfg.num_samples,
        "metric": cfg.metric,
        "report_every": cfg.report_every,
        "data": cfg.data,
    }
    t0 = time.perf_counter()
    with tracking.run(
        cfg.mlflow,
        out,
        name=cfg.mlflow.run_name or "tune",
        params=params,
        tags={"stage": "tune", "space_digest": spacemod.digest(flat)},
    ) as handle:
        parent, muri = handle
        prepare(cfg, job, parent)
        print(
            f"tune: {cfg.num_samples} samples of {', '.join(flat)} ({cfg.searcher}, scheduler {cfg.scheduler}) -> {out}"
            + (f"; MLflow run {parent}" if parent else "")
        )
        grid = build_tuner(cfg, job, parent, bool(resume)).fit()
        rows = collect(job, grid, cfg.metric)
        csv_text, md = tables(rows)
        files: dict[str, bytes] = {"results.csv": csv_text.encode(), "results.md": md.encode()}
        if rows:
            files["search.png"] = plot(rows, cfg.metric)
        best = rows[0] if rows and rows[0]["status"] == "completed" else None
        if best:
            files["best.yaml"] = best_config(job, best).encode()
        # an interrupted search has trials it never started (the grid has none for them yet)
        grids = [len(d["grid"]) for d in flat.values() if "grid" in d]
        expected = cfg.num_samples * math.prod(grids) if cfg.searcher in ("random", "grid") else cfg.num_samples
        ended = sum(r["status"] in ("completed", "stopped early", "error") for r in rows)
        unfinished = [r for r in rows if r["status"] in ("error", "unfinished")] + [None] * max(0, expected - len(rows))
        summary = {
            "out": out,
            "trials": len(rows),
            "completed": sum(r["status"] == "completed" for r in rows),
            "stopped_early": sum(r["status"] == "stopped early" for r in rows),
            "errors": sum(r["status"] == "error" for r in rows),
            "unfinished": max(0, expected - ended),
            "expected": expected,
            "best": best,
            "metric": cfg.metric,
            "minutes": (time.perf_counter() - t0) / 60,
            "mlflow_run_id": parent,
        }
        files["summary.json"] = json.dumps(summary, indent=1, default=str).encode()
        for name, data in files.items():
            storage.write_bytes(storage.join(out, name), data)
        tracking.log_files(parent, muri, files)
        if best:
            tracking.log_metrics(
                parent, muri, {f"best_{k}": best[k] for k in ("val_loss", "fd") if best[k] is not None}
            )
        tags = (
            {
                "best_trial": best["trial_id"],
                "best_checkpoint": best["checkpoint"],
                "best_config": storage.join(out, "best.yaml"),
                **{f"best.{k.removeprefix('param:')}": best[k] for k in best if k.startswith("param:")},
            }
            if best
            else {}
        )
        handle.status, handle.tags = ("FAILED" if unfinished else "FINISHED"), tags
    if not unfinished:
        shards.mark_done(out, SEARCH, prints["search"], summary)
    print(md)
    if unfinished:
        print(
            f"tune: {len(unfinished)} trials failed or did not finish; continue the search with: "
            f"ambient-ray tune --resume {out}"
        )
    elif best:
        print(
            f"tune: best trial {best['trial_id']} ({cfg.metric} {best[cfg.metric]}); "
            f"its train config: {storage.join(out, 'best.yaml')}"
        )
    return summary
