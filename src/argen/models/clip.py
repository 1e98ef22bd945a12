"""A local CLIP (through transformers) and LAION's linear aesthetic head, for scoring and evaluation.

Contract:
- `load_clip(path, device)` -> `Clip`: `path` is a local folder written by transformers'
  `CLIPModel.save_pretrained` + `CLIPProcessor.save_pretrained` (e.g. a download of
  openai/clip-vit-large-patch14). Nothing is downloaded. A missing folder, a folder that is not a
  transformers model, a model of another kind (`model_type` other than `clip`), or one that does not
  load raises `ArgenError` (one line).
- `Clip.identity`: {name (the config's `_name_or_path` or the folder name), path, model_type,
  projection_dim, sha256 (over the weight files' contents, in name order)}: recorded by every file
  that holds numbers made with this CLIP.
- `Clip.image_embeddings(images)` (PIL images) and `Clip.text_embeddings(texts)` -> (n, D) float32,
  L2-normalised; texts are truncated to the text model's positions (77 for OpenAI's CLIP).
  `Clip.similarity(images, texts)` -> (n,) cosine similarity (LAION's `similarity`).
  `Clip.tensor_features_model()`: the model as torchmetrics' `CLIPScore` calls it (features as tensors).
- `load_aesthetic_head(path, dim)` -> `AestheticHead`: LAION-Aesthetics' published linear predictor
  (`sa_0_4_vit_l_14_linear.pth`: an `nn.Linear(768, 1)` state dict, `weight` (1, D) and `bias` (1,)) from a
  torch `.pth` (read with `weights_only=True`) or a `.safetensors` file; its input width must equal the
  CLIP's projection width (768 for ViT-L/14). Its score is the head applied to the L2-normalised image
  embedding, as LAION computed it. A missing file or another layout (e.g. the MLP predictor) raises
  `ArgenError`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from argen.utils.errors import ArgenError
from argen.utils.io import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _weights_sha256(folder: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        digest.update(f"{path.name}:{sha256_file(path)};".encode())
    return digest.hexdigest()


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output holds the projected features; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Clip:
    def __init__(self, model, processor, identity: dict, device: torch.device):
        self.model, self.processor, self.identity, self.device = model, processor, identity, device
        self.max_length = model.config.text_config.max_position_embeddings
        self.dim = model.config.projection_dim

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        features = _features(self.model.get_image_features(pixel_values=pixels)).float()
        return torch.nn.functional.normalize(features, dim=-1).cpu()  # (n, D)

    @torch.no_grad()
    def text_embeddings(self, texts) -> torch.Tensor:
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_length)
        features = _features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                          attention_mask=tokens["attention_mask"].to(self.device)))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()  # (n, D)

    def similarity(self, images, texts) -> torch.Tensor:
        return (self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1)

    def tensor_features_model(self) -> torch.nn.Module:
        """The CLIP model behind a view whose get_image_features / get_text_features return tensors, as
        torchmetrics' CLIPScore expects (transformers 5 returns model outputs)."""
        return _TensorFeatures(self.model)


class _TensorFeatures(torch.nn.Module):
    """Keeps the last features it returned (`last["image"]`, `last["text"]`), so a caller can see the
    per-image cosines behind torchmetrics' aggregate without a second pass."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config
        self.last: dict[str, torch.Tensor] = {}

    def get_image_features(self, pixel_values):
        self.last["image"] = _features(self.model.get_image_features(pixel_values=pixel_values))
        return self.last["image"]

    def get_text_features(self, input_ids, attention_mask=None):
        self.last["text"] = _features(self.model.get_text_features(input_ids=input_ids,
                                                                   attention_mask=attention_mask))
        return self.last["text"]


def load_clip(path: str | Path, device: torch.device | str = "cpu") -> Clip:
    folder = Path(path)
    hint = ("a local folder saved by transformers' CLIPModel and CLIPProcessor (e.g. a download of "
            "openai/clip-vit-large-patch14)")
    if not folder.exists():
        raise ArgenError(f"CLIP weights {folder} do not exist; give {hint}")
    if not (folder / "config.json").is_file():
        raise ArgenError(f"{folder} is not a transformers model folder (no config.json); give {hint}")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArgenError(f"{folder}/config.json is unreadable ({exc})") from exc
    if config.get("model_type") != "clip":
        raise ArgenError(f"{folder} holds a {config.get('model_type') or 'unknown'} model, not CLIP; give {hint}")
    from transformers import CLIPModel, CLIPProcessor
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArgenError(f"cannot load CLIP from {folder}: {first}") from exc
    device = torch.device(device)
    model = model.eval().to(device)
    identity = {"name": config.get("_name_or_path") or folder.name, "path": str(folder.resolve()),
                "model_type": "clip", "projection_dim": model.config.projection_dim,
                "sha256": _weights_sha256(folder)}
    return Clip(model, processor, identity, device)


class AestheticHead(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = torch.nn.Linear(dim, 1)

    @torch.no_grad()
    def score(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """(n, D) L2-normalised CLIP image embeddings -> (n,) aesthetic scores."""
        return self.linear(image_embeddings.float()).squeeze(-1)


def load_aesthetic_head(path: str | Path, dim: int) -> tuple[AestheticHead, dict]:
    """-> (head, identity {path, sha256})."""
    path = Path(path)
    if not path.is_file():
        raise ArgenError(f"aesthetic head {path} does not exist; give LAION's sa_0_4_vit_l_14_linear.pth (a "
                         f"linear layer on CLIP ViT-L/14 image embeddings)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ArgenError(f"cannot read the aesthetic head {path}: {str(exc).strip().splitlines()[0]}") from exc
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict):
        raise ArgenError(f"{path} is not a state dict of a linear layer")
    state = {k.removeprefix("linear."): v for k, v in state.items()}
    weight, bias = state.get("weight"), state.get("bias")
    if set(state) != {"weight", "bias"} or weight.ndim != 2 or weight.shape[0] != 1 or bias.shape != (1,):
        raise ArgenError(f"{path} is not a linear aesthetic head (expected weight (1, D) and bias (1,), found "
                         f"{', '.join(sorted(state))[:120]}); LAION's MLP predictor is not supported")
    if weight.shape[1] != dim:
        raise ArgenError(f"the aesthetic head {path} takes {weight.shape[1]}-wide embeddings but the CLIP gives {dim} "
                         f"(LAION's head needs CLIP ViT-L/14, 768)")
    head = AestheticHead(dim)
    head.linear.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return head.eval(), {"path": str(path.resolve()), "sha256": sha256_file(path)}
