"""Session fixtures: one real SeaweedFS S3 server and one real local Ray cluster for the whole run."""

from __future__ import annotations

import os
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

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    address = ray.get_runtime_context().gcs_address
    yield address
    ray.shutdown()
