"""The shape the sharded stages share (corrupt, annotate, precompute): their common config keys, and the steps
of their ``run()``.

:class:`ActorStage` runs them in order:

1. check what needs no I/O (:meth:`~ActorStage.check`), then that OUT is reachable;
2. plan the work (:meth:`~ActorStage.plan`: read the input's listing, load what the workers will load, so a
   wrong input is refused by name before any work; fix the plan's fingerprint and its shards' names);
3. claim OUT for the plan: another plan's run there is refused unless ``overwrite`` (then its outputs are
   removed); ``OUT/_manifest.json`` records the plan's fingerprint, ``OUT/config.yaml`` the resolved config;
4. skip the shards whose done-marker (:mod:`ambient_ray.io.shards`) carries this plan's fingerprint, and run the
   others on Ray (:meth:`~ActorStage.work`: Ray Data actors or Ray tasks, one shard per call; a failure names
   the shards that failed and how many finished, and the finished ones are kept for a re-run to resume);
5. check every shard has its marker, then count the rows (rows in = rows out + rows quarantined,
   :meth:`~ActorStage.conserve`) and write the summary (:meth:`~ActorStage.finish`).

A stage subclasses it with the class attributes and those hooks; its module's ``run(cfg, progress=...)`` is
``TheStage(cfg, progress).run()``.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError, Strict, flag
from ambient_ray.io import ray_runtime, shards, storage
from ambient_ray.io.tracking import MlflowConfig


class ShardedConfig(Strict):
    """Keys of every sharded stage's config."""

    out: str = Field(
        ..., description="output URI: a local folder or s3://bucket/prefix", json_schema_extra=flag("--out")
    )
    overwrite: bool = Field(False, description="replace an earlier run of another plan in 'out'")


class ActorConfig(ShardedConfig):
    """Keys of a stage that runs a Ray Data actor pool over its input's shards (annotate, precompute)."""

    data: str = Field(
        ...,
        description="input dataset URI (a corrupt/annotate output or Parquet shards)",
        json_schema_extra=flag("--data"),
    )
    concurrency: int | None = Field(
        None, ge=1, description="actors (default: as many as the cluster's CPUs or GPUs allow)"
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor (and its torch threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; fractions share a GPU")
    debug_fail_shard: str | None = Field(None, description="tests: the call on this input shard fails (to test resume)")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


class ActorStage:
    """The ``run()`` of a sharded stage; a subclass names its outputs and writes :meth:`plan`, :meth:`work`
    and :meth:`finish` (and :meth:`check` where it has refusals that need no I/O)."""

    label = ""  # the stage's name in messages
    outputs: tuple[str, ...] = ("data", "quarantine", "_done")  # removed when another plan replaces the one in OUT
    held = "a run of another plan"  # the refusal: "OUT already holds {held}; use another 'out' or set overwrite=true"
    replace = ""  # ... and the refusal's end (" to replace it")

    def __init__(self, cfg: Any, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.out = storage.normalize(cfg.out)
        self.fingerprint = ""  # the plan's (set by plan())
        self.shards: list[str] = []  # every shard's name, in order (set by plan())
        self.manifest: dict[str, Any] = {}  # more keys of OUT/_manifest.json
        self.markers = storage.join(self.out, "_done")  # the folder of the shards' done-markers

    # ---------------------------------------------------------------- the hooks

    def check(self) -> None:
        """Refusals that need no I/O (before OUT is reached)."""

    def plan(self) -> None:
        """Check the inputs and plan the work: set ``fingerprint`` and ``shards`` (and ``manifest``)."""
        raise NotImplementedError

    def work(self, todo: list[str]) -> list[dict]:
        """Run the shards ``todo`` on Ray (``ray_init`` done); their summaries. Raise when one failed."""
        raise NotImplementedError

    def finish(self, done: dict[str, dict], ran: list[dict], seconds: float) -> Any:
        """The stage's result from every shard's marker summary (``done``), those run now and their seconds."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the skeleton

    def run(self) -> Any:
        self.check()
        storage.check_reachable(self.out)
        self.plan()
        self.claim()
        done = shards.done_all(self.markers, self.fingerprint)
        todo = [name for name in self.shards if name not in done]
        ran: list[dict] = []
        seconds = 0.0
        if todo:
            ray_runtime.ray_init(self.out)
            t0 = time.perf_counter()
            ran = self.work(todo)
            seconds = time.perf_counter() - t0
        done = shards.done_all(self.markers, self.fingerprint)
        missing = [name for name in self.shards if name not in done]
        if missing:
            raise RuntimeError(
                f"{self.label}: shards {missing[:10]} of {self.out} have no completion marker after the run"
            )
        return self.finish(done, ran, seconds)

    def claim(self) -> None:
        """OUT for this plan: another plan's run there refused (or, with ``overwrite``, its outputs removed)."""
        if shards.manifest_changed(self.out, self.fingerprint):
            if not self.cfg.overwrite:
                raise ConfigError(
                    f"{self.out} already holds {self.held}; use another 'out' or set overwrite=true{self.replace}"
                )
            for sub in self.outputs:
                storage.delete(storage.join(self.out, sub))
        shards.write_manifest(self.out, self.fingerprint, **self.manifest)
        cfgmod.save_resolved(self.cfg, self.out)

    # ---------------------------------------------------------------- helpers of the hooks

    def refuse_overlap(self, inp: str, what: str) -> None:
        """Refuse an OUT inside the input (or around it): the stage would write over what it reads."""
        data = storage.normalize(self.cfg.data)
        pairs = ((inp, self.out), (self.out, inp), (data, self.out))
        if any(a == b or a.startswith(b.rstrip("/") + "/") for a, b in pairs):
            raise ConfigError(
                f"config key 'out': {self.out} overlaps the input shards in {inp}; write the {what} elsewhere"
            )

    def conserve(self, listed: int, rows_in: int, rows_out: int, rows_quarantined: int) -> None:
        """Rows in = rows out + rows quarantined, and every listed row came in; else a RuntimeError (a bug)."""
        if rows_in != listed or rows_out + rows_quarantined != rows_in:
            raise RuntimeError(
                f"{self.label}: row conservation broken: {listed} rows listed, {rows_in} in, {rows_out} out, "
                f"{rows_quarantined} quarantined"
            )

    def actors(self, actor: type, plan: dict, files: list[str], *, error: type[Exception], **failed: str) -> list[dict]:
        """``actor(plan)`` on a Ray Data actor pool, one input shard of ``files`` per call (resources from the
        config's actor keys); ``error`` (naming the failed shards) when any failed. ``failed``: how
        :func:`ray_runtime.raise_failed_shards` counts the finished ones (``done``, ``complete``)."""
        cfg = self.cfg
        results = ray_runtime.shard_actors(
            actor,
            plan,
            files,
            [shards.shard_name(f) for f in files],
            label=self.label,
            concurrency=cfg.concurrency,
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            enabled=self.progress,
        )
        total = len(self.shards)
        ray_runtime.raise_failed_shards(results, plan, label=self.label, total=total, error=error, **failed)
        return results
