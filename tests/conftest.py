"""Session fixtures: one real SeaweedFS S3 server, one real local Ray cluster and one real MLflow server (on demand)."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

from ambient_ray import services, storage

BUCKET = "ambient-test"


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
