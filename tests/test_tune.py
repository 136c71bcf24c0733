"""The tune stage: a real Ray Tune search on the local cluster, trials nesting their own Ray Train runs,
MLflow on the real server, ASHA early stopping, resume, and the best config back into train."""

from __future__ import annotations

import json
import os
import signal
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ambient_ray import config as cfgmod
from ambient_ray.cli import main
from ambient_ray.config import ConfigError
from ambient_ray.io import storage
from ambient_ray.stages.corrupt import CorruptConfig, SourceConfig
from ambient_ray.stages.corrupt import run as corrupt_run
from ambient_ray.stages.train import TrainConfig
from tuning import search

MODEL = dict(img_resolution=8, in_channels=1, model_channels=16, channel_mult=[1, 2], label_dim=0)
STEPS = 20


def job(data, out, space, **kw):
    """A small search: 20 steps per trial, val_loss every 5, one worker of 1 CPU + the trial's 1 CPU."""
    base = dict(
        data=data,
        out=out,
        space=space,
        num_samples=1,
        scheduler="asha",
        report_every=5,
        samples=64,
        classifier_train=dict(
            steps=100,
            batch_size=64,
            log_every=50,
            checkpoint_every=100,
            cpus_per_worker=2,
            model=MODEL,
            optim=dict(lr=2e-3, warmup_steps=20),
        ),
        annotate=dict(grid_points=16, draws=2),
        train=dict(
            steps=STEPS,
            batch_size=32,
            checkpoint_every=10,
            log_every=5,
            sample_grid=0,
            model=MODEL,
            optim=dict(warmup_steps=2),
        ),  # lr: the default 1e-3, or searched
        sample=dict(sampler=dict(steps=6)),
        mlflow=dict(experiment="tests-tune"),
    )
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return search.load(flags=base)


def rows_of(folder):
    t = [pq.read_table(f) for f in storage.list_files(storage.join(folder, "data"), (".parquet",))]
    return pa.concat_tables(t).to_pandas().set_index("id")


@pytest.fixture(scope="module")
def mixed(ray_cluster, tmp_path_factory):
    """600 digits: 30 % clean, the rest blurred (σ_B = 1); 2 shards."""
    out = str(tmp_path_factory.mktemp("tune-data") / "mixed")
    corrupt_run(
        CorruptConfig(
            out=out,
            source=SourceConfig(dataset="digits", limit=600),
            corruptions=["blur:sigma=1"],
            clean_fraction=0.3,
            shard_size=300,
            preview=0,
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def searched(mixed, mlflow_server, tmp_path_factory):
    """4 trials: τ ∈ {0.3, 0.49} x lr ∈ {0.002, 50 (planted to diverge)}, λ_max drawn log-uniform; ASHA.

    The search is interrupted (SIGUSR1, which Ray Tune handles like Ctrl-C) as soon as the first trial
    has finished, then continued with ``ambient-ray tune --resume``. Returns (out, the interrupted
    run's summary, the final summary, the first trial's result.json mtime before the resume)."""
    out = str(tmp_path_factory.mktemp("tune") / "search")
    space = {
        "annotate.tau": {"grid": [0.3, 0.49]},
        "train.optim.lr": {"grid": [0.002, 50.0]},
        "train.ambient.lambda_max": {"loguniform": [1.5, 8.0]},
    }
    stop = threading.Event()

    def interrupt_after_first_trial():
        while not stop.wait(0.5):
            if storage.list_files(f"{out}/trials", ("result.json",)):
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    watcher = threading.Thread(target=interrupt_after_first_trial, daemon=True)
    watcher.start()
    try:
        first = search.run(job(mixed, out, space))
    finally:
        stop.set()
        watcher.join()
    done = storage.list_files(f"{out}/trials", ("result.json",))
    stamps = {f: os.stat(f).st_mtime_ns for f in done}
    assert main(["tune", "--resume", out]) == 0
    return out, first, json.loads(storage.read_bytes(f"{out}/summary.json")), stamps


def test_an_interrupted_search_resumes_without_rerunning_finished_trials(searched):
    out, first, final, stamps = searched
    assert first["completed"] == len(stamps) >= 1 and first["unfinished"] >= 1 and first["expected"] == 4
    assert final["unfinished"] == 0 and final["errors"] == 0 and final["trials"] == 4
    assert all(os.stat(f).st_mtime_ns == t for f, t in stamps.items())  # finished trials were not rerun


def test_search_runs_four_trials_and_writes_its_tables(searched):
    out, _, s, _ = searched
    assert s["trials"] == 4 and s["errors"] == 0 and s["completed"] >= 1
    with open(f"{out}/results.csv") as f:
        lines = f.read().splitlines()
    assert len(lines) == 5 and lines[0].startswith("trial_id,status,step")
    done = [json.loads(storage.read_bytes(f)) for f in storage.list_files(f"{out}/trials", ("result.json",))]
    assert len(done) == s["completed"] and all(d["metrics"]["step"] == STEPS and d["metrics"]["fd"] > 0 for d in done)
    # sorted by the metric: the best is the completed trial with the lowest val_loss
    assert s["best"]["val_loss"] == min(d["metrics"]["val_loss"] for d in done)
    assert storage.exists(f"{out}/search.png") and storage.exists(f"{out}/results.md")


def test_asha_stops_the_diverging_trials_early(searched):
    out, _, s, _ = searched
    huge = [r for r in _rows(out) if float(r["param:train.optim.lr"]) == 50.0]
    sane = [r for r in _rows(out) if float(r["param:train.optim.lr"]) == 0.002]
    assert len(huge) == 2 and len(sane) == 2
    assert all(r["status"] == "stopped early" and int(r["step"]) < STEPS for r in huge)
    assert any(r["status"] == "completed" for r in sane)
    assert s["best"]["param:train.optim.lr"] == 0.002


def _rows(out):
    import csv

    with open(f"{out}/results.csv") as f:
        return list(csv.DictReader(f))


def test_tau_changes_the_sigma_min_the_trial_trains_on(searched, mixed):
    out = searched[0]
    by_tau: dict[float, list] = {}
    for r in _rows(out):
        t = f"{out}/trials/{r['trial_id']}"
        report = json.loads(storage.read_bytes(f"{t}/annotated/annotation.json"))
        assert report["provenance"]["tau"] == float(r["param:annotate.tau"])
        # phase 2 only: the curves come from the search's prep, none are computed in the trial
        assert report["provenance"]["curves"] == f"{out}/prep/annotated" and not os.path.exists(f"{t}/annotated/curves")
        trained_on = yaml.safe_load(open(f"{t}/train/config.yaml"))["data"]
        assert trained_on == f"{t}/annotated"
        by_tau.setdefault(float(r["param:annotate.tau"]), []).append(rows_of(trained_on)["sigma_min"])
    lo, hi = by_tau[0.3][0], by_tau[0.49][0]
    assert (lo.index == hi.index).all()
    # the first σ where the classifier's probability passes τ (Eq. 3.2): a higher τ is passed no earlier
    assert (hi >= lo).all() and hi.mean() > lo.mean()
    assert (by_tau[0.3][0] == by_tau[0.3][1]).all()  # same τ, same annotation


def test_mlflow_holds_the_search_and_one_child_per_trial(searched, mlflow_server):
    from mlflow.tracking import MlflowClient

    out, _, s, _ = searched
    client = MlflowClient(mlflow_server.url)
    parent = client.get_run(s["mlflow_run_id"])
    assert parent.data.tags["stage"] == "tune" and parent.info.status == "FINISHED"
    assert (
        parent.data.tags["best_trial"] == s["best"]["trial_id"]
        and parent.data.tags["best_checkpoint"] == s["best"]["checkpoint"]
    )
    exp = parent.info.experiment_id
    children = client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = 'tune-trial'"
    )
    assert len(children) == 4
    for c in children:
        assert {"train.ambient.lambda_max", "annotate.tau", "train.optim.lr"} <= set(c.data.params)
        assert "val_loss" in c.data.metrics
        history = client.get_metric_history(c.info.run_id, "val_loss")
        assert len(history) >= 1 and min(h.step for h in history) == 5  # intermediate reports, not only the final one
        if float(c.data.params["train.optim.lr"]) == 50.0:  # stopped by ASHA: closed by the driver
            assert c.info.status == "KILLED" and c.data.tags["tune_outcome"] == "stopped-early"
        else:  # completed with its FD, or (a sane trial that trailed at a rung) stopped too
            assert (c.info.status == "FINISHED" and "fd" in c.data.metrics) or c.info.status == "KILLED"
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best.yaml", "search.png", "results.csv", "results.md"} <= names


def test_best_config_round_trips_into_train(searched, tmp_path):
    out, _, s, _ = searched
    best = f"{out}/best.yaml"
    cfg = cfgmod.build(TrainConfig, best)
    trial = f"{out}/trials/{s['best']['trial_id']}"
    assert cfg.data == f"{trial}/annotated" and cfg.out == f"{out}/best/train"
    assert cfg.ambient.lambda_max == pytest.approx(s["best"]["param:train.ambient.lambda_max"])
    assert cfg.optim.lr == 0.002 and cfg.report_every is None and not cfg.resume
    rc = main(
        [
            "train",
            "--config",
            best,
            "--set",
            "steps=2",
            "--set",
            f"out={tmp_path}/again",
            "--set",
            "mlflow.enabled=false",
        ]
    )
    assert rc == 0 and storage.exists(f"{tmp_path}/again/model/ema.safetensors")


def test_a_rerun_redoes_exactly_what_a_changed_key_touches(searched, mixed, tmp_path):
    """Resume (data/shards): a one-trial search on the searched run's classifier; re-run unchanged, nothing
    runs (not even Tune); with one train key changed, the trial is redone and the curves are kept."""
    small = dict(
        classifier=f"{searched[0]}/prep/classifier",
        num_samples=1,
        scheduler="none",
        samples=0,
        report_every=2,
        annotate=dict(grid_points=4, draws=2),
        train=dict(steps=4, checkpoint_every=4, log_every=2),
    )
    out = str(tmp_path / "small")
    space = {"annotate.tau": {"grid": [0.3]}}
    first = search.run(job(mixed, out, space, **small))
    assert first["completed"] == 1 and first["unfinished"] == 0
    (done,) = storage.list_files(f"{out}/trials", ("result.json",))
    curves = f"{out}/prep/annotated/_step.json"
    stamps = {p: os.stat(p).st_mtime_ns for p in (done, curves, f"{out}/summary.json")}
    again = search.run(job(mixed, out, space, **small))
    assert again["best"]["trial_id"] == first["best"]["trial_id"]
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items())  # nothing was redone, nothing rewritten
    changed = dict(small, train=dict(small["train"], optim=dict(warmup_steps=2, lr=2e-3)))
    third = search.run(job(mixed, out, space, **changed))
    assert third["completed"] == 1 and third["best"]["trial_id"] != first["best"]["trial_id"]
    assert not os.path.exists(done)  # the old trial's outputs are gone: they came from another train config
    new = f"{out}/trials/{third['best']['trial_id']}"
    assert yaml.safe_load(open(f"{new}/train/config.yaml"))["optim"]["lr"] == 2e-3
    assert os.stat(curves).st_mtime_ns == stamps[curves]  # the curves do not depend on train keys: kept
    assert json.loads(storage.read_bytes(f"{new}/annotated/annotation.json"))["provenance"]["curves"] == (
        f"{out}/prep/annotated"
    )


@pytest.mark.parametrize(
    "sets, message",
    [
        (["space.train.nope={uniform: [1, 2]}"], "unknown key"),
        (["space.annotate.tau={uniform: [0.4, 0.4]}"], "empty range"),
        (["space.train.ambient.lambda_max={loguniform: [0.5, 4]}"], "greater than 1"),
        (["space.annotate.tau={uniform: [0.3, 1.2]}"], "less than or equal to 0.5"),
        (["space.annotate.tau={choice: [0.0, 0.3]}"], "greater than 0"),
        (["space.annotate.tau={grid: [0.3, 0.4]}", "searcher=optuna"], "use choice"),
        (["space.annotate.tau={between: [0.3, 0.4]}"], "expected a domain"),
        (["train.ambient.lambda_max=3"], "both searched"),
        (["space.train.data={choice: [a]}"], "set by the search itself"),
        (["space.annotate.rule={choice: [first, median]}"], "first"),  # not an estimator: the known ones named
    ],
)
def test_bad_spaces_are_refused_before_any_trial(sets, message, tmp_path, capsys):
    out = tmp_path / "never"
    rc = main(
        [
            "tune",
            "--space",
            "tuning/ambient_o.yaml",
            "--data",
            str(tmp_path),
            "--out",
            str(out),
            *(f"--set={s}" for s in sets),
        ]
    )
    assert rc == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_the_shipped_space_loads_and_a_missing_searcher_package_is_named(monkeypatch):
    cfg = search.load("tuning/ambient_o.yaml", [], {"data": "x", "out": "y"})
    assert set(search.spacemod.flatten(cfg.space)) == {"train.ambient.lambda_max", "annotate.tau"}
    # the per-sample estimator is searchable like any annotate key
    rules = search.load(
        "tuning/ambient_o.yaml", ["space.annotate.rule={choice: [first, shrunk]}"], {"data": "x", "out": "y"}
    )
    assert "annotate.rule" in search.spacemod.flatten(rules.space)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hyperopt" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install hyperopt"):
        search.load(
            "tuning/ambient_o.yaml",
            ["searcher=hyperopt", "space.annotate.tau={choice: [0.3, 0.4]}"],
            {"data": "x", "out": "y"},
        )


def test_optuna_draws_every_searched_key_within_its_domain():
    """The optuna searcher on the checked space: its suggestions carry the dotted keys, inside the bounds,
    and it learns from completed trials (Ray Tune's OptunaSearch with a seeded TPE sampler)."""
    pytest.importorskip("optuna")
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch

    cfg = search.load(
        "tuning/ambient_o.yaml",
        ["searcher=optuna", "space.train.ema_decay={choice: [0.99, 0.999]}"],
        {"data": "x", "out": "y"},
    )
    flat = search.spacemod.flatten(cfg.space)
    opt = OptunaSearch(sampler=TPESampler(seed=0))
    assert opt.set_search_properties("val_loss", "min", search.spacemod.to_tune(flat))
    for i in range(6):
        c = opt.suggest(f"t{i}")
        assert set(c) == set(flat) and 0.3 <= c["annotate.tau"] <= 0.5 and 1.5 <= c["train.ambient.lambda_max"] <= 8
        assert c["train.ema_decay"] in (0.99, 0.999)
        opt.on_trial_complete(f"t{i}", {"val_loss": c["train.ambient.lambda_max"], "training_iteration": 1})
    assert len(opt._ot_study.trials) == 6 and opt._ot_study.best_value == min(t.value for t in opt._ot_study.trials)
