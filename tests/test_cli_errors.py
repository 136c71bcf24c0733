"""Bad input is one line on stderr and exit 2 for every stage that reads data, found before any Ray work; a typo
key is answered with 'did you mean'; a stage's ``--help`` and a config error are about as fast as ``--help``.

Each case runs the real command line in a subprocess (so an import-time traceback would show); none gets past the
input check, so none starts Ray or trains anything."""

from __future__ import annotations

import os
import statistics
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
    # a single Parquet file is accepted where a folder of shards is read: its columns are what is refused (corrupt
    # reads images, or noisy arrays in their place)
    alternative = " (or 'noisy' for noisy data)" if stage == "corrupt" else ""
    return [f"{where}: missing column '{column}'{alternative} (columns: foo, bar)"]


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


def _timed(args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)
    return time.perf_counter() - t0, r


def _best(args: list[str], n: int = 3) -> float:
    times = []
    for _ in range(n):
        took, r = _timed(args)
        times.append(took)
        assert r.returncode in (0, 2), r.stderr[-2000:]
    return min(times)


def _fast_commands() -> list[list[str]]:
    """Every registered stage's --help, and for each stage with a config a config error (an unknown key)."""
    from ambient_ray.stages import registry

    commands = []
    for name in registry.STAGES.names():
        commands.append([name, "--help"])
        if registry.get(name).config is not None:
            commands.append([name, "--set", "otu=1"])
    return commands


def test_stage_help_and_config_errors_are_about_as_fast_as_the_top_level_help():
    """Each command timed once, two at a time, beside runs of the top-level --help timed the same way; one over a
    bound is timed again alone (best of 3, against the top-level --help alone) before it counts as slow."""
    commands = _fast_commands()
    every = max(1, len(commands) // 4)  # the top-level --help between every few commands, under the same load
    runs = [["--help"]]
    for i in range(0, len(commands), every):
        runs += commands[i : i + every] + [["--help"]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_timed, runs))
    top = statistics.median(took for args, (took, _) in zip(runs, results) if args == ["--help"])
    alone = None  # the top-level --help timed alone, where a command is timed again
    slow = []
    for args, (took, r) in zip(runs, results):
        if args == ["--help"]:
            continue
        assert r.returncode in (0, 2), f"{args}: {r.stderr[-2000:]}"
        if "--set" in args:  # the config's own error, not argparse's
            assert "config key 'otu': unknown key" in r.stderr, f"{args}: {r.stderr[-2000:]}"
        ref = top
        if took >= ABSOLUTE_S or took / ref >= RATIO:
            alone = alone or _best(["--help"])
            took, ref = _best(args), alone
        print(f"ambient-ray {' '.join(args)}: {took:.2f} s (ambient-ray --help: {ref:.2f} s)")
        if took >= ABSOLUTE_S or took / ref >= RATIO:
            slow.append(f"ambient-ray {' '.join(args)}: {took:.2f} s, {took / ref:.1f}x ({ref:.2f} s)")
    assert not slow, f"slower than {ABSOLUTE_S} s or {RATIO}x ambient-ray --help: " + "; ".join(slow)
