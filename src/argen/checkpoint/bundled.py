"""The models that ship inside the argen package, by name.

Contract:
- `BUNDLED` maps a name to a file in `argen/data/demo/`: `demo-c2i` and `demo-t2i` (GPT-demo generators
  trained on the bundled emoji set by `scripts/train_demo_generators.py`) and `demo-vq` (the VQ-demo
  tokenizer that encodes for them). `bundled_path(name)` is that file, or None for any other text;
  `load_gpt("demo-c2i")`, `--gpt demo-t2i` and `--tokenizer demo-vq` go through it (`hub.resolve`).
- `BUNDLED_TOKENIZER[name]` is the tokenizer a bundled generator needs, used when none is given.
- `default_generator(kind)` is the bundled generator for a kind, for commands given no `--gpt`.
- `export_bundled(run_dir, kind, sampling, out_dir)` writes a trained argen generator as a bundled one:
  weights in float16 (they load into any dtype), the config, the class names, the recommended
  sampling settings (`sampling`, read back by `load_gpt` into `GPT.sampling_defaults`) and the
  training settings as provenance. Its sha256 is recorded by hand in `argen/data/demo/README.md`, and a
  test checks the files against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from argen.utils.errors import CheckpointError
from argen.utils.io import atomic_write, atomic_write_json

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"
BUNDLED = {"demo-c2i": "gpt_demo_c2i.safetensors", "demo-t2i": "gpt_demo_t2i.safetensors",
           "demo-vq": "vq_demo.safetensors"}
BUNDLED_TOKENIZER = {"demo-c2i": "demo-vq", "demo-t2i": "demo-vq"}
DEFAULT_GENERATORS = {"c2i": "demo-c2i", "t2i": "demo-t2i"}


def bundled_path(ref: str | Path) -> Path | None:
    """The package file of a bundled model name, else None. A missing file is an error (a broken install)."""
    name = BUNDLED.get(str(ref))
    if name is None:
        return None
    path = DEMO_DIR / name
    if not path.is_file():
        raise CheckpointError(f"the bundled model {ref} ({path}) is missing from this argen install; reinstall argen")
    return path


def default_generator(kind: str) -> str:
    return DEFAULT_GENERATORS[kind]


def export_bundled(run_dir: str | Path, kind: str, sampling: dict, out_dir: str | Path = DEMO_DIR) -> Path:
    """A finished `argen train` run -> out_dir/gpt_demo_<kind>.safetensors (+ .json) in float16."""
    run_dir = Path(run_dir)
    source = run_dir / "gpt.safetensors"
    info_file = run_dir / "gpt.json"
    if not source.is_file() or not info_file.is_file():
        raise CheckpointError(f"{run_dir} holds no finished generator (gpt.safetensors and gpt.json)")
    info = json.loads(info_file.read_text())
    if info.get("config", {}).get("kind") != kind:
        raise CheckpointError(f"{source} is not a {kind} generator")
    state = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
             for k, v in load_file(str(source)).items()}
    train = json.loads((run_dir / "train_config.json").read_text()).get("train", {}) \
        if (run_dir / "train_config.json").is_file() else {}
    keep = ("config", "max_steps", "batch_size", "lr", "warmup", "schedule", "min_lr_ratio", "dropout", "ema_decay",
            "seed", "weight_decay", "betas", "precision", "caption_len")
    provenance = {"made_by": "scripts/train_demo_generators.py (argen train)",
                  "data": "argen's bundled emoji training split (3,442 images), encoded by demo-vq, ten-crop + flip",
                  "settings": {k: train[k] for k in keep if k in train}}
    bundled = {**info, "training": {**info.get("training", {}), **provenance, "codes": None},
               "sampling": dict(sampling), "bundled_as": f"demo-{kind}", "weights_dtype": "float16"}
    file = Path(out_dir) / f"gpt_demo_{kind}.safetensors"
    atomic_write(file, lambda tmp: save_file(state, str(tmp), metadata={"argen": json.dumps(bundled, sort_keys=True)}))
    atomic_write_json(file.with_suffix(".json"), bundled)
    return file
