"""Benchmark the generation engine against the reference sampler on the same workload, same run.

GPU mode (default): GPT-B/L/XL at 256 and 384 px, batch 8 and 64 with guidance (cfg 4.0, top-k
2000), bf16, random weights. Reports per workload: engine first-call time (CUDA-graph capture
included), engine latency and images/s (best of --repeats), peak GPU memory, the eager reference
sampler's latency on the same workload, and the ratio.

    python benchmarks/bench_engine.py                      # CUDA, full grid
    python benchmarks/bench_engine.py --models GPT-B --sizes 384 --batches 8
    python benchmarks/bench_engine.py --cpu                # small configs on the CPU, float32

CPU mode: GPT-tiny/mini/small, batch 8 with guidance (cfg 4.0, top-k 100), float32; engine and
reference alternate and the best of --repeats is kept (the machine may be shared).
Random weights give the same cost as trained ones: every step does the same work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from argen.engine import Engine
from argen.models.gpt import GPT, gpt_config
from argen.sampling import reference_generate
from argen.sampling.logits import SamplingParams


def build(name: str, image_size: int | None, device, dtype, kind: str = "c2i") -> GPT:
    overrides = {"kind": kind} if image_size is None else {"image_size": image_size, "kind": kind}
    model = GPT(gpt_config(name, **overrides))
    torch.nn.init.normal_(model.output.weight, std=0.02)  # non-degenerate logits
    return model.eval().to(device=device, dtype=dtype)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
CLOCK = time.perf_counter


def timed(fn, device) -> float:
    sync(device)
    start = CLOCK()
    fn()
    sync(device)
    return CLOCK() - start


def run_workload(name, image_size, batch, args, device, dtype) -> dict:
    model = build(name, image_size, device, dtype, args.kind)
    cfg = model.config
    mask = None
    if cfg.kind == "c2i":
        cond = torch.arange(batch, device=device) % cfg.num_classes
    else:  # captions of different lengths, left padded
        g = torch.Generator().manual_seed(0)
        cond = torch.randn(batch, cfg.caption_len, cfg.caption_dim, generator=g)
        lengths = torch.randint(1, cfg.caption_len + 1, (batch,), generator=g)
        mask = (torch.arange(cfg.caption_len)[None, :] >= cfg.caption_len - lengths[:, None]).float()
        cond = (cond * mask[..., None]).to(device=device, dtype=dtype)
        mask = mask.to(device)
    params = SamplingParams(cfg_scale=args.cfg_scale, top_k=args.top_k)
    gen = torch.Generator(device=device)
    engine = Engine(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run_engine():
        engine.generate(cond, mask, params=params, generator=gen.manual_seed(0))

    def run_reference():
        reference_generate(model, cond, mask, cfg_scale=args.cfg_scale, top_k=args.top_k,
                           generator=gen.manual_seed(0))

    first = timed(run_engine, device)
    engine_times, ref_times = [], []
    for i in range(args.repeats):
        engine_times.append(timed(run_engine, device))
        if i < args.reference_repeats:
            ref_times.append(timed(run_reference, device))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    eng, ref = min(engine_times), min(ref_times) if ref_times else float("nan")
    row = {"model": name, "kind": cfg.kind, "image_size": cfg.image_size, "tokens": cfg.num_image_tokens,
           "batch": batch,
           "engine_s": eng, "engine_img_s": batch / eng, "engine_ms_per_step": eng / cfg.num_image_tokens * 1e3,
           "first_call_s": first, "peak_gib": peak, "reference_s": ref, "speedup": ref / eng}
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="CPU mode with small configs (float32)")
    parser.add_argument("--models", default=None, help="comma-separated configs (default by mode)")
    parser.add_argument("--sizes", default=None, help="comma-separated image sizes (GPU default 256,384)")
    parser.add_argument("--batches", default=None, help="comma-separated images per batch (GPU default 8,64)")
    parser.add_argument("--kind", choices=["c2i", "t2i"], default="c2i", help="c2i (default) or t2i")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--top-k", type=int, default=None, help="default 2000 GPU, 100 CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-repeats", type=int, default=None, help="default: GPU 1, CPU = repeats")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall (default) or process CPU time (steadier on a shared CPU; CPU mode only)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    if args.cpu:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(args.threads)
        models = (args.models or "GPT-tiny,GPT-mini,GPT-small").split(",")
        sizes = [None] if args.sizes is None else [int(s) for s in args.sizes.split(",")]
        batches = [int(b) for b in (args.batches or "8").split(",")]
        args.top_k = 100 if args.top_k is None else args.top_k
        args.reference_repeats = args.repeats if args.reference_repeats is None else args.reference_repeats
    else:
        if not torch.cuda.is_available():
            print("no CUDA device; use --cpu", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        models = (args.models or "GPT-B,GPT-L,GPT-XL").split(",")
        sizes = [int(s) for s in (args.sizes or "256,384").split(",")]
        batches = [int(b) for b in (args.batches or "8,64").split(",")]
        args.top_k = 2000 if args.top_k is None else args.top_k
        args.reference_repeats = 1 if args.reference_repeats is None else args.reference_repeats
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"# device: {device_name}; {args.kind}; dtype {str(dtype).replace('torch.', '')}; cfg {args.cfg_scale}; "
          f"top-k {args.top_k}; best of {args.repeats}; {args.clock} clock")
    print("| model | px | tokens | batch | engine s | img/s | ms/step | first call s | peak GiB | reference s | x |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for name in models:
        for size in sizes:
            for batch in batches:
                row = run_workload(name, size, batch, args, device, dtype)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the workload's model, cache and graphs are gone now
                rows.append(row)
                print(f"| {row['model']} | {row['image_size']} | {row['tokens']} | {row['batch']} | "
                      f"{row['engine_s']:.3f} | {row['engine_img_s']:.1f} | {row['engine_ms_per_step']:.2f} | "
                      f"{row['first_call_s']:.2f} | {row['peak_gib']:.2f} | {row['reference_s']:.3f} | "
                      f"{row['speedup']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
