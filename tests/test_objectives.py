"""The objective registry: every objective is reachable from its training stage's command line, an unknown or
another stage's objective is refused naming the allowed ones (exit 2, before any work), and each stage's run
looks its objective up in the registry (no Ray)."""

from __future__ import annotations

import pytest

from ambient_ray import cli
from ambient_ray.train import objectives
from ambient_ray.train.tasks.classifier_config import ClassifierTrainConfig
from ambient_ray.train.tasks.denoiser_config import TrainConfig
from ambient_ray.train.tasks.distill_config import DistillConfig

STAGE_OF = {"train": TrainConfig, "train-classifier": ClassifierTrainConfig, "distill": DistillConfig}


def test_every_objective_belongs_to_a_training_stage_and_its_config():
    assert objectives.names("train") == ["ambient", "masked", "noisy"]
    assert objectives.names("train-classifier") == ["classifier"] and objectives.names("distill") == ["distill"]
    for name, o in objectives.OBJECTIVES.items():
        assert o.config is STAGE_OF[o.stage], name
        assert o.config.model_fields["objective"].default in objectives.names(o.stage)
        assert callable(o.prepare) and callable(o.task) and o.help


@pytest.mark.parametrize("stage", sorted(STAGE_OF))
def test_the_stage_help_lists_its_objectives(stage, capsys):
    with pytest.raises(SystemExit):
        cli.main([stage, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in objectives.names(stage):
        assert f"{name}: {' '.join(objectives.OBJECTIVES.get(name).help.split())}" in out


@pytest.mark.parametrize(
    "argv, allowed",
    [
        (
            ["train", "--data", "/d", "--out", "/o", "--objective", "nope"],
            "unknown objective 'nope'; allowed here: ambient",
        ),
        (
            ["train", "--data", "/d", "--out", "/o", "--objective", "classifier"],
            "unknown objective 'classifier' (an objective of 'ambient-ray train-classifier'); allowed here: ambient",
        ),
        (
            ["train-classifier", "--data", "/d", "--out", "/o", "--set", "objective=ambient"],
            "(an objective of 'ambient-ray train'); allowed here: classifier",
        ),
    ],
)
def test_an_unknown_or_foreign_objective_exits_2_naming_the_allowed_ones(argv, allowed, capsys, monkeypatch):
    def no_storage(uri):  # the objective is checked before the output is touched
        raise AssertionError(f"the stage reached the storage check with a bad objective ({uri})")

    monkeypatch.setattr("ambient_ray.io.storage.check_reachable", no_storage)
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "config key 'objective'" in err and allowed in err and "Traceback" not in err


def test_the_worker_runs_the_objective_the_loop_config_names(monkeypatch):
    """worker_loop rebuilds the config with the objective's class and gives its task the driver's rows."""
    seen = {}
    monkeypatch.setattr("ambient_ray.train.loop.run", lambda task, cfg, config: seen.update(task=task, cfg=cfg))
    rows = objectives.OBJECTIVES.get("classifier").config  # any object: the rows travel untouched
    cfg = ClassifierTrainConfig(data="/d", out="/o")
    objectives.worker_loop({"cfg": cfg.model_dump(mode="json"), "objective": "classifier", "data": rows})
    assert type(seen["task"]).__name__ == "ClassifierTask" and seen["task"].rows is rows
    assert isinstance(seen["cfg"], ClassifierTrainConfig) and seen["cfg"].objective == "classifier"
