"""Cluster mode end to end: ``cluster/local.sh up``, the real ``ray job submit`` CLI running ``jobs.pipeline``,
the outputs checked in S3 (boto3) and the runs in the MLflow server (MlflowClient), then ``down``.

These tests start a Ray cluster of their own; conftest runs them before anything starts the session's
in-process cluster (two Ray clusters on one machine confuse Ray Train's placement-group cleaner).
The tests of this module share one local cluster and run in file order; the last one takes it down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.own_ray_cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(REPO, "cluster", "local.sh")
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
OUT = "s3://ambient/e2e"
TINY = [  # the pipeline of jobs/configs/pipeline.yaml, cut to seconds per stage
    f"out={OUT}",
    "corrupt.source.limit=600",
    "classifier.steps=15",
    "classifier.checkpoint_every=15",
    "classifier.log_every=5",
    "annotate.draws=2",
    "annotate.grid_points=8",
    "train.steps=15",
    "train.checkpoint_every=15",
    "train.log_every=5",  # three loss points, as the test asks
    "train.sample_grid=16",
    "sample.num=64",
    "sample.sampler.steps=6",
]


def parse_exports(text: str) -> dict[str, str]:
    import shlex

    env = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = str(tmp_path_factory.mktemp("local-cluster"))
    up = subprocess.run([LOCAL, "up", "--state", state, "--num-cpus", "2"], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr[-3000:]
    env = parse_exports(up.stdout)
    yield {"state": state, "env": env, "stderr": up.stderr}
    subprocess.run(
        [LOCAL, "down", "--state", state], capture_output=True, timeout=120
    )  # a no-op once the last test ran


def client_env(cluster: dict, **extra) -> dict:
    """This process's environment with the cluster's exports, less anything pointing at the test session's
    own services."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    return {**base, **cluster["env"], **extra}


def submit(
    cluster: dict, args: list[str], job_id: str, env: dict | None = None, wait: bool = True, timeout: float = 600
):
    cmd = [
        RAY,
        "job",
        "submit",
        "--submission-id",
        job_id,
        "--working-dir",
        ".",
        "--runtime-env",
        "cluster/runtime_env.yaml",
    ]
    cmd += ([] if wait else ["--no-wait"]) + ["--", *args]
    return subprocess.run(
        cmd, cwd=REPO, env=env or client_env(cluster), capture_output=True, text=True, timeout=timeout
    )


def job_status(cluster: dict, job_id: str) -> str:
    code = (
        "import sys; from ray.job_submission import JobSubmissionClient as C; "
        "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, cluster["env"]["RAY_ADDRESS"], job_id],
        env=client_env(cluster),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def cli(cluster: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ambient_ray.cli", *args],
        cwd=REPO,
        env=client_env(cluster),
        capture_output=True,
        text=True,
        timeout=120,
    )


def s3_client(cluster: dict):
    import boto3

    e = cluster["env"]
    return boto3.client(
        "s3",
        endpoint_url=e["AWS_ENDPOINT_URL"],
        aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"],
        region_name=e["AWS_DEFAULT_REGION"],
    )


def test_up_prints_the_environment_a_user_exports(cluster):
    env = cluster["env"]
    for key in (
        "RAY_ADDRESS",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN_PATH",
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "MLFLOW_TRACKING_URI",
    ):
        assert env.get(key), key
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_ADDRESS"].startswith("http://127.0.0.1:")
    assert os.stat(env["RAY_AUTH_TOKEN_PATH"]).st_mode & 0o077 == 0  # the token file is private
    status = subprocess.run([LOCAL, "status", "--state", cluster["state"]], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and status.stdout.count(" up ") == 3, status.stdout
    again = subprocess.run([LOCAL, "up", "--state", cluster["state"]], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already up" in again.stderr and parse_exports(again.stdout) == env


def test_pipeline_job_writes_s3_and_mlflow(cluster):
    job = f"pipeline-{uuid.uuid4().hex[:8]}"
    t0 = time.time()
    r = submit(
        cluster,
        [
            "python",
            "-m",
            "jobs.pipeline",
            "--config",
            "jobs/configs/pipeline.yaml",
            "--no-progress",
            *[f"--set={s}" for s in TINY],
        ],
        job,
    )
    print(f"pipeline job: {time.time() - t0:.0f}s")
    assert job_status(cluster, job) == "SUCCEEDED", r.stdout[-4000:] + r.stderr[-2000:]
    assert "pipeline: [6/6] evaluate: done" in r.stdout and "MLflow: pipeline run" in r.stdout, r.stdout[-3000:]

    # the outputs are in the cluster's S3
    s3 = s3_client(cluster)
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="ambient", Prefix="e2e/")
        for o in page.get("Contents", [])
    ]
    for needed in (
        "e2e/corrupt/data/",
        "e2e/annotated/data/",
        "e2e/train/model/",
        "e2e/samples/samples.npy",
        "e2e/eval/metrics.json",
        "e2e/pipeline.json",
    ):
        assert any(k.startswith(needed) for k in keys), (needed, keys[:20])
    report = json.loads(s3.get_object(Bucket="ambient", Key="e2e/pipeline.json")["Body"].read())
    assert list(report["stages"]) == ["corrupt", "classifier", "annotate", "train", "sample", "evaluate"]
    assert report["stages"]["corrupt"]["figures"]["rows_in"] == 600
    assert report["stages"]["evaluate"]["figures"]["fd"] > 0

    # the runs, their metrics and artifacts are in the cluster's MLflow server (artifacts stored in its S3)
    from mlflow.tracking import MlflowClient

    mc = MlflowClient(cluster["env"]["MLFLOW_TRACKING_URI"])
    exp = mc.get_experiment_by_name("ambient-ray-pipeline")
    runs = mc.search_runs([exp.experiment_id], filter_string=f"tags.`ray.job_submission_id` = '{job}'")
    by_name = {x.info.run_name: x for x in runs}
    assert set(by_name) == {"pipeline", "train-classifier", "annotate", "train", "sample", "evaluate"}
    parent = by_name["pipeline"]
    assert parent.info.run_id == report["mlflow_run_id"] and parent.info.status == "FINISHED"
    for name, run in by_name.items():
        if name != "pipeline":
            assert run.data.tags.get("mlflow.parentRunId") == parent.info.run_id, name
            assert run.info.status == "FINISHED", name
    assert len(mc.get_metric_history(by_name["train"].info.run_id, "loss")) >= 3
    assert by_name["evaluate"].data.metrics["fd"] == pytest.approx(report["stages"]["evaluate"]["figures"]["fd"])
    assert parent.data.metrics["evaluate.fd"] == pytest.approx(report["stages"]["evaluate"]["figures"]["fd"])
    arts = {a.path for a in mc.list_artifacts(by_name["train"].info.run_id)}
    assert {"coverage.png", "samples.png"} <= arts, arts
    png = mc.download_artifacts(by_name["train"].info.run_id, "samples.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    stored = s3.list_objects_v2(Bucket="ambient", Prefix="mlflow-artifacts/").get("KeyCount", 0)
    assert stored > 0

    # operations: the job's logs and its MLflow runs, by job id
    logs = cli(cluster, "jobs", "logs", job)
    assert logs.returncode == 0 and "pipeline: [3/6] annotate" in logs.stdout
    traced = cli(cluster, "jobs", "runs", job)
    assert traced.returncode == 0 and all(run.info.run_id in traced.stdout for run in runs), (
        traced.stdout + traced.stderr
    )
    listed = cli(cluster, "jobs", "list")
    assert job in listed.stdout and "SUCCEEDED" in listed.stdout

    # re-submitting the same pipeline (its config now read from S3) resumes: every stage is skipped, the run reopened
    with open(os.path.join(REPO, "jobs", "configs", "pipeline.yaml"), "rb") as f:
        s3.put_object(Bucket="ambient", Key="configs/pipeline.yaml", Body=f.read())
    again = f"pipeline-{uuid.uuid4().hex[:8]}"
    r2 = submit(
        cluster,
        [
            "python",
            "-m",
            "jobs.pipeline",
            "--config",
            "s3://ambient/configs/pipeline.yaml",
            *[f"--set={s}" for s in TINY],
        ],
        again,
    )
    assert job_status(cluster, again) == "SUCCEEDED", r2.stdout[-3000:]
    assert r2.stdout.count("finished earlier, skipped") == 6, r2.stdout[-3000:]
    assert parent.info.run_id in r2.stdout


def test_submission_without_the_token_is_refused(cluster, tmp_path):
    env = client_env(cluster, HOME=str(tmp_path))  # no ~/.ray/auth_token to fall back on
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k)
    job = f"no-token-{uuid.uuid4().hex[:6]}"
    r = submit(cluster, ["python", "-c", "print('should not run')"], job, env=env, wait=False, timeout=120)
    assert r.returncode != 0
    assert (
        "401" in r.stdout + r.stderr or "nauthorized" in r.stdout + r.stderr or "token" in (r.stdout + r.stderr).lower()
    )
    wrong = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    r = submit(cluster, ["python", "-c", "print('should not run')"], job, env=wrong, wait=False, timeout=120)
    assert r.returncode != 0
    assert job not in cli(cluster, "jobs", "list").stdout  # nothing was queued


def test_bad_config_fails_fast_naming_the_key(cluster):
    job = f"bad-config-{uuid.uuid4().hex[:6]}"
    t0 = time.time()
    r = submit(
        cluster,
        [
            "python",
            "-m",
            "jobs.pipeline",
            "--config",
            "jobs/configs/pipeline.yaml",
            "--set",
            "out=s3://ambient/bad",
            "--set",
            "train.lamda_max=4",
        ],
        job,
        timeout=300,
    )
    assert job_status(cluster, job) == "FAILED"
    assert r.returncode != 0
    logs = cli(cluster, "jobs", "logs", job).stdout
    assert "train.lamda_max" in logs and "unknown key" in logs, logs[-2000:]
    assert time.time() - t0 < 120
    s3 = s3_client(cluster)
    assert s3.list_objects_v2(Bucket="ambient", Prefix="bad/").get("KeyCount", 0) == 0  # failed before writing anything


def test_a_running_job_can_be_stopped(cluster):
    job = f"sleeper-{uuid.uuid4().hex[:6]}"
    r = submit(
        cluster,
        ["python", "-c", "import time; print('sleeping', flush=True); time.sleep(600)"],
        job,
        wait=False,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    deadline = time.time() + 60
    while job_status(cluster, job) != "RUNNING" and time.time() < deadline:
        time.sleep(0.5)
    stopped = cli(cluster, "jobs", "stop", job)
    assert stopped.returncode == 0 and "STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    assert job_status(cluster, job) == "STOPPED"
    followed = cli(
        cluster, "jobs", "logs", job, "--follow"
    )  # returns at once for an ended job: exit 1, it did not succeed
    assert followed.returncode == 1 and "sleeping" in followed.stdout and "STOPPED" in followed.stderr


def test_down_leaves_no_process_behind(cluster):
    import psutil

    with open(os.path.join(cluster["state"], "state.json")) as f:
        st = json.load(f)
    down = subprocess.run([LOCAL, "down", "--state", cluster["state"]], capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, down.stderr
    groups = {s["pgid"] for s in st["services"].values()}
    left = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:  # exited, waiting for init to reap it
                continue
            cmdline = " ".join(p.info["cmdline"] or [])
            if (
                os.getpgid(p.pid) in groups
                or st["ray_temp_dir"] in cmdline
                or cluster["state"] in cmdline
                or p.environ().get("AMBIENT_LOCAL_CLUSTER") == st["state"]
            ):
                left.append((p.pid, cmdline))
        except (psutil.Error, ProcessLookupError):
            continue
    assert not left, left
    status = subprocess.run([LOCAL, "status", "--state", cluster["state"]], capture_output=True, text=True, timeout=60)
    assert status.returncode == 3
