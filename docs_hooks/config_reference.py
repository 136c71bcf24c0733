"""MkDocs hook: config-key tables generated from the stages' pydantic configs, so the docs cannot drift from them.

A page writes ``<!-- config: STAGE -->`` where the table of that stage's keys goes (``STAGE`` as in
``ambient-ray STAGE``). The config class comes from the stage registry (``Stage.model()``, the same lookup the
CLI's parsers use), nested sections become dotted keys, and a key's flag comes from its ``flag(...)`` declaration
(``ambient_ray.config.declared_flags``, what the CLI turns into argparse options). A section that is one of
several models (``model``: one per ``model.arch``) gets one table per choice. A training stage's table is
followed by its registered objectives (``ambient_ray.train.objectives``) and, for an objective whose config class
is not the stage's, that class's table. An unknown stage fails the build.

Importing the config classes imports their light config modules (no torch: the same imports as a stage's
``--help``) and starts nothing: no Ray, no MLflow, no network.
"""

from __future__ import annotations

import html
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

# a marker on a line of its own (a mention inside backticks, as on the pages that explain it, is left alone)
MARKER = re.compile(r"^[ \t]*<!--\s*config:\s*([A-Za-z0-9_-]+)\s*-->[ \t]*$", re.MULTILINE)
ROOT = Path(__file__).resolve().parent.parent
_cache: dict[str, str] = {}


def _ensure_path() -> None:
    if str(ROOT) not in sys.path:  # the package and tuning/ from this checkout, installed or not
        sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------ cells


def _text(s: str) -> str:
    """Plain text safe inside a Markdown table cell: no HTML, no emphasis, no cell breaks, one line."""
    s = html.escape(" ".join(str(s).split()), quote=False)
    for ch in "\\`*_[]|":
        s = s.replace(ch, "\\" + ch)
    return s


def _code(s: str) -> str:
    """Inline code safe inside a table cell (a pipe would end the cell even inside backticks)."""
    s = " ".join(str(s).split())
    if "|" in s or "`" in s:
        return "<code>" + html.escape(s).replace("|", "&#124;") + "</code>"
    return f"`{s}`"


def _is_model(t: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(t, type) and issubclass(t, BaseModel)


def _union_args(t: Any) -> tuple:
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return typing.get_args(t)
    return ()


def _strip_annotated(t: Any) -> Any:
    while typing.get_origin(t) is typing.Annotated:
        t = typing.get_args(t)[0]
    return t


def type_name(t: Any) -> str:
    """A reader's name for an annotation: ``int``, ``float or none``, ``one of `a`, `b```, ``list of int``."""
    t = _strip_annotated(t)
    if t is type(None):
        return "none"
    args = _union_args(t)
    if args:
        rest = [a for a in args if a is not type(None)]
        if all(_is_model(_strip_annotated(a)) for a in rest) and len(rest) > 1:
            return "section: one of " + ", ".join(_variant_name(_strip_annotated(a)) for a in rest)
        names = " or ".join(type_name(a) for a in rest)
        return names + (" or none" if len(rest) < len(args) else "")
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        return "one of " + ", ".join(_code(repr(v) if not isinstance(v, str) else v) for v in typing.get_args(t))
    if origin in (list, tuple, set, frozenset):
        inner = [a for a in typing.get_args(t) if a is not Ellipsis]
        word = {list: "list", tuple: "tuple", set: "set", frozenset: "set"}[origin]
        return f"{word} of " + (" and ".join(type_name(a) for a in inner) if inner else "any")
    if origin is dict:
        k, v = (typing.get_args(t) + (Any, Any))[:2]
        return "mapping" if v is Any else f"mapping of {type_name(k)} to {type_name(v)}"
    if t is Any:
        return "any"
    if _is_model(t):
        return "section"
    return getattr(t, "__name__", str(t).replace("typing.", ""))


def _variant_name(model: Any) -> str:
    """A union member's name: its ``arch`` (or ``kind``/``name``) literal if it has one, else the class name."""
    for key in ("arch", "kind", "name"):
        field = model.model_fields.get(key)
        if field is not None and isinstance(field.default, str):
            return field.default
    return model.__name__


def default_text(field: Any) -> str:
    from pydantic import BaseModel

    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return _code(str(value).lower())
    if isinstance(value, str):
        return _code(value) if value else '`""`'
    if isinstance(value, (dict, list, tuple)) and not value:
        return _code("{}" if isinstance(value, dict) else "[]")
    return _code(repr(value) if not isinstance(value, (list, tuple, dict)) else _yamlish(value))


def _yamlish(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yamlish(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yamlish(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _constraints(field: Any) -> str:
    """Bounds from the field's metadata and from the ``Annotated`` members of a union annotation (``cpus_per_worker:
    Annotated[float, Field(gt=0)] | Literal["auto"]``): ``≥ 1``, ``> 0``, ``≤ 3``."""
    metadata = list(field.metadata)
    for arg in _union_args(field.annotation):
        if typing.get_origin(arg) is typing.Annotated:  # a Field(...) there keeps its bounds in its own metadata
            metadata += [b for m in arg.__metadata__ for b in (m, *getattr(m, "metadata", ()))]
    out = []
    for m in metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
    return ", ".join(out)


# ------------------------------------------------------------------------------ rows


def rows(model: Any, prefix: str = "") -> list[tuple[str, Any, list]]:
    """``(dotted key, field, [(variant, model), ...])`` for every key of ``model`` and of its nested sections;
    a section that is a union of models is one row, its variants listed for their own tables."""
    out: list[tuple[str, Any, list]] = []
    for name, field in model.model_fields.items():
        ann = _strip_annotated(field.annotation)
        args = [a for a in _union_args(ann) if a is not type(None)]
        sub = args[0] if len(args) == 1 else ann
        sub = _strip_annotated(sub)
        variants = [(_variant_name(a), a) for a in map(_strip_annotated, args) if _is_model(a)]
        if _is_model(sub):
            if field.description:
                out.append((prefix + name, field, []))
            out.extend(rows(sub, f"{prefix}{name}."))
        elif len(variants) > 1 and len(variants) == len(args):
            out.append((prefix + name, field, variants))
        else:
            out.append((prefix + name, field, []))
    return out


def table(model: Any, prefix: str = "") -> str:
    from ambient_ray.config import declared_flags

    flags = {key: fl.name for key, _, fl in declared_flags(model)}
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    unions = []
    for key, field, variants in rows(model):
        full = prefix + key
        name = _code(full) + (f" ({_code(flags[key])})" if key in flags else "")
        kind = type_name(field.annotation)
        bounds = _constraints(field)
        if bounds:
            kind += f", {_text(bounds)}"
        desc = _text(field.description or "")
        if variants:
            unions.append((full, field, variants))
            desc = (desc + " " if desc else "") + f"(keys per choice below: {', '.join(v for v, _ in variants)})"
        lines.append(f"| {name} | {kind} | {default_text(field)} | {desc} |")
    parts = ["\n".join(lines)]
    for full, _field, variants in unions:
        for variant, sub in variants:
            parts.append(f"**`{full}` keys when it is `{variant}`** ({_code(sub.__name__)}):")
            parts.append(table(sub, prefix=full + "."))
    return "\n\n".join(parts)


def stage_reference(stage: str) -> str:
    """The Markdown that replaces ``<!-- config: STAGE -->``: the stage's key table (and its objectives)."""
    if stage in _cache:
        return _cache[stage]
    _ensure_path()
    from ambient_ray.stages import registry

    if stage not in registry.STAGES:
        from mkdocs.exceptions import PluginError

        names = ", ".join(registry.STAGES.names())
        raise PluginError(f"<!-- config: {stage} -->: no such stage; registered: {names}")
    entry = registry.get(stage)
    model = entry.model()
    if model is None:
        text = f"`ambient-ray {stage}` has no config keys: its arguments are listed by `ambient-ray {stage} --help`."
    else:
        text = (
            f"Keys of `ambient-ray {stage}` ({_code(model.__name__)} in `{model.__module__}`), generated from the "
            f"config class when this site was built. Set them in the `--config` YAML, with `--set key=value`, or "
            f"with the flag named beside them.\n\n" + table(model)
        )
        if "objective" in model.model_fields:
            text += "\n\n" + _objectives(stage, model)
    _cache[stage] = text
    return text


def _objectives(stage: str, model: Any) -> str:
    from ambient_ray.train import objectives

    names = objectives.names(stage)
    lines = [f"Objectives of `ambient-ray {stage}` (key `objective`, from the objective registry):", ""]
    lines += [f"- `{n}`: {_text(objectives.OBJECTIVES.get(n).help)}" for n in names]
    for n in names:
        cls = objectives.OBJECTIVES.get(n).config
        if cls is not model:
            lines += ["", f"**Keys of objective `{n}`** ({_code(cls.__name__)}):", "", table(cls)]
    return "\n".join(lines)


def documented(stage: str) -> list[tuple[str, Any]]:
    """``(dotted key, field)`` of every row the stage's page shows, as :func:`stage_reference` renders them: its
    config's table, the tables of a union section's choices, and those of its objectives' own config classes."""
    _ensure_path()
    from ambient_ray.stages import registry

    model = registry.get(stage).model()
    if model is None:
        return []
    models = [model]
    if "objective" in model.model_fields:
        from ambient_ray.train import objectives

        models += [objectives.OBJECTIVES.get(n).config for n in objectives.names(stage)]
        models = [m for i, m in enumerate(models) if m not in models[:i]]
    out: list[tuple[str, Any]] = []

    def walk(m: Any, prefix: str) -> None:
        for key, field, variants in rows(m):
            out.append((prefix + key, field))
            for _, sub in variants:
                walk(sub, f"{prefix}{key}.")

    for m in models:
        walk(m, "")
    return out


def missing_descriptions() -> dict[str, tuple[int, int]]:
    """Per stage: (keys without a description, keys), counted over the generated rows (union variants and
    objectives' own config classes too)."""
    _ensure_path()
    from ambient_ray.stages import registry

    out = {}
    for name, st in registry.STAGES.in_order():
        if st.model() is not None:
            shown = documented(name)
            out[name] = (sum(not (field.description or "").strip() for _, field in shown), len(shown))
    return out


# ------------------------------------------------------------------------------ the MkDocs event


def on_page_markdown(markdown: str, page: Any = None, config: Any = None, files: Any = None, **kwargs: Any) -> str:
    return MARKER.sub(lambda m: stage_reference(m.group(1)), markdown)
