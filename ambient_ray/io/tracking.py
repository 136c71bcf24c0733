"""MLflow glue: one run per job, params from the resolved config, artifacts from the outputs.

The tracking URI comes from the config, else ``MLFLOW_TRACKING_URI``, else a local store. A run's id
is kept in ``OUT/mlflow_run.json`` so a resumed job logs into the same run.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from pydantic import Field

from ambient_ray.config import Strict
from ambient_ray.io import storage


class MlflowConfig(Strict):
    tracking_uri: str | None = Field(None, description="default: MLFLOW_TRACKING_URI, else a local store")
    experiment: str = "ambient-ray"
    artifact_location: str | None = Field(
        None, description="artifact root of a new experiment (default: the server's or store's own)"
    )
    run_name: str | None = None
    parent_run_id: str | None = Field(
        None, description="nest this job's run under another run (e.g. an experiment arm)"
    )
    enabled: bool = True


def tracking_uri(configured: str | None) -> str:
    from ambient_ray.io.services import mlflow_tracking_uri

    return mlflow_tracking_uri(configured)


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
        return True
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise  # an unreachable or failing server is an error, not a reason to open a second run


def ray_job_tags() -> dict[str, str]:
    """``{"ray.job_submission_id": ID}`` inside a job started by ``ray job submit`` (so ``ambient-ray jobs runs ID``
    finds the job's runs); empty elsewhere. The job supervisor hands the driver its metadata in this variable."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        job_id = (json.loads(raw).get("metadata") or {}).get("job_submission_id")
    except ValueError:
        return {}
    return {"ray.job_submission_id": job_id} if job_id else {}


def start_run(mcfg, out: str, params: dict, tags: dict | None = None) -> tuple[str | None, str | None]:
    """Create (or, for a resumed job, reopen) the job's MLflow run; returns (run_id, tracking_uri)."""
    if not mcfg.enabled:
        return None, None
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(mcfg.tracking_uri)
    client = MlflowClient(uri)
    marker = storage.join(out, "mlflow_run.json")
    if storage.exists(marker):
        recorded = json.loads(storage.read_bytes(marker))
        run_id = recorded["run_id"]
        if _run_exists(client, run_id):
            client.set_terminated(run_id, "RUNNING")
            return run_id, uri
        # resumed against another tracking server or store: keep the work, open a new run there
        print(
            f"mlflow: run {run_id} recorded in {marker} (tracking URI {recorded.get('tracking_uri')}) is not in {uri}; "
            "starting a new run",
            file=sys.stderr,
        )
    exp = client.get_experiment_by_name(mcfg.experiment)
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(mcfg.experiment, artifact_location=mcfg.artifact_location)
    )
    tags = {
        k: str(v) for k, v in {"out": out, **ray_job_tags(), **(tags or {})}.items()
    }  # the REST API takes strings only
    if mcfg.parent_run_id:
        tags["mlflow.parentRunId"] = mcfg.parent_run_id
    run = client.create_run(exp_id, run_name=mcfg.run_name, tags=tags)
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    storage.write_bytes(marker, json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}).encode())
    return run.info.run_id, uri


def log_metrics(run_id: str | None, uri: str | None, values: dict[str, float], step: int = 0) -> None:
    """Log a dict of numbers as metrics of a run (one batch)."""
    if not run_id:
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in sorted(values.items())]
    MlflowClient(uri).log_batch(run_id, metrics=items)


def log_files(run_id: str | None, uri: str | None, files: dict[str, bytes], artifact_path: str | None = None) -> None:
    """Log in-memory files (name -> bytes) as artifacts of a run."""
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            path = os.path.join(d, name)
            with open(path, "wb") as f:
                f.write(data)
            client.log_artifact(run_id, path, artifact_path)


def finish(run_id: str | None, uri: str | None, status: str = "FINISHED", tags: dict | None = None) -> None:
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, str(v))
    client.set_terminated(run_id, status)


def finish_training(cfg, out: str, ckpt: str | None, run_id: str | None, uri: str | None) -> None:
    """Export inference weights, draw the σ donut and a sample grid, and log them to the run."""
    from ambient_ray.io import plots

    files: dict[str, bytes] = {"config.yaml": storage.read_bytes(storage.join(out, "config.yaml"))}
    if ckpt:
        from ambient_ray.train.engine import export_weights

        export_weights(out, ckpt)
        cov = json.loads(storage.read_bytes(storage.join(ckpt, "coverage.json")))
        storage.write_bytes(storage.join(out, "coverage.json"), json.dumps(cov, indent=1).encode())
        png = plots.coverage_plot(cov["donut"], title=f"σ coverage (λ_max={cfg.ambient.lambda_max})")
        storage.write_bytes(storage.join(out, "coverage.png"), png)
        files.update({"coverage.png": png, "coverage.json": json.dumps(cov).encode()})
        if cfg.sample_grid:
            from ambient_ray.stages.sample import draw, load_denoiser

            net = load_denoiser(storage.join(out, "model"))
            imgs = draw(net, cfg.sample_grid, seed=cfg.seed)
            grid = plots.image_grid_png(imgs)
            storage.write_bytes(storage.join(out, "samples.png"), grid)
            files["samples.png"] = grid
    log_files(run_id, uri, files)
    finish(run_id, uri, tags={"checkpoint": ckpt or "", "model": storage.join(out, "model")})
