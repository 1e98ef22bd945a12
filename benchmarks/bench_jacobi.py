"""Speculative Jacobi decoding against plain decoding: forward passes, acceptance, wall time, quality.

    python benchmarks/bench_jacobi.py --demo /work/runs/demo                # demo generators
    python benchmarks/bench_jacobi.py --demo /work/runs/demo --quality-seeds 0,1,2
    python benchmarks/bench_jacobi.py --gpt-b --gpt-b-windows 4,8          # full-size GPT-B, random weights
    python benchmarks/bench_jacobi.py --bundled --windows 8,8:4x2,16,16:4x3 --per-item 0 --slots 4 --batch-one 10

`--bundled` takes the generators that ship with argen (`demo-c2i`, `demo-t2i`) at their own sampling
settings (`SamplingParams.for_model`) instead of a demo folder at the demo settings. A `--windows`
entry is W or W:KxD[xG], a window with a draft tree (`argen.engine.draft_tree`); `--tree` is the tree
of the entries without one and of the quality and token checks.

Sections (each optional):
- window sweep on the demo generators (`<demo>/gpt-c2i`, `<demo>/gpt-t2i`) at the demo's sampling
  settings (cfg 3.0, temperature 0.8, top-k 50): per window W, forward passes per image (prefill
  included; plain decoding needs one per token), the acceptance rate of verified drafts, and the
  wall time of one batch against `argen.generate` (decode="ar") on the same batch;
- quality: the demo report's scores (the bundled classifier's c2i accuracy and t2i prompt match, and
  the colour-centroid matches) for plain and Jacobi sampling over several seeds, with the demo
  report's image counts (8 per class/prompt);
- slots (`--slots S`): the server's continuous scheduler in process: the demo conditions x
  --slots-per-item as requests through `SlotDecoder` (plain) and `JacobiSlotDecoder` (each --windows W)
  with S slots, admitted as slots free up; wall time, slot steps (forwards) and acceptance;
- token check (`--token-check N`): N plain and N Jacobi samples of one c2i class, compared token by
  token (chi-square per position) and by per-image statistics;
- GPT-B (random weights, 256 tokens, cfg 4.0, top-k 2000, float32): wall time and forward passes.
  With random weights the acceptance rate says nothing about trained models; the wall time of a
  W-token verify forward against a one-token step is the point.
Timings on a shared CPU are noisy: each figure is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import numpy as np
import torch

from argen import generate, load_gpt, load_tokenizer
from argen.engine.jacobi import jacobi_decode
from argen.models.gpt import GPT, gpt_config
from argen.sampling import SamplingParams
from argen.utils.io import atomic_write_json

DEMO_SETTINGS = dict(cfg_scale=3.0, temperature=0.8, top_k=50)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _variants(text: str) -> list[str]:
    """--windows: "8,8:4x2,16" -> ["8", "8:4x2", "16"] (each checked by `jacobi_args`)."""
    labels = [x.strip() for x in text.split(",") if x.strip()]
    for label in labels:
        jacobi_args(label)
    return labels


def jacobi_args(label: str) -> dict:
    """A --windows entry, W or W:KxD[xG] -> jacobi_decode's window= and tree= (default --tree)."""
    from argen.engine.draft_tree import parse_tree

    window, _, tree = str(label).partition(":")
    return dict(window=int(window), tree=parse_tree(tree or TREE))


def demo_conditions(gpt: GPT, per_item: int):
    """The demo report's conditions: each class (c2i) or each demo prompt (t2i), `per_item` times."""
    from argen.training.demo import PROMPTS

    if gpt.config.kind == "c2i":
        return torch.arange(gpt.config.num_classes).repeat_interleave(per_item), None
    from argen.data.text_encoders import load_text_encoder

    feats, mask = load_text_encoder("minilm").encode(PROMPTS, gpt.config.caption_len)
    return feats.repeat_interleave(per_item, dim=0), mask.repeat_interleave(per_item, dim=0)


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def settings(gpt: GPT) -> SamplingParams:
    """The sampling settings of a run: the model's own (--bundled) or the demo report's."""
    return SamplingParams.for_model(gpt) if BUNDLED else SamplingParams(**DEMO_SETTINGS)


BUNDLED = False  # --bundled
TREE = None  # --tree: the draft tree of every Jacobi run


def window_sweep(name: str, gpt: GPT, windows: list[str], per_item: int, seed: int, repeats: int) -> list[dict]:
    cond, mask = demo_conditions(gpt, per_item)
    params = settings(gpt)
    n = gpt.config.num_image_tokens
    ar_s, _ = best_time(lambda: generate(gpt, cond, mask, params=params, generator=torch.Generator().manual_seed(seed)),
                        repeats)
    rows = [dict(model=name, images=len(cond), tokens=n, window="ar", forwards_per_image=float(n),
                 acceptance=None, wall_s=round(ar_s, 3), speedup_forwards=1.0, speedup_wall=1.0)]
    print(f"{name}: {len(cond)} images x {n} tokens, plain decoding {ar_s:.2f} s", flush=True)
    for w in windows:
        t, res = best_time(lambda w=w: jacobi_decode(gpt, cond, mask, params, **jacobi_args(w),
                                                     generator=torch.Generator().manual_seed(seed)), repeats)
        fpi = float(res.forwards.double().mean())
        row = dict(model=name, images=len(cond), tokens=n, window=w, forwards_per_image=round(fpi, 2),
                   acceptance=round(res.acceptance_rate, 3), wall_s=round(t, 3),
                   speedup_forwards=round(n / fpi, 2), speedup_wall=round(ar_s / t, 2),
                   batched_forwards=res.model_calls)
        rows.append(row)
        print(f"  W={w:>3s}: {fpi:6.2f} forwards/image ({n / fpi:4.2f}x fewer), acceptance {res.acceptance_rate:5.1%}, "
              f"{res.model_calls} batched forwards, {t:.2f} s ({ar_s / t:4.2f}x plain)", flush=True)
    return rows


def batch_one(name: str, gpt: GPT, windows: list[str], images: int, repeats: int = 1) -> list[dict]:
    """Latency: `images` demo conditions sampled one at a time, plain and Jacobi, total wall time
    (each image's plain and Jacobi runs back to back, `repeats` times over, so that a machine's load
    falls on both alike)."""
    cond, mask = demo_conditions(gpt, 1)
    params = settings(gpt)
    picks = [(cond[i:i + 1], None if mask is None else mask[i:i + 1]) for i in range(min(images, len(cond)))]
    n = gpt.config.num_image_tokens
    c, m = picks[0]  # warm-up: the engine's first call builds its cache
    generate(gpt, c, m, params=params, generator=torch.Generator().manual_seed(0))
    for w in windows:
        jacobi_decode(gpt, c, m, params, **jacobi_args(w), generator=torch.Generator().manual_seed(0))
    wall = {w: 0.0 for w in ["ar"] + windows}
    calls = {w: 0 for w in windows}
    for _ in range(repeats):
        for i, (c, m) in enumerate(picks):
            for w in ["ar"] + windows:
                t0 = time.perf_counter()
                if w == "ar":
                    generate(gpt, c, m, params=params, generator=torch.Generator().manual_seed(i))
                else:
                    calls[w] += jacobi_decode(gpt, c, m, params, **jacobi_args(w),
                                              generator=torch.Generator().manual_seed(i)).model_calls
                wall[w] += time.perf_counter() - t0
    ar_s, count = wall["ar"], len(picks) * repeats
    rows = [dict(model=name, batch=1, images=count, window="ar", wall_s=round(ar_s, 3))]
    print(f"{name}, batch 1 x {count} images: plain decoding {ar_s:.2f} s ({1000 * ar_s / count:.1f} ms an image)",
          flush=True)
    for w in windows:
        t = wall[w]
        rows.append(dict(model=name, batch=1, images=count, window=w, wall_s=round(t, 3),
                         forwards_per_image=round(calls[w] / count, 2),
                         speedup_wall=round(ar_s / t, 2)))
        print(f"  W={w:>3s}: {calls[w] / count:6.2f} forwards/image "
              f"({n * count / calls[w]:4.2f}x fewer), {t:.2f} s ({ar_s / t:4.2f}x plain)", flush=True)
    return rows


def slots(name: str, gpt: GPT, windows: list[str], per_item: int, num_slots: int, repeats: int) -> list[dict]:
    """The continuous scheduler: plain slots against Jacobi slots on the same requests."""
    from argen.engine import JacobiStep, SlotDecoder, SlotRequest

    cond, mask = demo_conditions(gpt, per_item)
    params = settings(gpt)

    def requests():
        return [SlotRequest(cond[i], None if mask is None else mask[i], params, torch.Generator().manual_seed(i))
                for i in range(len(cond))]

    def run(w):
        step = None if w == "ar" else JacobiStep(**jacobi_args(w))
        decoder = SlotDecoder(gpt, num_slots, step)
        t0 = time.perf_counter()
        decoder.run(requests())
        return time.perf_counter() - t0, decoder.counters

    best = {}
    for _ in range(repeats):  # interleaved, so that the machine's load falls on every decoder alike
        for w in ["ar"] + windows:
            t, counters = run(w)
            best[w] = min((t, counters), best.get(w, (float("inf"), None)), key=lambda x: x[0])
    rows = []
    for w in ["ar"] + windows:
        t, counters = best[w]
        row = dict(model=name, slots=num_slots, images=len(cond), window=w, wall_s=round(t, 3),
                   decode_steps=counters["decode_steps"], slot_steps=counters["slot_steps"],
                   acceptance=round(counters["accepted"] / max(counters["drafted"], 1), 3) if w != "ar" else None)
        if rows:
            row["speedup_wall"] = round(rows[0]["wall_s"] / t, 2)
            row["fewer_steps"] = round(rows[0]["decode_steps"] / counters["decode_steps"], 2)
        rows.append(row)
        print(f"{name}, {num_slots} slots, {len(cond)} requests, W={w}: {t:.2f} s, {counters['decode_steps']} steps"
              + (f" ({row['fewer_steps']}x fewer, {row['speedup_wall']}x the speed of plain slots), acceptance "
                 f"{row['acceptance']:.1%}" if w != "ar" else ""), flush=True)
    return rows


def quality(demo: Path, models: dict[str, GPT], window: int, seeds: list[int], per_item: int) -> list[dict]:
    """The demo report's scores for plain and Jacobi sampling, per seed: the bundled classifier's accuracy
    (c2i) and prompt match (t2i), and the colour-centroid match beside them (`training.demo.DemoScorer`)."""
    from argen.data.datasets import DemoDataset
    from argen.engine import decode_codes
    from argen.training.demo import DemoScorer

    tokenizer = load_tokenizer(demo / "tokenizer")
    scorer = DemoScorer(DemoDataset("train"))
    rows = []
    for kind, gpt in models.items():
        cond, mask = demo_conditions(gpt, per_item)
        groups = scorer.num_classes if kind == "c2i" else len(scorer.prompt_refs)
        labels = np.repeat(np.arange(groups), per_item)
        for seed in seeds:
            for decode in ("ar", "jacobi"):
                extra = dict(decode="jacobi", window=window) if decode == "jacobi" else {}
                codes = generate(gpt, cond, mask, generator=torch.Generator().manual_seed(seed), **DEMO_SETTINGS,
                                 **extra)
                images = decode_codes(tokenizer, codes)
                score = scorer.c2i(images, labels) if kind == "c2i" else scorer.t2i(images, labels)
                main_score = score["accuracy"] if kind == "c2i" else score["match"]
                rows.append(dict(model=kind, seed=seed, decode=decode, score=round(main_score, 3),
                                 colour=round(score["colour"], 3)))
                print(f"  {kind} seed {seed} {decode:6s}: classifier {main_score:.1%}, colour {score['colour']:.1%}",
                      flush=True)
    for kind in models:
        for decode in ("ar", "jacobi"):
            for key in ("score", "colour"):
                scores = [r[key] for r in rows if r["model"] == kind and r["decode"] == decode]
                spread = np.std(scores, ddof=1) if len(scores) > 1 else 0.0
                print(f"{kind} {decode:6s} {key:6s}: mean {np.mean(scores):.1%} (sd {spread:.1%}) over seeds {seeds}")
    return rows


def token_check(gpt: GPT, label: int, images: int, window: int) -> dict:
    """Plain against Jacobi on `images` samples of one class: chi-square p of each position's token
    marginal, and Mann-Whitney p of per-image statistics (background tokens, distinct tokens, repeats)."""
    from scipy.stats import chi2_contingency, mannwhitneyu

    cond = torch.full((images,), label)
    out = {}
    for seed, decode in ((1, "ar"), (2, "jacobi")):
        extra = dict(decode="jacobi", window=window, tree=TREE) if decode == "jacobi" else {}
        out[decode] = generate(gpt, cond, None, generator=torch.Generator().manual_seed(seed), params=settings(gpt),
                               **extra).numpy()  # (images, N)
    pvalues = []
    for pos in range(out["ar"].shape[1]):
        a, j = out["ar"][:, pos], out["jacobi"][:, pos]
        vals = np.unique(np.concatenate([a, j]))
        ca, cj = np.array([(a == v).sum() for v in vals]), np.array([(j == v).sum() for v in vals])
        keep = (ca + cj) >= 10  # rare tokens pooled into one cell
        table = np.stack([np.append(ca[keep], ca[~keep].sum()), np.append(cj[keep], cj[~keep].sum())])
        pvalues.append(float(chi2_contingency(table[:, table.sum(0) > 0])[1]))
    background = np.bincount(out["ar"].ravel()).argmax()
    stats = {"background tokens": lambda t: (t == background).sum(1),
             "distinct tokens": lambda t: np.array([len(set(r)) for r in t]),
             "repeats of the previous token": lambda t: (t[:, 1:] == t[:, :-1]).sum(1)}
    result = {"images": images, "label": label, "min_position_p": min(pvalues),
              "positions_below_0.05": int(sum(p < 0.05 for p in pvalues))}
    print(f"token check, class {label}, {images} images each: smallest per-position p {min(pvalues):.4f}, "
          f"{result['positions_below_0.05']} of {len(pvalues)} positions below 0.05")
    for name, fn in stats.items():
        a, j = fn(out["ar"]), fn(out["jacobi"])
        result[name] = {"ar": float(a.mean()), "jacobi": float(j.mean()), "p": float(mannwhitneyu(a, j).pvalue)}
        print(f"  {name}: plain {a.mean():.2f}, Jacobi {j.mean():.2f}, Mann-Whitney p {result[name]['p']:.3f}")
    return result


def forward_cost(name: str, gpt: GPT, sizes: list[int], repeats: int) -> list[dict]:
    """One image with guidance (2 rows): the model's cached forward of T tokens from a mid-image root,
    against T = 1 (best of `repeats` x 200 calls). Tokens past the grid sit at its last position and
    write to their own cache slots, as a draft tree's branches do. Bounds what Jacobi decoding can gain
    in wall time where the sampling work costs nothing: passes saved / this ratio."""
    cfg = gpt.config
    root = cfg.cond_len + cfg.num_image_tokens // 2
    cache = gpt.new_cache(2, root + max(sizes) + 1)
    rows, first = [], None
    with torch.inference_mode():
        for size in sizes:
            slots = torch.arange(root, root + size)
            positions = slots.clamp(max=cfg.cond_len + cfg.num_image_tokens - 1)
            keys = torch.arange(root + size)
            mask = (keys <= slots[:, None])[None, None].expand(2, 1, size, root + size) if size > 1 else None
            call = functools.partial(gpt.forward_cached, torch.randn(2, size, cfg.dim), positions, cache,
                                     root + size, mask, slots=slots if size > 1 else None)
            for _ in range(20):
                call()
            t, _ = best_time(functools.partial(lambda f: [f() for _ in range(200)], call), repeats)
            ms = 1000 * t / 200
            first = first or ms
            rows.append(dict(model=name, tokens=size, ms=round(ms, 3), vs_one=round(ms / first, 2)))
    print(f"{name}, one forward with guidance: " + ", ".join(f"T={r['tokens']} {r['ms']:.3f} ms ({r['vs_one']:.2f}x)"
                                                           for r in rows), flush=True)
    return rows


def bundled_quality(models: dict[str, GPT], window: int, seeds: list[int], per_item: int) -> list[dict]:
    """--bundled: the bundled classifier's scores of plain and Jacobi samples (window, TREE) on the same
    seeds, and whether their difference is within one standard error (`classifier_check`)."""
    from classifier_check import paired_scores

    def jacobi(cond, mask, params, gen):
        return generate(gpt, cond, mask, params=params, generator=gen, decode="jacobi", window=window, tree=TREE)

    def plain(cond, mask, params, gen):
        return generate(gpt, cond, mask, params=params, generator=gen)

    rows = []
    for kind, gpt in models.items():
        print(f"quality, demo-{kind}, W={window}, tree {TREE}:", flush=True)
        rows += [dict(model=kind, **row) for row in paired_scores(gpt, {"plain": plain, "jacobi": jacobi}, seeds,
                                                                  per_item)]
    return rows


def gpt_b(windows: list[int], images: int, repeats: int, tokens: int | None) -> list[dict]:
    torch.manual_seed(0)
    gpt = GPT(gpt_config("GPT-B")).eval()
    with torch.no_grad():  # the default init zeroes the head (flat logits): give it random weights
        torch.nn.init.normal_(gpt.output.weight, std=0.02)
    cond = torch.arange(images) * 7 % 1000
    params = SamplingParams(cfg_scale=4.0, top_k=2000)
    n = tokens or gpt.config.num_image_tokens
    ar_s, _ = best_time(lambda: generate(gpt, cond, params=params, max_new_tokens=n,
                                         generator=torch.Generator().manual_seed(0)), repeats)
    rows = [dict(model="GPT-B random", images=images, tokens=n, window="ar", wall_s=round(ar_s, 3),
                 forwards_per_image=float(n))]
    print(f"GPT-B (random weights), {images} images x {n} tokens, cfg 4.0, top-k 2000: plain {ar_s:.2f} s "
          f"({1000 * ar_s / n:.1f} ms/token)", flush=True)
    for w in windows:
        t, res = best_time(lambda w=w: jacobi_decode(gpt, cond, None, params, window=w, max_new_tokens=n,
                                                     generator=torch.Generator().manual_seed(0)), repeats)
        fpi = float(res.forwards.double().mean())
        rows.append(dict(model="GPT-B random", images=images, tokens=n, window=w, wall_s=round(t, 3),
                         forwards_per_image=round(fpi, 2), acceptance=round(res.acceptance_rate, 3),
                         ms_per_forward=round(1000 * t / res.model_calls, 1), speedup_wall=round(ar_s / t, 2)))
        print(f"  W={w:3d}: {fpi:6.2f} forwards/image, acceptance {res.acceptance_rate:5.1%}, {t:.2f} s "
              f"({1000 * t / res.model_calls:.1f} ms/forward, {ar_s / t:4.2f}x plain)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, help="an `argen demo` output folder (gpt-c2i, gpt-t2i, tokenizer)")
    ap.add_argument("--bundled", action="store_true", help="the bundled demo-c2i / demo-t2i at their own settings")
    ap.add_argument("--tree", default=None, help="a draft tree KxD[xG] for every Jacobi run (default none)")
    ap.add_argument("--kinds", default="c2i,t2i", help="which demo generators (default c2i,t2i)")
    ap.add_argument("--windows", type=_variants, default=["2", "4", "8", "12", "16"],
                    help="W or W:KxD[xG] (a window with a draft tree), comma-separated")
    ap.add_argument("--per-item", type=int, default=2, help="images per class/prompt in the window sweep (0: no sweep)")
    ap.add_argument("--sweep-seed", type=int, default=0)
    ap.add_argument("--slots", type=int, default=0, help="also compare plain and Jacobi slot decoders (continuous "
                    "batching) with this many slots on the demo conditions x --slots-per-item")
    ap.add_argument("--slots-per-item", type=int, default=4, help="requests per class/prompt for --slots")
    ap.add_argument("--batch-one", type=int, default=0, help="also time this many images one at a time")
    ap.add_argument("--forward-cost", type=_ints, default=[], help="also time one forward of these token counts "
                    "(e.g. 1,8,16,50,151: the first is the reference)")
    ap.add_argument("--quality-seeds", type=_ints, default=[], help="seeds for the class/prompt match check")
    ap.add_argument("--quality-window", type=int, default=None, help="default: argen's DEFAULT_WINDOW")
    ap.add_argument("--token-check", type=int, default=0, help="images per decoder for the token-level check "
                    "of one c2i class (0: none)")
    ap.add_argument("--token-check-class", type=int, default=7)
    ap.add_argument("--gpt-b", action="store_true")
    ap.add_argument("--gpt-b-windows", type=_ints, default=[4, 8])
    ap.add_argument("--gpt-b-images", type=int, default=2)
    ap.add_argument("--gpt-b-tokens", type=int, default=None, help="tokens per image (default: all 256)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {now}")
    results: dict = {}
    global BUNDLED, TREE
    BUNDLED, TREE = args.bundled, args.tree
    if args.demo or args.bundled:
        models = {kind: load_gpt(f"demo-{kind}" if args.bundled else args.demo / f"gpt-{kind}")
                  for kind in args.kinds.split(",")}
        if args.per_item:
            results["sweep"] = [row for kind, gpt in models.items()
                                for row in window_sweep(f"demo {kind}", gpt, args.windows, args.per_item,
                                                        args.sweep_seed, args.repeats)]
        if args.slots:
            results["slots"] = [row for kind, gpt in models.items()
                                for row in slots(f"demo {kind}", gpt, args.windows, args.slots_per_item, args.slots,
                                                 args.repeats)]
        if args.forward_cost:
            results["forward_cost"] = [row for kind, gpt in models.items()
                                       for row in forward_cost(f"demo {kind}", gpt, args.forward_cost,
                                                               max(args.repeats, 5))]
        if args.batch_one:
            results["batch_one"] = [row for kind, gpt in models.items()
                                    for row in batch_one(f"demo {kind}", gpt, args.windows, args.batch_one,
                                                         args.repeats)]
        if args.quality_seeds:
            from argen.engine.jacobi import DEFAULT_WINDOW

            window = args.quality_window or DEFAULT_WINDOW
            results["quality"] = (bundled_quality(models, window, args.quality_seeds, per_item=8) if args.bundled
                                  else quality(args.demo, models, window, args.quality_seeds, per_item=8))
        if args.token_check and "c2i" in models:
            from argen.engine.jacobi import DEFAULT_WINDOW

            results["token_check"] = token_check(models["c2i"], args.token_check_class, args.token_check,
                                                 args.quality_window or DEFAULT_WINDOW)
    if args.gpt_b:
        results["gpt_b"] = gpt_b(args.gpt_b_windows, args.gpt_b_images, args.repeats, args.gpt_b_tokens)
    if args.json:
        atomic_write_json(args.json, results)


if __name__ == "__main__":
    main()
