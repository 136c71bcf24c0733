"""Search spaces: plain YAML mappings from a stage's dotted config key to a domain, checked before any trial.

A space names keys of the stage configs a trial runs, prefixed with the stage: ``annotate.tau``,
``annotate.locality_eps`` (the crop-size threshold ε of the locality map), ``train.ambient.lambda_max``,
``train.optim.lr``, ``sample.sampler.steps``. Each maps to one domain::

    annotate.tau: {uniform: [0.3, 0.5]}
    train.ambient.lambda_max: {loguniform: [1.5, 8]}
    train.optim.lr: {choice: [0.001, 0.002]}
    annotate.locality_eps: {grid: [0.02, 0.05, 0.1]}
    train.batch_size: {randint: [32, 129]}      # upper bound excluded, as in Ray Tune

Nested mappings are flattened (``train: {ambient: {lambda_max: {...}}}`` is the same key), so
``--set space.train.optim.lr='{loguniform: [1e-4, 1e-2]}'`` adds a key from the command line. Every
key must exist in its stage's config, must not be one the search sets itself (data, out, mlflow,
...), and every value the domain can take (its bounds, or each choice) must pass that config's own
validation: λ_max ≤ 1 or τ outside (0, 0.5] is refused here, with the key named, before any work.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from ambient_ray import config as cfgmod
from ambient_ray.config import ConfigError
from ambient_ray.stages import registry

DOMAINS = ("uniform", "loguniform", "choice", "grid", "randint")
SEARCHERS = ("random", "grid", "optuna", "hyperopt")
STAGES = ("annotate", "train", "sample")  # the registered stages of a trial whose keys a space may search
_ALSO_OWNED = {  # keys every trial sets itself in a stage's section, besides the keys that wire the stage
    "annotate": ("curves_from", "overwrite"),
    "train": ("resume", "report_every"),
    "sample": (),
}


def owned(stage: str) -> set[str]:
    """The keys of ``stage`` a trial sets itself: neither searched nor fixed in the search config."""
    return registry.owned(stage, *_ALSO_OWNED[stage])


def stage_models() -> dict:
    """Each searchable stage's config class, from the stage registry."""
    return {stage: registry.get(stage).model() for stage in STAGES}


def _is_domain(v: Any) -> bool:
    return isinstance(v, dict) and len(v) == 1 and next(iter(v)) in DOMAINS


def flatten(space: dict, prefix: str = "") -> dict[str, dict]:
    """``{train: {optim: {lr: {uniform: [..]}}}}`` -> ``{'train.optim.lr': {uniform: [..]}}``."""
    flat: dict[str, dict] = {}
    for k, v in (space or {}).items():
        key = f"{prefix}{k}"
        if _is_domain(v):
            flat[key] = v
        elif isinstance(v, dict) and v:
            flat.update(flatten(v, key + "."))
        else:
            raise ConfigError(
                f"search space key '{key}': expected a domain, one of {', '.join(DOMAINS)} "
                f"(e.g. {{uniform: [0.3, 0.5]}}); got {v!r}"
            )
    return flat


def _values_to_check(key: str, kind: str, arg: Any) -> list:
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"search space key '{key}': {kind} needs a non-empty list of values")
        return list(arg)
    if not (
        isinstance(arg, list)
        and len(arg) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in arg)
    ):
        raise ConfigError(f"search space key '{key}': {kind} needs [low, high] numbers; got {arg!r}")
    lo, hi = arg
    if not lo < hi:
        raise ConfigError(f"search space key '{key}': empty range [{lo}, {hi}] (low must be below high)")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"search space key '{key}': loguniform needs low > 0; got {lo}")
    if kind == "randint":
        if not all(float(x).is_integer() for x in arg):
            raise ConfigError(f"search space key '{key}': randint needs integer bounds; got {arg!r}")
        return [int(lo), int(hi) - 1]  # Ray Tune's randint excludes the upper bound
    return [lo, hi]


def check(space: dict, base: dict[str, dict], searcher: str) -> dict[str, dict]:
    """Validate a space against the stage configs (``base``: each stage's fixed keys); the flat space."""
    if searcher not in SEARCHERS:
        raise ConfigError(f"config key 'searcher': {searcher!r} is not one of {', '.join(SEARCHERS)}")
    flat = flatten(space)
    if not flat:
        raise ConfigError(
            "config key 'space': the search space is empty; name at least one key, "
            "e.g. annotate.tau: {uniform: [0.3, 0.5]}"
        )
    models = stage_models()
    dummy = {"data": "x", "out": "x", "checkpoint": "x"}
    for key, domain in flat.items():
        stage, _, rest = key.partition(".")
        if stage not in models or not rest:
            raise ConfigError(
                f"search space key '{key}': must start with one of {', '.join(models)} (e.g. annotate.tau)"
            )
        if rest.split(".")[0] in owned(stage):
            raise ConfigError(f"search space key '{key}': set by the search itself for each trial")
        kind, arg = next(iter(domain.items()))
        if kind == "grid" and searcher in ("optuna", "hyperopt"):
            raise ConfigError(f"search space key '{key}': grid does not work with the {searcher} searcher; use choice")
        if searcher == "grid" and kind != "grid":
            raise ConfigError(f"search space key '{key}': searcher 'grid' needs every key as a grid (got {kind})")
        model = models[stage]
        fields = {k: v for k, v in dummy.items() if k in model.model_fields}
        for value in _values_to_check(key, kind, arg):
            section = copy.deepcopy({**fields, **base.get(stage, {})})
            cfgmod.set_path(section, rest.split("."), value)
            try:
                cfgmod.build(model, flags=section)
            except ConfigError as e:
                detail = str(e).replace("invalid config: ", "")
                raise ConfigError(
                    f"search space key '{key}' = {value!r} is refused by the {stage} config: {detail}"
                ) from None
    return flat


def to_tune(flat: dict[str, dict]) -> dict:
    """Ray Tune domains for a checked flat space (keys stay dotted)."""
    from ray import tune

    out = {}
    for key, domain in flat.items():
        kind, arg = next(iter(domain.items()))
        out[key] = {
            "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a),
            "choice": tune.choice,
            "grid": tune.grid_search,
            "randint": lambda a: tune.randint(*a),
        }[kind](arg)
    return out


def split(params: dict[str, Any]) -> dict[str, dict]:
    """A trial's ``{'train.optim.lr': v, ...}`` -> per-stage nested overrides ``{'train': {'optim': {'lr': v}}}``."""
    out: dict[str, dict] = {}
    for key, value in params.items():
        stage, _, rest = key.partition(".")
        cfgmod.set_path(out.setdefault(stage, {}), rest.split("."), value)
    return out


def digest(flat: dict[str, dict]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]
