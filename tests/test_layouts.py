"""argen's models have exactly the state-dict keys and shapes of every released LlamaGen file."""

from __future__ import annotations

import json

import pytest
import torch

from argen.checkpoint import build_gpt_config
from argen.checkpoint.loading import load_strict
from argen.models.gpt import GPT
from argen.models.tokenizer import VQModel, vq_config
from argen.utils.errors import CheckpointError
from reference_cases import REFERENCE_DIR

LAYOUTS = sorted((REFERENCE_DIR / "layouts").glob("*.json")) if (REFERENCE_DIR / "layouts").is_dir() else []


def build_for_layout(name: str):
    with torch.device("meta"):
        if name.startswith("VQ"):
            return VQModel(vq_config(name))
        size, kind = name.rsplit("-", 1)
        return GPT(build_gpt_config(size, kind=kind))


@pytest.mark.skipif(not LAYOUTS, reason="no reference layouts")
@pytest.mark.parametrize("layout_path", LAYOUTS, ids=[p.stem for p in LAYOUTS])
def test_model_matches_released_layout(layout_path):
    layout = json.loads(layout_path.read_text())
    model = build_for_layout(layout["name"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: list(shape) for k, shape in layout["state_dict"] if k != "freqs_cis"}
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == layout["num_params"]


@pytest.mark.skipif(not LAYOUTS, reason="no reference layouts")
def test_layout_mismatch_names_keys_and_config():
    layout = json.loads((REFERENCE_DIR / "layouts" / "GPT-B-c2i.json").read_text())
    state = {k: torch.zeros(1).expand(shape) for k, shape in layout["state_dict"]}
    model = build_for_layout("GPT-L-c2i")
    with pytest.raises(CheckpointError) as info:
        load_strict(model, state, "c2i_B_256.pt", "generator config 'GPT-L'")
    message = str(info.value)
    assert "'GPT-L'" in message and "c2i_B_256.pt" in message
    assert "missing" in message and "layers.12.attention.wqkv.weight" in message
    assert "mis-shaped" in message and "tok_embeddings.weight" in message
