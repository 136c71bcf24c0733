"""``python -m jobs.experiment --config FILE [--set key=value ...]``: the experiment stage as a Ray job.

A config with ``kind: masked`` (``jobs/configs/experiment_masked.yaml``), or ``--kind masked``, runs the masked
experiment (the ``experiment-masked`` stage, ``jobs.experiment_masked``) instead; ``kind: dsd``
(``jobs/configs/experiment_dsd.yaml``) the DSD experiment (``experiment-dsd``, ``jobs.experiment_dsd``)."""

import sys

import yaml

from ambient_ray.cli import main

KINDS = ("masked", "dsd")  # a config's kind: its stage's job module is jobs.experiment_KIND


def _kind(argv: list[str]) -> tuple[str | None, list[str]]:
    """The experiment's kind (``--kind K``, ``--set kind=K``, else the config file's ``kind``) and the arguments
    for its stage (``--kind`` left out)."""
    kind, rest, path = None, [], None
    it = iter(argv)
    for a in it:
        if a == "--kind" or a.startswith("--kind="):
            kind = a.split("=", 1)[1] if "=" in a else next(it, None)
            continue
        if a == "--config" or a.startswith("--config="):
            path = a.split("=", 1)[1] if "=" in a else next(it, None)
            rest += ["--config", path] if path is not None else [a]
            continue
        if a.startswith("kind=") and rest and rest[-1] == "--set":
            kind = a.split("=", 1)[1].strip()
        rest.append(a)
    if kind is None and path:
        from ambient_ray.io import storage

        try:
            loaded = yaml.safe_load(storage.read_bytes(path).decode())
        except Exception:  # an unreadable or invalid file: the stage itself reports it
            loaded = None
        if isinstance(loaded, dict):
            kind = loaded.get("kind")
    return kind, rest


if __name__ == "__main__":
    kind, args = _kind(sys.argv[1:])
    if kind is not None and kind not in KINDS:
        print(f"jobs.experiment: error: unknown kind {kind!r}; one of {', '.join(KINDS)}", file=sys.stderr)
        sys.exit(2)
    if kind == "masked":
        from jobs import experiment_masked

        sys.exit(experiment_masked.run(args))
    if kind == "dsd":
        from jobs import experiment_dsd

        sys.exit(experiment_dsd.run(args))
    sys.exit(main(["experiment", *args]))
