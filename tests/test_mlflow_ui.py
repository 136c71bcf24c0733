"""The MLflow UI in a real browser: the link our summary line prints opens the runs table, not the GenAI view.

A pipeline's MLflow runs, made as the pipeline makes them (its run, one nested run per stage, through
``ambient_ray.io.tracking``; no training), on the session's real MLflow server; the pipeline's summary line (the
``ambient-ray pipeline`` report) prints the link, which headless Chromium (Debian's package, ``make browser``)
loads; the test reads the rendered page. ``AMBIENT_MLFLOW_SCREENSHOT=PATH`` also saves a screenshot of it (the
docs' ``docs/assets/mlflow-runs.png``).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
import time

import pytest

from ambient_ray.io import tracking
from ambient_ray.stages import reports

STAGES = ("corrupt", "train-classifier", "annotate", "train", "sample", "evaluate")
GENAI = ("Detect Issues", "Judges", "Evaluation runs", "Tool calls")  # the GenAI overview and its sidebar


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("Chromium is not installed: run `make browser` (it installs Debian's chromium package)")
    return found


def browse(url: str, *action: str, width: int = 1600) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url`` (a fresh profile: nothing a user chose before) with one ``action`` flag
    (``--dump-dom``, ``--screenshot=PATH``); virtual time lets the page's requests and rendering finish first."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--window-size={width},900",
            "--virtual-time-budget=15000",
            *action,
            url,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def page_text(url: str) -> str:
    """The rendered page's text (the DOM after its scripts ran), tags and styles stripped."""
    r = browse(url, "--dump-dom")
    assert r.returncode == 0 and "<body" in r.stdout, r.stderr[-2000:]
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", r.stdout, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)))


def test_printed_links_open_the_runs_table_with_the_stage_runs(mlflow_server, tmp_path, capfd):
    uri = mlflow_server.url
    # the shipped pipeline's experiment (maybe shared with other tests of the session: the link shows one pipeline)
    mcfg = tracking.MlflowConfig(tracking_uri=uri, experiment="ambient-ray-pipeline")
    out = str(tmp_path / "run")
    capfd.readouterr()
    stages = {}
    with tracking.run(mcfg, out, name="pipeline", params={"seed": 0}, tags={"stage": "pipeline"}) as (parent, _):
        for i, name in enumerate(STAGES):
            folder = f"{out}/{name}"
            with tracking.run(tracking.child(mcfg, name, parent), folder, params={"step": i}) as (run_id, _):
                tracking.log_metrics(run_id, uri, {"seconds": 1.0 + i})
                if name == "train":  # as the train stage does: its weights registered as a model version
                    model = f"ui-test-{time.time_ns()}"
                    assert tracking.register_model(run_id, uri, model, f"s3://b/{name}/model") == "1"
            stages[name] = {"out": folder, "mlflow_run_id": run_id}
    tracked = capfd.readouterr()
    for noise in ("View run", "View experiment", "Waiting up to"):  # MLflow's own lines, silenced
        assert noise not in tracked.out + tracked.err, (noise, tracked)

    reports.pipeline(None, {"minutes": 0.1, "out": out, "stages": stages, "mlflow_run_id": parent, "mlflow_uri": uri})
    summary = capfd.readouterr().out
    link = re.search(rf"MLflow: pipeline run {parent}: (\S+)", summary)
    assert link, summary
    url = link.group(1)
    assert url.startswith(f"{uri}/#/experiments/") and "workflowType=machine_learning" in url, url

    text = page_text(url)
    assert "Model training" in text and "Runs" in text, text[:3000]
    assert "7 matching runs" in text, text[:3000]  # the pipeline's run and its six stages' runs, one row each
    rows = text[text.index("Run Name") :]
    at = [rows.find(f" {name} ") for name in ("pipeline", *STAGES)]
    assert -1 not in at and at == sorted(at), (at, rows[:2000])  # every row present, in the order they started
    for genai in GENAI:
        assert genai not in text, (genai, text[:3000])

    # a stage's own line links its run page, under the experiment's "Runs" (not "Evaluations")
    reports.mlflow_line({**stages["train"], "mlflow_uri": uri})  # as `ambient-ray train` reports its run
    run_page = re.search(r"MLflow run \w+: (\S+)", capfd.readouterr().out).group(1)
    text = page_text(run_page)
    assert "Runs" in text and "Evaluations" not in text and "train" in text, text[:3000]
    for genai in GENAI:
        assert genai not in text, (genai, text[:3000])

    shot = os.environ.get("AMBIENT_MLFLOW_SCREENSHOT")
    if shot:
        r = browse(url, f"--screenshot={os.path.abspath(shot)}", width=1400)
        assert r.returncode == 0 and os.path.getsize(shot) > 0, r.stderr[-2000:]
