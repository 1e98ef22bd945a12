"""The quickstart pipeline behind `argen demo`: small models on the bundled emoji dataset.

`run_demo(DemoOptions(out="runs/demo"))` copies the small VQ tokenizer bundled with argen into
OUT/tokenizer (or, with `train_tokenizer`, trains one there), extracts codes, computes MiniLM caption
features, trains a class-conditional and a text-conditional generator, samples a grid per class and for
a few prompts over several seeds, scores them with the bundled classifier (`DemoScorer`), and writes
OUT/report.md (from the package template `training/templates/demo_report.md`) with the images, the
scores and the loss curves. `--quick` (the default) takes about 7 minutes on a 2-core CPU; with a GPU it
trains larger models for longer. Every stage reuses what an earlier run left in OUT, and OUT records
which tokenizer its codes came from.
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
import torch.nn.functional as F
from tqdm.auto import tqdm

from argen.checkpoint import load_gpt, load_tokenizer
from argen.checkpoint.bundled import default_generator
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
DEMO_TOKENIZER = Path(str(resources.files("argen.data") / "demo" / "vq_demo.safetensors"))
SCORE_SEEDS = 3  # sampling seeds the report's classifier scores average over


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


# batch 32: at equal compute, 900 steps of 32 scored 0.55 on the classifier where 450 of 64 scored 0.48;
# c2i gets more steps than t2i because its target (0.7x real accuracy) had the smaller margin
CPU_PLAN = Plan(name="quick (CPU)", tokenizer_config="VQ-demo", tokenizer_steps=1800, tokenizer_batch=16,
                tokenizer_lr=5e-4, gpt_config="GPT-demo", c2i_steps=1100, t2i_steps=1000, batch_size=32, lr=8e-3,
                warmup=20, dropout=0.0, samples_per_class=8, cfg_scale=3.0, temperature=0.8, top_k=50)
GPU_PLAN = Plan(name="GPU", tokenizer_config="VQ-demo", tokenizer_steps=6000, tokenizer_batch=64, tokenizer_lr=5e-4,
                gpt_config="GPT-demo-L", c2i_steps=6000, t2i_steps=6000, batch_size=256, lr=1e-3, warmup=200,
                dropout=0.1, samples_per_class=8, cfg_scale=3.0, temperature=0.8, top_k=50)


def _stage(title: str) -> None:
    print(f"\n== {title}", flush=True)


# ---------------------------------------------------------------------- stages
def stage_tokenizer(out: Path, plan: Plan, seed: int, given: str | None, progress: bool = True,
                    train: bool = False) -> Path:
    """The tokenizer the demo encodes with: `given`; else OUT/tokenizer if an earlier run left one; else a
    copy of the one bundled with argen (`DEMO_TOKENIZER`), or with `train` one trained there with the
    plan's settings."""
    import shutil

    from argen.utils.io import sha256_file

    if given:
        return Path(given)
    tok_dir = out / "tokenizer"
    file = tok_dir / "tokenizer.safetensors"
    if file.is_file():
        if train and sha256_file(file) == sha256_file(DEMO_TOKENIZER):
            raise ArgenError(f"{tok_dir} holds the bundled tokenizer; use another --out to train one")
        print(f"reusing {tok_dir}")
        return tok_dir
    if not train:
        if not DEMO_TOKENIZER.is_file():
            raise ArgenError(f"the bundled demo tokenizer {DEMO_TOKENIZER} is missing; pass --train-tokenizer")
        tok_dir.mkdir(parents=True, exist_ok=True)
        for suffix in (".json", ".safetensors"):  # the weights last: their presence marks a finished copy
            atomic_write(file.with_suffix(suffix), lambda tmp, s=suffix: shutil.copyfile(
                DEMO_TOKENIZER.with_suffix(s), tmp))
        print(f"using the bundled tokenizer (made by scripts/train_demo_tokenizer.py), copied to {tok_dir}; "
              "--train-tokenizer trains one instead")
        return tok_dir
    train_tokenizer(TokenizerTrainConfig(
        out=str(tok_dir), data="demo", config=plan.tokenizer_config, max_steps=plan.tokenizer_steps, seed=seed,
        batch_size=plan.tokenizer_batch, lr=plan.tokenizer_lr, use_disc=False, restart_dead_codes=50, resume=True,
        progress=progress))
    return tok_dir


def _probe_seconds(threads: int) -> float:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(shape, generator=gen) for shape in ((2048, 128), (128, 384), (2048, 384)))
    rounds = []
    for _ in range(6):
        t0 = time.perf_counter()
        for _ in range(10):
            (F.silu(a @ b) * c).sum()
        rounds.append(time.perf_counter() - t0)
    return float(np.median(rounds[1:]))  # the first round warms up; the median, as a busy core comes and goes


PROBE_MARGIN = 1.25  # 1 thread must beat all threads by this factor: near-equal timings are noise, not a busy CPU


def fastest_threads(most: int) -> int:
    """1 or `most` torch threads, whichever runs a small probe (the generators' matmul and SwiGLU shapes)
    faster right now, with 1 thread chosen only when it is `PROBE_MARGIN` times faster; leaves torch set
    to it. On a CPU shared with other jobs, OpenMP threads waiting for a busy core make every op several
    times slower: with one other busy process on the 2 cores a demo generator step took 446 ms at 2
    threads and 221 ms at 1 (162 against 249 ms when idle). Without the margin an idle machine sometimes
    measured the two within noise and ran a stage on 1 thread."""
    if most <= 1:
        torch.set_num_threads(1)
        return 1
    timings = {n: _probe_seconds(n) for n in (most, 1)}
    best = 1 if timings[1] * PROBE_MARGIN < timings[most] else most
    torch.set_num_threads(best)
    return best


def record_tokenizer(out: Path, tok_dir: Path, given: str | None) -> str:
    """Check that OUT's codes and generators belong to this tokenizer (refuse another one's), record it
    in OUT/tokenizer-used.json, and return how the report names it: given, bundled, or trained here."""
    from argen.utils.io import sha256_file

    file = tok_dir / "tokenizer.safetensors" if tok_dir.is_dir() else tok_dir
    record = out / "tokenizer-used.json"
    digest = sha256_file(file)
    if record.is_file():
        used = json.loads(record.read_text())
        if used.get("sha256") != digest:
            raise ArgenError(f"{out} holds codes and generators made with the tokenizer {used.get('path')}, not "
                             f"{file}; use another --out or delete {out}")
    elif (out / "codes-c2i").exists():
        raise ArgenError(f"{out} holds codes from an earlier argen version whose tokenizer is not recorded; use "
                         f"another --out or delete {out}")
    atomic_write_json(record, {"path": str(file), "sha256": digest})
    if given:
        return f"given ({given})"
    if digest == sha256_file(DEMO_TOKENIZER):
        return "bundled with argen (made by scripts/train_demo_tokenizer.py)"
    info = file.with_suffix(".json")
    steps = json.loads(info.read_text()).get("training", {}).get("steps", "?") if info.is_file() else "?"
    return f"trained in this run ({steps} steps)"


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


def _group_means(hits: np.ndarray, ids: np.ndarray, groups: int) -> list[float]:
    return [float(hits[ids == g].mean()) if (ids == g).any() else float("nan") for g in range(groups)]


class DemoScorer:
    """The report's scores for generated images, from the classifier shipped with argen
    (`argen.evaluation.demo_classifier`) and, beside it, the colour-histogram centroid test.

    - `c2i(images, labels)`: the classifier's accuracy on class-conditional samples, overall and per class;
    - `t2i(images, prompt_ids)`: the share of text-conditional samples whose nearest prompt, by cosine
      similarity of the classifier's pooled features to the mean features of the training images with
      exactly that caption (and their mirror images), is their own prompt; overall and per prompt;
    - `real(images, labels)`: the classifier's accuracy on real (or reconstructed) images.
    """

    def __init__(self, train_set: DemoDataset, classifier: str | None = None):
        from argen.evaluation.demo_classifier import embed, load_demo_classifier

        self.model, self.info = load_demo_classifier(classifier)
        if self.info.get("class_names") != train_set.class_names:
            raise ArgenError("the demo classifier was trained on other categories than the demo dataset's; "
                             "remake it with scripts/train_demo_classifier.py")
        self.num_classes = len(train_set.class_names)
        self.centroids = np.stack([color_features(train_set.images[train_set.labels == c]).mean(0)
                                   if (train_set.labels == c).any() else np.full(64, 1e3)
                                   for c in range(self.num_classes)])
        captions = [train_set.captions(i)[0] for i in range(len(train_set))]
        self.prompt_refs = [[i for i, c in enumerate(captions) if c == prompt] for prompt in PROMPTS]
        ref_images = train_set.images[[i for refs in self.prompt_refs for i in refs]]
        ref_ids = np.array([k for k, refs in enumerate(self.prompt_refs) for _ in refs], dtype=np.int64)
        self.ref_feats = np.concatenate([embed(self.model, ref_images), embed(self.model, ref_images[:, :, ::-1])])
        self.ref_ids = np.concatenate([ref_ids, ref_ids])  # the drawings and their mirror images
        self.prompt_centroids = np.stack([color_features(train_set.images[r]).mean(0) if r else np.full(64, 1e3)
                                          for r in self.prompt_refs])

    def real(self, images: np.ndarray, labels: np.ndarray) -> dict:
        from argen.evaluation.demo_classifier import accuracy, predict

        acc, per_class = accuracy(predict(self.model, images), labels, self.num_classes)
        return {"accuracy": acc, "per_class": per_class, "colour": class_match(color_features(images), labels,
                                                                              self.centroids)}

    def c2i(self, images: np.ndarray, labels: np.ndarray) -> dict:
        return self.real(images, labels)

    def t2i(self, images: np.ndarray, prompt_ids: np.ndarray) -> dict:
        from argen.evaluation.demo_classifier import embed, nearest_centroid

        if not len(self.ref_ids):
            raise ArgenError("no training image has one of the report's prompts as its caption")
        hits = nearest_centroid(embed(self.model, images), self.ref_feats, self.ref_ids) == prompt_ids
        return {"match": float(hits.mean()), "per_prompt": _group_means(hits, prompt_ids, len(PROMPTS)),
                "colour": class_match(color_features(images), prompt_ids, self.prompt_centroids)}


def mean_scores(runs: list[dict]) -> dict:
    """Per-key mean of several seeds' score dicts, lists element-wise; NaN (a class without images) stays NaN."""
    out = {}
    for key in runs[0]:
        values = np.array([r[key] for r in runs], dtype=float)  # (seeds,) or (seeds, groups)
        mean = values.mean(axis=0)
        out[key] = mean.tolist() if values.ndim > 1 else float(mean)
    return out


def _loss_curve(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def _curve_summary(curve: list[dict]) -> str:
    picks = sorted({curve[0]["step"], *[curve[int(len(curve) * f) - 1]["step"] for f in (0.25, 0.5, 0.75, 1.0)]})
    by_step = {r["step"]: r["loss"] for r in curve}
    return ", ".join(f"step {s}: {by_step[s]:.3f}" for s in picks)


@torch.no_grad()
def sample_images(gpt, tokenizer, cond, mask, params: SamplingParams, seed: int) -> np.ndarray:
    """(B,) class ids or (B, L, D) captions -> (B, 64, 64, 3) uint8 samples.

    One generator seeded with `seed` draws for all images, SAMPLE_CHUNK at a time (not the per-image
    seeds of `argen sample`), so the demo's samples and the numbers in docs/example stay as they were."""
    gen = torch.Generator(device=gpt.tok_embeddings.weight.device).manual_seed(seed)
    tokens = torch.cat([generate(gpt, cond[start:start + SAMPLE_CHUNK],
                                 None if mask is None else mask[start:start + SAMPLE_CHUNK], params=params,
                                 generator=gen) for start in range(0, len(cond), SAMPLE_CHUNK)])  # (B, N)
    return decode_codes(tokenizer, tokens)


def score_generators(c2i, t2i, tokenizer, scorer: DemoScorer, n: int, seed: int, params: dict,
                     device: torch.device) -> dict:
    """Sample `n` images per class (c2i) and per report prompt (t2i) for SCORE_SEEDS seeds, score them;
    `params` maps each kind to its SamplingParams. Returns the mean scores, the per-seed runs and the
    first seed's samples."""
    from argen.data.text_encoders import load_text_encoder

    labels = torch.arange(scorer.num_classes).repeat_interleave(n)
    feats, mask = load_text_encoder("minilm").encode(PROMPTS, t2i.config.caption_len)
    if feats.shape[-1] != t2i.config.caption_dim:
        raise ArgenError("the t2i generator and the MiniLM caption features disagree on the caption width")
    feats, mask = feats.repeat_interleave(n, dim=0).to(device), mask.repeat_interleave(n, dim=0).to(device)
    prompt_ids = np.repeat(np.arange(len(PROMPTS)), n)
    result = {"c2i_runs": [], "t2i_runs": []}
    for k in range(SCORE_SEEDS):
        samples = sample_images(c2i, tokenizer, labels.to(device), None, params["c2i"], seed + 2 * k)
        result["c2i_runs"].append(scorer.c2i(samples, labels.numpy()))
        t2i_samples = sample_images(t2i, tokenizer, feats, mask, params["t2i"], seed + 2 * k + 1)
        result["t2i_runs"].append(scorer.t2i(t2i_samples, prompt_ids))
        if k == 0:
            result["c2i_samples"], result["t2i_samples"] = samples, t2i_samples
    result["c2i"], result["t2i"] = mean_scores(result["c2i_runs"]), mean_scores(result["t2i_runs"])
    return result


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
    train_tokenizer: bool = False  # train one into OUT/tokenizer instead of using the bundled one
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

    most = torch.get_num_threads()
    threads: dict[str, int] = {}

    def timed(name, fn, *a, probe=True, **kw):
        if probe and device.type == "cpu":  # a busy CPU is faster with fewer threads; probed before each stage
            threads[name] = fastest_threads(most)
            if threads[name] < most:
                print(f"({name} runs on 1 thread: it measured faster than {most} just now, so another process "
                      "is probably using the CPU)")
        t0 = time.perf_counter()
        result = fn(*a, progress=options.progress, **kw)
        timings[name] = time.perf_counter() - t0
        return result

    train_set, val_set = DemoDataset("train"), DemoDataset("val")
    if options.limit:
        train_set = train_set.subset(options.limit)
    trains = options.train_tokenizer and not options.tokenizer
    _stage(f"1/6 tokenizer ({plan.tokenizer_config}" + (f", {plan.tokenizer_steps} steps)" if trains else ")"))
    tok_dir = timed("tokenizer", stage_tokenizer, out, plan, options.seed, options.tokenizer, train=trains,
                    probe=False)
    tokenizer_source = record_tokenizer(out, tok_dir, options.tokenizer)
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
    _stage("6/6 samples, scores and report")
    if device.type == "cpu":
        threads["samples+report"] = fastest_threads(most)
    t0 = time.perf_counter()
    metrics = write_report(out, plan, tokenizer, tokenizer_source, train_set, val_set, c2i_dir, t2i_dir, device,
                           options.seed, timings)
    timings["samples+report"] = time.perf_counter() - t0
    torch.set_num_threads(most)
    metrics["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    metrics["threads"] = threads
    metrics["total_s"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out / "metrics.json", metrics)
    print(f"\ndone in {metrics['total_s']:.0f} s: {out / 'report.md'}")
    print("next: `argen serve` (no flags) serves the generators bundled with argen; open http://127.0.0.1:8000/ "
          f"to draw emoji in the browser, or `argen serve --gpt {c2i_dir}` for the one this run trained")
    return metrics


def _pct(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.0%}"


def write_report(out: Path, plan: Plan, tokenizer, tokenizer_source: str, train_set: DemoDataset, val_set: DemoDataset,
                 c2i_dir: Path, t2i_dir: Path, device: torch.device, seed: int, timings: dict) -> dict:
    images_dir = out / "images"
    names = train_set.class_names
    n = plan.samples_per_class
    scorer = DemoScorer(train_set)
    # tokenizer reconstructions of every validation image; 16 of them in the figure
    with torch.no_grad():
        grid = 64 // tokenizer.downsample
        recon = np.concatenate([to_uint8(tokenizer.decode(tokenizer.encode(
            from_uint8(val_set.images[i:i + SAMPLE_CHUNK]).to(device)).view(-1, grid, grid)))
            for i in range(0, len(val_set), SAMPLE_CHUNK)])
    shown = np.arange(0, len(val_set), max(1, len(val_set) // 16))[:16]
    psnr = float(psnr_uint8(val_set.images[shown][None], recon[shown][None])[0])  # over the 16 images together
    pairs = np.stack([val_set.images[shown], recon[shown]], axis=1).reshape(-1, *recon.shape[1:])
    save_png(make_grid(pairs, cols=8), images_dir / "tokenizer_reconstructions.png")
    real = scorer.real(val_set.images, val_set.labels)
    real_recon = scorer.real(recon, val_set.labels)

    # one row per class (real training images of the class on the left) and per prompt; SCORE_SEEDS seeds
    if TextFeatureStore(out / "text-minilm").dim != 384:
        raise ArgenError("the demo's caption features are not MiniLM's (384 wide)")
    plan_params = SamplingParams(cfg_scale=plan.cfg_scale, temperature=plan.temperature, top_k=plan.top_k)
    fresh = score_generators(load_gpt(c2i_dir, device=device), load_gpt(t2i_dir, device=device), tokenizer, scorer,
                             n, seed, {"c2i": plan_params, "t2i": plan_params}, device)
    bundled_gpts = {kind: load_gpt(default_generator(kind), device=device) for kind in ("c2i", "t2i")}
    bundled = score_generators(bundled_gpts["c2i"], bundled_gpts["t2i"], load_tokenizer("demo-vq", device=device),
                               scorer, n, seed, {k: SamplingParams.for_model(g) for k, g in bundled_gpts.items()},
                               device)
    rng = np.random.default_rng(seed)
    refs = [rng.choice(np.nonzero(train_set.labels == c)[0], size=min(REFS, int((train_set.labels == c).sum())),
                       replace=False) for c in range(len(names))]
    prompt_refs = [train_set.images[r[:REFS]] for r in scorer.prompt_refs]
    for prefix, result in (("", fresh), ("bundled_", bundled)):
        save_png(_side_by_side([train_set.images[r] for r in refs], result["c2i_samples"], n),
                 images_dir / f"{prefix}c2i_samples.png")
        save_png(_side_by_side(prompt_refs, result["t2i_samples"], n), images_dir / f"{prefix}t2i_samples.png")
    c2i_runs, t2i_runs, c2i_scores, t2i_scores = fresh["c2i_runs"], fresh["t2i_runs"], fresh["c2i"], fresh["t2i"]
    bundled_ratio = bundled["c2i"]["accuracy"] / real["accuracy"] if real["accuracy"] else float("nan")

    c2i_curve, t2i_curve = _loss_curve(c2i_dir), _loss_curve(t2i_dir)
    ratio = c2i_scores["accuracy"] / real["accuracy"] if real["accuracy"] else float("nan")
    metrics = {
        "plan": plan.__dict__,
        "device": str(device),
        "tokenizer": tokenizer_source,
        "score_seeds": [seed + 2 * k for k in range(SCORE_SEEDS)],
        "tokenizer_val_psnr_db": round(psnr, 2),
        "classifier_val_accuracy": round(real["accuracy"], 3),
        "classifier_val_recon_accuracy": round(real_recon["accuracy"], 3),
        "c2i_classifier_accuracy": round(c2i_scores["accuracy"], 3),
        "c2i_classifier_accuracy_seeds": [round(r["accuracy"], 3) for r in c2i_runs],
        "c2i_to_real_accuracy_ratio": round(ratio, 3),
        "c2i_classifier_accuracy_per_class": dict(zip(names, [round(a, 3) for a in c2i_scores["per_class"]])),
        "classifier_val_accuracy_per_class": dict(zip(names, [round(a, 3) for a in real["per_class"]])),
        "chance_class": round(1 / len(names), 3),
        "t2i_prompt_match": round(t2i_scores["match"], 3),
        "t2i_prompt_match_seeds": [round(r["match"], 3) for r in t2i_runs],
        "t2i_prompt_match_per_prompt": dict(zip(PROMPTS, [round(a, 3) for a in t2i_scores["per_prompt"]])),
        "chance_prompt": round(1 / len(PROMPTS), 3),
        "c2i_colour_match": round(c2i_scores["colour"], 3),
        "val_real_colour_match": round(real["colour"], 3),
        "t2i_colour_match": round(t2i_scores["colour"], 3),
        "c2i_loss": {"first": c2i_curve[0]["loss"], "last": c2i_curve[-1]["loss"]},
        "t2i_loss": {"first": t2i_curve[0]["loss"], "last": t2i_curve[-1]["loss"]},
        "c2i_loss_curve": [(r["step"], round(r["loss"], 4)) for r in c2i_curve],
        "t2i_loss_curve": [(r["step"], round(r["loss"], 4)) for r in t2i_curve],
        "bundled": {
            "sampling": {k: SamplingParams.for_model(g).to_dict() for k, g in bundled_gpts.items()},
            "c2i_classifier_accuracy": round(bundled["c2i"]["accuracy"], 3),
            "c2i_classifier_accuracy_seeds": [round(r["accuracy"], 3) for r in bundled["c2i_runs"]],
            "c2i_to_real_accuracy_ratio": round(bundled_ratio, 3),
            "c2i_classifier_accuracy_per_class": dict(zip(names, [round(a, 3)
                                                                  for a in bundled["c2i"]["per_class"]])),
            "t2i_prompt_match": round(bundled["t2i"]["match"], 3),
            "t2i_prompt_match_seeds": [round(r["match"], 3) for r in bundled["t2i_runs"]],
            "t2i_prompt_match_per_prompt": dict(zip(PROMPTS, [round(a, 3) for a in bundled["t2i"]["per_prompt"]])),
        },
    }
    class_rows = [["row", "class", "training images", "classifier on real val", "on c2i samples",
                   "on the bundled generator's"]]
    class_rows += [[str(c + 1), name, str(int((train_set.labels == c).sum())), _pct(real["per_class"][c]),
                    _pct(c2i_scores["per_class"][c]), _pct(bundled["c2i"]["per_class"][c])]
                   for c, name in enumerate(names)]
    prompt_rows = [["row", "prompt", "prompt match", "the bundled generator's"]]
    prompt_rows += [[str(i + 1), p, _pct(t2i_scores["per_prompt"][i]), _pct(bundled["t2i"]["per_prompt"][i])]
                    for i, p in enumerate(PROMPTS)]
    b = metrics["bundled"]["sampling"]["c2i"]
    timing_rows = [["stage", "seconds"]] + [[k, f"{v:.0f}"] for k, v in timings.items()]
    template = resources.files("argen.training").joinpath("templates/demo_report.md").read_text(encoding="utf-8")
    text = template.format(
        out=out, plan=plan, device=device, tokenizer_source=tokenizer_source, machine=platform.machine(),
        torch_version=torch.__version__,
        num_train=len(train_set), num_classes=len(names), seed=seed, refs=REFS, n=n, seeds=SCORE_SEEDS,
        class_table=_md_table(class_rows), prompt_table=_md_table(prompt_rows), timing_table=_md_table(timing_rows),
        psnr=psnr, real_acc=real["accuracy"], recon_acc=real_recon["accuracy"], gen_acc=c2i_scores["accuracy"],
        ratio=ratio, class_chance=1 / len(names), prompt_match=t2i_scores["match"], prompt_chance=1 / len(PROMPTS),
        gen_colour=c2i_scores["colour"], val_colour=real["colour"], prompt_colour=t2i_scores["colour"],
        num_val=len(val_set), c2i_curve=_curve_summary(c2i_curve), t2i_curve=_curve_summary(t2i_curve),
        bundled_acc=bundled["c2i"]["accuracy"], bundled_ratio=bundled_ratio, bundled_match=bundled["t2i"]["match"],
        bundled_cfg=b["cfg_scale"], bundled_temperature=b["temperature"], bundled_top_k=b["top_k"])
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(text))
    return metrics
