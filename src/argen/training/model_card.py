"""The model card of a pushed generator or adapter (`argen push`): README.md made from the run.

Contract:
- `render_card(model, repo, tokenizer_ref, license_id, evaluations, has_grid)` -> README.md text: YAML
  metadata through huggingface_hub's `ModelCardData` (`library_name: argen`, `license`, tags,
  `pipeline_tag: text-to-image` for t2i), then how to load it (`hf://owner/name`), the model config, the
  training settings and steps, the data (the code shards' index: images, size, grid, copies, classes or
  caption encoder, the `--filter` and its per-criterion report), the metrics (first, last and lowest
  logged training loss from `log.jsonl`; each `argen evaluate` result, flagged when its Inception had
  random weights), the sample grid (`GRID`) and the licence. Paths appear by their last part only.
- `find_evaluations(model, given)` -> [(name, results)]: the `argen evaluate` JSON files given (each must
  exist) and those in the run folder or one level below (a JSON object with `fid` or `clip_score`).
`model` is an `argen.training.publish.Model`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from argen.utils.errors import ArgenError

if TYPE_CHECKING:
    from argen.training.publish import Model

GRID = "samples.png"


def read_json(path: Path) -> dict:
    """A JSON file's content, or {} when it is missing or unreadable (the card leaves that part out)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _codes_index(model: Model) -> dict:
    """The code shards' index.json (meta.json if unfinished), with `text_encoder` from their text features."""
    codes = (model.info.get("training") or {}).get("codes") or model.train.get("codes")
    if not codes:
        return {}
    folder = Path(codes)
    index = read_json(folder / "index.json") or read_json(folder / "meta.json")
    features = model.train.get("text_features") or index.get("text_features")
    if features:
        encoder = read_json(folder / features / "meta.json").get("encoder")
        index["text_encoder"] = _name_only(encoder)
    return index


def _training_log(model: Model) -> list[dict]:
    if model.run_dir is None or not (model.run_dir / "log.jsonl").is_file():
        return []
    rows = []
    for line in (model.run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("loss"), (int, float)):
            rows.append(row)
    return rows


def find_evaluations(model: Model, given: list[str] | None = None) -> list[tuple[str, dict]]:
    """(name, results) of `argen evaluate` JSON files: those given, and any in the run folder (one level down)."""
    files = [Path(f) for f in given or []]
    for f in files:
        if not f.is_file():
            raise ArgenError(f"--metrics {f} does not exist")
    if model.run_dir is not None:
        files += sorted(model.run_dir.glob("*.json")) + sorted(model.run_dir.glob("*/*.json"))
    found, seen = [], set()
    for f in files:
        data = read_json(f)
        if isinstance(data, dict) and ("fid" in data or "clip_score" in data) and f.resolve() not in seen:
            seen.add(f.resolve())
            found.append((f.name if f.parent == model.run_dir or model.run_dir is None
                          else f"{f.parent.name}/{f.name}", data))
    return found


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _table(rows: list[tuple[str, object]]) -> str:
    return "\n".join(["| | |", "| --- | --- |", *[f"| {k} | {_number(v)} |" for k, v in rows if v is not None]])


def _name_only(value) -> str | None:
    """A path as its last part (the card names data and files without the pusher's folders)."""
    if not value:
        return None
    text = str(value)
    return text if text.startswith("hf://") or not ("/" in text or "\\" in text) else Path(text).name


def render_card(model: Model, repo: str, tokenizer_ref: str, license_id: str, evaluations: list[tuple[str, dict]],
                has_grid: bool) -> str:
    """README.md: YAML metadata (through huggingface_hub's ModelCardData) and the card's text."""
    from huggingface_hub import ModelCardData

    cfg = (model.info.get("config") or {}) if model.kind == "generator" else {}
    kind = cfg.get("kind") or model.info.get("kind")
    tags = ["argen", "autoregressive", "llamagen", "image-generation"]
    tags.append("text-to-image" if kind == "t2i" else "class-conditional")
    if model.kind == "adapter":
        tags.append("lora")
    meta = ModelCardData(library_name="argen", license=license_id, tags=tags,
                         pipeline_tag="text-to-image" if kind == "t2i" else None)
    training = model.info.get("training") or {}
    settings = {**(training.get("settings") or {}), **model.train}
    index = _codes_index(model)
    log = _training_log(model)
    what = "text-to-image" if kind == "t2i" else "class-conditional" if kind == "c2i" else ""
    lines = [f"# {repo}", ""]
    if model.kind == "adapter":
        base = model.info.get("base") or model.info.get("peft", {}).get("base_model_name_or_path")
        lines += [f"A LoRA adapter (peft layout) for the argen generator `{base}`, made with "
                  f"[argen](https://pypi.org/project/argen/), a LlamaGen-style autoregressive image generator.", ""]
    else:
        lines += [f"A {what} {cfg.get('name', '')} generator trained with argen, a LlamaGen-style "
                  f"autoregressive image generator: a GPT over the codes of a VQ image tokenizer.", ""]
    if has_grid:
        lines += [f"![samples]({GRID})", "", "Samples from the model (the run's last sample grid, or one made "
                  "by `argen push`).", ""]
    lines += ["## How to load it", "", "```python", "import argen", ""]
    if model.kind == "adapter":
        lines += [f"# files: hf://{repo}/adapter_config.json, hf://{repo}/adapter_model.safetensors",
                  "# load the base generator and apply the adapter with argen's LoRA support"]
    else:
        where = "in this repository" if tokenizer_ref == "tokenizer.safetensors" else tokenizer_ref
        lines += [f'gpt = argen.load_gpt("hf://{repo}")             # weights and config',
                  f'tokenizer = argen.load_tokenizer("hf://{repo}")  # its tokenizer ({where})']
    lines += ["```", ""]
    if model.kind == "generator":
        condition = "--prompts \"a photo of a cat\"" if kind == "t2i" else "--classes 0,1,2"
        lines += ["```", f"argen sample --gpt hf://{repo} {condition} --out samples", "```", "",
                  "The tokenizer and the config come with the repository; no other flag is needed. Files are "
                  "cached by huggingface_hub (`HF_HOME`), and `HF_HUB_OFFLINE=1` loads them from the cache "
                  "alone.", ""]
        if kind == "t2i":
            encoder = index.get("text_encoder")
            lines += [f"Prompts are encoded with `--text-encoder` (default `minilm`); the generator takes "
                      f"{cfg.get('caption_dim')}-wide caption features"
                      + (f". Its training captions were encoded with `{encoder}`: pass that encoder" if encoder
                         else "") + ".", ""]
        lines += ["## Model", "", _table([
            ("config", cfg.get("name")), ("kind", kind), ("layers", cfg.get("n_layer")), ("heads", cfg.get("n_head")),
            ("width", cfg.get("dim")), ("vocabulary (tokenizer codes)", cfg.get("vocab_size")),
            ("image size (px)", cfg.get("image_size")), ("downsample", cfg.get("downsample")),
            ("tokens per image", (cfg["image_size"] // cfg["downsample"]) ** 2
             if cfg.get("image_size") and cfg.get("downsample") else None),
            ("classes", cfg.get("num_classes") if kind == "c2i" else None),
            ("caption features (length x width)", f"{cfg.get('caption_len')} x {cfg.get('caption_dim')}"
             if kind == "t2i" else None),
            ("tokenizer", tokenizer_ref),
            ("recommended sampling", json.dumps(model.info["sampling"], sort_keys=True)
             if model.info.get("sampling") else None),
        ]), ""]
    lines += ["## Training", "", _table([
        ("steps", training.get("steps") or model.info.get("steps")),
        ("batch size", settings.get("batch_size")), ("learning rate", settings.get("lr")),
        ("schedule", settings.get("schedule")), ("warmup", settings.get("warmup")),
        ("gradient accumulation", settings.get("grad_accum")), ("EMA", training.get("ema")),
        ("precision", settings.get("precision") or None), ("seed", settings.get("seed")),
        ("initialised from", _name_only((training.get("init_from") or {}).get("ref")
                                        if isinstance(training.get("init_from"), dict) else training.get("init_from"))),
    ]), ""]
    lines += ["## Data", ""]
    if index:
        report = index.get("filter_report")
        lines += [_table([
            ("images", index.get("num_images")), ("source", _name_only(index.get("source"))),
            ("image size (px)", index.get("image_size")), ("token grid", "x".join(map(str, index.get("grid") or []))
                                                           or None),
            ("augmented copies per image", index.get("num_augs")),
            ("caption encoder", index.get("text_encoder") if index.get("kind") == "t2i" else None),
            ("classes", index.get("num_classes") if index.get("kind") == "c2i" else None),
            ("filter", f"`{index['filter']}`" if index.get("filter") else None),
            ("kept by the filter", f"{report['kept']:,} of {report['seen']:,}" if report else None),
        ]), ""]
        if report:
            lines += ["| criterion | passed | failed | unknown |", "| --- | --- | --- | --- |",
                      *[f"| `{row['criterion']}` | {row['passed']:,} | {row['failed']:,} | {row['unknown']:,} |"
                        for row in report.get("criteria", [])], ""]
    elif training.get("data"):
        lines += [str(training["data"]), ""]
    else:
        lines += ["Not recorded with the weights (the code shards were not found).", ""]
    lines += ["## Metrics", ""]
    if log:
        losses = [row["loss"] for row in log]
        lines += [_table([("logged steps", f"{log[0]['step']}..{log[-1]['step']}"),
                          ("training loss, first logged", losses[0]), ("training loss, last logged", losses[-1]),
                          ("training loss, lowest", min(losses)),
                          ("tokens/s (last logged)", round(log[-1].get("tokens_per_s", 0)) or None)]), ""]
    for name, result in evaluations:
        keys = ("fid", "sfid", "inception_score", "precision", "recall", "clip_score", "num_samples",
                "num_reference", "image_size")
        rows = [(k, result.get(k) if not isinstance(result.get(k), list) else "x".join(map(str, result[k])))
                for k in keys]
        weights = result.get("inception_weights") or {}
        if weights.get("random"):
            rows.append(("warning", "random-weight Inception: not an FID"))
        if result.get("clip_model"):
            rows.append(("CLIP model", (result["clip_model"] or {}).get("name")))
        lines += [f"`argen evaluate` ({name}):", "", _table(rows), ""]
    if not log and not evaluations:
        lines += ["None recorded.", ""]
    lines += ["## Licence", "", f"`{license_id}`" + (" (not stated by the uploader)" if license_id == "other" else "")
              + ". The training data's own terms apply as well.", ""]
    return f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines)
