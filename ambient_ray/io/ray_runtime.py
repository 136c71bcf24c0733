"""Ray glue in one place: starting Ray, where Ray's own output goes, and a stage's progress line.

``ray_init`` is the only ``ray.init`` of the package. It keeps the console for ambient-ray:

* Ray's Python loggers (``ray``, ``ray.data``, ``ray.train``, ``ray.tune``) write to the run's log
  file, ``ray.log`` beside the job's outputs (a local ``out``), else ``ambient-ray.log`` in Ray's
  session log folder; the path is printed once.
* The output of Ray's workers and actors (Ray Train's controller, DeepSpeed, Ray Data's executors)
  goes to the same file; only ambient-ray's own progress lines from the training workers
  (``step N/M  ...``) reach the console.
* Ray Data's progress bars are off in the driver: a stage shows its own (``progress``,
  ``run_tasks``, :class:`Progress`), one bar when stderr is a terminal, else one plain line per interval.

Ray's C++ core worker writes its error lines to the process's stderr itself; those cannot be routed
from Python and stay on the console (see docs/cluster/index.md, "Console and logs").
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable

from ambient_ray.io import shards, storage
from ambient_ray.io.progress import Progress

LOG_NAME = "ray.log"
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
# what a training worker prints that is ours: the loop's progress line (train/loop.py)
OURS = re.compile(r"^step \d+/\d+\s")

_lock = threading.Lock()
_state: dict = {"path": None, "file": None, "pending": []}


def log_path(out: str | None) -> str | None:
    """``OUT/ray.log`` for a local ``out``; None for an object-store one (Ray's session folder is used)."""
    if not out:
        return None
    out = storage.normalize(out)
    return None if storage.is_s3(out) else os.path.join(out, LOG_NAME)


def ray_init(out: str | None = None, **kwargs) -> str | None:
    """Start (or join, with ``RAY_ADDRESS``) Ray once per process with ambient-ray's console; returns the
    log file. ``out``: the job's output folder (its ``ray.log`` is the log file). ``kwargs`` go to
    ``ray.init`` (e.g. ``num_cpus``, ``address``). A no-op when Ray is already up."""
    import ray

    if ray.is_initialized():
        return _state["path"]
    path = log_path(out)
    if path:
        _open(path)
    _route_loggers()  # before ray.init, which logs (kept until the file opens when there is no OUT)
    options = {"logging_level": "INFO", "log_to_driver": True, **kwargs}
    ray.init(**options)
    if not path:  # now Ray's session folder exists
        from ray._private.worker import global_worker

        _open(os.path.join(global_worker.node.get_logs_dir_path(), "ambient-ray.log"))
    _quiet_data()
    if options["log_to_driver"]:
        _route_worker_output()
    print(f"ray: Ray's own logs (and its workers' output) go to {_state['path']}", flush=True)
    return _state["path"]


def _open(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _lock:
        if _state["file"] is not None:
            _state["file"].close()
        _state["path"], _state["file"] = path, open(path, "a", buffering=1, encoding="utf-8")
        for text in _state["pending"]:
            _state["file"].write(text)
        _state["pending"].clear()


def _write(text: str) -> None:
    with _lock:
        text = text if text.endswith("\n") else text + "\n"
        if _state["file"] is not None:
            _state["file"].write(text)
        else:
            _state["pending"].append(text)


class _FileHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write(self.format(record))
        except Exception:  # logging must never break a stage
            self.handleError(record)


def _route_loggers() -> None:
    """Ray's Python loggers: their console handlers out, the run's log file in (files Ray keeps stay)."""
    importlib.import_module("ray.data")  # configures the "ray.data" logger on import: configure it after that

    handler = _FileHandler(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d -- %(message)s"))
    for name in RAY_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, _FileHandler) or not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.addHandler(handler)
        lg.propagate = False


def _quiet_data() -> None:
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def _route_worker_output() -> None:
    """Every worker line to the log file; ambient-ray's progress lines also to the console."""
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: keep its default printing
        return

    def handle(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        tag = f"({who + ' ' if who else ''}pid={data.get('pid')}{'' if data.get('is_err') is False else ' err'})"
        lines = [str(x) for x in data.get("lines", [])]
        for line in lines:
            _write(f"{tag} {line}")
        for line in lines:
            if OURS.match(line):
                print(f"  {line}", flush=True)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handle)


# ------------------------------------------------------------------------------ progress


def progress(rows: Iterable[dict], label: str, total: int, unit: str, enabled: bool = True) -> list[dict]:
    """All rows of a Ray Data dataset's iterator (``ds.iter_rows()``), counting them in a progress bar."""
    out: list[dict] = []
    with Progress(label, total, unit, enabled) as bar:
        for row in rows:
            out.append(row)
            bar.update()
    return out


def run_tasks(
    fn: Callable,
    args: list,
    *,
    label: str,
    unit: str,
    num_cpus: float,
    max_retries: int,
    kwargs: dict | None = None,
    enabled: bool = True,
) -> list:
    """``fn(arg, **kwargs)`` for each arg as Ray tasks (``num_cpus`` each; a task whose worker died is retried
    ``max_retries`` times, Ray Core's own option); results in the order of ``args``, with a progress bar.
    ``kwargs`` are put in the object store once. The first failure is raised."""
    import ray

    remote = ray.remote(fn).options(num_cpus=num_cpus, max_retries=max_retries)
    shared = {k: ray.put(v) for k, v in (kwargs or {}).items()}
    refs = [remote.remote(a, **shared) for a in args]
    index = {r: i for i, r in enumerate(refs)}
    results: list = [None] * len(refs)
    bar = Progress(label, len(refs), unit, enabled)
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for r in done:
                results[index[r]] = ray.get(r)
                bar.update()
    except BaseException:
        for r in pending:
            ray.cancel(r, force=True)
        raise
    finally:
        bar.close()
    return results


def shard_actors(
    actor: type,
    plan: dict,
    files: list[str],
    names: list[str],
    *,
    label: str,
    concurrency: int | None,
    num_cpus: float,
    num_gpus: float,
    enabled: bool = True,
) -> list[dict]:
    """One Ray Data ``map_batches`` call of ``actor(plan)`` per input shard (``{"path", "name"}`` of each file),
    on an actor pool (``concurrency``, else as many as the cluster's GPUs or CPUs allow), with the stage's own
    progress bar; the actors' summaries, one dict per shard. Where the actors could not run at all, every
    shard's summary says so in ``failed``."""
    import ray
    import ray.data

    resources = ray.cluster_resources()
    if concurrency:
        n = concurrency
    elif num_gpus > 0:
        n = max(1, int(resources.get("GPU", 0) // num_gpus))
    else:
        n = max(1, int(resources.get("CPU", 1) // num_cpus))
    n = min(n, len(files))
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.op_resource_reservation_enabled
    # one actor-pool operator and nothing downstream: no CPUs held back for other operators; the stage's own
    # progress bar instead of Ray Data's
    ctx.enable_progress_bars, ctx.op_resource_reservation_enabled = False, False
    items = [{"path": f, "name": name} for f, name in zip(files, names)]
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            actor,
            fn_constructor_kwargs={"plan": plan},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=n),
            num_cpus=num_cpus,
            num_gpus=num_gpus or None,
        )
        rows = progress(ds.iter_rows(), label, len(items), "shards", enabled=enabled)
        return [{k: v.item() if hasattr(v, "item") else v for k, v in r.items()} for r in rows]
    except Exception as e:  # the actors could not run at all (e.g. weights that do not load there)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return [{"name": name, "failed": why} for name in names]
    finally:
        ctx.enable_progress_bars, ctx.op_resource_reservation_enabled = saved


def raise_failed_shards(
    results: list[dict],
    plan: dict,
    *,
    label: str,
    total: int,
    done: str,
    error: type[Exception],
    complete: str = "shards complete",
) -> None:
    """Raise ``error`` (the stage's own exception class) naming the shards, up to ten, whose :func:`shard_actors`
    summary says ``failed``, with how many of the stage's ``total`` shards are ``complete`` (the done-markers of
    ``plan["fingerprint"]`` in ``plan["out"]``/``done``) and how to resume; nothing when none failed."""
    failed = [r for r in results if r.get("failed")]
    if failed:
        finished = len(shards.done_all(storage.join(plan["out"], done), plan["fingerprint"]))
        listing = "\n  ".join(f"{r['name']}: {r['failed']}" for r in failed[:10])
        raise error(
            f"{label} stage failed with {finished} of {total} {complete} in {plan['out']}; failed:\n  {listing}\n"
            "completed shards are kept; re-run the same command to resume"
        )
