"""Bad input is one line on stderr and exit 2 for every stage that reads data, found before any Ray work; a typo
key is answered with 'did you mean'; a stage's ``--help`` and a config error are about as fast as ``--help``.

Each case runs the real command line in a subprocess (so an import-time traceback would show); none gets past the
input check, so none starts Ray or trains anything."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

CLI = os.path.join(os.path.dirname(sys.executable), "ambient-ray")

# every stage that reads a dataset: its arguments for input X and output O (other required keys filled in)
STAGES = {
    "corrupt": ["--dataset", "{x}", "--out", "{o}"],
    "train-classifier": ["--data", "{x}", "--out", "{o}"],
    "annotate": ["--data", "{x}", "--out", "{o}", "--fixed", "clean=0"],
    "precompute": ["--data", "{x}", "--out", "{o}", "--vae", "pixels"],
    "train": ["--data", "{x}", "--out", "{o}"],
    "locality": ["--checkpoint", "{o}/no-checkpoint", "--data", "{x}", "--out", "{o}"],
    "features": ["--dataset", "{x}", "--out", "{o}"],
    "evaluate": ["--samples", "{x}", "--reference", "digits", "--out", "{o}"],
}
# the column each stage names first when a Parquet input lacks its columns
FIRST_MISSING = {"corrupt": "image", "features": "image", "evaluate": "image"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of wrong-schema shards, one wrong-schema Parquet file, and a folder that does not exist."""
    root = tmp_path_factory.mktemp("bad-input")
    table = pa.table({"foo": [1, 2], "bar": ["a", "b"]})
    (root / "folder").mkdir()
    pq.write_table(table, root / "folder" / "part-0.parquet")
    pq.write_table(table, root / "one.parquet")
    return {"folder": str(root / "folder"), "file": str(root / "one.parquet"), "missing": str(root / "nowhere")}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


def _cases(inputs, out) -> dict[tuple[str, str], list[str]]:
    cases = {}
    for stage, template in STAGES.items():
        for kind, x in inputs.items():
            cases[stage, kind] = [stage] + [a.format(x=x, o=f"{out}/{stage}-{kind}") for a in template]
        # a key one edit away from 'out', which every stage has
        cases[stage, "typo"] = [stage] + [a.format(x=inputs["folder"], o=f"{out}/{stage}") for a in template]
        cases[stage, "typo"] += ["--set", "otu=/x"]
    return cases


@pytest.fixture(scope="module")
def results(inputs, tmp_path_factory):
    cases = _cases(inputs, tmp_path_factory.mktemp("out"))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        done = dict(zip(cases, pool.map(_run, cases.values())))
    return done


def _expected(stage: str, kind: str, inputs: dict) -> list[str]:
    """Words the one line must hold."""
    if kind == "typo":
        return ["config key 'otu': unknown key; did you mean 'out'?"]
    if kind == "missing":
        return [inputs["missing"], "no such file or folder"]
    column = FIRST_MISSING.get(stage, "id")
    where = inputs["file"] if kind == "file" else os.path.join(inputs["folder"], "part-0.parquet")
    # a single Parquet file is accepted where a folder of shards is read: its columns are what is refused
    return [f"{where}: missing column '{column}' (columns: foo, bar)"]


@pytest.mark.parametrize("kind", ["folder", "file", "missing", "typo"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_bad_input_is_one_line_and_exit_2(results, inputs, stage, kind):
    r = results[stage, kind]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"ambient-ray {stage}: error: ")
    for word in _expected(stage, kind, inputs):
        assert word in lines[0], lines[0]
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------ fast help

# A stage's --help builds its argparse flags from its config classes: pydantic models in modules without torch,
# Ray, DeepSpeed or MLflow. Beyond the top-level --help (the CLI, pydantic, PyYAML, pyarrow.fs) that is numpy and
# the config modules, measured at 0.8-1.5x the top-level time; importing torch alone made it ~4x and the training
# stack 15x or more. 3x leaves room for a loaded machine while catching a heavy import on the --help path.
RATIO = 3.0
ABSOLUTE_S = 1.5


def _best(args: list[str], n: int = 3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - t0)
        assert r.returncode in (0, 2), r.stderr[-2000:]
    return min(times)


def test_stage_help_and_config_errors_are_about_as_fast_as_the_top_level_help():
    top = _best(["--help"])
    for args in (["train", "--help"], ["train", "--data", "/d", "--out", "/o", "--set", "stpes=1"]):
        took = _best(args)
        print(f"ambient-ray {' '.join(args)}: {took:.2f} s (ambient-ray --help: {top:.2f} s)")
        assert took < ABSOLUTE_S, f"{args}: {took:.2f} s"
        assert took / top < RATIO, f"{args}: {took:.2f} s is {took / top:.1f}x ambient-ray --help ({top:.2f} s)"
