"""Recipes: the settings behind each released LlamaGen checkpoint, as package data (one JSON file each).

Contract:
- `recipe_names(trainer=None)` lists the recipes ("train" or "train-tokenizer" ones with `trainer`).
- `load_recipe(name, trainer)` -> the recipe dict; `ArgenError` for an unknown name or one meant for the
  other trainer. A recipe file holds:
  - `name`, `trainer`, `released` (the file it reproduces), `summary`;
  - `settings`: values for the trainer's config dataclass (`argen.training.config`), field by field;
    explicit command-line flags override them;
  - `data`: what the run trains on (dataset, `num_images`, `epochs`, the data `shape` used by
    `--dry-run` when no codes are given, the `extract_codes` flags, ten-crop/crop range/flip);
  - `sources`: for every setting (and every `data.<key>`) where the value comes from: the paper's
    section or table, the reference repository's script and flag, or an issue thread of the authors;
  - `notes`: what argen does differently, or what is not published.
- `recipe_settings(recipe)` -> the settings with JSON lists turned into tuples.
This module imports nothing heavy (the CLI reads it while parsing).
"""

from __future__ import annotations

import json
from importlib import resources

from argen.utils.errors import ArgenError

TRAINERS = ("train", "train-tokenizer")


def _files() -> dict[str, object]:
    root = resources.files(__name__)
    return {entry.name[:-5]: entry for entry in root.iterdir() if entry.name.endswith(".json")}


def _read(name: str) -> dict:
    return json.loads(_files()[name].read_text(encoding="utf-8"))


def recipe_names(trainer: str | None = None) -> list[str]:
    names = sorted(_files())
    return [n for n in names if trainer is None or _read(n)["trainer"] == trainer]


def load_recipe(name: str, trainer: str | None = None) -> dict:
    if name not in _files():
        known = ", ".join(recipe_names(trainer))
        raise ArgenError(f"unknown recipe {name!r}; known: {known}")
    recipe = _read(name)
    if trainer is not None and recipe["trainer"] != trainer:
        raise ArgenError(f"recipe {name!r} is for `argen {recipe['trainer']}`, not `argen {trainer}`")
    return recipe


def recipe_settings(recipe: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in recipe["settings"].items()}
