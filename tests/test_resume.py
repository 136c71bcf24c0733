"""The one resume protocol (ambient_ray.io.shards): fingerprints, done-markers, manifests (no Ray)."""

from __future__ import annotations

import json

import pytest

from ambient_ray.io import shards, tracking
from ambient_ray.stages import results


def test_fingerprints_are_stable_and_see_every_key():
    a = shards.fingerprint({"lr": 0.001, "steps": 20, "model": {"channels": [1, 2]}})
    assert a == shards.fingerprint({"model": {"channels": [1, 2]}, "steps": 20, "lr": 0.001})  # key order
    assert a != shards.fingerprint({"lr": 0.002, "steps": 20, "model": {"channels": [1, 2]}})
    assert a != shards.fingerprint({"lr": 0.001, "steps": 20, "model": {"channels": [2, 1]}})
    assert shards.fingerprint({}, ["a", "b"]) != shards.fingerprint({}, ["ab"]) != shards.fingerprint({})
    # chained: a step's print changes with the step before it
    assert shards.chain("", {"x": 1}) != shards.chain("p", {"x": 1})
    assert shards.chain("p", {"x": 1}) == shards.chain("p", {"x": 1}) and len(shards.chain("", {})) == 16


def test_config_prints_leave_out_what_does_not_change_the_work():
    from ambient_ray.stages.sample import SampleConfig

    base = SampleConfig(checkpoint="c", out="o")
    fp = shards.config_print(base)
    assert fp == shards.config_print(
        base.model_copy(update={"mlflow": base.mlflow.model_copy(update={"run_name": "x"})})
    )
    assert fp != shards.config_print(base.model_copy(update={"num": base.num + 1}))
    assert fp != shards.config_print(base, "an input's print")


def test_a_marker_counts_only_with_its_own_fingerprint(tmp_path):
    folder = str(tmp_path / "step")
    assert shards.done(folder, "_step", "f1") is None and shards.read_marker(folder, "_step") is None
    shards.mark_done(folder, "_step", "f1", {"rows": 3})
    assert shards.done(folder, "_step", "f1") == {"rows": 3}
    assert shards.done(folder, "_step", "f2") is None  # another config made it: not done
    raw = json.loads((tmp_path / "step" / "_step.json").read_text())
    assert raw == {"name": "_step", "fingerprint": "f1", "summary": {"rows": 3}}
    assert not list((tmp_path / "step").glob("*.tmp-*"))  # written atomically (a temporary name, renamed)


def test_done_all_lists_the_markers_of_one_plan(tmp_path):
    folder = str(tmp_path / "_done")
    shards.mark_done(folder, "shard-00000", "plan", {"shard": 0})
    shards.mark_done(folder, "shard-00001", "old-plan", {"shard": 1})
    shards.mark_done(folder, "shard-00002", "plan", {"shard": 2})
    (tmp_path / "_done" / "shard-00003.json.tmp-1234abcd").write_text("{")  # a killed write
    assert shards.done_all(folder, "plan") == {"shard-00000": {"shard": 0}, "shard-00002": {"shard": 2}}
    assert shards.done_all(str(tmp_path / "none"), "plan") == {}


def test_manifest_tells_a_changed_plan(tmp_path):
    out = str(tmp_path)
    assert not shards.manifest_changed(out, "a")  # nothing there yet
    shards.write_manifest(out, "a", shards=4)
    assert json.loads((tmp_path / "_manifest.json").read_text()) == {"fingerprint": "a", "shards": 4}
    assert not shards.manifest_changed(out, "a") and shards.manifest_changed(out, "b")
    shards.clear(str(tmp_path / "_manifest.json"))
    shards.clear(str(tmp_path / "never"))  # clearing nothing is fine
    assert not shards.manifest_changed(out, "b")


def test_one_stage_failed_class():
    from ambient_ray.stages import annotate, corrupt
    from ambient_ray.workflows import pipeline

    assert corrupt.StageFailed is annotate.StageFailed is pipeline.StageFailed is results.StageFailed


@pytest.mark.parametrize(
    "exc, status", [(None, "FINISHED"), (RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_the_run_context_ends_the_run_by_how_its_block_ended(tmp_path, monkeypatch, exc, status):
    ended = []
    monkeypatch.setattr(tracking, "start_run", lambda mcfg, out, params, tags: ("r1", "uri"))
    monkeypatch.setattr(tracking, "finish", lambda run_id, uri, status="FINISHED", tags=None: ended.append(status))
    with pytest.raises(type(exc)) if exc else _nothing():
        with tracking.run(tracking.MlflowConfig(), str(tmp_path), name="n", parent="p") as (run_id, uri):
            assert (run_id, uri) == ("r1", "uri")
            if exc:
                raise exc
    assert ended == [status]


def test_the_run_context_hands_over_status_names_and_nesting(tmp_path, monkeypatch):
    seen, ended = {}, []

    def start(mcfg, out, params, tags):
        seen.update(name=mcfg.run_name, parent=mcfg.parent_run_id, params=params, tags=tags)
        return "r2", "uri"

    monkeypatch.setattr(tracking, "start_run", start)
    monkeypatch.setattr(
        tracking, "finish", lambda run_id, uri, status="FINISHED", tags=None: ended.append((status, tags))
    )
    with tracking.run({"experiment": "e"}, str(tmp_path), name="child", parent="p1", params={"a": 1}) as handle:
        handle.status, handle.tags = "FAILED", {"why": "unfinished"}
    assert seen == {"name": "child", "parent": "p1", "params": {"a": 1}, "tags": None}
    assert ended == [("FAILED", {"why": "unfinished"})] and handle.run_id == "r2"
    with pytest.raises(RuntimeError), tracking.run(tracking.MlflowConfig(), str(tmp_path), close_on_error=False):
        raise RuntimeError("left for the owner to close")
    assert len(ended) == 1
    assert tracking.child({"experiment": "e", "run_name": None}, "train", "p") == {
        "experiment": "e",
        "run_name": "train",
        "parent_run_id": "p",
        "register_model": False,  # a workflow's child registers no model version unless asked
    }
    assert tracking.child({"experiment": "e"}, "train", "p", register=True)["register_model"] is True


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
