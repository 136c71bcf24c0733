"""Typed configuration: pydantic models loaded from YAML and overridden with ``--set key=value``.

Every stage has one config model. A run's config is built from, in order of precedence:
``--set key=value`` overrides (dotted keys, values parsed as YAML), then command-line flags, then the
YAML file given with ``--config`` (a local path or an S3 URI), then the model's defaults. Validation
errors name the offending key and what is allowed. The resolved config is written beside the outputs.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from ambient_ray.io import storage


class ConfigError(ValueError):
    """A config that cannot be loaded or does not validate; the message names the key."""


class DataError(ConfigError):
    """An input the config names that a stage cannot read: missing, a file where a folder is needed, no Parquet
    shards, a column missing. Raised on the driver before any Ray work; the message names the file. (A bad row is
    no DataError: the stages quarantine it.)"""


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Flag:
    """The command-line flag of one config field, declared beside it with :func:`flag`.

    The CLI derives the rest from the field: the argparse type from its annotation, choices from a
    ``Literal``, ``store_true`` for a bool, a repeatable flag for a list, the help from its description.
    ``parse`` converts what the user typed (a string; with ``repeat``, the list of strings) into the
    config value, for values argparse cannot type (``0,1,2`` -> ``[0, 1, 2]``, ``SOURCE=SIGMA`` items)."""

    name: str
    help: str | None = None
    parse: Callable[[Any], Any] | None = None
    repeat: bool = False
    metavar: str | None = None
    choices: tuple | None = None

    def __call__(self, schema: dict) -> None:  # pydantic's json_schema_extra hook: the JSON schema names the flag
        schema["x-flag"] = self.name


def fill_preset(data: Any, presets: dict[str, dict], owner: str) -> Any:
    """A model config's raw input with its ``preset``'s keys filled in where the input leaves them unset
    (explicit keys win); an unknown preset is refused naming the family's."""
    if isinstance(data, dict) and data.get("preset") is not None:
        if data["preset"] not in presets:
            raise ValueError(f"unknown preset {data['preset']!r}; {owner} has {', '.join(presets)}")
        data = {**presets[data["preset"]], **data}
    return data


def flag(
    name: str,
    help: str | None = None,
    *,
    parse: Callable[[Any], Any] | None = None,
    repeat: bool = False,
    metavar: str | None = None,
    choices: tuple | None = None,
) -> Flag:
    """Declare a field's flag: ``steps: int = Field(200, ge=1, json_schema_extra=flag("--steps"))``."""
    if not name.startswith("--"):
        raise TypeError(f"flag {name!r}: a flag name starts with '--'")
    return Flag(name, help, parse, repeat, metavar, choices)


def csv(cast: Callable[[str], Any] = str) -> Callable[[str], list]:
    """A :class:`Flag` ``parse`` for comma-separated values: ``csv(int)('0, 1,2')`` -> ``[0, 1, 2]``."""

    def parse(text: str) -> list:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]

    parse.__name__ = f"csv({getattr(cast, '__name__', 'str')})"
    return parse


def unwrap_optional(annotation: Any) -> Any:
    """``int | None`` -> ``int``; any other annotation unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def declared_flags(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo, Flag]]:
    """Every ``(dotted key, field, flag)`` declared in ``model`` and in its nested sections."""
    for name, field in model.model_fields.items():
        # a field a subclass redeclares (a new default, say) keeps the flag declared on its base
        declared = [c.model_fields[name] for c in model.__mro__ if issubclass(c, BaseModel) and name in c.model_fields]
        fl = next((f.json_schema_extra for f in declared if isinstance(f.json_schema_extra, Flag)), None)
        if fl is not None:
            yield prefix + name, field, fl
        sub = unwrap_optional(field.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from declared_flags(sub, f"{prefix}{name}.")


def parse_set(item: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (['a', 'b'], 3). Values are parsed as YAML (so ``x=[1,2]`` is a list)."""
    key, eq, raw = item.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set seed=1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return [k.strip() for k in key.strip().split(".")], value


def set_path(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: '{'.'.join(keys[: i + 1])}' is not a section")
        node = nxt
    node[keys[-1]] = value


def merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` deep-merged into it: sections merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the section at ``loc`` (the parent of an unknown key)."""
    cls: Any = model
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
        for arg in getattr(cls, "__args__", ()) or ():  # Optional[Section]
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                cls = arg
    return sorted(getattr(cls, "model_fields", {}))


def edits(a: str, b: str) -> int:
    """The edits that turn ``a`` into ``b``: insertions, deletions, substitutions and swaps of two neighbours."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


def suggest(key: str, allowed: list[str]) -> str | None:
    """The allowed key ``key`` is a typo of: one edit away (two for a key of 8 characters or more), else None;
    none for a key of 1 or 2 characters (one edit away from too many keys to mean one)."""
    if len(key) < 3:
        return None
    limit = 2 if len(key) >= 8 else 1
    scored = sorted((edits(key, k), k) for k in allowed)
    return scored[0][1] if scored and scored[0][0] <= limit else None


def format_errors(model: type[BaseModel], err: ValidationError) -> str:
    """One line naming every invalid key and what is wrong with it."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not str(p).startswith("function-"))
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            near = suggest(str(loc[-1]), allowed) if loc else None
            hint = f"did you mean '{near}'?" if near else f"allowed keys here: {', '.join(allowed)}"
            lines.append(f"config key '{key}': unknown key; {hint}")
        elif e["type"] == "missing":
            lines.append(f"config key '{key}': required but not given")
        else:
            msg = e["msg"].replace("Value error, ", "")
            lines.append(f"config key '{key}': {msg} (got {e.get('input')!r})")
    return "invalid config: " + "; ".join(lines)


def build(model: type[M], path: str | None = None, sets: list[str] | None = None, flags: dict | None = None) -> M:
    """Build and validate a config of type ``model`` from a YAML file, flags and ``--set`` items."""
    data: dict = {}
    if path:
        try:
            text = storage.read_bytes(path).decode()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    for dotted, value in (flags or {}).items():
        if value is not None:
            set_path(data, dotted.split("."), value)
    for item in sets or []:
        keys, value = parse_set(item)
        set_path(data, keys, value)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(model, e)) from None


def build_section(
    model: type[M], section: str, keys: dict, *, owned: set[str], owner: str, fill: dict | None = None
) -> M:
    """Build a stage's ``model`` from ``keys``, one section of a larger config (an experiment's, a search's,
    a pipeline's).

    Keys the owner sets itself (``owned``) are refused, naming ``section.key`` and ``owner``; ``fill`` gives
    them (the real values, or placeholders for a check). Validation errors name the key as ``section.key``."""
    clash = sorted(owned & set(keys))
    if clash:
        raise ConfigError(f"config key '{section}.{clash[0]}': set by {owner}")
    try:
        return build(model, flags={**keys, **(fill or {})})
    except ConfigError as e:
        raise ConfigError(
            f"section '{section}': " + str(e).replace("config key '", f"config key '{section}.")
        ) from None


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_resolved(cfg: BaseModel, out_uri: str, name: str = "config.yaml") -> str:
    """Write the resolved config beside a run's outputs; returns its URI."""
    uri = storage.join(out_uri, name)
    storage.write_bytes(uri, to_yaml(cfg).encode())
    return uri


def get_key(cfg: BaseModel, dotted: str) -> Any:
    """The value of the dotted key ``dotted`` (``source.dataset``) of a built config."""
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def flatten(cfg: BaseModel | dict, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (for MLflow params)."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat
