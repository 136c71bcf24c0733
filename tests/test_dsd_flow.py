"""Denoising Score Distillation end to end (issue 33): docs/stages/distill.md's noisy flow as written (corrupt with
noise, the Phase-I teacher, its truncated sampler, distill with proximal FD in MLflow, one-step sampling), and the
distill stage's refusals."""

from __future__ import annotations

import json
import pathlib
import shlex

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def documented(marker: str) -> list[str]:
    """The commands of the docs block marked ``<!-- tested: MARKER -->`` in docs/stages/distill.md."""
    text = (ROOT / "docs" / "stages" / "distill.md").read_text()
    block = text.split(f"<!-- tested: {marker} -->", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines() if line.startswith("ambient-ray ")]


SMALL = ["--set", "model.model_channels=16", "--set", "model.channel_mult=[1,2]"]
FAST = {  # appended to each documented command: the same flow, cut to seconds
    "corrupt": ["--set", "source.limit=160", "--set", "preview=0"],
    "train": ["--steps", "8", "--set", "batch_size=16", "--set", "log_every=4", "--set", "checkpoint_every=8"]
    + SMALL
    + ["--set", "sample_grid=4", "--set", "mlflow.enabled=false"],
    "sample": ["--num", "8", "--steps", "4", "--set", "mlflow.enabled=false"],
    "distill": ["--steps", "8", "--set", "batch_size=8", "--set", "log_every=4", "--set", "checkpoint_every=8"]
    + ["--set", "distill.eval_every=4", "--set", "distill.eval_images=32", "--set", "sample_grid=4"]
    + ["--set", "optim.lr=1e-3", "--set", "mlflow.experiment=tests-dsd"],
}


@pytest.fixture(scope="module")
def flow(ray_cluster, mlflow_server, tmp_path_factory):
    from ambient_ray import cli

    root = tmp_path_factory.mktemp("dsd-flow")
    lines = documented("noisy flow")
    assert [shlex.split(line)[1] for line in lines] == ["corrupt", "train", "sample", "distill", "sample"]
    import os

    here = os.getcwd()
    os.chdir(root)
    try:
        for line in lines:
            argv = shlex.split(line)[1:]
            extra = FAST[argv[0]] if not (argv[0] == "sample" and "--one-step" in argv) else ["--num", "8"]
            assert cli.main(argv + extra) == 0, line
    finally:
        os.chdir(here)
    return root / "runs"


def test_the_documented_noisy_flow_trains_a_teacher_and_distils_it(flow):
    """The flow as written: the teacher's model.json says σ_n 0.2 (every row noisy), the truncated sampler and the
    one-step generator draw images, the generator's model.json is the teacher's network marked one-step."""
    teacher = json.loads((flow / "teacher" / "model" / "model.json").read_text())
    assert teacher["noisy"]["sigma_n"] == pytest.approx(0.2) and teacher["noisy"]["rows_clean"] == 0
    gen = json.loads((flow / "dsd" / "model" / "model.json").read_text())
    assert gen["one_step"]["sigma_init"] == 2.5 and gen["one_step"]["way"] == "adjusted"
    assert gen["one_step"]["sigma_n"] == pytest.approx(0.2) and gen["model"] == teacher["model"]
    for d in ("teacher-samples", "dsd-samples"):
        assert any((flow / d).rglob("*.png")), d
    assert (flow / "dsd" / "samples.png").exists()


def test_proximal_fd_is_logged_every_eval_every_steps_and_the_pick_is_kept(flow):
    """distill.eval_every 4 over 8 steps: two proximal FDs in MLflow (steps 4 and 8), the best's step among them,
    its generator in OUT/picked/ (a model folder) with picked.json, which the summary and the run's artifacts hold."""
    from mlflow.tracking import MlflowClient

    summary = json.loads((flow / "dsd" / "summary.json").read_text())
    client = MlflowClient()
    hist = sorted(client.get_metric_history(summary["mlflow_run_id"], "proximal_fd"), key=lambda m: m.step)
    assert sorted(m.step for m in hist) == [4, 8] and all(m.value >= 0 for m in hist)
    best = min(hist, key=lambda m: m.value)
    picked = json.loads((flow / "dsd" / "picked" / "picked.json").read_text())
    assert picked["step"] == best.step and picked["proximal_fd"] == pytest.approx(best.value)
    assert summary["picked"]["step"] == best.step
    evals = json.loads((flow / "dsd" / "proximal.json").read_text())
    assert [r["step"] for r in evals] == [4, 8] and [r["proximal_fd"] for r in evals] == [m.value for m in hist]
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["proximal_fd_best_step"] == best.step
    arts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    assert {"picked.json", "samples.png"} <= arts
    from ambient_ray.models.weights import load

    net = load(str(flow / "dsd" / "picked"), "denoiser")
    assert net.meta["one_step"]["sigma_init"] == 2.5


def test_distill_refuses_what_it_cannot_distil(flow, tmp_path):
    """One line each: no σ_n for the adjusted way; a one-step generator as a teacher; proximal FD without rows."""
    from ambient_ray.config import ConfigError
    from ambient_ray.train.tasks.distill_config import DistillConfig, prepare

    plain = tmp_path / "plain"
    (plain / "model").mkdir(parents=True)
    meta = json.loads((flow / "teacher" / "model" / "model.json").read_text())
    meta.pop("noisy")
    (plain / "model" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="set distill.sigma_n or --way standard"):
        prepare(DistillConfig(teacher=str(plain), out=str(tmp_path / "o")))
    assert prepare(DistillConfig(teacher=str(plain), out=str(tmp_path / "o"), distill={"way": "standard"}))
    with pytest.raises(ConfigError, match="already a distilled one-step generator"):
        prepare(DistillConfig(teacher=str(flow / "dsd"), out=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="proximal FD needs the noisy training rows"):
        prepare(DistillConfig(teacher=str(flow / "teacher"), out=str(tmp_path / "o"), distill={"eval_every": 2}))


def test_an_ambient_o_teacher_distils_the_adjusted_way_per_row(flow, blurred_digits, tmp_path):
    """Any teacher: rows annotated with σ_min (Ambient-o's blurred data) give each draw its own σ_n (the adjusted
    way re-noises G's samples to it; a clean row trains plain SiD); distill.sigma_n overrides the annotated ones."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ambient_ray.data.metadata import parquet_files
    from ambient_ray.train.tasks.distill_config import DistillConfig, prepare

    table = pa.concat_tables([pq.read_table(f) for f in parquet_files(blurred_digits)])
    corrupted = np.array(table.column("quality").to_pylist()) == "corrupted"
    (tmp_path / "annotated").mkdir()
    pq.write_table(
        table.append_column("sigma_min", pa.array(np.where(corrupted, 0.3, 0.0))), tmp_path / "annotated" / "a.parquet"
    )
    data = str(tmp_path / "annotated")
    teacher = str(flow / "teacher")
    rows = prepare(DistillConfig(teacher=teacher, data=data, out=str(tmp_path / "o"), mlflow={"enabled": False})).rows
    ids = table.column("id").to_pylist()
    got = np.array([rows.row_sigma_n[i] for i in ids])
    np.testing.assert_allclose(got, np.where(corrupted, 0.3, 0.0), rtol=1e-6)  # σ_min is float32 on the driver
    assert 0 < corrupted.mean() < 1
    cfg = DistillConfig(teacher=teacher, data=data, out=str(tmp_path / "o"), distill={"sigma_n": 0.1})
    rows = prepare(cfg).rows
    assert sorted(set(rows.row_sigma_n.values())) == [0.0, 0.1]
