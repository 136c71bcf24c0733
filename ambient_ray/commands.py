"""The command-line parts of the stages whose command does more than build the config, run and report:
``corrupt --list-corruptions``, ``tune --space/--resume``, ``jobs``, ``ls`` and ``get``.

A stage registry entry (:mod:`ambient_ray.stages.registry`) may name, as ``module:function``, an ``extra``
(adds the flags that are not config keys to its argparse sub-parser) and a ``command`` (runs instead of the
CLI's build -> run -> report). This module sits beside the CLI: it may import any stage or workflow.
A command gets the parsed arguments and the config flags given on the command line (``{dotted key: value}``,
converted; ``{}`` for a command without a config) and returns the exit code.
"""

from __future__ import annotations

import argparse
from typing import Any

from ambient_ray import config as cfgmod
from ambient_ray.stages import reports


def corrupt_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list-corruptions", action="store_true", help="list the known corruptions and exit")


def corrupt(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from ambient_ray import corruptions
    from ambient_ray.stages import corrupt as stage

    if args.list_corruptions:
        stage.load_plugins(flags.get("plugins") or [])
        for name, ct in sorted(corruptions.registered().items()):
            params = ", ".join(
                f"{k}: {p.describe()}" + ("" if p.default is None else f" = {p.default}") for k, p in ct.params.items()
            )
            print(f"{name:14s} {params}")
        return 0
    cfg = cfgmod.build(stage.CorruptConfig, args.config, args.sets, flags)
    reports.corrupt(cfg, stage.run(cfg, progress=not args.no_progress))
    return 0


def tune_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", help="search config with the space (e.g. tuning/ambient_o.yaml); same as --config")
    p.add_argument(
        "--resume", metavar="URI", help="continue the interrupted search in URI (its --out); finished trials are kept"
    )


def tune(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from tuning import config as tuneconfig  # the config and its check; the search (Ray Tune) once they pass

    if args.resume:
        given = [name for name, v in (("--space", args.space), ("--config", args.config), ("--set", args.sets)) if v]
        given += [fl.name for key, _, fl in cfgmod.declared_flags(tuneconfig.TuneConfig) if key in flags]
        if given:
            raise cfgmod.ConfigError(f"--resume takes the search's own config (URI/tune.yaml); drop {', '.join(given)}")
        from tuning import search

        s = search.run(resume=args.resume)
    else:
        if args.space and args.config:
            raise cfgmod.ConfigError("give the search config once: --space or --config")
        cfg = tuneconfig.load(args.space or args.config, args.sets, flags)
        from tuning import search

        s = search.run(cfg)
    print(
        f"tune: {s['trials']} trials ({s['completed']} completed, {s['stopped_early']} stopped early, "
        f"{s['errors']} failed, {s['unfinished']} unfinished) in {s['minutes']:.0f} min; {s['out']}/results.md"
        + (", best.yaml" if s["best"] else "")
    )
    return 1 if s["errors"] or s["unfinished"] else 0


def jobs_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("list", "logs", "stop", "runs"))
    p.add_argument(
        "job_id", nargs="?", help="the job's submission id (from 'ray job submit' or 'ambient-ray jobs list')"
    )
    p.add_argument("--address", help="the cluster's dashboard URL (default: RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="logs: follow until the job ends; exits 1 unless it succeeded")
    p.add_argument("--tracking-uri", help="runs: the MLflow server (default: MLFLOW_TRACKING_URI)")


def jobs(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from ambient_ray.workflows import ops

    if args.action != "list" and not args.job_id:
        raise cfgmod.ConfigError(f"jobs {args.action} needs a job id")
    if args.action == "list":
        return ops.list_jobs(args.address)
    if args.action == "logs":
        return ops.logs(args.address, args.job_id, args.follow)
    if args.action == "stop":
        return ops.stop(args.address, args.job_id)
    return ops.runs(args.job_id, args.tracking_uri)


def ls_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri", help="a folder or file, local or s3://bucket/prefix (e.g. a pipeline's out)")
    p.add_argument("-r", "--recursive", action="store_true", help="every file with its size, not one line a folder")


def ls(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from ambient_ray.workflows import outputs

    return outputs.ls(args.uri, args.recursive)


def get_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri", help="a file or folder, local or s3://bucket/prefix")
    p.add_argument("dest", nargs="?", help="where to put it (default: the current folder)")


def get(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from ambient_ray.workflows import outputs

    return outputs.get(args.uri, args.dest)
