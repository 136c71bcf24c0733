"""Session fixtures: one real SeaweedFS S3 server, one real local Ray cluster and one real MLflow server (on demand)."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

from ambient_ray.io import services, storage

BUCKET = "ambient-test"

# Ray Train's fixed costs per run, which the suite pays ~25 times (every train, train-classifier, Tune
# trial, experiment arm): the controller polls its workers every 2 s (each finished or failed run waits
# for the next poll), and every run starts a spot-preemption watcher actor (one more process on a
# 2-CPU node; no node of a local test cluster is ever preempted). Both are read when a run starts and
# propagated to its controller; set before the session's cluster starts, so Tune trials inherit them.
# About 4-6 s less per run, measured; nothing a test checks depends on either.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# DeepSpeed's CPU Adam (the ZeRO-Offload test) is compiled on first use into TORCH_EXTENSIONS_DIR, by default
# ~/.cache/torch_extensions, shared by every checkout: a build from another checkout's sources is rebuilt
# (60-90 s on 2 cores, measured in its ninja log). One build per venv, made by `make setup`.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def pytest_collection_modifyitems(items):
    """Tests marked own_ray_cluster (cluster/local.sh) start a Ray cluster of their own: run them first,
    before any test starts the session's in-process cluster, so that two never run at once."""
    own = [i for i in items if i.get_closest_marker("own_ray_cluster")]
    items[:] = own + [i for i in items if not i.get_closest_marker("own_ray_cluster")]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 with one bucket; the AWS_* variables point at it."""
    svc = services.start_seaweedfs(str(tmp_path_factory.mktemp("seaweedfs")))
    old = {k: os.environ.get(k) for k in svc.env()}
    os.environ.update(svc.env())
    storage.ensure_bucket(BUCKET)
    yield svc
    svc.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_prefix(s3):
    """A fresh s3://bucket/prefix for one test."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """One local Ray cluster (2 CPUs); started after S3 so its workers inherit the AWS_* variables."""
    import ray

    # address="local": always a fresh cluster of its own, never one already running on the machine
    # the dashboard serves the state API, which Ray Train's placement-group cleaner polls: without it a Train run
    # stopped from outside (a Tune trial stopped by ASHA) would keep its workers' CPUs reserved
    ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="WARNING", log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    address = ray.get_runtime_context().gcs_address
    yield address
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(s3, tmp_path_factory):
    """An MLflow tracking server (SQLite store) whose artifacts go through its proxy to
    s3://ambient-test/mlflow-artifacts; MLFLOW_TRACKING_URI points at it for the session."""
    svc = services.start_mlflow(str(tmp_path_factory.mktemp("mlflow")), f"s3://{BUCKET}/mlflow-artifacts", env=s3.env())
    env = {**svc.env(), "MLFLOW_DISABLE_TELEMETRY": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield svc
    svc.stop()
    if "mlflow" in sys.modules and sys.modules["mlflow"].get_tracking_uri() == svc.url:
        sys.modules["mlflow"].set_tracking_uri(None)  # tests may have set it; it also unsets the variable
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def blurred_digits(ray_cluster, tmp_path_factory):
    """The built-in digits through the corrupt stage (blur σ 1.0, 30% clean), written once for the session:
    the training tests' data (read only)."""
    from ambient_ray.data.sources import SourceConfig
    from ambient_ray.stages.corrupt import CorruptConfig
    from ambient_ray.stages.corrupt import run as corrupt_run

    out = str(tmp_path_factory.mktemp("blurred-digits") / "corrupt")
    cfg = CorruptConfig(
        out=out, source=SourceConfig(dataset="digits"), corruptions=["blur:sigma=1.0"], clean_fraction=0.3, preview=0
    )
    corrupt_run(cfg, progress=False)
    return out
