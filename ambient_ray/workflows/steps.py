"""Running a workflow's steps: each step is one stage run into its own folder, skipped when it finished with
the same fingerprint, and made ready to (re)run by its stage's resume policy.

A finished step leaves a done-marker in its folder (:mod:`ambient_ray.io.shards`: ``FOLDER/<marker>.json`` with
the fingerprint of the step's resolved config, chained with the steps it reads from, and the step's summary).
The pipeline, the experiment and the tune stage run every stage through :func:`run`; what a step's folder
holds when it did not finish is handled by :func:`prepare`, per the stage's ``resume`` policy in the stage
registry (:mod:`ambient_ray.stages.registry`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ambient_ray.io import shards, storage
from ambient_ray.stages import registry

STEP = "_step"  # a step's done-marker: <the step's folder>/_step.json


def run(
    folder: str,
    fingerprint: str,
    work: Callable[[], Any],
    *,
    marker: str = STEP,
    clear: bool = False,
    find: Callable[[], dict | None] | None = None,
) -> tuple[dict, bool]:
    """``work()`` into ``folder`` unless the step finished there with ``fingerprint``; returns (its summary, whether
    it ran now). ``find``: the finished step's summary or None (default: ``folder``'s own marker; the experiment
    also looks in its reuse folders). ``clear``: empty the folder first (else the stage resumes or overwrites)."""
    kept = find() if find is not None else shards.done(folder, marker, fingerprint)
    if kept is not None:
        return kept, False
    if clear:
        shards.clear(folder)
    summary = dict(work())
    shards.mark_done(folder, marker, fingerprint, summary)
    return summary, True


def prepare(stage: str, cfg: Any, fingerprint: str, *, marker: str = STEP, label: str = "") -> Any:
    """Make the folder ``cfg.out`` of a step of ``stage`` (a registered stage) ready to (re)run; the config to run
    it with. A run there that finished with another fingerprint is removed; an unfinished one is kept, continued
    or removed by the stage's resume policy. ``label`` prefixes what it prints (``pipeline: train``)."""
    from ambient_ray.io.checkpoint import latest_checkpoint

    policy = registry.get(stage).resume
    out = storage.normalize(cfg.out)
    old = shards.read_marker(out, marker)
    if old is not None:  # finished, but with another config (or after a changed earlier step)
        print(
            f"{label}: its config or an earlier stage changed since it finished "
            f"({old['fingerprint']} -> {fingerprint}); redoing it"
        )
        storage.delete(out)
        return cfg
    if not storage.exists(out):
        return cfg
    if policy == "checkpoint":
        if latest_checkpoint(out):
            print(f"{label}: continuing the unfinished run in {out} from its latest checkpoint")
            return cfg.model_copy(update={"resume": True})
        storage.delete(out)  # started, no checkpoint yet: nothing to keep
    elif policy == "restart":
        storage.delete(out)
    elif policy == "shards-overwrite":  # an unfinished run of another config is the workflow's own: replace it
        return cfg.model_copy(update={"overwrite": True})
    return cfg  # "shards": the stage resumes shard by shard on its own
