"""Jacobi decoding v2 pieces (`benchmarks/speculate.py`), each on its own: forward passes per image, the
tokens gained per pass (histogram), and wall time one image at a time against plain decoding.

    python benchmarks/bench_speculate.py                       # bundled demo-c2i and demo-t2i
    python benchmarks/bench_speculate.py --kinds c2i --per-item 4 --batch-one 10 --json out.json
    python benchmarks/bench_speculate.py --kinds c2i --per-item 0 --quality-seeds 0,1,2,3 --quality-variant best

Variants (name: Spec(window, candidates, depth, groups, coupling)):
- base: Spec(8), the algorithm of `argen.engine.jacobi` (Gumbel-coupled redrafts, no tree);
- couple: maximal-coupling redrafts (SJD-PAC's adaptive continuation, in its exact form);
- tree-first: 4 candidates for the first unverified token, branches of depth 3;
- tree-all: 4 candidates at every spine position, depth 2;
- W16, W32: longer windows alone;
- best: W16 + maximal coupling + 4 candidates at every position, depth 3.
Models at their own recommended sampling settings (`SamplingParams.for_model`). Timings on a shared
CPU are noisy; each wall time is the total over the images of one pass.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from classifier_check import conditions as classifier_conditions
from classifier_check import paired_scores
from speculate import Spec, speculative_decode

from argen import generate, load_gpt
from argen.engine.jacobi import jacobi_decode
from argen.sampling import SamplingParams
from argen.utils.io import atomic_write_json

VARIANTS = {
    "base": Spec(8),
    "couple": Spec(8, coupling="max"),
    "tree-first": Spec(8, 4, 3, 1),
    "tree-all": Spec(8, 4, 2, 7),
    "W16": Spec(16),
    "W32": Spec(32),
    "best": Spec(16, 4, 3, 15, "max"),
}


def conditions(gpt, per_item: int):
    """Each class (c2i) or demo prompt (t2i), `per_item` times: (cond, mask or None)."""
    cond, mask, _ = classifier_conditions(gpt, per_item)
    return cond, mask


def passes(name: str, gpt, variants: dict, per_item: int, seed: int) -> list[dict]:
    cond, mask = conditions(gpt, per_item)
    params = SamplingParams.for_model(gpt)
    n = gpt.config.num_image_tokens
    ref = jacobi_decode(gpt, cond, mask, params, window=8, generator=torch.Generator().manual_seed(seed))
    ref_fpi = float(ref.forwards.double().mean())
    print(f"{name}: {len(cond)} images x {n} tokens, {params}; argen.engine.jacobi W=8: {ref_fpi:.2f} forwards/image "
          f"({n / ref_fpi:.2f}x fewer than plain)", flush=True)
    rows = [dict(model=name, variant="jacobi_decode W=8", forwards_per_image=round(ref_fpi, 2),
                 fewer=round(n / ref_fpi, 2))]
    for label, spec in variants.items():
        t0 = time.perf_counter()
        res = speculative_decode(gpt, cond, mask, params, spec, generator=torch.Generator().manual_seed(seed))
        seconds = time.perf_counter() - t0
        fpi = float(res.forwards.double().mean())
        hist = res.gained.tolist()
        total = max(sum(hist), 1)
        rows.append(dict(model=name, variant=label, spec=repr(spec), forwards_per_image=round(fpi, 2),
                         fewer=round(n / fpi, 2), gained=hist, rescues=res.rescues.tolist(),
                         one_token_passes=round(hist[1] / total, 3), batch_s=round(seconds, 2)))
        print(f"  {label:10s} {fpi:6.2f} forwards/image ({n / fpi:4.2f}x fewer); passes adding 1..W tokens "
              f"{hist[1:]}; 1-token passes {hist[1] / total:.0%}; rescues {res.rescues.tolist()}; "
              f"{seconds:.1f} s for the batch", flush=True)
    return rows


def batch_one(name: str, gpt, variants: dict, images: int) -> list[dict]:
    """Wall time of `images` conditions sampled one at a time: plain, argen.engine.jacobi, each variant."""
    cond, mask = conditions(gpt, 1)
    params = SamplingParams.for_model(gpt)
    picks = [(cond[i:i + 1], None if mask is None else mask[i:i + 1]) for i in range(min(images, len(cond)))]

    def total(fn) -> float:
        t0 = time.perf_counter()
        for i, (c, m) in enumerate(picks):
            fn(c, m, torch.Generator().manual_seed(i))
        return time.perf_counter() - t0

    generate(gpt, *picks[0], params=params, generator=torch.Generator().manual_seed(0))  # warm-up
    plain = total(lambda c, m, g: generate(gpt, c, m, params=params, generator=g))
    rows = [dict(model=name, variant="plain", wall_s=round(plain, 3))]
    print(f"{name}, batch 1 x {len(picks)} images: plain {plain:.2f} s", flush=True)
    runs = {"jacobi_decode W=8": lambda c, m, g: jacobi_decode(gpt, c, m, params, window=8, generator=g)}
    runs.update({label: (lambda c, m, g, s=spec: speculative_decode(gpt, c, m, params, s, generator=g))
                 for label, spec in variants.items()})
    for label, fn in runs.items():
        t = total(fn)
        rows.append(dict(model=name, variant=label, wall_s=round(t, 3), speedup=round(plain / t, 2)))
        print(f"  {label:18s} {t:.2f} s ({plain / t:.2f}x plain)", flush=True)
    return rows


def quality(gpt, variant: str, seeds: list[int], per_item: int = 8) -> list[dict]:
    """The bundled classifier's scores of plain samples and of the variant's, per seed, with the mean
    difference and its standard error (`classifier_check.paired_scores`)."""
    return paired_scores(gpt, {
        "plain": lambda c, m, p, g: generate(gpt, c, m, params=p, generator=g),
        variant: lambda c, m, p, g: speculative_decode(gpt, c, m, p, VARIANTS[variant], generator=g).tokens,
    }, seeds, per_item)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="c2i,t2i")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--per-item", type=int, default=4, help="images per class/prompt for the pass counts (0: none)")
    ap.add_argument("--batch-one", type=int, default=0, help="also time this many images one at a time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality-seeds", default="", help="seeds for the c2i classifier check (none by default)")
    ap.add_argument("--quality-variant", default="best")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    results: dict = {"passes": [], "batch_one": []}
    for kind in args.kinds.split(","):
        gpt = load_gpt(f"demo-{kind}")
        if args.per_item:
            results["passes"] += passes(f"demo-{kind}", gpt, variants, args.per_item, args.seed)
        if args.batch_one:
            results["batch_one"] += batch_one(f"demo-{kind}", gpt, variants, args.batch_one)
        if args.quality_seeds and kind == "c2i":
            results["quality"] = quality(gpt, args.quality_variant, [int(x) for x in args.quality_seeds.split(",")])
    if args.json:
        atomic_write_json(args.json, results)


if __name__ == "__main__":
    main()
