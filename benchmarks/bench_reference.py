"""The comparison baseline: argen's reference sampler (the plain KV-cache loop) eager and compiled.

`argen.sampling.reference_generate` is the loop that matches LlamaGen's `generate`. This script
times it per workload (model, image size, batch) twice: eager, and with the model's per-step
forward (`GPT.forward_cached`, the call the loop makes once per token) wrapped by
`torch.compile(mode="reduce-overhead")`, which is what LlamaGen's own compile option does to its
per-token step. The compiled loop's first call (compilation and CUDA-graph recording included) is
reported apart from its best steady call. Random weights (the output head re-drawn so that the
logits are not flat): every step costs what a trained model's does.

    python benchmarks/bench_reference.py                                   # CUDA, bf16, GPT-B/XL, 384 px, batch 8
    python benchmarks/bench_reference.py --models GPT-B --batches 8,64 --json ref.json
    python benchmarks/bench_reference.py --cpu --models GPT-tiny --batches 2 --tokens 8   # smoke run

The loop slices the cache to the filled length, so the compiled step sees a new key length every
token: dynamo marks it dynamic after the first recompile and the CUDA-graph trees record one graph
per length during the first call; later calls replay them. A workload that fails is reported and
the run goes on; --budget-s skips workloads (or the compiled half) that would start after it. The
JSON file is rewritten after every workload.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback

import torch
from torch._dynamo.utils import counters

from argen.models.gpt import GPT, gpt_config
from argen.sampling import reference_generate


def build(name: str, image_size: int | None, device, dtype) -> GPT:
    overrides = {} if image_size is None else {"image_size": image_size}
    with torch.device(device):
        model = GPT(gpt_config(name, **overrides))
        torch.nn.init.normal_(model.output.weight, std=0.02)  # the default init zeroes the head
    return model.eval().to(dtype=dtype)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def run_loop(model: GPT, batch: int, args, device, tokens: int | None = None) -> None:
    cond = torch.arange(batch, device=device) % model.config.num_classes  # (B,)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():
        reference_generate(model, cond, cfg_scale=args.cfg_scale, top_k=args.top_k, generator=gen,
                           max_new_tokens=tokens or args.tokens)


def workload(model: GPT, batch: int, args, device, deadline: float, partial=lambda row: None) -> dict:
    """One (model, batch) row; `partial(row)` is called with the eager half before compiling starts."""
    tokens = args.tokens or model.config.num_image_tokens
    row = {"model": model.config.name, "image_size": model.config.image_size, "batch": batch, "tokens": tokens}
    run_loop(model, batch, args, device, tokens=min(8, tokens))  # warm-up (kernel selection, allocator)
    row["eager_s"] = min(timed(lambda: run_loop(model, batch, args, device), device)
                         for _ in range(args.eager_repeats or args.repeats))
    if args.no_compile:
        return row
    partial({**row, "note": "compiled loop not finished"})
    if time.perf_counter() > deadline:
        row["note"] = "compiled loop skipped (time budget)"
        return row
    torch._dynamo.reset()
    counters.clear()
    eager_step = model.forward_cached
    model.forward_cached = torch.compile(eager_step, mode=args.compile_mode)
    try:
        row["compiled_first_s"] = timed(lambda: run_loop(model, batch, args, device), device)
        times = []
        for _ in range(args.repeats):
            times.append(timed(lambda: run_loop(model, batch, args, device), device))
            if time.perf_counter() > deadline:
                break
        row["compiled_s"] = min(times)
        row["compiled_repeats"] = len(times)
        row["dynamo_stats"] = dict(counters["stats"])  # unique_graphs: compilations, recompiles included
        skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
        if skips:  # e.g. cudagraph_skips: the graphs were not used (the step mutates its cache argument)
            row["note"] = f"inductor counters {skips}"
    finally:
        del model.forward_cached  # back to the class's method
        torch._dynamo.reset()
    row["compiled_speedup"] = row["eager_s"] / row["compiled_s"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU in float32 (smoke runs)")
    parser.add_argument("--models", default="GPT-B,GPT-XL")
    parser.add_argument("--sizes", default="384", help="comma-separated image sizes ('-': the config's own)")
    parser.add_argument("--batches", default="8", help="images per batch (with guidance: twice the sequences)")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--top-k", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per image (default: the whole grid)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the warm-up (best kept)")
    parser.add_argument("--eager-repeats", type=int, default=None, help="timed eager calls (default --repeats)")
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--no-compile", action="store_true", help="eager loop only")
    parser.add_argument("--budget-s", type=float, default=math.inf, help="start nothing new after this many s")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.cpu:
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    else:
        print("no CUDA device; use --cpu", file=sys.stderr)
        return 2
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (f"# reference loop: {where}; torch {torch.__version__}; {str(dtype).replace('torch.', '')}; "
              f"cfg {args.cfg_scale}; top-k {args.top_k}; best of {args.repeats}; compile mode {args.compile_mode}")
    print(header)
    print("| model | px | batch | tokens | eager s | compiled first call s | compiled s | compiled/eager x |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    deadline = time.perf_counter() + args.budget_s

    def save(rows_so_far: list[dict]) -> None:  # rewritten after every workload (and before compiling)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"header": header, "args": vars(args), "rows": rows_so_far}, handle, indent=2,
                          default=str)

    rows: list[dict] = []
    failed = False
    sizes = [None if s == "-" else int(s) for s in args.sizes.split(",")]
    for name in args.models.split(","):
        for size in sizes:
            model = None
            for batch in (int(b) for b in args.batches.split(",")):
                if time.perf_counter() > deadline:
                    row = {"model": name, "image_size": size, "batch": batch, "error": "skipped (time budget)"}
                else:
                    try:
                        if model is None:
                            model = build(name, size, device, dtype)
                        row = workload(model, batch, args, device, deadline,
                                       partial=lambda r: save(rows + [r]))
                    except Exception as exc:  # noqa: BLE001 - report it and go on with the next workload
                        traceback.print_exc()
                        failed = True
                        row = {"model": name, "image_size": size, "batch": batch,
                               "error": f"{type(exc).__name__}: {exc}"[:300]}
                rows.append(row)
                if row.get("error"):
                    print(f"| {name} | {size} | {batch} | - | FAILED: {row['error']} | | | |", flush=True)
                else:
                    f = lambda key, spec=".3f", row=row: format(row[key], spec) if key in row else "-"  # noqa: E731
                    print(f"| {row['model']} | {row['image_size']} | {batch} | {row['tokens']} | {f('eager_s')} | "
                          f"{f('compiled_first_s', '.1f')} | {f('compiled_s')} | {f('compiled_speedup', '.2f')} |"
                          + (f" {row['note']}" if row.get("note") else ""), flush=True)
                save(rows)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            model = None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
