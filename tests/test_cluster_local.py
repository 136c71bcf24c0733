"""Cluster mode end to end, as the docs write it: the block of ``docs/`` marked ``<!-- tested: local cluster
flow -->`` (``cluster/local.sh up``, the real ``ray job submit`` CLI running ``jobs.pipeline``, ``ambient-ray jobs``,
``ls`` and ``get``) runs in bash from a shell with no virtual environment on ``PATH``; then the outputs are checked
in S3 (boto3) and the runs in the MLflow server (MlflowClient); the last test runs the docs' ``down`` block.

The one change to the documented commands: the pipeline line gets the ``--set`` overrides of ``TINY`` appended,
which cut every stage to seconds. These tests start a Ray cluster of their own; conftest runs them before anything
starts the session's in-process cluster (two Ray clusters on one machine confuse Ray Train's placement-group
cleaner). The tests of this module share one local cluster and run in file order; the last one takes it down.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.own_ray_cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(REPO, "cluster", "local.sh")
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
OUT = "s3://ambient/run1"  # the documented flow's out
TINY = [  # the pipeline of jobs/configs/pipeline.yaml, cut to seconds per stage
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


def documented(marker: str) -> str:
    """The bash block that follows ``<!-- tested: MARKER -->`` in a page of docs/ (exactly one such block)."""
    found = []
    for root, _, files in os.walk(os.path.join(REPO, "docs")):
        for name in sorted(files):
            if name.endswith(".md"):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    text = f.read()
                for m in re.finditer(rf"<!-- tested: {re.escape(marker)} -->\s*```(?:bash|sh)\n(.*?)```", text, re.S):
                    found.append(m.group(1))
    assert len(found) == 1, f"docs/: {len(found)} blocks marked 'tested: {marker}'"
    return found[0]


def with_overrides(script: str, overrides: list[str]) -> str:
    """``script`` with continuation lines joined and ``--set`` overrides appended to its ``jobs.pipeline`` line."""
    lines = script.replace("\\\n", " ").splitlines()
    hits = [i for i, line in enumerate(lines) if "-m jobs.pipeline" in line]
    assert len(hits) == 1, script
    cmd, hash_, comment = lines[hits[0]].partition("  #")
    lines[hits[0]] = cmd.rstrip() + "".join(f" --set {o}" for o in overrides) + (f"  #{comment}" if hash_ else "")
    return "\n".join(lines) + "\n"


def bare_shell_env(state: str) -> dict:
    """A user's shell: no virtual environment on PATH, none of the test session's services configured."""
    venv_bin = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_")) and k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env["AMBIENT_CLUSTER_STATE"] = state  # the state folder, instead of .local-cluster/ in the checkout
    return env


def run_bash(script: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def parse_exports(text: str) -> dict[str, str]:
    import shlex

    env = {}
    for line in text.splitlines():
        if line.startswith("export ") and not line.startswith("export PATH="):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The documented flow, run as written (plus TINY): up, submit the pipeline, look at the outputs."""
    state = str(tmp_path_factory.mktemp("local-cluster"))
    shell = bare_shell_env(state)
    bare = run_bash("command -v ray || echo 'ray: command not found'", shell, 30)
    assert "not found" in bare.stdout  # the shell the flow starts from has no ray on PATH
    t0 = time.time()
    flow = run_bash(with_overrides(documented("local cluster flow"), TINY), shell, 1200)
    seconds = time.time() - t0
    envtext = subprocess.run([LOCAL, "env", "--state", state], capture_output=True, text=True, timeout=60)
    env = parse_exports(envtext.stdout)
    yield {"state": state, "env": env, "flow": flow, "seconds": seconds, "shell": shell, "exports": envtext.stdout}
    subprocess.run([LOCAL, "down", "--state", state], capture_output=True, timeout=120)  # a no-op once the last ran


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


def test_documented_flow_runs_as_written(cluster):
    """The docs' flow ran in a shell with no venv on PATH: up printed the PATH it needs, the job ran all six
    stages, ``ambient-ray jobs list``, ``ls`` and ``get`` worked; its log is the quiet one the docs count."""
    flow = cluster["flow"]
    out = flow.stdout + flow.stderr
    print(f"documented flow: {cluster['seconds']:.0f} s")
    assert flow.returncode == 0, out[-4000:]
    assert "pipeline: [6/6] evaluate: done" in flow.stdout and "MLflow: pipeline run" in flow.stdout, out[-3000:]
    assert re.search(r"raysubmit_\w+\s+SUCCEEDED", flow.stdout), out[-3000:]  # ambient-ray jobs list
    for folder in ("corrupt/", "classifier/", "annotated/", "train/", "samples/", "eval/"):  # ambient-ray ls
        assert re.search(rf"^{folder}\s+\d+ files?\s", flow.stdout, re.M), (folder, out[-3000:])
    grid = os.path.join(REPO, "runs", "grid.png")  # ambient-ray get ... runs/
    with open(grid, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    os.remove(grid)
    assert "export PATH=" in cluster["exports"] and os.path.dirname(sys.executable) in cluster["exports"]


def test_pipeline_job_writes_s3_and_mlflow(cluster):
    job = re.search(r"raysubmit_\w+", cluster["flow"].stdout).group(0)
    logs = cli(cluster, "jobs", "logs", job).stdout
    lines = logs.splitlines()
    print(f"job log: {len(lines)} lines")
    for noise in ("View run", "View experiment", "Waiting up to", "LinAlgWarning", "\r", "0%|"):
        assert noise not in logs, (noise, logs[-3000:])

    # the outputs are in the cluster's S3
    s3 = s3_client(cluster)
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="ambient", Prefix="run1/")
        for o in page.get("Contents", [])
    ]
    for needed in (
        "run1/corrupt/data/",
        "run1/annotated/data/",
        "run1/train/model/",
        "run1/samples/samples.npy",
        "run1/eval/metrics.json",
        "run1/pipeline.json",
    ):
        assert any(k.startswith(needed) for k in keys), (needed, keys[:20])
    report = json.loads(s3.get_object(Bucket="ambient", Key="run1/pipeline.json")["Body"].read())
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
    assert "pipeline: [3/6] annotate" in logs
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
            f"--set=out={OUT}",
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
    down = run_bash(documented("local cluster down"), cluster["shell"], 180)  # the docs' down block, as written
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
