"""Helpers to replay the LlamaGen reference cases in ../shared/reference/llamagen/ (read its README)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REFERENCE_DIR = Path(os.environ.get("ARGEN_REFERENCE_DIR",
                                    Path(__file__).resolve().parents[2] / "shared" / "reference" / "llamagen"))


def case_paths(kind: str) -> list[Path]:
    cases = REFERENCE_DIR / "cases"
    if not cases.is_dir():
        return []
    return sorted(p for p in cases.glob("*.pt") if p.name.startswith("VQ" if kind == "vq" else "GPT"))


def case_params(kind: str):
    paths = case_paths(kind)
    if not paths:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no reference cases under {REFERENCE_DIR}"))]
    return [pytest.param(p, id=p.stem) for p in paths]


def load_case(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def replay_state_dict(recipe: dict) -> dict:
    g = torch.Generator().manual_seed(recipe["seed"])
    return {key: mean + std * torch.randn(shape, generator=g, dtype=torch.float32)
            for key, shape, mean, std in recipe["params"]}


def write_released_file(case: dict, path: Path) -> Path:
    torch.save({"model": replay_state_dict(case["recipe"])}, path)
    return path


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
