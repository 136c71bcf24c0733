"""The pipeline's config checks, fingerprints and resume decisions (no Ray: the job itself runs in
test_cluster_local)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError
from ambient_ray.workflows import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "jobs", "configs", "pipeline.yaml")


def load(*sets: str, out: str = "runs/x") -> pipeline.PipelineConfig:
    return cfgmod.build(pipeline.PipelineConfig, SHIPPED, [f"out={out}", *sets])


def test_the_shipped_config_wires_every_stage_to_the_one_before(tmp_path):
    stages = pipeline.stage_configs(load(out=str(tmp_path)))
    assert stages["classifier"].data == stages["annotate"].data == stages["corrupt"].out
    assert stages["annotate"].classifier == stages["classifier"].out
    assert stages["train"].data == stages["annotate"].out
    assert stages["sample"].checkpoint == stages["train"].out
    assert stages["evaluate"].samples == stages["sample"].out
    assert (stages["evaluate"].reference, stages["evaluate"].reference_where) == (
        stages["corrupt"].out,
        "quality=clean",
    )
    assert stages["classifier"].kind == "noise"
    assert all(stages[s].out.startswith(str(tmp_path)) for s in pipeline.STAGES)
    given = pipeline.stage_configs(load("evaluate.reference=digits", out=str(tmp_path)))["evaluate"]
    assert (given.reference, given.reference_where) == ("digits", None)


@pytest.mark.parametrize(
    "item, key",
    [
        ("train.lamda_max=4", "train.lamda_max"),
        ("annotate.tau=0.9", "annotate.tau"),
        ("classifier.optim.lr=-1", "classifier.optim.lr"),
        ("train.data=s3://elsewhere", "train.data"),
        ("sample.checkpoint=x", "sample.checkpoint"),
        ("corrupt.corruptions=[blurr:sigma=1]", "corrupt.corruptions"),
    ],
)
def test_a_bad_key_is_refused_by_name_before_any_stage(item, key, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        pipeline.stage_configs(load(item, out=str(tmp_path)))


def test_a_bad_key_fails_the_cli_with_code_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--config", SHIPPED, "--set", f"out={out}", "--set", "train.steps=-3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "train.steps" in r.stderr
    assert not out.exists()


def test_fingerprints_change_from_the_edited_stage_onwards(tmp_path):
    base = pipeline.fingerprints(pipeline.stage_configs(load(out=str(tmp_path))))
    edited = pipeline.fingerprints(pipeline.stage_configs(load("train.optim.lr=0.001", out=str(tmp_path))))
    assert [base[s] == edited[s] for s in pipeline.STAGES] == [True, True, True, False, False, False]
    early = pipeline.fingerprints(pipeline.stage_configs(load("annotate.tau=0.4", out=str(tmp_path))))
    assert [base[s] == early[s] for s in pipeline.STAGES] == [True, True, False, False, False, False]
    # MLflow settings are not part of the work: a new tracking server does not redo anything
    moved = pipeline.fingerprints(pipeline.stage_configs(load("mlflow.experiment=other", out=str(tmp_path))))
    assert moved == base


def _finished(folder, fingerprint: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "out.bin").write_bytes(b"kept")
    summary = {"out": str(folder), "figures": {}}
    (folder / pipeline.MARKER).write_text(json.dumps({"stage": "x", "fingerprint": fingerprint, "summary": summary}))


def test_prepare_keeps_unfinished_shards_clears_stale_runs_and_resumes_training(tmp_path):
    stages = pipeline.stage_configs(load(out=str(tmp_path)))
    # a finished stage of another config: cleared, so it reruns from nothing
    _finished(tmp_path / "annotated", "old")
    pipeline._prepare("annotate", stages["annotate"], "new")
    assert not (tmp_path / "annotated").exists()
    # an unfinished corrupt keeps its shards (corrupt resumes shard by shard)
    (tmp_path / "corrupt" / "data").mkdir(parents=True)
    (tmp_path / "corrupt" / "data" / "shard-00000.parquet").write_bytes(b"x")
    assert pipeline._prepare("corrupt", stages["corrupt"], "f") is stages["corrupt"]
    assert (tmp_path / "corrupt" / "data" / "shard-00000.parquet").exists()
    # an unfinished training run with a checkpoint resumes from it; one without any starts over
    ckpt = tmp_path / "train" / "ray" / "train" / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "model.json").write_text("{}")
    assert pipeline._prepare("train", stages["train"], "f").resume is True
    (tmp_path / "classifier" / "ray" / "train").mkdir(parents=True)
    prepared = pipeline._prepare("classifier", stages["classifier"], "f")
    assert prepared.resume is False and not (tmp_path / "classifier").exists()
    # unfinished samples start over
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "part.npy").write_bytes(b"x")
    pipeline._prepare("sample", stages["sample"], "f")
    assert not (tmp_path / "samples").exists()
