"""Int8 weight-only decoding on the CPU: speed and weight memory against fp32, and quality.

Speed (default): GPT-B c2i (random weights: every step does the same work), 2 images with guidance
(4 rows), top-k 2000, 256 tokens. Variants, run in alternation so that a shared machine's load hits
them alike, best (and median) of --repeats kept:
  reference fp32   the eager reference sampler (`argen.sampling.reference_generate`), float32
  engine fp32 / engine bf16
  engine int8 fp32 / engine int8 bf16   block linears int8, head in the model's dtype
  engine int8+head fp32 / bf16          the output head int8 too
  ... packed                            the float linears (the head) on oneDNN-packed weights (--cpu-kernels packed)
Reports ms per token step (wall clock, and CPU time of the process: steadier on a shared machine,
summed over the threads), the ratio to the reference, the weights in MB, and the issue's target
(int8 >= 2.5x the reference fp32 sampler, by wall clock).

    python benchmarks/bench_int8.py --threads 2
    python benchmarks/bench_int8.py --variants "reference fp32,engine fp32,engine int8 bf16"
    python benchmarks/bench_int8.py --device cuda --variants "engine bf16,engine int8 bf16"   # GPU check

Quality (--quality GPT_CHECKPOINT): teacher-forced argmax agreement of the int8 model (head kept
and head quantised) with the float32 one, on --quality-images sequences the float32 engine samples
itself (cfg 4.0, top-k 100, classes in turn; for t2i the learned empty caption). Target >= 99%.
With --classifier-seeds (a demo generator): the bundled classifier's scores of fp32 and int8 samples
(8 a class or prompt, the model's own settings) on those seeds, and whether they lie within 1 s.e.:

    python benchmarks/bench_int8.py --threads 1 --quality demo-c2i --classifier-seeds 0,1,2,3,4,5,6,7,8,9
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from argen.checkpoint import load_gpt, quantize_gpt
from argen.engine import Engine
from argen.models.gpt import GPT, gpt_config
from argen.nn.packed import pack_linears
from argen.nn.quant import weight_bytes
from argen.sampling import reference_generate
from argen.sampling.logits import SamplingParams

VARIANTS = ("reference fp32", "engine fp32", "engine bf16", "engine int8 fp32", "engine int8 bf16",
            "engine int8+head fp32", "engine int8+head bf16", "engine fp32 packed", "engine int8 fp32 packed",
            "engine int8 bf16 packed")
SPEEDUP_TARGET = 2.5
AGREEMENT_TARGET = 0.99
MARGIN = 0.05  # logits: top-2 gaps below this are near-ties that any rounding may flip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_variant(base: GPT, name: str, device) -> GPT:
    """A copy of `base` (float32, on the CPU) as the variant `name` needs it, on `device`."""
    model = GPT(base.config)
    model.load_state_dict(base.state_dict())
    model.eval()
    if "int8" in name:
        quantize_gpt(model, "int8", head="+head" in name)
    model.to(device=device, dtype=DTYPES[name.split()[-2 if name.endswith("packed") else -1]])
    return pack_linears(model) if name.endswith("packed") else model


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed(args) -> int:
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = GPT(gpt_config(args.model)).eval()
    torch.nn.init.normal_(base.output.weight, std=0.02)  # non-degenerate logits
    names = [v.strip() for v in args.variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    models = {n: build_variant(base, n, device) for n in names}
    cond = (torch.arange(args.images) % base.config.num_classes).to(device)
    params = SamplingParams(cfg_scale=4.0, top_k=args.top_k)
    engines = {n: Engine(m) for n, m in models.items() if n.startswith("engine")}
    gen = torch.Generator(device=device)

    def run(name: str) -> None:
        if name.startswith("reference"):
            reference_generate(models[name], cond, cfg_scale=4.0, top_k=args.top_k, generator=gen.manual_seed(0),
                               max_new_tokens=args.tokens)
        else:
            engines[name].generate(cond, params=params, generator=gen.manual_seed(0), max_new_tokens=args.tokens)
        sync(device)

    for name in names:  # warm-up: allocations, first-call dispatch, CUDA graph capture
        run(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            start, start_cpu = time.perf_counter(), time.process_time()
            run(name)
            times[name].append((time.perf_counter() - start) / args.tokens * 1e3)
            cpu[name].append((time.process_time() - start_cpu) / args.tokens * 1e3)
    cfg = base.config
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"# {cfg.name} c2i, {args.images} images + guidance ({2 * args.images} rows), top-k {args.top_k}, "
          f"{args.tokens} tokens; {where}, torch {torch.__version__}; best and median of {args.repeats}, "
          f"variants in alternation")
    print("| variant | ms/step best | ms/step median | x reference fp32 (best) | CPU ms/step best | x reference "
          "(CPU time) | weights MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    ref = min(times["reference fp32"]) if "reference fp32" in times else float("nan")
    ref_cpu = min(cpu["reference fp32"]) if "reference fp32" in cpu else float("nan")
    rows = []
    for name in names:
        best, best_cpu = min(times[name]), min(cpu[name])
        row = {"variant": name, "ms_per_step": best, "ms_per_step_median": statistics.median(times[name]),
               "speedup": ref / best, "cpu_ms_per_step": best_cpu, "cpu_speedup": ref_cpu / best_cpu,
               "weights_mb": weight_bytes(models[name]) / 2**20}
        rows.append(row)
        print(f"| {name} | {best:.1f} | {row['ms_per_step_median']:.1f} | {row['speedup']:.2f} | {best_cpu:.1f} | "
              f"{row['cpu_speedup']:.2f} | {row['weights_mb']:.1f} |")
    lines = []
    int8 = [n for n in names if "int8" in n]
    if int8 and ref == ref:
        best_name = min(int8, key=lambda n: min(times[n]))
        ratio = ref / min(times[best_name])
        lines.append(f"target: int8 >= {SPEEDUP_TARGET}x the reference fp32 sampler: {best_name} {ratio:.2f}x: "
                     f"{'met' if ratio >= SPEEDUP_TARGET else 'MISSED'}")
    for line in lines:
        print(f"- {line}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": where, "args": vars(args), "rows": rows, "targets": lines}, handle, indent=2)
    return 0


@torch.no_grad()
def quality(args) -> int:
    fp32 = load_gpt(args.quality)
    cfg = fp32.config
    batch = args.quality_images
    if cfg.kind == "c2i":
        cond, mask = torch.arange(batch) % cfg.num_classes, None
    else:
        cond, mask = fp32.null_condition(batch, "cpu").clone(), None  # the learned empty caption
    tokens = Engine(fp32).generate(cond, mask, params=SamplingParams(cfg_scale=4.0, top_k=100),
                                   generator=torch.Generator().manual_seed(0))
    logits = fp32.logits(tokens, cond, mask)  # (B, N, V)
    reference, probs = logits.argmax(-1), logits.softmax(-1)
    top2 = logits.topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > MARGIN  # (B, N): fp32's top two logits not near-tied
    print(f"# {args.quality} ({cfg.name}, {cfg.kind}): teacher-forced next-token predictions against fp32 on "
          f"{batch} sequences x {cfg.num_image_tokens} tokens that the fp32 model sampled itself; "
          f"{decisive.float().mean().item():.1%} of positions have fp32 top-2 logits > {MARGIN} apart")
    print("| model | argmax agreement | agreement where fp32 is decisive | mean total variation |")
    print("| --- | --- | --- | --- |")
    worst = 1.0
    for name in ("bf16", "int8 fp32", "int8 bf16", "int8+head fp32", "int8+head bf16"):
        model = load_gpt(args.quality)
        if "int8" in name:
            quantize_gpt(model, "int8", head="+head" in name)
        model.to(dtype=DTYPES[name.split()[-1]])
        out = model.logits(tokens, cond, mask)
        same = out.argmax(-1) == reference
        agree = same.float().mean().item()
        tv = 0.5 * (out.softmax(-1) - probs).abs().sum(-1).mean().item()
        if name.startswith("int8 "):
            worst = min(worst, agree)
        print(f"| {name} | {agree:.4f} | {same[decisive].float().mean().item():.4f} | {tv:.4f} |")
    print(f"\n- target: argmax agreement >= {AGREEMENT_TARGET} (int8, head kept): "
          f"{'met' if worst >= AGREEMENT_TARGET else 'MISSED'} (worst {worst:.4f})")
    if args.classifier_seeds:
        from classifier_check import paired_scores

        int8 = quantize_gpt(load_gpt(args.quality), "int8")
        print(f"\n# the bundled classifier's scores, fp32 against int8 fp32 (head kept), {args.quality}")
        paired_scores(fp32, {
            "fp32": lambda c, m, p, g: Engine(fp32).generate(c, m, params=p, generator=g),
            "int8": lambda c, m, p, g: Engine(int8).generate(c, m, params=p, generator=g),
        }, [int(s) for s in args.classifier_seeds.split(",")])
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
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--json", default=None, help="also write the speed rows here")
    parser.add_argument("--quality", default=None, help="a generator checkpoint: run the quality check instead")
    parser.add_argument("--quality-images", type=int, default=100)
    parser.add_argument("--classifier-seeds", default="",
                        help="with --quality on a demo generator: also the bundled classifier's scores of fp32 and "
                             "int8 samples on these seeds (comma-separated), paired")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return quality(args) if args.quality else speed(args)


if __name__ == "__main__":
    sys.exit(main())
