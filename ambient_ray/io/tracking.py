"""MLflow glue: one run per job, params from the resolved config, artifacts from the outputs.

The tracking URI comes from the config, else ``MLFLOW_TRACKING_URI``, else a local store. A run's id
is kept in ``OUT/mlflow_run.json`` so a resumed job logs into the same run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pydantic import Field

from ambient_ray.config import Strict
from ambient_ray.io import storage

# a local SQLite store announces its table creation and migration at INFO on the console of every new run folder
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
# MLflow prints "View run NAME at: URL" and "View experiment at: URL" to stdout each time a run of an HTTP tracking
# server ends (mlflow/tracking/_tracking_service/client.py, TrackingServiceClient._log_url, called by
# set_terminated) unless this variable is true; its links open the GenAI view. Our summary lines print the links
# (see run_link). Read at each call, so setting it here covers every process that imports this module; an explicit
# value in the environment wins.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class MlflowConfig(Strict):
    tracking_uri: str | None = Field(None, description="default: MLFLOW_TRACKING_URI, else a local store")
    experiment: str = Field("ambient-ray", description="MLflow experiment the run goes to (created if missing)")
    artifact_location: str | None = Field(
        None, description="artifact root of a new experiment (default: the server's or store's own)"
    )
    run_name: str | None = Field(
        None,
        description="name of the job's MLflow run (default: MLflow's generated name; pipeline, experiment "
        "and tune: their stage's name)",
    )
    parent_run_id: str | None = Field(
        None, description="nest this job's run under another run (e.g. an experiment arm)"
    )
    enabled: bool = Field(True, description="false: no MLflow run (nothing logged, no model registered)")
    system_metrics: bool = Field(
        True,
        description="training: MLflow's system metrics monitor (CPU, memory, disk, network; GPU with nvidia-ml-py) in "
        "each node's first worker, logged as system/node_<N>/...",
    )
    system_metrics_interval: float = Field(10.0, gt=0, description="seconds between system metrics samples")
    register_model: bool = Field(
        True,
        description="training: register the exported weights (OUT/model, referenced by URI, not uploaded) as a new "
        "version of the registered model 'registered_model'",
    )
    registered_model: str | None = Field(
        None, description="name in the MLflow model registry (default: '<experiment>-<stage>')"
    )


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


def _root_of(client, parent_run_id: str) -> str:
    """The top of the tree a run nested under ``parent_run_id`` joins: the parent's own root, else the parent (also
    where the parent is not in this store: MLflow nests under any id, so does this)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(parent_run_id).data.tags.get(ROOT_TAG) or parent_run_id
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return parent_run_id
        raise


def ui_root(uri: str | None) -> str | None:
    """The address of the MLflow UI of a tracking URI: the server itself for http(s); None for a local store."""
    return uri.rstrip("/") if uri and uri.startswith(("http://", "https://")) else None


def _ui(root: str, path: str, query: dict[str, str]) -> str:
    from urllib.parse import quote, urlencode

    # the UI routes in the URL's fragment: the query of the route goes after the fragment's path
    return f"{root}/#{path}?{urlencode({**UI_VIEW, **query}, quote_via=quote)}"


def run_url(uri: str | None, experiment_id: str, run_id: str) -> str | None:
    """A run's page in the model-training view (under the experiment's "Runs"; it lists the run's child runs)."""
    root = ui_root(uri)
    return _ui(root, f"/experiments/{experiment_id}/runs/{run_id}", {}) if root else None


def tree_url(uri: str | None, experiment_id: str, root_run_id: str) -> str | None:
    """The runs table of one tree: the run ``root_run_id`` (a pipeline's) and every run nested under it (its stages),
    one row each, in the order they started.

    The table folds nested runs under a collapsed parent row, and whether a row is open is kept in the browser only
    (the UI's ``runsExpanded`` state, which a shared view's URL does not carry either); the UI nests only when the
    table is sorted by its own creation-time key (``attributes.start_time``). Sorting by the same column named with
    quotes (``attributes.`start_time```) keeps the order and lists every run of the tree as a row."""
    root = ui_root(uri)
    if not root:
        return None
    query = {
        "searchFilter": f"tags.`{ROOT_TAG}` = '{root_run_id}'",
        "orderByKey": "attributes.`start_time`",
        "orderByAsc": "true",
    }
    return _ui(root, f"/experiments/{experiment_id}/runs", query)


def run_link(run_id: str | None, uri: str | None, tree: bool = False) -> str | None:
    """The UI link of a run for a summary line: its page, or (``tree``) the runs table of its tree (:func:`tree_url`:
    a pipeline's run and its stages' runs); None for a local store, or where the server cannot say (a summary line
    never fails)."""
    if not run_id or not ui_root(uri):
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(uri).get_run(run_id)
    except (MlflowException, OSError):
        return None
    exp = run.info.experiment_id
    if tree:
        return tree_url(uri, exp, run.data.tags.get(ROOT_TAG) or run_id)
    return run_url(uri, exp, run_id)


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


# The experiment's kind. MLflow 3's UI shows it (and reads it where the workflow switch below is off); the open-source
# UI of 3.17 does not choose its view from it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# What MLflow 3.x's UI (3.17) opens: the sidebar's "GenAI | Model training" switch decides, for every experiment, and
# it is read from the page URL's `workflowType` parameter (genai or machine_learning), else from the value last chosen
# in that browser (localStorage "mlflow.workflowType"), else GenAI: an experiment opened with no parameter
# (MLflow's own "#/experiments/1" link) lands on the GenAI overview (traces, judges), and a run's page sits under
# "Evaluations". Every link we print carries the parameter, so it opens the model-training view (runs table, run
# pages under "Runs") in any browser.
UI_VIEW = {"workflowType": "machine_learning"}
# Every run nested under another carries the id of the run at the top of its tree (a pipeline's, an experiment's,
# a search's; that run carries its own): the link of a tree lists them together.
ROOT_TAG = "ambient.root_run_id"


def mark_training(client, exp_id: str) -> None:
    """Tag an experiment as model training unless it already has a kind (a user's choice is kept)."""
    if EXPERIMENT_KIND_TAG not in client.get_experiment(exp_id).tags:
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def experiment_id(client, name: str, artifact_location: str | None = None) -> str:
    """The id of the experiment ``name``, created (tagged as model training) if it does not exist."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(
            name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    mark_training(client, exp.experiment_id)
    return exp.experiment_id


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
            got = client.get_run(run_id)
            mark_training(client, got.info.experiment_id)
            if ROOT_TAG not in got.data.tags:  # a run opened before runs carried it
                parent = got.data.tags.get("mlflow.parentRunId")
                client.set_tag(run_id, ROOT_TAG, _root_of(client, parent) if parent else run_id)
            client.set_terminated(run_id, "RUNNING")
            return run_id, uri
        # resumed against another tracking server or store: keep the work, open a new run there
        print(
            f"mlflow: run {run_id} recorded in {marker} (tracking URI {recorded.get('tracking_uri')}) is not in {uri}; "
            "starting a new run",
            file=sys.stderr,
        )
    exp_id = experiment_id(client, mcfg.experiment, mcfg.artifact_location)
    tags = {
        k: str(v) for k, v in {"out": out, **ray_job_tags(), **(tags or {})}.items()
    }  # the REST API takes strings only
    if mcfg.parent_run_id:
        tags["mlflow.parentRunId"] = mcfg.parent_run_id
        tags[ROOT_TAG] = _root_of(client, mcfg.parent_run_id)
    run = client.create_run(exp_id, run_name=mcfg.run_name, tags=tags)
    if not mcfg.parent_run_id:
        client.set_tag(run.info.run_id, ROOT_TAG, run.info.run_id)
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


def child(mcfg, name: str, parent: str | None, register: bool = False) -> dict:
    """The ``mlflow`` section of a stage a workflow runs: the workflow's settings, the stage's run name,
    and nested under ``parent`` (the workflow's run, or one of its children). A child registers no model
    version unless ``register`` (a search's trials and an experiment's arms would add one per run)."""
    base = mcfg if isinstance(mcfg, dict) else mcfg.model_dump()
    return {
        **base,
        "run_name": name,
        "parent_run_id": parent,
        "register_model": register and base.get("register_model", True),
    }


class Run(tuple):
    """``(run_id, tracking_uri)`` of an open run (both None when MLflow is off), and what :func:`run` sets
    when its block ends well: ``status`` (default FINISHED) and extra ``tags``."""

    status: str
    tags: dict

    def __new__(cls, run_id: str | None, uri: str | None):
        self = super().__new__(cls, (run_id, uri))
        self.status, self.tags = "FINISHED", {}
        return self

    @property
    def run_id(self) -> str | None:
        return self[0]

    @property
    def uri(self) -> str | None:
        return self[1]


@contextmanager
def run(
    mcfg,
    out: str,
    *,
    name: str | None = None,
    parent: str | None = None,
    params: dict | None = None,
    tags: dict | None = None,
    close_on_error: bool = True,
) -> Iterator[Run]:
    """Open (or, for a resumed ``out``, reopen) a run for the block; ``with tracking.run(...) as (run_id, uri)``.

    ``name`` and ``parent`` override the config's ``run_name`` and ``parent_run_id`` (nesting the run
    under another one). The run ends FINISHED (or the yielded :class:`Run`'s ``status``, with its
    ``tags``) when the block does, FAILED on an exception, KILLED on Ctrl-C (KeyboardInterrupt).
    ``close_on_error=False`` leaves a run that raised open for its owner to close (a Tune trial's run:
    the driver knows whether the trial failed or was stopped early)."""
    if isinstance(mcfg, dict):
        mcfg = MlflowConfig.model_validate(mcfg)
    update = {k: v for k, v in (("run_name", name), ("parent_run_id", parent)) if v is not None}
    handle = Run(*start_run(mcfg.model_copy(update=update), out, params or {}, tags))
    try:
        yield handle
    except BaseException as e:
        if close_on_error:
            finish(*handle, status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finish(*handle, status=handle.status, tags=handle.tags)


def set_tags(run_id: str | None, uri: str | None, tags: dict) -> None:
    """Set (or overwrite) tags of a run, e.g. the latest checkpoint's URI while training."""
    if not run_id:
        return
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


class SystemMetrics:
    """MLflow's system metrics monitor (a thread: CPU, memory, disk and network from psutil; NVIDIA GPUs through
    nvidia-ml-py where NVML loads) logging into an open run as ``system/<node_id>/<metric>``; one per node.

    The monitor logs a sample every ``interval`` seconds; :meth:`stop` also logs the last one taken, so even a
    run shorter than the interval has its node's figures. Steps continue from those already in the run, so a
    restarted worker does not overwrite its predecessor's."""

    def __init__(self, run_id: str, uri: str | None, node_id: str, interval: float = 10.0):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop lines, per node
        self.monitor = SystemMetricsMonitor(
            run_id, sampling_interval=interval, resume_logging=True, node_id=node_id, tracking_uri=uri
        )
        self.monitor.start()

    def stop(self) -> None:
        m = self.monitor
        if m._process is None:
            return
        m.finish()  # joins the thread: it stops between two samples and flushes what it queued
        try:  # the sample the thread took before it stopped (a short run's only one)
            m.collect_metrics()
            m.publish_metrics(m.aggregate_metrics())
            m.mlflow_logger.flush()
        except Exception as e:  # the run may already be closed; system metrics never fail a training run
            print(f"mlflow: could not log the last system metrics sample: {e}", file=sys.stderr)


def system_metrics(mcfg, run_id: str | None, uri: str | None, node_id: str) -> SystemMetrics | None:
    """Start a node's :class:`SystemMetrics` unless MLflow or ``system_metrics`` is off."""
    if not run_id or not mcfg.enabled or not mcfg.system_metrics:
        return None
    return SystemMetrics(run_id, uri, node_id, mcfg.system_metrics_interval)


def registered_name(mcfg, stage: str) -> str:
    """The registered model's name: ``registered_model``, else ``<experiment>-<stage>`` (without the characters a
    registry name may not hold)."""
    name = mcfg.registered_model or f"{mcfg.experiment}-{stage}"
    return name.replace("/", "-").replace(":", "-")


def register_model(run_id: str | None, uri: str | None, name: str, source: str, tags: dict | None = None) -> str | None:
    """Register ``source`` (a URI of exported weights, referenced, not uploaded) as a new version of the registered
    model ``name`` (created if new), linked to the run and tagged; returns the version, or None (with a note on
    stderr) where the registry refuses it. A tracking server accepts only sources it could read itself (an
    ``s3://`` URI), not a path on this machine's disk; a local store takes both."""
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    how = "set mlflow.register_model=false to not register"
    if (uri or "").startswith(("http://", "https://")) and "://" not in source:
        print(
            f"mlflow: not registering {source} as a version of {name!r}: the tracking server {uri} takes no local "
            f"path as a model source (train with --out s3://... to register; {how})",
            file=sys.stderr,
        )
        return None
    client = MlflowClient(uri)
    tags = {k: str(v) for k, v in (tags or {}).items()}
    try:
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # await_creation_for=0: no "Waiting up to 300 seconds for model version to finish creation" line (the
        # registry store's INFO log of its wait loop); an open-source registry creates a version READY at once
        version = client.create_model_version(name, source=source, run_id=run_id, tags=tags, await_creation_for=0)
    except MlflowException as e:
        print(f"mlflow: could not register {source} as a version of {name!r}: {e.message} ({how})", file=sys.stderr)
        return None
    return version.version
