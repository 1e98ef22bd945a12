"""Shared fixtures: tiny random models in the released (torch pickle) and argen formats."""

from __future__ import annotations

import argparse

import pytest
import torch

from argen.checkpoint import build_gpt_config
from argen.models.gpt import GPT
from argen.models.tokenizer import VQModel, vq_config


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.5) -> torch.nn.Module:
    """Give every parameter non-trivial random values (the default init zeroes the output head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
    return model.eval()


def tiny_gpt(kind: str = "c2i", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return randomize(GPT(build_gpt_config("GPT-tiny", kind=kind, **overrides)), seed)


def tiny_tokenizer(seed: int = 0, name: str = "VQ-tiny-16") -> VQModel:
    """A tiny tokenizer whose downsample (16) and codebook (512) match GPT-tiny."""
    torch.manual_seed(seed)
    return VQModel(vq_config(name)).eval()


def save_released(model: torch.nn.Module, path, container: str | None = "model", with_args: bool = True):
    state = model.state_dict()
    obj = state if container is None else {container: state}
    if container is not None and with_args:
        obj["args"] = argparse.Namespace(gpt_model="GPT-tiny", image_size=64)
        obj["steps"] = 10
    torch.save(obj, path)
    return path


@pytest.fixture
def c2i_gpt():
    return tiny_gpt("c2i")


@pytest.fixture
def t2i_gpt():
    return tiny_gpt("t2i", seed=1)
