"""Training step time on the CPU under different settings, for both trainers.

Each trainer runs the demo's quick-plan shapes (tokenizer: VQ-demo, batch 16, 64 px, no GAN or LPIPS;
generator: GPT-demo c2i on random 8x8 codes of 512 entries, batch 64) for --steps steps per run.
A setting is a comma-free list of `key=value` pairs joined by `+`, applied to the trainer's config
(for example `precision=bf16+compile=1`); the extra key `threads` sets torch's thread count. Runs
alternate between the settings, --repeats times each, so a shared machine's load hits all alike; the
per-step times come from each run's log.jsonl (the first --skip steps, with oneDNN's primitive set-up
and compilation, are left out) and the median over all kept steps is reported per setting.

    python benchmarks/bench_train_step.py --trainer tokenizer --settings precision=fp32 precision=bf16
    python benchmarks/bench_train_step.py --trainer generator --settings precision=fp32 precision=bf16+compile=1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from argen.data.codes import CodeShardWriter
from argen.training.config import TokenizerTrainConfig, TrainConfig
from argen.training.generator import train
from argen.training.tokenizer import train_tokenizer


def _codes(root: Path, n: int = 512, grid: int = 8, codebook: int = 512) -> Path:
    rng = np.random.default_rng(0)
    meta = {"kind": "c2i", "codebook_size": codebook, "grid": [grid, grid], "image_size": grid * 8, "num_augs": 2,
            "num_classes": 10}
    writer = CodeShardWriter(root / "codes", meta)
    writer.write_shard(0, rng.integers(0, codebook, (n, 2, grid, grid)), rng.integers(0, 10, n))
    writer.finalize()
    return root / "codes"


def _parse_setting(text: str, config_type) -> tuple[int | None, dict]:
    """'precision=bf16+threads=2' -> (2, {'precision': 'bf16'}), values typed like the config's defaults."""
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    threads, overrides = None, {}
    for pair in filter(None, text.split("+")):
        key, _, value = pair.partition("=")
        if key == "threads":
            threads = int(value)
        elif key not in fields:
            raise SystemExit(f"unknown setting {key!r} for {config_type.__name__}")
        elif isinstance(fields[key].default, bool):
            overrides[key] = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(fields[key].default, int):
            overrides[key] = int(value)
        elif isinstance(fields[key].default, float):
            overrides[key] = float(value)
        else:
            overrides[key] = value
    return threads, overrides


def run_once(trainer: str, root: Path, steps: int, codes: Path | None, skip: int, overrides: dict) -> list[float]:
    out = Path(tempfile.mkdtemp(dir=root))
    if trainer == "tokenizer":
        base = dict(out=str(out), data="demo", config="VQ-demo", image_size=64, batch_size=16, max_steps=steps,
                    lr=5e-4, use_disc=False, perceptual_weight=0.0, ckpt_every=10 ** 6, log_every=1,
                    progress=False, device="cpu")
        cfg = TokenizerTrainConfig(**{**base, **overrides})
        train_tokenizer(cfg)
        key, per = "images_per_s", cfg.batch_size
    else:
        base = dict(codes=str(codes), out=str(out), config="GPT-demo", max_steps=steps, batch_size=64, lr=1e-3,
                    ckpt_every=10 ** 6, log_every=1, tensorboard=False, progress=False, device="cpu")
        cfg = TrainConfig(**{**base, **overrides})
        train(cfg)
        key, per = "tokens_per_s", cfg.batch_size * 64
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [per / r[key] for r in records][skip:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=["tokenizer", "generator"], default="tokenizer")
    parser.add_argument("--settings", nargs="+", default=["precision=fp32", "precision=bf16"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", type=int, default=3)
    args = parser.parse_args(argv)
    config_type = TokenizerTrainConfig if args.trainer == "tokenizer" else TrainConfig
    parsed = [_parse_setting(s, config_type) for s in args.settings]
    default_threads = torch.get_num_threads()
    times: dict[str, list[float]] = {s: [] for s in args.settings}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        codes = _codes(root) if args.trainer == "generator" else None
        for _ in range(args.repeats):
            for name, (threads, overrides) in zip(args.settings, parsed):
                torch.set_num_threads(threads or default_threads)
                times[name] += run_once(args.trainer, root, args.steps, codes, args.skip, overrides)
    torch.set_num_threads(default_threads)
    first = statistics.median(times[args.settings[0]])
    print(f"{args.trainer}: {args.steps} steps a run, {args.repeats} runs a setting, first {args.skip} steps left out")
    for name in args.settings:
        med = statistics.median(times[name])
        print(f"  {name:40s} median step {med * 1e3:7.1f} ms  ({first / med:.2f}x the first)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
