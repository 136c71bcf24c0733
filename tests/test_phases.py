"""Multi-phase schedules: ``init_from`` (engine) and ``train.phases`` in the pipeline, with its markers and MLflow.

One two-phase pipeline on the session's blurred digits (phase 1: ZeRO-2 on one worker, 3 steps at lr 2e-3;
phase 2: ZeRO-3 on two workers, 2 steps at lr 1e-9, so its weights stay those it started from), re-submitted
unchanged and then with a changed phase-2 key."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from safetensors.numpy import load as load_st

from ambient_ray.config import ConfigError
from ambient_ray.io import storage
from ambient_ray.workflows import pipeline

MODEL = {"img_resolution": 8, "in_channels": 1, "model_channels": 16, "channel_mult": [1, 2]}


def pipeline_config(out: str, data: str, phase2: dict | None = None) -> pipeline.PipelineConfig:
    train = {
        "batch_size": 16,
        "log_every": 1,
        "sample_grid": 0,
        "model": MODEL,
        "optim": {"lr": 2e-3, "warmup_steps": 0},
        "ambient": {"corrupted_sigma_min": 1.0},
        "phases": [
            {"name": "p1", "steps": 3, "checkpoint_every": 3},
            {"name": "p2", "steps": 2, "optim.lr": 1e-9, "zero_stage": 3, "num_workers": 2, **(phase2 or {})},
        ],
    }
    raw = {
        "out": out,
        "data": data,
        "train": train,
        "sample": {"num": 8, "sampler": {"steps": 3}},
        "mlflow": {"experiment": "tests-phases"},
    }
    return pipeline.PipelineConfig.model_validate(raw)


def weights(folder: str, name: str = "model.safetensors") -> dict[str, np.ndarray]:
    return load_st(storage.read_bytes(storage.join(folder, "model", name)))


def marker(folder: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(folder, pipeline.MARKER)))


@pytest.fixture(scope="module")
def two_phases(blurred_digits, mlflow_server, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("phases") / "run")
    cfg = pipeline_config(out, blurred_digits)
    return cfg, pipeline.run(cfg, progress=False)


def test_phase_two_starts_from_phase_one_on_every_zero3_rank(two_phases):
    cfg, report = two_phases
    out = report["out"]
    assert list(report["stages"]) == ["train/p1", "train/p2", "sample"]  # data given: no corrupt/annotate
    p1, p2 = storage.join(out, "train", "p1"), storage.join(out, "train", "p2")
    assert report["stages"]["sample"]["out"] == storage.join(out, "samples")
    first, second = weights(p1), weights(p2)
    assert set(first) == set(second)
    # phase 2 trained at lr 1e-9: its weights are phase 1's (a fresh init differs by far more); under ZeRO-3 on
    # two ranks, so every rank loaded them before DeepSpeed partitioned the network
    gap = max(float(np.abs(first[k] - second[k]).max()) for k in first)
    spread = max(float(np.abs(first[k]).max()) for k in first)
    assert gap < 1e-5 < spread
    # the EMA starts from the loaded raw weights too
    ema = weights(p2, "ema.safetensors")
    assert max(float(np.abs(first[k] - ema[k]).max()) for k in first) < 1e-5
    # phase 1 itself did train (lr 2e-3 for 3 steps from the seed-0 network it started from)
    assert max(float(np.abs(first[k] - weights(p1, "ema.safetensors")[k]).max()) for k in first) > 1e-4
    # each phase at its own step count, from step 0, and its own config
    for folder, steps, lr in ((p1, 3, 2e-3), (p2, 2, 1e-9)):
        summary = json.loads(storage.read_bytes(storage.join(folder, "summary.json")))
        assert summary["metrics"]["step"] == steps
        resolved = yaml.safe_load(storage.read_bytes(storage.join(folder, "config.yaml")))
        assert (resolved["optim"]["lr"], resolved["steps"], resolved["optim"]["warmup_steps"]) == (lr, steps, 0)
    assert resolved["init_from"] == p1 and resolved["zero_stage"] == 3


def test_each_phase_is_a_nested_mlflow_run(two_phases):
    _, report = two_phases
    client = MlflowClient()
    runs = {r: client.get_run(s["mlflow_run_id"]) for r, s in report["stages"].items()}
    assert {r: run.info.run_name for r, run in runs.items()} == {"train/p1": "train/p1", "train/p2": "train/p2"} | {
        "sample": "sample"
    }
    assert {run.data.tags["mlflow.parentRunId"] for run in runs.values()} == {report["mlflow_run_id"]}
    assert float(runs["train/p2"].data.params["optim.lr"]) == 1e-9
    assert runs["train/p2"].data.params["init_from"] == storage.join(report["out"], "train", "p1")


def test_markers_skip_finished_phases_and_redo_a_changed_one(two_phases, blurred_digits, capsys):
    cfg, report = two_phases
    out = report["out"]
    p1, p2 = storage.join(out, "train", "p1"), storage.join(out, "train", "p2")
    before = {f: marker(f) for f in (p1, p2)}
    capsys.readouterr()
    again = pipeline.run(cfg, progress=False)
    text = capsys.readouterr().out
    assert text.count("finished earlier, skipped") == 3, text
    assert again["fingerprints"] == report["fingerprints"]
    # phase 2 changed (one step fewer): phase 1 kept, phase 2 and sample redone
    changed = pipeline.run(pipeline_config(out, blurred_digits, {"steps": 1}), progress=False)
    text = capsys.readouterr().out
    assert "[1/3] train/p1: finished earlier, skipped" in text and "pipeline: train/p2: its config" in text, text
    assert "[2/3] train/p2: done" in text, text
    assert "[3/3] sample: finished earlier" not in text
    assert marker(p1) == before[p1]
    assert marker(p2)["fingerprint"] != before[p2]["fingerprint"] == report["fingerprints"]["train/p2"]
    assert changed["fingerprints"]["sample"] != report["fingerprints"]["sample"]
    assert json.loads(storage.read_bytes(storage.join(p2, "summary.json")))["metrics"]["step"] == 1


def test_init_from_refuses_another_architecture_naming_the_parameter(two_phases, blurred_digits, tmp_path):
    from ambient_ray.stages.train import TrainConfig, run

    _, report = two_phases
    src = storage.join(report["out"], "train", "p1")
    cfg = TrainConfig(
        data=blurred_digits,
        out=str(tmp_path / "wide"),
        steps=1,
        model={**MODEL, "model_channels": 8},
        ambient={"corrupted_sigma_min": 1.0},
        init_from=src,
        mlflow={"enabled": False},
    )
    for given in (src, storage.join(src, "model")):  # the output folder or its model/ folder
        with pytest.raises(ConfigError, match=r"init_from.*parameter 'unet\..*model\.model_channels: 16 vs 8"):
            run(cfg.model_copy(update={"init_from": given}))
    # an output that holds no model is refused naming the key
    with pytest.raises(ConfigError, match="init_from"):
        run(cfg.model_copy(update={"init_from": str(tmp_path / "nothing")}))
    assert not os.path.exists(tmp_path / "wide" / "ray")


@pytest.mark.parametrize(
    "phase2, key",
    [
        ({"optim": {"lr": -1}}, r"train\.phases\[1\]\.optim\.lr"),
        ({"lamda_max": 3}, r"train\.phases\[1\]\.lamda_max"),
        ({"init_from": "/elsewhere"}, r"train\.phases\[1\]\.init_from"),
        ({"out": "/elsewhere"}, r"train\.phases\[1\]\.out"),
        ({"name": "p1"}, r"train\.phases\[1\]\.name"),
    ],
)
def test_a_bad_phase_key_fails_before_any_stage(phase2, key, tmp_path):
    out = tmp_path / "run"
    cfg = pipeline_config(str(out), str(tmp_path / "data"), phase2)
    with pytest.raises(ConfigError, match=key):
        pipeline.run(cfg, progress=False)
    assert not out.exists()


def test_a_bad_key_of_the_train_section_is_named_as_its_own(tmp_path):
    cfg = pipeline_config(str(tmp_path / "run"), str(tmp_path / "data"))
    bad = cfg.model_copy(update={"train": {**cfg.train, "batch_size": 0}})
    with pytest.raises(ConfigError, match=r"'train\.batch_size'"):
        pipeline.stage_configs(bad)
    refused = cfg.model_copy(update={"corrupt": {"clean_fraction": 0.5}})
    with pytest.raises(ConfigError, match="'corrupt': not run when 'data' is given"):
        pipeline.stage_configs(refused)


def test_phase_keys_merge_into_the_train_section_and_the_steps_follow_the_sections(tmp_path):
    cfg = pipeline_config(str(tmp_path / "run"), str(tmp_path / "data"), {"model": {"dropout": 0.2}})
    stages = pipeline.stage_configs(cfg)
    assert list(stages) == ["train/p1", "train/p2", "sample"]
    p1, p2 = stages["train/p1"], stages["train/p2"]
    # nested keys merge one by one: phase 2 keeps the section's model and optim keys it does not set
    assert (p2.model.dropout, p2.model.model_channels, p1.model.dropout) == (0.2, 16, p1.model.dropout)
    assert (p2.optim.lr, p2.optim.warmup_steps, p1.optim.lr) == (1e-9, 0, 2e-3)
    assert (p1.init_from, p2.init_from, stages["sample"].checkpoint) == (None, p1.out, p2.out)
    assert p1.out == str(tmp_path / "run" / "train" / "p1") and p1.data == p2.data == str(tmp_path / "data")
    raw = cfg.model_dump()
    with_pre = pipeline.PipelineConfig.model_validate(
        {**raw, "precompute": {"vae": "pixels"}, "evaluate": {"reference": "digits"}}
    )
    stages = pipeline.stage_configs(with_pre)
    assert list(stages) == ["precompute", "train/p1", "train/p2", "sample", "evaluate"]
    assert stages["train/p1"].data == stages["precompute"].out == str(tmp_path / "run" / "precomputed")
    with pytest.raises(ConfigError, match="'precompute': runs on the top-level 'data'"):
        pipeline.stage_configs(pipeline.PipelineConfig.model_validate({**raw, "data": None, "precompute": {"a": 1}}))
