"""Training step time on the CPU with and without torch's deterministic algorithms, for both trainers.

Each trainer runs the demo's quick-plan shapes (tokenizer: VQ-demo, batch 16, 64 px, no GAN or LPIPS;
generator: GPT-demo c2i on random 8x8 codes of 512 entries, batch 64) for --steps steps per run.
Runs alternate between the two settings, --repeats times each, so a shared machine's load hits both
alike; the per-step times come from each run's log.jsonl (the first --skip steps, with oneDNN's
primitive set-up, are left out) and the median over all kept steps is reported per setting.

    python benchmarks/bench_train_step.py --trainer tokenizer --steps 12 --repeats 3
    python benchmarks/bench_train_step.py --trainer generator --threads 2

The trainers always enable deterministic algorithms on the CPU; for the "off" rows this script
replaces `argen.training.parts.training_scope` by one that leaves them off, to measure the cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from argen.data.codes import CodeShardWriter
from argen.training import parts
from argen.training.config import TokenizerTrainConfig, TrainConfig
from argen.training.generator import train
from argen.training.tokenizer import train_tokenizer

_REAL_SCOPE = parts.training_scope


def _scope(enabled: bool):
    @contextlib.contextmanager
    def scope(deterministic, device):
        with _REAL_SCOPE(deterministic, device):
            torch.use_deterministic_algorithms(enabled)
            yield
    return scope


def _codes(root: Path, n: int = 512, grid: int = 8, codebook: int = 512) -> Path:
    rng = np.random.default_rng(0)
    meta = {"kind": "c2i", "codebook_size": codebook, "grid": [grid, grid], "image_size": grid * 8, "num_augs": 2,
            "num_classes": 10}
    writer = CodeShardWriter(root / "codes", meta)
    writer.write_shard(0, rng.integers(0, codebook, (n, 2, grid, grid)), rng.integers(0, 10, n))
    writer.finalize()
    return root / "codes"


def _step_times(out: Path, trainer: str, batch: int, tokens: int, skip: int) -> list[float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    if trainer == "tokenizer":
        times = [batch / r["images_per_s"] for r in records]
    else:
        times = [tokens / r["tokens_per_s"] for r in records]
    return times[skip:]


def run_once(trainer: str, root: Path, steps: int, codes: Path | None, skip: int) -> list[float]:
    out = Path(tempfile.mkdtemp(dir=root))
    if trainer == "tokenizer":
        train_tokenizer(TokenizerTrainConfig(out=str(out), data="demo", config="VQ-demo", image_size=64,
                                             batch_size=16, max_steps=steps, lr=5e-4, use_disc=False,
                                             perceptual_weight=0.0, ckpt_every=10 ** 6, log_every=1,
                                             progress=False, device="cpu"))
        return _step_times(out, trainer, 16, 0, skip)
    train(TrainConfig(codes=str(codes), out=str(out), config="GPT-demo", max_steps=steps, batch_size=64, lr=1e-3,
                      ckpt_every=10 ** 6, log_every=1, tensorboard=False, progress=False, device="cpu"))
    return _step_times(out, trainer, 64, 64 * 64, skip)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=["tokenizer", "generator"], default="tokenizer")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        codes = _codes(root) if args.trainer == "generator" else None
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for enabled in (False, True):
                parts.training_scope = _scope(enabled)
                try:
                    times[enabled] += run_once(args.trainer, root, args.steps, codes, args.skip)
                finally:
                    parts.training_scope = _REAL_SCOPE
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.trainer}: {args.threads} threads, {len(times[True])} steps per setting")
    print(f"  deterministic off: median step {off * 1e3:.1f} ms")
    print(f"  deterministic on:  median step {on * 1e3:.1f} ms ({(on / off - 1) * 100:+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
