"""A real MLflow tracking server: SQLite store, artifacts proxied by the server to SeaweedFS S3."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from ambient_ray.io import services, storage

from .conftest import BUCKET


def _png() -> bytes:
    img = (np.arange(16 * 16 * 3, dtype=np.uint32).reshape(16, 16, 3) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_run_is_tracked_and_artifacts_land_in_s3(mlflow_server, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server.url
    mlflow.set_tracking_uri(mlflow_server.url)
    png = tmp_path / "grid.png"
    png.write_bytes(_png())
    note = tmp_path / "note.txt"
    note.write_text("hello from ambient-ray\n")

    exp_id = mlflow.create_experiment(f"ambient-test-{os.getpid()}-{time.time_ns()}")
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.log_param("tau", 0.5)
        mlflow.log_params({"lambda_max": 2, "crop": 16})
        for step in range(5):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_artifact(str(png), artifact_path="plots")
        mlflow.log_artifact(str(note))
    run_id = run.info.run_id

    client = MlflowClient(tracking_uri=mlflow_server.url)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"tau": "0.5", "lambda_max": "2", "crop": "16"}
    assert got.data.metrics["loss"] == pytest.approx(0.2)
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, pytest.approx(1.0 / (s + 1))) for s in range(5)]
    assert got.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: the client never sees S3

    top = {a.path: a.is_dir for a in client.list_artifacts(run_id)}
    assert top == {"plots": True, "note.txt": False}
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/grid.png"]
    back = client.download_artifacts(run_id, "plots/grid.png", str(tmp_path / "down"))
    assert open(back, "rb").read() == png.read_bytes()

    # the objects really are in SeaweedFS, under the configured destination
    s3 = storage.s3_client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="mlflow-artifacts/")["Contents"]]
    want = f"mlflow-artifacts/{exp_id}/{run_id}/artifacts/plots/grid.png"
    assert want in keys, keys
    assert f"mlflow-artifacts/{exp_id}/{run_id}/artifacts/note.txt" in keys
    assert s3.get_object(Bucket=BUCKET, Key=want)["Body"].read() == png.read_bytes()


def test_server_answers_127_clients_and_keeps_host_check(mlflow_server):
    assert urllib.request.urlopen(f"{mlflow_server.url}/health", timeout=10).status == 200
    api = f"{mlflow_server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert urllib.request.urlopen(urllib.request.Request(api, headers={"Host": "localhost"}), timeout=10).status == 200
    with pytest.raises(urllib.error.HTTPError) as e:  # MLflow 3's DNS-rebinding guard is still on
        urllib.request.urlopen(urllib.request.Request(api, headers={"Host": "evil.example.com"}), timeout=10)
    assert e.value.code in (400, 403)


def test_stop_ends_the_server_and_its_children(tmp_path):
    svc = services.start_mlflow(str(tmp_path / "srv"), str(tmp_path / "artifacts"))
    try:
        port = int(svc.url.rsplit(":", 1)[1])
        assert urllib.request.urlopen(f"{svc.url}/health", timeout=10).status == 200
        assert os.path.exists(tmp_path / "srv" / "mlflow.db")
        pgid = os.getpgid(svc.proc.pid)
        assert pgid == svc.proc.pid != os.getpgid(0)  # its own process group
    finally:
        svc.stop()
    assert svc.proc.poll() is not None
    deadline = time.time() + 15
    while True:  # the whole group (uvicorn workers included) is gone
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        assert time.time() < deadline, "processes of the MLflow server's group are still alive"
        time.sleep(0.2)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    svc.stop()  # idempotent


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert services.mlflow_tracking_uri("http://example:5000") == "http://example:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert services.mlflow_tracking_uri(None) == "http://from-env:5000"
    assert services.mlflow_tracking_uri("") == "http://from-env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert services.mlflow_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    legacy = tmp_path / "legacy"
    (legacy / "mlruns" / "0").mkdir(parents=True)
    (legacy / "mlruns" / "0" / "meta.yaml").write_text("name: Default\n")
    monkeypatch.chdir(legacy)
    assert services.mlflow_tracking_uri(None) == f"file://{legacy}/mlruns"


def test_default_local_store_works_with_start_run(tmp_path):
    """The fallback store takes a real run (in a fresh process: mlflow's tracking URI is global)."""
    code = (
        "import mlflow, os\n"
        "from ambient_ray.io.services import mlflow_tracking_uri\n"
        "uri = mlflow_tracking_uri(None)\n"
        "mlflow.set_tracking_uri(uri)\n"
        "open('a.txt', 'w').write('x')\n"
        "with mlflow.start_run() as r:\n"
        "    mlflow.log_param('p', 1); mlflow.log_metric('m', 2.0, step=3); mlflow.log_artifact('a.txt')\n"
        "c = mlflow.tracking.MlflowClient(uri)\n"
        "assert c.get_run(r.info.run_id).data.params == {'p': '1'}\n"
        "assert [a.path for a in c.list_artifacts(r.info.run_id)] == ['a.txt']\n"
        "print(uri)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"sqlite:///{tmp_path}/mlflow.db"
    assert (tmp_path / "mlflow.db").exists()
    assert list((tmp_path / "mlruns").rglob("a.txt"))  # artifacts beside it, in ./mlruns


def test_resumed_job_reopens_its_run_or_starts_one_in_another_store(tmp_path, capsys):
    """A re-run logs into the run recorded in OUT/mlflow_run.json; pointed at a store that lacks that run
    (another server, another SQLite file), it says so and opens a new run instead of failing."""
    import json

    from mlflow.tracking import MlflowClient

    from ambient_ray.io.tracking import MlflowConfig, start_run

    out = str(tmp_path / "job")
    a, b = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    first, _ = start_run(MlflowConfig(tracking_uri=a, experiment="resume"), out, params={"x": 1})
    MlflowClient(a).set_terminated(first, "FAILED")
    again, _ = start_run(MlflowConfig(tracking_uri=a, experiment="resume"), out, params={"x": 1})
    assert again == first and MlflowClient(a).get_run(first).info.status == "RUNNING"
    assert MlflowClient(a).get_run(first).data.tags["ambient.root_run_id"] == first  # the top of its own tree
    other, uri = start_run(MlflowConfig(tracking_uri=b, experiment="resume"), out, params={"x": 1})
    assert other != first and uri == b
    assert MlflowClient(b).get_run(other).data.params == {"x": "1"}
    assert json.loads((tmp_path / "job" / "mlflow_run.json").read_text()) == {"run_id": other, "tracking_uri": b}
    assert f"run {first} recorded in" in capsys.readouterr().err


def test_experiments_are_marked_as_model_training(mlflow_server, tmp_path):
    """Our experiments carry the model-training kind (``mlflow.experimentKind``; the view a link opens is chosen by
    its ``workflowType``: test_mlflow_ui)."""
    from mlflow.tracking import MlflowClient

    from ambient_ray.io import tracking

    client = MlflowClient(mlflow_server.url)
    name = f"ambient-kind-{os.getpid()}-{time.time_ns()}"

    def start(experiment: str, out: str) -> None:
        mcfg = tracking.MlflowConfig(tracking_uri=mlflow_server.url, experiment=experiment)
        run_id, uri = tracking.start_run(mcfg, str(tmp_path / out), {"x": 1})
        tracking.finish(run_id, uri)

    start(name, "new")  # a new experiment is created with the tag
    assert client.get_experiment_by_name(name).tags.get("mlflow.experimentKind") == "custom_model_development"

    old = client.create_experiment(f"{name}-old")  # made before ambient-ray tagged them: no kind yet
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    start(f"{name}-old", "old")
    assert client.get_experiment(old).tags.get("mlflow.experimentKind") == "custom_model_development"

    chosen = client.create_experiment(f"{name}-genai", tags={"mlflow.experimentKind": "genai_development"})
    start(f"{name}-genai", "genai")  # a kind someone chose is kept
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"
