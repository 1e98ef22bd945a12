"""Remake the tokenizer `argen demo` uses by default (argen/data/demo/vq_demo.safetensors + .json).

Usage: python scripts/train_demo_tokenizer.py [--steps 3000] [--seed 0] [--work runs/demo-tokenizer]

Trains `VQ-demo` on the bundled emoji training split with the demo's own tokenizer stage and settings
(batch 16, lr 5e-4, no GAN, no LPIPS, dead-code restarts every 50 steps), for twice the steps a demo
run could afford, then copies the weights into the package. `argen demo --train-tokenizer` trains one
the same way inside the demo instead. About 141 ms a step on 2 CPU cores (7 minutes for 3,000 steps).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from argen.training.demo import CPU_PLAN, DEMO_TOKENIZER, stage_tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/demo-tokenizer")
    args = parser.parse_args(argv)
    work = Path(args.work)
    tok_dir = stage_tokenizer(work, replace(CPU_PLAN, tokenizer_steps=args.steps), args.seed, None, train=True)
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(tok_dir / f"tokenizer{suffix}", DEMO_TOKENIZER.with_suffix(suffix))
    print(f"wrote {DEMO_TOKENIZER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
