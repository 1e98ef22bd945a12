"""Checkpoint loading and saving.

- Released LlamaGen files (torch pickles) load strictly given a named config
  (`load_tokenizer(path, config="VQ-16")`, `load_gpt(path, config="GPT-B", kind=..., ...)`).
- argen files are self-describing: `<name>.safetensors` with the config in its metadata and a
  `<name>.json` beside it. A directory holding `tokenizer.safetensors` / `gpt.safetensors` works too.
  The demo's image classifier (`save_classifier`/`load_classifier`) is stored the same way.
"""

from argen.checkpoint.loading import (
    build_gpt_config,
    load_classifier,
    load_gpt,
    load_tokenizer,
    quantize_gpt,
    save_classifier,
    save_gpt,
    save_tokenizer,
)

__all__ = ["build_gpt_config", "load_classifier", "load_gpt", "load_tokenizer", "quantize_gpt", "save_classifier",
           "save_gpt", "save_tokenizer"]
