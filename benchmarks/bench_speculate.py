"""Jacobi decoding with draft trees and longer windows (`jacobi_decode(window=, tree=)`), each on its
own: forward passes per image, the tokens gained per pass (histogram) and the passes an alternative of
the tree rescued.

    python benchmarks/bench_speculate.py                       # bundled demo-c2i and demo-t2i
    python benchmarks/bench_speculate.py --kinds c2i --per-item 4 --json out.json

Wall time (batch 1, slots), the classifier's scores and the token-level check of the same variants
are `bench_jacobi.py --bundled --windows 8,8:4x3x1,8:4x2,16,16:4x3 ...`.

Variants (name: window, tree as candidates x depth [x groups]):
- base: W = 8, no tree (`decode="jacobi"`'s default);
- tree-first: W = 8, 4 candidates for the first unverified token only, branches of 3 tokens (4x3x1);
- tree-all: W = 8, 4 candidates at every spine position, branches of 2 tokens (4x2);
- W16: W = 16, no tree;
- best: W = 16 with 4 candidates at every position, branches of 3 tokens (4x3).
Models at their own recommended sampling settings (`SamplingParams.for_model`). The pass counts come
from `jacobi_decode`'s static batch with a step that also records each slot's gain per pass. Timings
on a shared CPU are noisy; each wall time is the total over the images of one pass.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from classifier_check import conditions as classifier_conditions

from argen import load_gpt
from argen.engine import Batches
from argen.engine.jacobi import JacobiStep
from argen.sampling import SamplingParams
from argen.utils.io import atomic_write_json

VARIANTS = {
    "base": (8, None),
    "tree-first": (8, "4x3x1"),
    "tree-all": (8, "4x2"),
    "W16": (16, None),
    "best": (16, "4x3"),
}


def variant(label: str) -> tuple[int, str | None]:
    """A --variants entry that is not a name: W or W:KxD[xG] -> (window, tree)."""
    window, _, tree = label.partition(":")
    return int(window), tree or None


class RecordedStep(JacobiStep):
    """`JacobiStep` that also records the tokens each active slot gained in each pass."""

    def __init__(self, window: int, tree, gains: list[int]):
        super().__init__(window, tree)
        self.gains = gains  # shared with the decoder's copy of the step

    def advance(self) -> None:
        before = [slot.steps for slot in self.decoder.slots]
        super().advance()
        self.gains += [slot.steps - b for slot, b in zip(self.decoder.slots, before)]


def conditions(gpt, per_item: int):
    """Each class (c2i) or demo prompt (t2i), `per_item` times: (cond, mask or None)."""
    cond, mask, _ = classifier_conditions(gpt, per_item)
    return cond, mask


def passes(name: str, gpt, variants: dict, per_item: int, seed: int) -> list[dict]:
    cond, mask = conditions(gpt, per_item)
    params = SamplingParams.for_model(gpt)
    n = gpt.config.num_image_tokens
    print(f"{name}: {len(cond)} images x {n} tokens, {params}", flush=True)
    rows = []
    for label, (window, tree) in variants.items():
        gains: list[int] = []
        t0 = time.perf_counter()
        # jacobi_decode's static batch (a fresh Batches: its decoder holds this recording step)
        res = Batches(gpt).run(cond, mask, params, generator=torch.Generator().manual_seed(seed),
                               step=RecordedStep(window, tree, gains))
        seconds = time.perf_counter() - t0
        fpi = float(res.forwards.double().mean())
        hist = torch.bincount(torch.tensor(gains, dtype=torch.long), minlength=window + 1).tolist()
        total = max(sum(hist), 1)
        rows.append(dict(model=name, variant=label, window=window, tree=tree, forwards_per_image=round(fpi, 2),
                         fewer=round(n / fpi, 2), gained=hist, rescued=res.rescued,
                         one_token_passes=round(hist[1] / total, 3), batch_s=round(seconds, 2)))
        print(f"  {label:10s} {fpi:6.2f} forwards/image ({n / fpi:4.2f}x fewer); passes adding 1..W tokens "
              f"{hist[1:]}; 1-token passes {hist[1] / total:.0%}; rescued {res.rescued} of {total} passes; "
              f"{seconds:.1f} s for the batch", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="c2i,t2i")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="names above, or W or W:KxD[xG] entries")
    ap.add_argument("--per-item", type=int, default=4, help="images per class/prompt for the pass counts (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {name: VARIANTS[name] if name in VARIANTS else variant(name) for name in args.variants.split(",")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    results: dict = {"passes": []}
    for kind in args.kinds.split(","):
        gpt = load_gpt(f"demo-{kind}")
        if args.per_item:
            results["passes"] += passes(f"demo-{kind}", gpt, variants, args.per_item, args.seed)
    if args.json:
        atomic_write_json(args.json, results)


if __name__ == "__main__":
    main()
