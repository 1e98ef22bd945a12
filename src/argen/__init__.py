"""argen: LlamaGen-style autoregressive image generation.

Public API (imported lazily so that `import argen` stays cheap):
    load_tokenizer(path, config=None) -> VQModel
    load_gpt(path, config=None, kind=None, image_size=None, downsample=None, lora=None, adapters=None) -> GPT
             (lora: LoRA adapter directories, "DIR:SCALE" or (dir, scale), merged into the weights;
             adapters: ["NAME=DIR[:SCALE]", ...] served side by side, unmerged, chosen per image)
    generate(gpt, cond, cond_mask=None, cfg_scale=1.0, cfg_interval=-1, temperature=1.0,
             top_k=0, top_p=1.0, generator=None) -> (B, N) LongTensor
             (or params=SamplingParams(...); decode="jacobi", window=W)
    edit(gpt, tokenizer, images, mask, cond, params=..., generator=...) -> EditResult (inpainting;
         argen.editing also has extend: outpainting)
    SamplingParams: the one carrier of sampling settings (SamplingParams.for_kind for the defaults)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_tokenizer": "argen.checkpoint",
    "load_gpt": "argen.checkpoint",
    "save_tokenizer": "argen.checkpoint",
    "save_gpt": "argen.checkpoint",
    "generate": "argen.engine",
    "edit": "argen.editing",
    "reference_generate": "argen.sampling",
    "SamplingParams": "argen.sampling",
    "ArgenError": "argen.utils.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in {"evaluation", "editing", "engine", "sampling", "checkpoint", "data", "models", "training", "serving"}:
        return importlib.import_module(f"argen.{name}")
    raise AttributeError(f"module 'argen' has no attribute {name!r}")
