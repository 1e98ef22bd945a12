"""Command-line flags derived from a config dataclass, so each setting is written down once.

Contract:
- `add_config_flags(parser, cls, skip=())` adds one flag per field of the dataclass `cls` whose metadata
  has a `help` entry (see `argen.training.config` for the metadata keys). Flags default to "not given"
  (argparse.SUPPRESS): the namespace holds only what the user typed, so a recipe can sit between the
  dataclass defaults and the explicit flags. The help text shows the dataclass default.
- Types: bool fields -> `--name/--no-name`; tuple fields -> `nargs=N` (and one flag per element when
  `metadata["parts"]` names them, e.g. `--beta1`, `--beta2`); `metadata["type"]` names a
  numeric type in `argen.cli.common` (`positive_int`, `finite_float`, `float_range(0,1)`, ...), which
  makes a bad value exit 2 with a one-line message; otherwise the annotation's int/float/str.
- `given(args, cls)` -> {field: value} for the flags the user gave.
- `resolve(cls, given_values, recipe_values=None, **fixed)` -> a `cls` instance: dataclass defaults,
  then the recipe's values, then the explicit flags, then `fixed`.
- `print_resolved(args, cfg, recipe)` prints (for `--dry-run`) the recipe's header and citations and
  every resolved setting with its source: "command line", the recipe's citation, or none (a default);
  `print_recipe_data(recipe)` and `print_recipe_notes(recipe)` print the recipe's data and notes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

from argen.cli import common

_RANGE = re.compile(r"^(int_range|float_range)\(([^,]+),([^)]+)\)$")


def _numeric_type(name: str):
    match = _RANGE.match(name.replace(" ", ""))
    if match:
        kind, low, high = match.groups()
        cast = int if kind == "int_range" else float
        return getattr(common, kind)(cast(low), cast(high))
    return getattr(common, name)


def _base_type(annotation: str) -> str:
    """'int | None' -> 'int'; 'tuple[float, float]' -> 'tuple'."""
    parts = [p.strip() for p in annotation.split("|") if p.strip() != "None"]
    return parts[0].split("[")[0] if parts else "str"


def flag_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING or f.default is None:
        return ""
    if isinstance(f.default, bool):
        return ""
    if isinstance(f.default, tuple):
        return f" (default: {' '.join(str(v) for v in f.default)})"
    return f" (default: {f.default})"


def add_config_flags(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in flag_fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        target = parser
        if "group" in meta:
            target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
        base = _base_type(annotation)
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS}
        help_text = meta["help"]
        if base == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
            if isinstance(f.default, bool):
                help_text += f" (default: {'on' if f.default else 'off'})"
        else:
            if "type" in meta:
                kwargs["type"] = _numeric_type(meta["type"])
            elif base in ("int", "float"):
                kwargs["type"] = {"int": int, "float": float}[base]
            if base == "tuple":
                kwargs["nargs"] = annotation.count(",") + 1  # tuple[float, float] -> 2
                kwargs["metavar"] = tuple(f"V{i + 1}" for i in range(kwargs["nargs"]))
                for i, part in enumerate(meta.get("parts", ())):  # e.g. --beta1 / --beta2 for betas
                    target.add_argument("--" + part.replace("_", "-"), dest=f"{f.name}.{i}", default=argparse.SUPPRESS,
                                        type=kwargs.get("type", float), metavar=part.upper(),
                                        help=f"element {i + 1} of {flag_name(f)}")
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            help_text += _default_text(f)
        kwargs["help"] = help_text
        target.add_argument(flag_name(f), **kwargs)


def given(args: argparse.Namespace, cls) -> dict:
    """The config values the user typed (flags left out are absent)."""
    values = {}
    for f in flag_fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
        parts = {i: getattr(args, f"{f.name}.{i}") for i in range(len(f.metadata.get("parts", ())))
                 if hasattr(args, f"{f.name}.{i}")}
        if parts:
            whole = list(values.get(f.name, f.default))
            for i, value in parts.items():
                whole[i] = value
            values[f.name] = tuple(whole)
    return values


def resolve(cls, given_values: dict, recipe_values: dict | None = None, **fixed):
    """Dataclass defaults < recipe < explicit flags < `fixed`."""
    values = {**(recipe_values or {}), **given_values, **fixed}
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names})


def print_resolved(args: argparse.Namespace, cfg, recipe: dict | None) -> None:
    sources = (recipe or {}).get("sources", {})
    if recipe:
        reproduces = f" (reproduces {recipe['released']})" if recipe.get("released") else ""
        print(f"recipe {recipe['name']}: {recipe['summary']}{reproduces}")
        for short, full in recipe.get("citations", {}).items():
            print(f"  {short}: {full}")
    print("resolved training configuration (value  <- source):")
    typed = set(given(args, type(cfg)))
    from_recipe = set(recipe["settings"]) if recipe else set()
    values = cfg.to_dict()
    width = max(len(k) for k in values) + 1
    for key, value in values.items():
        note = "  <- command line" if key in typed else ""
        if not note and key in sources and key in from_recipe:
            note = f"  <- {sources[key]}"
        print(f"  {key:{width}s} {json.dumps(value)}{note}")


def print_recipe_data(recipe: dict | None, skip=("shape",)) -> None:
    sources = (recipe or {}).get("sources", {})
    for key, value in (recipe or {}).get("data", {}).items():
        if key not in skip:
            note = f"  <- {sources['data.' + key]}" if "data." + key in sources else ""
            print(f"  data.{key}: {json.dumps(value)}{note}")


def print_recipe_notes(recipe: dict | None) -> None:
    for note in (recipe or {}).get("notes", []):
        print(f"note: {note}")
