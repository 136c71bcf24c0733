"""``ambient-ray jobs``: follow, stop and trace the Ray jobs of a cluster (thin glue over Ray's job SDK and MLflow).

    ambient-ray jobs list                  jobs of the cluster, newest first
    ambient-ray jobs logs ID [--follow]    a job's output (``--follow``: until it ends)
    ambient-ray jobs stop ID               stop a job and wait until it has stopped
    ambient-ray jobs runs ID               the MLflow runs the job logged (tag ``ray.job_submission_id``)

The cluster is ``--address`` or ``RAY_ADDRESS`` (the dashboard URL, e.g. http://127.0.0.1:8265); with
token authentication on, the token comes from ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH`` as for ``ray job``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    from ambient_ray.config import ConfigError

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError(
            "no cluster given: pass --address http://HOST:8265 or set RAY_ADDRESS (cluster/local.sh env prints it)"
        )
    return JobSubmissionClient(address)


def list_jobs(address: str | None) -> int:
    jobs = sorted(client(address).list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
        print(
            f"{j.submission_id or j.job_id:28s} "
            f"{str(j.status.value if hasattr(j.status, 'value') else j.status):10s} "
            f"{started}  {' '.join(j.entrypoint.split())[:80]}"
        )
    if not jobs:
        print("no jobs")
    return 0


def logs(address: str | None, job_id: str, follow: bool) -> int:
    c = client(address)
    if not follow:
        sys.stdout.write(c.get_job_logs(job_id))
        return 0

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    status = str(c.get_job_status(job_id).value)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def stop(address: str | None, job_id: str, timeout: float = 60.0) -> int:
    c = client(address)
    c.stop_job(job_id)
    deadline = time.time() + timeout
    status = str(c.get_job_status(job_id).value)
    while status not in TERMINAL and time.time() < deadline:
        time.sleep(0.5)
        status = str(c.get_job_status(job_id).value)
    print(f"job {job_id}: {status}")
    return 0 if status in TERMINAL else 1


def runs(job_id: str, tracking_uri: str | None) -> int:
    from mlflow.tracking import MlflowClient

    from ambient_ray.io.tracking import run_url
    from ambient_ray.io.tracking import tracking_uri as resolve

    uri = resolve(tracking_uri)
    mc = MlflowClient(uri)
    exps = {e.experiment_id: e.name for e in mc.search_experiments()}
    found = mc.search_runs(
        list(exps), filter_string=f"tags.`ray.job_submission_id` = '{job_id}'", order_by=["attributes.start_time ASC"]
    )
    for r in found:
        link = run_url(uri, r.info.experiment_id, r.info.run_id) or ""
        print(f"{r.info.run_id}  {r.info.status:9s} {exps.get(r.info.experiment_id, '?')}/{r.info.run_name}  {link}")
    if not found:
        print(f"no MLflow runs tagged ray.job_submission_id={job_id} in {uri}")
        return 1
    return 0
