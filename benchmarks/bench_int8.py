"""Int8 weight-only decoding on the CPU: speed and weight memory against fp32, and quality.

Speed (default): GPT-B c2i (random weights: every step does the same work), 2 images with guidance
(4 rows), top-k 2000, 256 tokens. Variants, run in alternation so that a shared machine's load hits
them alike, best (and median) of --repeats kept:
  reference fp32   the eager reference sampler (`argen.sampling.reference_generate`), float32
  engine fp32 / engine bf16
  engine int8 fp32 / engine int8 bf16   block linears int8, head in the model's dtype
  engine int8+head fp32 / bf16          the output head int8 too
Reports ms per token step, the ratio to the reference, the weights in MB, and the issue's target
(int8 >= 2.5x the reference fp32 sampler).

    python benchmarks/bench_int8.py --threads 2
    python benchmarks/bench_int8.py --variants "reference fp32,engine fp32,engine int8 bf16"

Quality (--quality GPT_CHECKPOINT): teacher-forced argmax agreement of the int8 model (head kept
and head quantised) with the float32 one, on --quality-images sequences the float32 engine samples
itself (cfg 4.0, top-k 100, classes in turn, or the zero caption for t2i). Target >= 99%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from argen.checkpoint import load_gpt, quantize_gpt
from argen.engine import Engine
from argen.models.gpt import GPT, gpt_config
from argen.nn.quant import weight_bytes
from argen.sampling import reference_generate
from argen.sampling.logits import SamplingParams

VARIANTS = ("reference fp32", "engine fp32", "engine bf16", "engine int8 fp32", "engine int8 bf16",
            "engine int8+head fp32", "engine int8+head bf16")
SPEEDUP_TARGET = 2.5
AGREEMENT_TARGET = 0.99
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_variant(base: GPT, name: str) -> GPT:
    """A copy of `base` (float32) as the variant `name` needs it."""
    model = GPT(base.config)
    model.load_state_dict(base.state_dict())
    model.eval()
    dtype = DTYPES[name.split()[-1]]
    if "int8" in name:
        quantize_gpt(model, "int8", head="+head" in name)
    return model.to(dtype=dtype)


def speed(args) -> int:
    torch.manual_seed(0)
    base = GPT(gpt_config(args.model)).eval()
    torch.nn.init.normal_(base.output.weight, std=0.02)  # non-degenerate logits
    names = [v.strip() for v in args.variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    models = {n: build_variant(base, n) for n in names}
    cond = torch.arange(args.images) % base.config.num_classes
    params = SamplingParams(cfg_scale=4.0, top_k=args.top_k)
    engines = {n: Engine(m) for n, m in models.items() if n.startswith("engine")}
    gen = torch.Generator()

    def run(name: str) -> None:
        if name.startswith("reference"):
            reference_generate(models[name], cond, cfg_scale=4.0, top_k=args.top_k, generator=gen.manual_seed(0),
                               max_new_tokens=args.tokens)
        else:
            engines[name].generate(cond, params=params, generator=gen.manual_seed(0), max_new_tokens=args.tokens)

    for name in names:  # warm-up: allocations, first-call dispatch
        run(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            start = time.perf_counter()
            run(name)
            times[name].append((time.perf_counter() - start) / args.tokens * 1e3)
    cfg = base.config
    print(f"# {cfg.name} c2i, {args.images} images + guidance ({2 * args.images} rows), top-k {args.top_k}, "
          f"{args.tokens} tokens, {args.threads} thread(s), torch {torch.__version__}; best and median of "
          f"{args.repeats}, variants in alternation")
    print("| variant | ms/step best | ms/step median | x reference fp32 (best) | weights MB |")
    print("| --- | --- | --- | --- | --- |")
    ref = min(times["reference fp32"]) if "reference fp32" in times else float("nan")
    for name in names:
        best = min(times[name])
        print(f"| {name} | {best:.1f} | {statistics.median(times[name]):.1f} | {ref / best:.2f} | "
              f"{weight_bytes(models[name]) / 2**20:.0f} |")
    int8 = [n for n in names if "int8" in n]
    if int8 and ref == ref:
        best_name = min(int8, key=lambda n: min(times[n]))
        ratio = ref / min(times[best_name])
        print(f"\n- target: int8 >= {SPEEDUP_TARGET}x the reference fp32 sampler: {best_name} {ratio:.2f}x: "
              f"{'met' if ratio >= SPEEDUP_TARGET else 'MISSED'}")
    return 0


@torch.no_grad()
def quality(args) -> int:
    fp32 = load_gpt(args.quality)
    cfg = fp32.config
    batch = args.quality_images
    if cfg.kind == "c2i":
        cond, mask = torch.arange(batch) % cfg.num_classes, None
    else:
        cond, mask = torch.zeros(batch, cfg.caption_len, cfg.caption_dim), torch.ones(batch, cfg.caption_len)
    tokens = Engine(fp32).generate(cond, mask, params=SamplingParams(cfg_scale=4.0, top_k=100),
                                   generator=torch.Generator().manual_seed(0))
    reference = fp32.logits(tokens, cond, mask).argmax(-1)  # (B, N)
    print(f"# {args.quality} ({cfg.name}, {cfg.kind}): teacher-forced argmax agreement with fp32, "
          f"{batch} self-sampled sequences x {cfg.num_image_tokens} tokens")
    worst = 1.0
    for name in ("bf16", "int8 fp32", "int8 bf16", "int8+head fp32", "int8+head bf16"):
        model = load_gpt(args.quality)
        if "int8" in name:
            quantize_gpt(model, "int8", head="+head" in name)
        model.to(dtype=DTYPES[name.split()[-1]])
        agree = (model.logits(tokens, cond, mask).argmax(-1) == reference).float().mean().item()
        if "int8" in name:
            worst = min(worst, agree)
        print(f"- {name}: {agree:.4f}")
    print(f"- target >= {AGREEMENT_TARGET} for int8: {'met' if worst >= AGREEMENT_TARGET else 'MISSED'} "
          f"(worst {worst:.4f})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="GPT-B")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256, help="token steps per run (default: the whole grid)")
    parser.add_argument("--top-k", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--quality", default=None, help="a generator checkpoint: run the quality check instead")
    parser.add_argument("--quality-images", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return quality(args) if args.quality else speed(args)


if __name__ == "__main__":
    sys.exit(main())
