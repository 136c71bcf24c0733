"""The demo's key outputs are those recorded before the second-wave restructuring.

``tests/data/demo_reference.json`` was recorded by ``tests/demo_fingerprint.py`` from the short demo below,
run on the first-wave layout (commit 1c41918): the corrupt shards, the annotation curves, σ_min per row, the
final training loss and the sample array. A refactor that changes any number fails here: the shards, σ_min
and samples bit for bit, the curves (their mean over the rows, added later from a run of this test whose σ_min,
samples and loss matched the recording) and the loss to float32 precision, whose last bits vary by CPU. The
short demo pins ``annotate.rule=first``, the only per-sample rule when it was recorded (the default is now
``shrunk``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.demo_fingerprint import fingerprint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = [
    "classifier.steps=40",
    "classifier.checkpoint_every=40",
    "classifier.log_every=20",
    "train.steps=40",
    "train.checkpoint_every=40",
    "train.log_every=20",
    "train.sample_grid=16",
    "sample.num=32",
    "annotate.rule=first",  # the recording's rule: per-sample σ_min was the first crossing before issue 21
]


@pytest.mark.own_ray_cluster  # the demo starts a Ray instance of its own: run before the session's cluster
def test_short_demo_matches_the_recorded_outputs(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "RAY_ADDRESS"))}
    sets = [a for s in SHORT for a in ("--set", s)]
    r = subprocess.run(
        [sys.executable, "-m", "jobs.demo", "--out", str(out), *sets],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(REPO, "tests", "data", "demo_reference.json")) as f:
        recorded = json.load(f)
    got = fingerprint(str(out))
    # bit for bit: the corrupt shards, σ_min per row, the samples
    exact = ("corrupt_rows", "corrupt", "sigma_min", "mean_sigma_min", "samples", "samples_mean")
    assert {k: got[k] for k in exact} == {k: recorded[k] for k in exact}
    # the classifier's curves and the training loss go through float32 arithmetic whose last bits differ
    # between CPU models: equal to float32 precision (a change of the computation moves them far more)
    assert got["curve_mean"] == pytest.approx(recorded["curve_mean"], abs=1e-6)
    assert got["final_loss"] == pytest.approx(recorded["final_loss"], rel=1e-6)
