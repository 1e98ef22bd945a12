"""The quickstart pipeline behind `argen demo`: small models on the bundled emoji dataset.

`run_demo(DemoOptions(out="runs/demo"))` trains (or reuses) a small VQ tokenizer on the emoji training split,
extracts codes, computes MiniLM caption features, trains a class-conditional and a text-conditional
generator, samples a grid per class and for a few prompts, and writes OUT/report.md (from the package
template `training/templates/demo_report.md`) with the images, the metrics and the loss curves.
`--quick` (the default) fits in about 10 minutes on a 2-core CPU; with a GPU it trains larger models
for longer. Every stage reuses what an earlier run left in OUT.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from argen.checkpoint import load_gpt, load_tokenizer
from argen.data.codes import CodeDataset, CodeShardWriter
from argen.data.datasets import DemoDataset
from argen.data.text_features import TextFeatureStore, save_text_features
from argen.engine import decode_codes, generate
from argen.evaluation.recon_metrics import psnr_uint8
from argen.sampling.logits import SamplingParams
from argen.training.generator import TrainConfig, train
from argen.training.tokenizer import TokenizerTrainConfig, train_tokenizer
from argen.utils.errors import ArgenError
from argen.utils.images import from_uint8, make_grid, save_png, to_uint8
from argen.utils.io import atomic_write, atomic_write_json
from argen.utils.torch_utils import parse_device

PROMPTS = [
    "an emoji of grinning face",
    "an emoji of green heart",
    "an emoji of blue heart",
    "an emoji of fire",
    "an emoji of japan flag",
    "an emoji of christmas tree",
    "an emoji of banana",
    "an emoji of rocket",
]


REFS = 2  # real images shown left of each row of samples
SAMPLE_CHUNK = 64  # images per generate call, all from one generator: this fixes the demo's samples


@dataclass(frozen=True)
class Plan:
    """How big and how long each stage is."""

    name: str
    tokenizer_config: str
    tokenizer_steps: int
    tokenizer_batch: int
    tokenizer_lr: float
    gpt_config: str
    c2i_steps: int
    t2i_steps: int
    batch_size: int
    lr: float
    warmup: int
    dropout: float  # token/attention/FFN dropout; 0 for the few-epoch CPU run
    samples_per_class: int
    cfg_scale: float
    temperature: float
    top_k: int


CPU_PLAN = Plan(name="quick (CPU)", tokenizer_config="VQ-demo", tokenizer_steps=1800, tokenizer_batch=16,
                tokenizer_lr=5e-4, gpt_config="GPT-demo", c2i_steps=450, t2i_steps=450, batch_size=64, lr=8e-3,
                warmup=20, dropout=0.0, samples_per_class=8, cfg_scale=3.0, temperature=0.8, top_k=50)
GPU_PLAN = Plan(name="GPU", tokenizer_config="VQ-demo", tokenizer_steps=6000, tokenizer_batch=64, tokenizer_lr=5e-4,
                gpt_config="GPT-demo-L", c2i_steps=6000, t2i_steps=6000, batch_size=256, lr=1e-3, warmup=200,
                dropout=0.1, samples_per_class=8, cfg_scale=3.0, temperature=0.8, top_k=50)


def _stage(title: str) -> None:
    print(f"\n== {title}", flush=True)


# ---------------------------------------------------------------------- stages
def stage_tokenizer(out: Path, plan: Plan, seed: int, given: str | None, progress: bool = True) -> Path:
    if given:
        return Path(given)
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.safetensors").is_file():
        print(f"reusing {tok_dir}")
        return tok_dir
    train_tokenizer(TokenizerTrainConfig(
        out=str(tok_dir), data="demo", config=plan.tokenizer_config, max_steps=plan.tokenizer_steps, seed=seed,
        batch_size=plan.tokenizer_batch, lr=plan.tokenizer_lr, use_disc=False, restart_dead_codes=50, resume=True,
        progress=progress))
    return tok_dir


def stage_codes(out: Path, tokenizer, data: DemoDataset, device: torch.device, progress: bool = True) -> Path:
    """Encode the training images, as is and mirrored, into c2i code shards (`argen extract-codes --flip`)."""
    from argen.data.extract import extract_codes

    codes_dir = out / "codes-c2i"
    if (codes_dir / "index.json").is_file():
        print(f"reusing {codes_dir}")
        return codes_dir
    extract_codes(tokenizer, data, codes_dir, image_size=64, flip=True, shard_size=1024, batch_size=128,
                  device=device, progress=progress)
    return codes_dir


def stage_text(out: Path, data: DemoDataset, c2i_codes: Path, progress: bool = True) -> tuple[Path, Path]:
    """MiniLM features of each training image's caption, and t2i shards whose labels index them."""
    from argen.data.text_encoders import load_text_encoder

    text_dir = out / "text-minilm"
    t2i_dir = out / "codes-t2i"
    if (t2i_dir / "index.json").is_file() and (text_dir / "meta.json").is_file():
        print(f"reusing {text_dir} and {t2i_dir}")
        return text_dir, t2i_dir
    captions = [data.captions(i)[0] for i in range(len(data))]
    if not (text_dir / "meta.json").is_file():
        encoder = load_text_encoder("minilm")
        feats = []
        for start in tqdm(range(0, len(captions), 256), desc="caption features", unit="batch",
                          disable=not progress):
            feats.extend(encoder.encode_unpadded(captions[start:start + 256]))
        save_text_features(text_dir, feats, encoder="minilm", max_length=encoder.max_length, texts=captions)
    source = CodeDataset(c2i_codes)
    if len(source) != len(data):
        raise ArgenError(f"{c2i_codes} holds {len(source)} images but the demo split has {len(data)}; delete "
                         f"{c2i_codes} and rerun")
    meta = {**{k: source.meta[k] for k in ("tokenizer", "codebook_size", "grid", "image_size", "num_augs",
                                           "aug_names")},
            "kind": "t2i", "text_features": "../" + text_dir.name, "num_classes": None, "class_names": None}
    writer = CodeShardWriter(t2i_dir, meta)
    offset = 0
    for k, shard in enumerate(source.meta["shards"]):
        codes = np.asarray(source.shard_codes(k))  # (count, num_augs, h, w), checked by CodeDataset
        writer.write_shard(shard["index"], codes, np.arange(offset, offset + len(codes)))  # caption i = image i
        offset += len(codes)
    writer.finalize()
    return text_dir, t2i_dir


def stage_generator(out: Path, kind: str, codes: Path, plan: Plan, steps: int, seed: int, device: str,
                    tokenizer_dir: Path, progress: bool = True) -> Path:
    run_dir = out / f"gpt-{kind}"
    info_file = run_dir / "gpt.json"
    if info_file.is_file() and json.loads(info_file.read_text()).get("training", {}).get("steps") == steps:
        print(f"reusing {run_dir}")
        return run_dir
    from argen.models.gpt import gpt_config

    cfg = TrainConfig(codes=str(codes), out=str(run_dir), config=plan.gpt_config, max_steps=steps, resume=True,
                      seed=seed, batch_size=plan.batch_size, lr=plan.lr, warmup=plan.warmup, schedule="cosine",
                      min_lr_ratio=0.1, dropout=plan.dropout, ema=False, device=device,
                      # the demo's short captions: its generators keep their 16 caption slots, not the features' 120
                      caption_len=gpt_config(plan.gpt_config).caption_len if kind == "t2i" else None,
                      ckpt_every=max(50, steps // 4), log_every=10, sample_every=0, tokenizer=str(tokenizer_dir),
                      desc=f"train {kind}", progress=progress)
    train(cfg)
    return run_dir


# ---------------------------------------------------------------------- sampling and metrics
def color_features(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 64) normalized 4x4x4 colour histograms of the non-white pixels."""
    if len(images) == 0:
        return np.zeros((0, 64))
    pixels = images.reshape(len(images), -1, 3).astype(np.int64)
    bins = (pixels // 64)
    codes = bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]
    ink = pixels.min(axis=-1) < 235
    hist = np.zeros((len(images), 64))
    for i in range(len(images)):
        hist[i] = np.bincount(codes[i][ink[i]], minlength=64)
    hist /= np.maximum(hist.sum(axis=1, keepdims=True), 1)
    return np.sqrt(hist)


def class_match(features: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> float:
    """Share of images whose nearest class centroid (in colour-histogram space) is their own class."""
    dist = ((features[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((dist.argmin(1) == labels).mean())


def _loss_curve(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def _curve_summary(curve: list[dict]) -> str:
    picks = sorted({curve[0]["step"], *[curve[int(len(curve) * f) - 1]["step"] for f in (0.25, 0.5, 0.75, 1.0)]})
    by_step = {r["step"]: r["loss"] for r in curve}
    return ", ".join(f"step {s}: {by_step[s]:.3f}" for s in picks)


@torch.no_grad()
def sample_images(gpt, tokenizer, cond, mask, plan: Plan, seed: int) -> np.ndarray:
    """(B,) class ids or (B, L, D) captions -> (B, 64, 64, 3) uint8 samples.

    One generator seeded with `seed` draws for all images, SAMPLE_CHUNK at a time (not the per-image
    seeds of `argen sample`), so the demo's samples and the numbers in docs/example stay as they were."""
    params = SamplingParams(cfg_scale=plan.cfg_scale, temperature=plan.temperature, top_k=plan.top_k)
    gen = torch.Generator(device=gpt.tok_embeddings.weight.device).manual_seed(seed)
    tokens = torch.cat([generate(gpt, cond[start:start + SAMPLE_CHUNK],
                                 None if mask is None else mask[start:start + SAMPLE_CHUNK], params=params,
                                 generator=gen) for start in range(0, len(cond), SAMPLE_CHUNK)])  # (B, N)
    return decode_codes(tokenizer, tokens, chunk=SAMPLE_CHUNK)


def _side_by_side(ref_rows: list[np.ndarray], samples: np.ndarray, per_row: int) -> np.ndarray:
    """Rows of up to REFS reference images, a grey bar, then `per_row` samples: one uint8 image."""
    refs = []
    for row in ref_rows:
        pad = np.full((REFS - len(row), 64, 64, 3), 255, np.uint8)
        refs.append(np.concatenate([row.reshape(-1, 64, 64, 3), pad]))
    left = make_grid(np.concatenate(refs), cols=REFS)
    right = make_grid(samples, cols=per_row)
    bar = np.full((left.shape[0], 6, 3), 160, np.uint8)
    return np.concatenate([left, bar, right], axis=1)


def _md_table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
@dataclass(frozen=True)
class DemoOptions:
    """What `argen demo` was asked for; None means the plan's value."""

    out: str = "runs/demo"
    device: str = "auto"
    seed: int = 0
    tokenizer: str | None = None
    c2i_steps: int | None = None
    t2i_steps: int | None = None
    tokenizer_steps: int | None = None
    batch_size: int | None = None
    samples_per_class: int | None = None
    limit: int | None = None
    progress: bool = True  # progress bars of the stages (the CLI applies argen's one progress rule)


def run_demo(options: DemoOptions) -> dict:
    """Run (or resume) every stage and return the metrics written to OUT/metrics.json."""
    started = time.perf_counter()
    device = parse_device(options.device)
    plan = GPU_PLAN if device.type == "cuda" else CPU_PLAN
    overrides = {k: v for k, v in (("c2i_steps", options.c2i_steps), ("t2i_steps", options.t2i_steps),
                                   ("tokenizer_steps", options.tokenizer_steps),
                                   ("samples_per_class", options.samples_per_class),
                                   ("batch_size", options.batch_size)) if v is not None}
    plan = replace(plan, **overrides)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    print(f"argen demo: {plan.name} plan on {device}; output in {out}")

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        result = fn(*a, progress=options.progress)
        timings[name] = time.perf_counter() - t0
        return result

    train_set, val_set = DemoDataset("train"), DemoDataset("val")
    if options.limit:
        train_set = train_set.subset(options.limit)
    _stage(f"1/6 tokenizer ({plan.tokenizer_config}, {plan.tokenizer_steps} steps)")
    tok_dir = timed("tokenizer", stage_tokenizer, out, plan, options.seed, options.tokenizer)
    tokenizer = load_tokenizer(tok_dir, device=device)
    _stage("2/6 codes")
    c2i_codes = timed("codes", stage_codes, out, tokenizer, train_set, device)
    _stage("3/6 caption features (MiniLM) and t2i codes")
    _, t2i_codes = timed("text", stage_text, out, train_set, c2i_codes)
    _stage(f"4/6 class-conditional generator ({plan.gpt_config}, {plan.c2i_steps} steps)")
    c2i_dir = timed("c2i", stage_generator, out, "c2i", c2i_codes, plan, plan.c2i_steps, options.seed, options.device,
                    tok_dir)
    _stage(f"5/6 text-conditional generator ({plan.gpt_config}, {plan.t2i_steps} steps)")
    t2i_dir = timed("t2i", stage_generator, out, "t2i", t2i_codes, plan, plan.t2i_steps, options.seed, options.device,
                    tok_dir)
    _stage("6/6 samples, metrics and report")
    t0 = time.perf_counter()
    metrics = write_report(out, plan, tokenizer, tok_dir, train_set, val_set, c2i_dir, t2i_dir, device, options.seed,
                           timings)
    timings["samples+report"] = time.perf_counter() - t0
    metrics["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    metrics["total_s"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out / "metrics.json", metrics)
    print(f"\ndone in {metrics['total_s']:.0f} s: {out / 'report.md'}")
    return metrics


def write_report(out: Path, plan: Plan, tokenizer, tok_dir: Path, train_set: DemoDataset, val_set: DemoDataset,
                 c2i_dir: Path, t2i_dir: Path, device: torch.device, seed: int, timings: dict) -> dict:
    images_dir = out / "images"
    names = train_set.class_names
    n = plan.samples_per_class
    # tokenizer reconstructions on validation images
    val = from_uint8(val_set.images[:: max(1, len(val_set) // 16)][:16]).to(device)
    with torch.no_grad():
        grid = 64 // tokenizer.downsample
        recon = to_uint8(tokenizer.decode(tokenizer.encode(val).view(-1, grid, grid)))
    real = to_uint8(val)
    psnr = float(psnr_uint8(real[None], recon[None])[0])  # over all 16 images together
    pairs = np.stack([real, recon], axis=1).reshape(-1, *real.shape[1:])
    save_png(make_grid(pairs, cols=8), images_dir / "tokenizer_reconstructions.png")

    # c2i: one row per class, real training images of the class on the left
    c2i = load_gpt(c2i_dir, device=device)
    labels = torch.arange(len(names)).repeat_interleave(n)
    samples = sample_images(c2i, tokenizer, labels.to(device), None, plan, seed)
    rng = np.random.default_rng(seed)
    refs = [rng.choice(np.nonzero(train_set.labels == c)[0], size=min(REFS, int((train_set.labels == c).sum())),
                       replace=False) for c in range(len(names))]
    save_png(_side_by_side([train_set.images[r] for r in refs], samples, n), images_dir / "c2i_samples.png")
    # a class missing from the (limited) training images gets a centroid nothing is near
    centroids = np.stack([color_features(train_set.images[train_set.labels == c]).mean(0)
                          if (train_set.labels == c).any() else np.full(64, 1e3) for c in range(len(names))])
    gen_match = class_match(color_features(samples), labels.numpy(), centroids)
    val_match = class_match(color_features(val_set.images), val_set.labels, centroids)

    # t2i: one row per prompt
    from argen.data.text_encoders import load_text_encoder

    t2i = load_gpt(t2i_dir, device=device)
    encoder = load_text_encoder("minilm")
    store_check = TextFeatureStore(out / "text-minilm")
    if store_check.dim != t2i.config.caption_dim:
        raise ArgenError("the t2i generator and the caption features disagree on the caption width")
    feats, mask = encoder.encode(PROMPTS, t2i.config.caption_len)
    feats = feats.repeat_interleave(n, dim=0).to(device)
    mask = mask.repeat_interleave(n, dim=0).to(device)
    t2i_samples = sample_images(t2i, tokenizer, feats, mask, plan, seed + 1)
    captions = [train_set.captions(i)[0] for i in range(len(train_set))]
    refs = [[i for i, c in enumerate(captions) if c == prompt][:REFS] for prompt in PROMPTS]
    save_png(_side_by_side([train_set.images[r] for r in refs], t2i_samples, n), images_dir / "t2i_samples.png")
    prompt_centroids = np.stack([color_features(train_set.images[r]).mean(0) if r else np.full(64, 1e3)
                                 for r in refs])
    prompt_match = class_match(color_features(t2i_samples), np.repeat(np.arange(len(PROMPTS)), n), prompt_centroids)

    c2i_curve, t2i_curve = _loss_curve(c2i_dir), _loss_curve(t2i_dir)
    metrics = {
        "plan": plan.__dict__,
        "device": str(device),
        "tokenizer_val_psnr_db": round(psnr, 2),
        "c2i_class_match": round(gen_match, 3),
        "val_real_class_match": round(val_match, 3),
        "chance_class_match": round(1 / len(names), 3),
        "t2i_prompt_match": round(prompt_match, 3),
        "chance_prompt_match": round(1 / len(PROMPTS), 3),
        "c2i_loss": {"first": c2i_curve[0]["loss"], "last": c2i_curve[-1]["loss"]},
        "t2i_loss": {"first": t2i_curve[0]["loss"], "last": t2i_curve[-1]["loss"]},
        "c2i_loss_curve": [(r["step"], round(r["loss"], 4)) for r in c2i_curve],
        "t2i_loss_curve": [(r["step"], round(r["loss"], 4)) for r in t2i_curve],
    }
    class_rows = [["row", "class", "training images"]]
    class_rows += [[str(c + 1), name, str(int((train_set.labels == c).sum()))] for c, name in enumerate(names)]
    prompt_rows = [["row", "prompt"]] + [[str(i + 1), p] for i, p in enumerate(PROMPTS)]
    timing_rows = [["stage", "seconds"]] + [[k, f"{v:.0f}"] for k, v in timings.items()]
    template = resources.files("argen.training").joinpath("templates/demo_report.md").read_text(encoding="utf-8")
    text = template.format(
        out=out, plan=plan, device=device, machine=platform.machine(), torch_version=torch.__version__,
        num_train=len(train_set), num_classes=len(names), seed=seed, refs=REFS, n=n,
        class_table=_md_table(class_rows), prompt_table=_md_table(prompt_rows), timing_table=_md_table(timing_rows),
        psnr=psnr, gen_match=gen_match, val_match=val_match, class_chance=1 / len(names), prompt_match=prompt_match,
        prompt_chance=1 / len(PROMPTS), c2i_curve=_curve_summary(c2i_curve), t2i_curve=_curve_summary(t2i_curve))
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(text))
    return metrics
