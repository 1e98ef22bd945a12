"""Remake the generators that ship with argen (`demo-c2i`, `demo-t2i` in argen/data/demo/).

Usage:
    python scripts/train_demo_generators.py [--work runs/bundled] [--c2i-steps 6000] [--t2i-steps 6000]
    python scripts/train_demo_generators.py --work runs/bundled --export   # after training: into the package

Stages, each resumable (rerun the same command after an interruption):
1. codes: the bundled emoji training split encoded by the bundled tokenizer (`VQ-demo`), LlamaGen's 10
   copies per image (`extract-codes --ten-crop --flip`), and MiniLM features of each image's caption
   with t2i shards that point at them (the demo's own `stage_text`);
2. training: two `argen train` processes side by side, one thread each (on 2 cores that beats one
   after the other at 2 threads), fp32, batch 32, AdamW lr 1e-3 (8e-3 per 256) after 200 warm-up
   steps, cosine to 1e-4, dropout 0.05, EMA 0.999 (the final file holds the EMA weights);
3. `--export`: the two final generators, in float16, with their recommended sampling settings and
   provenance in the metadata, are written to argen/data/demo/gpt_demo_{c2i,t2i}.safetensors + .json.

CPU training is deterministic: the same command on the same code gives the same files.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

SETTINGS = {"batch_size": 32, "lr": 8e-3, "warmup": 200, "dropout": 0.05, "ema_decay": 0.999, "config": "GPT-demo"}
# Chosen on these generators by benchmarks/bench_bundled.py (BENCHMARKS.md, 2026-12-07): guidance 3-5 and
# temperature 0.8-1.0 at top-k 50 all scored within noise; this one had the best t2i prompt match.
SAMPLING = {"cfg_scale": 4.0, "temperature": 0.8, "top_k": 50, "top_p": 1.0}


def prepare_codes(work: Path) -> tuple[Path, Path]:
    import torch

    from argen.checkpoint import load_tokenizer
    from argen.data.datasets import DemoDataset
    from argen.data.extract import extract_codes
    from argen.training.demo import DEMO_TOKENIZER, stage_text

    torch.set_num_threads(2)
    data = DemoDataset(split="train")
    c2i = work / "codes-c2i"
    if not (c2i / "index.json").is_file():
        tokenizer = load_tokenizer(str(DEMO_TOKENIZER))
        extract_codes(tokenizer, data, c2i, image_size=64, ten_crop=True, flip=True, shard_size=1024,
                      batch_size=128)
    _, t2i = stage_text(work, data, c2i)
    return c2i, t2i


def train_command(kind: str, codes: Path, work: Path, steps: int, seed: int) -> list[str]:
    s = SETTINGS
    cmd = [sys.executable, "-m", "argen.cli.main", "train", "--codes", str(codes), "--out", str(work / f"gpt-{kind}"),
           "--config", s["config"], "--max-steps", str(steps), "--resume", "--seed", str(seed),
           "--batch-size", str(s["batch_size"]), "--lr", str(s["lr"]), "--warmup", str(s["warmup"]),
           "--schedule", "cosine", "--min-lr-ratio", "0.1", "--dropout", str(s["dropout"]), "--precision", "fp32",
           "--ema", "--ema-decay", str(s["ema_decay"]), "--device", "cpu", "--ckpt-every", "500", "--log-every", "50",
           "--no-progress"]
    if kind == "t2i":
        cmd += ["--caption-len", "16"]  # the demo's short captions: 16 caption slots, as `argen demo`
    return cmd


def export(work: Path) -> None:
    from argen.checkpoint.bundled import export_bundled

    for kind in ("c2i", "t2i"):
        path = export_bundled(work / f"gpt-{kind}", kind, SAMPLING)
        print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bundled")
    parser.add_argument("--c2i-steps", type=int, default=6000)
    parser.add_argument("--t2i-steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", action="store_true", help="copy the trained generators into the package")
    args = parser.parse_args(argv)
    work = Path(args.work)
    if args.export:
        export(work)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    c2i, t2i = prepare_codes(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for kind, codes, steps in (("c2i", c2i, args.c2i_steps), ("t2i", t2i, args.t2i_steps)):
        log = open(work / f"train-{kind}.log", "a")
        procs.append(subprocess.Popen(train_command(kind, codes, work, steps, args.seed), env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
        print(f"training {kind}: {steps} steps, log in {work / f'train-{kind}.log'}")
    codes_ok = [p.wait() for p in procs]
    if any(codes_ok):
        print(f"training failed (exit codes {codes_ok}); see the logs", file=sys.stderr)
        return 1
    print(f"done; `python {sys.argv[0]} --work {work} --export` copies them into the package")
    return 0


if __name__ == "__main__":
    sys.exit(main())
