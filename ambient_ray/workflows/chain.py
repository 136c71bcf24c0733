"""The chain every workflow runs: annotate -> train -> sample -> evaluate, each stage reading the output of the
one before.

:func:`wire` gives the keys that link the stages of one run of the chain (the pipeline, an experiment arm, a
tune trial): each stage's input (its registered ``input`` key: annotate's and train's ``data``, sample's
``checkpoint``, evaluate's ``samples``), its ``out``, annotate's ``classifier`` and each stage's MLflow section.
The workflow adds its section's keys and its own (an arm's ``rows``, a trial's ``report_every``, ...).
"""

from __future__ import annotations

from collections.abc import Callable

from ambient_ray.stages import registry

CHAIN = ("annotate", "train", "sample", "evaluate")  # registered stage names, in the order they run


def wire(
    data: str,
    outs: dict[str, str],
    *,
    classifier: str | None = None,
    mlflow: Callable[[str], dict] | None = None,
    where: Callable[[str], str] | None = None,
) -> dict[str, dict]:
    """``{stage: {key: value}}`` for the chain stages in ``outs`` (stage -> its output folder; consecutive, in
    chain order: a run may start after annotate or stop before evaluate). The first reads ``data``, each later
    one the output of the one before; annotate gets ``classifier``; ``mlflow(stage)`` gives each stage's MLflow
    section; ``where(folder)``: where a finished step's output really is (an experiment takes steps from
    earlier experiments' folders)."""
    names = tuple(outs)
    start = CHAIN.index(names[0]) if names and names[0] in CHAIN else -1
    if start < 0 or names != CHAIN[start : start + len(names)]:
        raise ValueError(f"not a run of the chain {' -> '.join(CHAIN)}: {', '.join(names) or 'nothing'}")
    links: dict[str, dict] = {}
    source = data
    for stage in names:
        keys = {registry.get(stage).input: source, "out": outs[stage]}
        if stage == "annotate" and classifier is not None:
            keys["classifier"] = classifier
        if mlflow is not None:
            keys["mlflow"] = mlflow(stage)
        links[stage] = keys
        source = where(outs[stage]) if where is not None else outs[stage]
    return links
