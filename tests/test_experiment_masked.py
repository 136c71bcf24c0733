"""The masked experiment (Ambient Diffusion at our scale, ``ambient-ray experiment-masked``): one tiny run through
the real stages, and the refusals of its config before any work starts."""

from __future__ import annotations

import json
import math
import os

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ambient_ray import config as cfgmod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "jobs", "configs", "experiment_masked.yaml")


def test_tiny_masked_experiment_end_to_end(ray_cluster, mlflow_server, tmp_path):
    """One p, one seed: the ambient arm under both masked samplers and the memorization block's clean arm; the
    table has their rows with finite metrics, the ambient model trained on masked rows with δ, the MLflow tree
    holds one child per trained model, and a re-run does nothing."""
    from ambient_ray.workflows import experiment_masked as em

    out = str(tmp_path / "exp")
    model = dict(model_channels=16, channel_mult=[1, 2], label_dim=0)
    flags = dict(
        p=[0.6],
        seeds=[0],
        arms=["ambient"],
        features="pixels",
        samples=48,
        out=out,
        train=dict(steps=6, batch_size=32, checkpoint_every=6, log_every=3, sample_grid=0, model=model),
        sample=dict(sampler=dict(steps=3, guidance_masks=2)),
        memorization=dict(rows=24, p=[], samples=24, train=dict(steps=4, checkpoint_every=4)),
        mlflow=dict(experiment="tests-experiment-masked"),
    )
    cfg = cfgmod.build(em.MaskedExperimentConfig, flags=flags)
    s = em.run(cfg, progress=False)
    report = json.loads(open(f"{out}/results.json").read())
    rows = {(r["block"], r["p"], r["arm"], r["sampler"]): r["metrics"] for r in report["table"]}
    assert set(rows) == {
        ("main", 0.6, "ambient", "fixed-mask"),
        ("main", 0.6, "ambient", "reconstruction-guidance"),
        ("memorization", None, "clean", "heun"),
    }
    for metrics in rows.values():
        for m in ("fd", "fd_holdout", "precision", "recall", "memorization_top1_mean", "memorization_share_above"):
            assert metrics[m]["n"] == 1 and math.isfinite(metrics[m]["mean"]), m
        assert 0.0 <= metrics["holdout_share_above"]["mean"] <= 1.0  # the no-copy baseline, held-out images
    md = open(f"{out}/results.md").read()
    assert "| 0.6 | ambient | 0.1 | fixed-mask |" in md and "| 0.6 | ambient | 0.1 | reconstruction-guidance |" in md
    assert "| clean | clean | heun |" in md.split("Memorization:")[1]
    assert open(f"{out}/results.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the ambient model: the masked objective with δ on the masked rows; the clean arm: the plain loss
    trained = yaml.safe_load(open(f"{out}/runs/p-0.6/ambient/seed-0/train/config.yaml"))
    assert trained["objective"] == "masked" and trained["masked"]["delta"] == 0.1
    assert trained["data"].endswith("seed-0/p-0.6")
    clean = yaml.safe_load(open(f"{out}/runs/memorization/clean/seed-0/train/config.yaml"))
    assert clean["objective"] == "ambient" and clean["data"].endswith("prep/memorization-clean")
    # MLflow: one child per trained model, its metrics per sampler, the stage runs under it
    client = MlflowClient()
    parent = client.get_run(s["mlflow_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = 'experiment-arm'",
    )
    assert sorted((c.data.tags["block"], c.data.tags["arm"]) for c in children) == [
        ("main", "ambient"),
        ("memorization", "clean"),
    ]
    ambient = next(c for c in children if c.data.tags["arm"] == "ambient")
    assert {"fd.fixed-mask", "fd.reconstruction-guidance"} <= set(ambient.data.metrics)
    # a re-run skips every finished step
    again = em.run(cfg, progress=False)
    assert again["ran"] == [] and again["table"] == s["table"]


def test_masked_experiment_refuses_bad_config(tmp_path):
    """Bad keys are refused when the config is built or checked, before any Ray work; the shipped config builds."""
    from ambient_ray.workflows import experiment_masked as em
    from jobs import experiment as job

    def build(**kw):
        return cfgmod.build(em.MaskedExperimentConfig, flags={"out": str(tmp_path), **kw})

    with pytest.raises(cfgmod.ConfigError, match="δ is in"):
        build(delta_per_p={0.9: 0.0})  # the naive arm is δ = 0
    with pytest.raises(cfgmod.ConfigError, match="arms"):
        build(arms=["ambient", "magic"])
    with pytest.raises(cfgmod.ConfigError, match="masked sampler"):
        build(samplers=["heun"])
    with pytest.raises(cfgmod.ConfigError, match="oracle_sampler"):
        build(oracle_sampler="fixed-mask")
    with pytest.raises(cfgmod.ConfigError, match="missing probability"):
        build(p=[0.4, 1.0])
    with pytest.raises(cfgmod.ConfigError, match="nothing to run"):
        build(arms=[], memorization={"run": False})
    refused = {
        "'train.objective': set by the experiment": dict(train={"objective": "ambient"}),
        "'train.masked.delta': set by the experiment": dict(train={"masked": {"delta": 0.2}}),
        "'sample.sampler.name': set by the experiment": dict(sample={"sampler": {"name": "heun"}}),
        "'evaluate.memorization.threshold'": dict(evaluate={"memorization": {"threshold": 0.5}}),
        "'memorization.train.seed': set by the experiment": dict(memorization={"train": {"seed": 3}}),
        "(?s)section 'train'.*lernrate": dict(train={"lernrate": 1}),
        "(?s)section 'sample'.*stochastic": dict(sample={"sampler": {"stochastic": True}}),  # masked samplers: Heun
    }
    for message, kw in refused.items():
        with pytest.raises(cfgmod.ConfigError, match=message):
            em.check(build(**kw))
    cfg = cfgmod.build(em.MaskedExperimentConfig, SHIPPED, [f"out={tmp_path}"])
    em.check(cfg)
    assert cfg.delta_at(0.9) == 0.3 and cfg.delta_at(0.4) == 0.1 and cfg.memo_p() == cfg.p
    # python -m jobs.experiment picks the masked stage from the config's kind (or --kind)
    assert job._kind(["--config", SHIPPED, "--out", "x"]) == ("masked", ["--config", SHIPPED, "--out", "x"])
    assert job._kind(["--kind", "masked", "--out", "x"]) == ("masked", ["--out", "x"])
    assert job._kind(["--config", os.path.join(REPO, "jobs", "configs", "experiment.yaml")])[0] is None
