"""The stage registry drives the command line and the workflows; the step runner, the chain's wiring and the
sharded stages' skeleton (no Ray: fast)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from pydantic import Field, field_validator

from ambient_ray import cli
from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError, Strict, flag
from ambient_ray.io import shards
from ambient_ray.stages import registry
from ambient_ray.stages.actor_stage import ActorStage, ShardedConfig
from ambient_ray.stages.evaluate import EvaluateConfig
from ambient_ray.workflows import chain, steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ a throwaway stage (this module)


class EchoConfig(Strict):
    out: str = Field(..., description="output URI", json_schema_extra=flag("--out"))
    times: int = Field(1, ge=1, json_schema_extra=flag("--times"))


def echo_run(cfg: EchoConfig) -> dict:
    return {"out": cfg.out, "times": cfg.times}


class PlantedEvaluate(EvaluateConfig):
    """The evaluate config with one more key, refused when set: seen only where the registry's class is used."""

    planted: bool = False

    @field_validator("planted")
    @classmethod
    def _refuse(cls, v: bool) -> bool:
        if v:
            raise ValueError("planted refusal")
        return v


@pytest.fixture
def stages(monkeypatch):
    """A copy of the registry in its place; ``swap(name, **changes)`` replaces an entry, ``add`` registers one."""
    copy = registry.StageRegistry()
    for name, stage in registry.STAGES.in_order():
        copy.register(name, stage)
    monkeypatch.setattr(registry, "STAGES", copy)

    def swap(name: str, **changes) -> None:
        entries = [(n, dataclasses.replace(s, **changes) if n == name else s) for n, s in copy.in_order()]
        fresh = registry.StageRegistry()
        for n, s in entries:
            fresh.register(n, s)
        monkeypatch.setattr(registry, "STAGES", fresh)

    copy.swap = swap
    return copy


# ------------------------------------------------------------------------------ the command line


def test_help_lists_every_registered_stage_in_order(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    names = registry.STAGES.names()
    assert names and all(f"    {name}" in out for name in names)
    assert [n for n, _ in registry.STAGES.in_order()][:2] == ["corrupt", "precompute"]  # the order of a run
    assert out.index("    corrupt") < out.index("    train-classifier") < out.index("    evaluate")


def test_an_unknown_stage_exits_2_naming_the_registered_ones(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["denoise", "--out", "/o"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'denoise'" in err
    assert all(name in err for name in registry.STAGES.names())


def test_an_unknown_stage_section_of_a_workflow_exits_2_naming_the_allowed_ones(tmp_path, capsys):
    assert cli.main(["pipeline", "--out", str(tmp_path), "--set", "denoise.steps=3"]) == 2
    err = capsys.readouterr().err
    assert "config key 'denoise': unknown key" in err and "annotate, classifier, corrupt" in err
    assert cli.main(["experiment", "--out", str(tmp_path), "--set", "denoise.steps=3"]) == 2
    assert "config key 'denoise': unknown key" in capsys.readouterr().err
    space = "space.denoise.steps={uniform: [1, 2]}"
    assert cli.main(["tune", "--data", "/d", "--out", str(tmp_path), "--set", space]) == 2
    assert "must start with one of annotate, train, sample" in capsys.readouterr().err


def test_a_registered_stage_is_a_sub_command(stages, capsys):
    stages.register("echo", registry.Stage("say the output folder", __name__, "EchoConfig", function="echo_run"))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "    echo" in out and "say the output folder" in out
    assert cli.main(["echo", "--out", "/x", "--times", "3"]) == 0
    assert "echo: done; output in /x" in capsys.readouterr().out
    assert cli.config(cli.parse_args(["echo", "--out", "/x", "--set", "times=4"])).times == 4
    assert cli.main(["echo", "--out", "/x", "--times", "0"]) == 2
    assert "config key 'times'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the workflows read the registry


def test_the_workflows_take_each_sections_config_and_folder_from_the_registry(stages, tmp_path):
    from ambient_ray.workflows import experiment, pipeline
    from tuning import search

    stages.swap("evaluate", module=__name__, config="PlantedEvaluate", folder="scores")
    shipped = os.path.join(REPO, "jobs", "configs", "pipeline.yaml")

    def pipe(*sets: str):
        return pipeline.stage_configs(cfgmod.build(pipeline.PipelineConfig, shipped, [f"out={tmp_path}", *sets]))

    built = pipe()["evaluate"]
    assert type(built) is PlantedEvaluate and built.out == f"{tmp_path}/scores"
    with pytest.raises(ConfigError, match="evaluate.planted.*planted refusal"):
        pipe("evaluate.planted=true")
    exp = cfgmod.build(experiment.ExperimentConfig, flags={"out": str(tmp_path), "evaluate": {"planted": True}})
    with pytest.raises(ConfigError, match="planted refusal"):
        experiment.check(exp)
    flags = {"data": "/d", "out": str(tmp_path), "evaluate": {"planted": True}}
    with pytest.raises(ConfigError, match="planted refusal"):
        search.load(None, ["space.annotate.tau={uniform: [0.3, 0.4]}"], flags)


def test_every_registered_stage_builds_its_config_and_names_its_run():
    for name, stage in registry.STAGES.in_order():
        model = stage.model()
        assert model is None or hasattr(model, "model_fields"), name
        if stage.command is None:
            module = __import__(stage.module, fromlist=[stage.function])
            assert callable(getattr(module, stage.function)), name
        assert stage.resume in ("shards", "shards-overwrite", "checkpoint", "restart"), name
        assert stage.links <= set(model.model_fields) if model is not None else not stage.links, name
    with pytest.raises(KeyError, match="unknown stage 'denoise'; registered: annotate, corrupt"):
        registry.get("denoise")


# ------------------------------------------------------------------------------ the chain, the step runner, merge


def test_the_chain_feeds_each_stage_the_output_of_the_one_before():
    outs = {"train": "/o/train", "sample": "/o/samples", "evaluate": "/o/eval"}
    links = chain.wire("/data", outs, mlflow=lambda s: {"run_name": s}, where=lambda u: u.replace("/o", "/old"))
    assert links == {
        "train": {"data": "/data", "out": "/o/train", "mlflow": {"run_name": "train"}},
        "sample": {"checkpoint": "/old/train", "out": "/o/samples", "mlflow": {"run_name": "sample"}},
        "evaluate": {"samples": "/old/samples", "out": "/o/eval", "mlflow": {"run_name": "evaluate"}},
    }
    assert chain.wire("/d", {"annotate": "/a"}, classifier="/k") == {
        "annotate": {"data": "/d", "out": "/a", "classifier": "/k"}
    }
    with pytest.raises(ValueError, match="not a run of the chain"):
        chain.wire("/d", {"annotate": "/a", "sample": "/s"})


def test_a_step_runs_once_per_fingerprint(tmp_path):
    folder = str(tmp_path / "step")
    calls = []

    def work():
        calls.append(1)
        (tmp_path / "step").mkdir(exist_ok=True)
        return {"n": len(calls)}

    assert steps.run(folder, "f1", work) == ({"n": 1}, True)
    assert steps.run(folder, "f1", work) == ({"n": 1}, False)  # finished with this fingerprint: skipped
    (tmp_path / "step" / "stale.txt").write_text("x")
    assert steps.run(folder, "f2", work, clear=True) == ({"n": 2}, True)
    assert not (tmp_path / "step" / "stale.txt").exists()
    assert steps.run(folder, "f3", work, find=lambda: {"n": 0}) == ({"n": 0}, False)
    assert shards.done(folder, steps.STEP, "f2") == {"n": 2}


def test_merge_deep_merges_sections_and_replaces_the_rest():
    base = {"optim": {"lr": 1, "betas": [0.9, 0.99]}, "steps": 3}
    assert cfgmod.merge(base, {"optim": {"lr": 2, "betas": [0.5]}, "seed": 1}) == {
        "optim": {"lr": 2, "betas": [0.5]},
        "steps": 3,
        "seed": 1,
    }
    assert base["optim"]["lr"] == 1


# ------------------------------------------------------------------------------ the sharded stages' skeleton


class CountConfig(ShardedConfig):
    rows: list[int] = [2, 3]


class Count(ActorStage):
    """Shards of ``rows`` rows each; the ``lost`` shard's rows go missing (a planted bug)."""

    label = "count"
    held = "counts of another plan"
    lost: str | None = None

    def plan(self):
        self.fingerprint = shards.fingerprint(self.cfg.rows)
        self.shards = [f"shard-{k}" for k in range(len(self.cfg.rows))]
        self.ran_now: list[str] = []

    def work(self, todo):
        for name in todo:
            k = self.shards.index(name)
            rows = self.cfg.rows[k]
            summary = {"rows": rows, "out": rows - (name == self.lost)}
            shards.mark_done(f"{self.out}/_done", name, self.fingerprint, summary)
            self.ran_now.append(name)
        return [{"rows": self.cfg.rows[self.shards.index(n)]} for n in todo]

    def finish(self, done, ran, seconds):
        self.conserve(
            sum(self.cfg.rows), sum(d["rows"] for d in done.values()), sum(d["out"] for d in done.values()), 0
        )
        return {"shards_run": len(ran), "shards_skipped": len(self.shards) - len(ran)}


def test_the_skeleton_skips_finished_shards_refuses_another_plan_and_checks_the_rows(tmp_path, monkeypatch):
    from ambient_ray.io import ray_runtime

    monkeypatch.setattr(ray_runtime, "ray_init", lambda out: None)
    out = str(tmp_path / "counts")
    cfg = CountConfig(out=out)
    assert Count(cfg).run() == {"shards_run": 2, "shards_skipped": 0}
    assert json.loads((tmp_path / "counts" / "_manifest.json").read_text())["fingerprint"] == shards.fingerprint([2, 3])
    assert (tmp_path / "counts" / "config.yaml").exists()
    assert Count(cfg).run() == {"shards_run": 0, "shards_skipped": 2}
    other = CountConfig(out=out, rows=[4])
    with pytest.raises(ConfigError, match="already holds counts of another plan; use another 'out' or set overwrite"):
        Count(other).run()
    assert Count(other.model_copy(update={"overwrite": True})).run() == {"shards_run": 1, "shards_skipped": 0}
    broken = Count(CountConfig(out=str(tmp_path / "broken")))
    broken.lost = "shard-1"
    with pytest.raises(RuntimeError, match="count: row conservation broken: 5 rows listed, 5 in, 4 out"):
        broken.run()
