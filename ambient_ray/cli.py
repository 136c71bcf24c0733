"""The ``ambient-ray`` command line: one sub-command per registered stage, its flags built from the stage's config.

The sub-commands are the entries of the stage registry (:mod:`ambient_ray.stages.registry`), in the order
registered; each names its config class, its run function and what to print after it.

Every stage takes ``--config FILE`` (local path or S3 URI, YAML) and ``--set key=value`` overrides
(dotted keys; values parsed as YAML), plus flags for its most used keys. A flag is declared once, beside
its config field (``Field(..., json_schema_extra=flag("--steps"))``, see :func:`ambient_ray.config.flag`);
this module turns those declarations into argparse sub-parsers. Precedence: ``--set`` > flags > config
file > defaults. ``python -m jobs.<stage>`` runs the same code (for ``ray job submit``).

Exit codes: 0 done; 2 a usage or config error (the message names the key or the input); 1 anything
else, with its traceback (a bug, or a stage that failed part-way and says what it kept).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ambient_ray import config as cfgmod
from ambient_ray.stages import registry, reports
from ambient_ray.stages.registry import Stage

FLAG = "flag:"  # argparse dest prefix of a config flag: 'flag:source.dataset'


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input (exit 2, message only): a config error, an unusable input dataset
    (:class:`ambient_ray.config.DataError`: missing, no Parquet shards, a column missing), a bad corruption spec,
    an unreachable or refused storage URI, a missing input file. Any other exception is a failure (exit 1)."""
    from ambient_ray.corruptions import CorruptionError
    from ambient_ray.io.storage import StorageError

    return (cfgmod.ConfigError, CorruptionError, StorageError, FileNotFoundError)


# ------------------------------------------------------------------------------ flags from the config models


def _help(field: FieldInfo, fl: cfgmod.Flag) -> str:
    text = fl.help or field.description or ""
    if field.is_required():
        text += " (required)"
    else:
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(map(str, default))
        if default not in (None, "", {}, False):
            text += f" (default {default})"
    return text.strip().replace("%", "%%")


def argparse_kwargs(key: str, field: FieldInfo, fl: cfgmod.Flag) -> dict[str, Any]:
    """How argparse reads the flag of config key ``key``: its type, action and choices from the field."""
    kw: dict[str, Any] = {"dest": FLAG + key, "default": None, "help": _help(field, fl)}
    metavar = fl.metavar or fl.name[2:].upper().replace("-", "_")
    ann = cfgmod.unwrap_optional(field.annotation)
    if fl.parse is not None:  # the flag's own conversion takes the raw string (or the list of them)
        return {**kw, "type": str, "action": "append" if fl.repeat else "store", "metavar": metavar}
    if ann is bool:
        return {**kw, "action": argparse.BooleanOptionalAction if field.default is True else "store_true"}
    repeat = get_origin(ann) is list
    if repeat:
        (ann,) = get_args(ann)
    choices = fl.choices
    if get_origin(ann) is Literal:
        choices = choices or get_args(ann)
        ann = type(choices[0])
    if ann not in (int, float, str):
        raise TypeError(
            f"flag {fl.name} (config key '{key}'): no command-line type for {field.annotation}; give parse="
        )
    kw.update(type=ann, action="append" if repeat else "store")
    if choices:
        kw["choices"] = choices
        if fl.metavar:
            kw["metavar"] = fl.metavar
    else:
        kw["metavar"] = metavar
    return kw


def add_flags(p: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One argparse option per flag declared in ``model`` (and its nested sections)."""
    seen: dict[str, str] = {}
    for key, field, fl in cfgmod.declared_flags(model):
        if fl.name in seen:
            raise TypeError(f"{model.__name__}: flag {fl.name} declared for both '{seen[fl.name]}' and '{key}'")
        seen[fl.name] = key
        p.add_argument(fl.name, **argparse_kwargs(key, field, fl))


def flag_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """``{dotted config key: value}`` of the flags given on the command line (converted by their ``parse``)."""
    values: dict[str, Any] = {}
    for key, _, fl in cfgmod.declared_flags(model):
        value = getattr(args, FLAG + key, None)
        if value is None:
            continue
        if fl.parse is not None:
            try:
                value = fl.parse(value)
            except cfgmod.ConfigError:
                raise
            except (ValueError, TypeError) as e:  # only the user's text for this flag was converted here
                raise cfgmod.ConfigError(f"config key '{key}': {fl.name} {value!r}: {e}") from None
        values[key] = value
    return values


def config(args: argparse.Namespace, model: type[BaseModel] | None = None) -> Any:
    """The stage's validated config from ``--config``, the flags and ``--set`` (a ConfigError names the key)."""
    model = model or registry.get(args.stage).model()
    return cfgmod.build(model, args.config, args.sets, flag_values(args, model))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (local path or s3:// URI)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable; dotted keys, YAML values)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _populate(p: argparse.ArgumentParser, name: str, stage: Stage) -> None:
    model = stage.model()
    if model is not None:
        _common(p)
        add_flags(p, model)
        if "objective" in model.model_fields:  # a training stage: its registered objectives
            from ambient_ray.train import objectives

            p.epilog = "objectives (key 'objective'):\n" + objectives.describe(name)
            p.formatter_class = argparse.RawDescriptionHelpFormatter
    stage.add_flags(p)


def run_stage(args: argparse.Namespace) -> int:
    """Run the sub-command: the stage's own command, or build its config, run it and print its report."""
    stage = registry.get(args.stage)
    model = stage.model()
    command = stage.command_function()
    if command is not None:
        return command(args, flag_values(args, model) if model is not None else {})
    cfg = config(args, model)
    summary = stage.call(cfg, progress=not args.no_progress)
    if stage.report is None:
        reports.done(args.stage, summary)
    else:
        stage.report(cfg, summary)
    return 0


def parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, just that sub-command gets its flags (so running one stage
    imports only its own modules)."""
    p = argparse.ArgumentParser(prog="ambient-ray", description="Train good diffusion models from bad data, with Ray.")
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, stage in registry.STAGES.in_order():
        sp = sub.add_parser(name, help=stage.help, description=stage.help)
        if only is None or only == name:
            _populate(sp, name, stage)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    stage = next((a for a in argv if not a.startswith("-")), None)
    return parser(only=stage if stage in registry.STAGES else "").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return run_stage(args)
    except user_errors() as e:
        print(f"ambient-ray {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, or a stage that stopped part-way (its message says what it kept)
        traceback.print_exc()
        print(f"ambient-ray {args.stage}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
