"""The DSD experiment (Denoising Score Distillation at our scale, ``ambient-ray experiment-dsd``): one tiny run
through the real stages, and the refusals of its config before any work starts."""

from __future__ import annotations

import json
import math
import os

import pytest
import yaml

from ambient_ray import config as cfgmod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "jobs", "configs", "experiment_dsd.yaml")


def test_tiny_dsd_experiment_end_to_end(ray_cluster, tmp_path):
    """One σ_n, one seed, every arm but dsd-standard (the same code as dsd-adjusted with the other way) and the
    oracle (a plain train run; two Ray Train runs less, the suite's time): the table has a row per arm with finite
    FD, held-out FD, NFE and seconds, the DSD arm its pick (step, FD there, best FD), the teacher the noisy
    objective in its way, and a re-run does nothing."""
    from ambient_ray.workflows import experiment_dsd as ed

    out = str(tmp_path / "exp")
    model = dict(model_channels=16, channel_mult=[1, 2], label_dim=0)
    engine = dict(batch_size=16, cpus_per_worker=1, sample_grid=0)
    flags = dict(
        sigmas=[0.2],
        seeds=[0],
        arms=[a for a in ed.ARMS if a not in ("dsd-standard", "oracle")],
        features="pixels",
        samples=24,
        out=out,
        train=dict(steps=4, checkpoint_every=4, log_every=2, model=model, **engine),
        distill=dict(steps=4, checkpoint_every=4, log_every=2, distill=dict(eval_every=2, eval_images=16), **engine),
        sample=dict(sampler=dict(steps=3)),
        mlflow=dict(enabled=False),
    )
    cfg = cfgmod.build(ed.DsdExperimentConfig, flags=flags)
    s = ed.run(cfg, progress=False)
    report = json.loads(open(f"{out}/results.json").read())
    rows = {(r["sigma"], r["arm"]): r["metrics"] for r in report["table"]}
    assert set(rows) == {(0.2, a) for a in ed.ARMS if a not in ("oracle", "dsd-standard")}
    for (sigma, arm), m in rows.items():
        for k in ("fd", "fd_holdout", "nfe", "seconds_per_1000_images"):
            assert m[k]["n"] == 1 and math.isfinite(m[k]["mean"]), (arm, k)
        assert ("proximal_fd" in m) == (sigma is not None), arm
    assert rows[(0.2, "observations")]["nfe"]["mean"] == 0.0
    assert rows[(0.2, "ambient-full")]["nfe"]["mean"] == 5.0 == rows[(0.2, "ambient-truncated")]["nfe"]["mean"]
    for arm in ["dsd-adjusted"]:
        m = rows[(0.2, arm)]
        assert m["nfe"]["mean"] == 1.0
        assert m["picked_step"]["mean"] in (2.0, 4.0)
        assert m["best_fd_over_evals"]["mean"] <= m["picked_fd_at_step"]["mean"]
        assert math.isfinite(m["picked_fd"]["mean"])
    md = open(f"{out}/results.md").read()
    for arm in cfg.arms:
        assert f"| {arm} |" in md, arm
    assert "DSD < Truncated < Full < observations" in md and "picked ≈ best (dsd-adjusted)" in md
    assert "adjusted < standard (DSD): not checked" in md  # dsd-standard did not run
    assert open(f"{out}/results.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the teacher: the noisy objective in its way, on the noisy rows
    for way in ("adjusted",):
        trained = yaml.safe_load(open(f"{out}/runs/sigma-0.2/teacher-{way}/seed-0/train/config.yaml"))
        assert trained["objective"] == "noisy" and trained["noisy"]["way"] == way
        assert trained["data"].endswith("seed-0/sigma-0.2")
        distilled = yaml.safe_load(open(f"{out}/runs/sigma-0.2/teacher-{way}/seed-0/distill/config.yaml"))
        assert distilled["distill"]["way"] == way
    # a re-run skips every finished step
    again = ed.run(cfg, progress=False)
    assert again["ran"] == [] and again["table"] == s["table"]


def test_dsd_experiment_refuses_bad_config(tmp_path):
    """Bad keys are refused when the config is built or checked, before any Ray work; the shipped config builds."""
    from ambient_ray.workflows import experiment_dsd as ed

    def build(**kw):
        return cfgmod.build(ed.DsdExperimentConfig, flags={"out": str(tmp_path), **kw})

    ok = {"distill": {"distill": {"eval_every": 10}}}
    with pytest.raises(cfgmod.ConfigError, match="arms"):
        build(arms=["oracle", "magic"], **ok)
    with pytest.raises(cfgmod.ConfigError, match="noise level"):
        build(sigmas=[0.2, 0.0], **ok)
    with pytest.raises(cfgmod.ConfigError, match="repeated"):
        build(seeds=[0, 0], **ok)
    with pytest.raises(cfgmod.ConfigError, match="oracle"):
        build(oracle_sampler="one-step", **ok)
    with pytest.raises(cfgmod.ConfigError, match="eval_every"):
        build()  # the DSD arms need the picked generator
    build(arms=["observations", "ambient-full"])  # no DSD arm: no distillation, no eval_every needed
    refused = {
        "'train.objective': set by the experiment": dict(train={"objective": "ambient"}),
        "'train.noisy.way': set by the experiment": dict(train={"noisy": {"way": "standard"}}),
        "'distill.distill.way': set by the experiment": dict(distill={"distill": {"way": "adjusted", "eval_every": 5}}),
        "'distill.teacher': set by": dict(distill={"teacher": "/t", "distill": {"eval_every": 5}}),
        "'sample.sampler.name': set by the experiment": dict(sample={"sampler": {"name": "heun"}}),
        "'evaluate.proximal': set by": dict(evaluate={"proximal": "noise:sigma=0.1"}),
        "past distill.steps": dict(distill={"steps": 10, "distill": {"eval_every": 20}}),
        "(?s)section 'train'.*lernrate": dict(train={"lernrate": 1}),
        "(?s)section 'distill'.*lernrate": dict(distill={"lernrate": 1, "distill": {"eval_every": 5}}),
    }
    for message, kw in refused.items():
        with pytest.raises(cfgmod.ConfigError, match=message):
            ed.check(build(**{**ok, **kw}))
    cfg = cfgmod.build(ed.DsdExperimentConfig, SHIPPED, [f"out={tmp_path}"])
    ed.check(cfg)
    assert cfg.sigmas == [0.1, 0.2, 0.4] and cfg.seeds == [0, 1, 2] and cfg.arms == list(ed.ARMS)
    assert cfg.distill["optim"]["lr"] > 1e-5


def test_dsd_tables_every_arm():
    """The tables from results of every arm and two seeds (no Ray): mean ± SE per (σ_n, arm), the paper's
    orderings with their verdicts, the pick table, the plot."""
    from ambient_ray.workflows import experiment_dsd as ed

    fd = {"observations": 40.0, "ambient-full": 20.0, "ambient-truncated": 15.0, "dsd-adjusted": 10.0}
    fd |= {"dsd-standard": 12.0, "oracle": 5.0}
    results = []
    for seed in (0, 1):
        for arm, v in fd.items():
            m = {"fd": v + seed, "fd_holdout": v + 1, "nfe": 1.0, "seconds_per_1000_images": 0.5}
            if arm != "oracle":
                m["proximal_fd"] = v / 2
            if arm in ed.DSD_ARMS:
                m |= {"picked_step": 200.0, "picked_fd_at_step": 10.5, "best_fd_over_evals": 10.0}
                m |= {"best_fd_step": 300.0, "picked_fd": v + 0.5}
            results.append({"sigma": None if arm == "oracle" else 0.2, "arm": arm, "seed": seed, "metrics": m})
    table = ed.summarize(results)
    assert [(r["sigma"], r["arm"]) for r in table][0] == (None, "oracle")
    fdm = {r["arm"]: r["metrics"]["fd"] for r in table}
    assert fdm["dsd-adjusted"]["mean"] == 10.5 and fdm["dsd-adjusted"]["se"] == pytest.approx(0.5)
    checks = {c["claim"]: c["holds"] for c in ed.orderings(table, tolerance=0.1)}
    assert checks == {
        "DSD < Truncated < Full < observations": True,
        "adjusted < standard (DSD)": True,
        "picked ≈ best (dsd-adjusted)": True,
        "picked ≈ best (dsd-standard)": True,
    }
    assert not ed.orderings(table, tolerance=0.01)[2]["holds"]  # a 5 % gap is not within 1 %
    cfg = cfgmod.build(ed.DsdExperimentConfig, flags={"out": "/o", "distill": {"distill": {"eval_every": 5}}})
    md = ed.markdown(table, ed.orderings(table, 0.1), cfg, 1.0)
    assert "| 0.2 | dsd-standard | 12.500 ± 0.500 |" in md and "| clean | oracle |" in md
    assert "σ_n = 0.2, DSD < Truncated < Full < observations: agrees" in md
    assert ed.plot(table, "t")[:8] == b"\x89PNG\r\n\x1a\n"
