"""What a CPU decode step could cost with other kernels: the issue-24 floor study (CPU only).

At the bar's workload (GPT-B, random weights, 2 images with guidance = 4 rows, one token per row) it
times, in alternating rounds (the machine may be shared), best and median of --rounds:
  aten linears      every linear a step calls, through the modules (`bench_engine.MatmulFloor`):
                    the matmul floor that `bench_engine.py --cpu` reports
  onednn packed     the same weights reordered once for oneDNN (`torch.ops.mkldnn._reorder_linear_weight`)
                    and multiplied by `torch.ops.mkldnn._linear_pointwise`: what a packed-weight module
                    could give; its results differ from aten's in the last bits
  eager forward     `GPT.forward_cached` of one token per row at --kv cache slots
  compiled forward  the same through `torch.compile` (inductor; `--freezing`: weights frozen as
                    constants, which lets inductor pack them for oneDNN); the compile time and the
                    largest logit difference from eager are printed
and the bytes one step streams (linear weights, and the keys/values attention reads at --kv).

    python benchmarks/bench_floor_kernels.py --threads 1
    python benchmarks/bench_floor_kernels.py --threads 2 --dtype bf16 --no-compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_engine import MatmulFloor, build, step_linears


def packed_linears(model, rows: int):
    """oneDNN-reordered copies of the step's linear weights, and a function running them once."""
    modules = step_linears(model)
    packed = [torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows) for m in modules]
    dtype = model.tok_embeddings.weight.dtype
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=dtype) for m in modules}

    def run() -> None:
        for module, weight in zip(modules, packed):
            torch.ops.mkldnn._linear_pointwise(inputs[module.in_features], weight, None, "none", [-1], "")

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="GPT-B")
    parser.add_argument("--rows", type=int, default=4, help="rows per step (2 per guided image; default 4)")
    parser.add_argument("--kv", type=int, default=129, help="cache slots attended (default 129: a 256-token "
                        "image's mean)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled forward")
    parser.add_argument("--freezing", action=argparse.BooleanOptionalAction, default=True,
                        help="inductor freezing for the compiled forward (default on)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build(args.model, None, device, dtype)
    cfg = model.config
    cache = model.new_cache(args.rows)
    h = torch.randn(args.rows, 1, cfg.dim, dtype=dtype)
    positions = torch.tensor([args.kv - 1])
    floor = MatmulFloor(model, args.rows, device)
    variants = {"aten linears": floor.run, "onednn packed": packed_linears(model, args.rows),
                "eager forward": lambda: model.forward_cached(h, positions, cache, args.kv)}
    if not args.no_compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = args.freezing
        compiled = torch.compile(model.forward_cached, dynamic=True)
        with torch.inference_mode():
            started = time.perf_counter()
            got = compiled(h, positions, cache, args.kv)
            compile_s = time.perf_counter() - started
            diff = (got - model.forward_cached(h, positions, cache, args.kv)).abs().max().item()
        print(f"# compile: {compile_s:.1f} s (freezing {'on' if args.freezing else 'off'}); largest logit "
              f"difference from eager {diff:.2e}")
        variants["compiled forward"] = lambda: compiled(h, positions, cache, args.kv)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, run in variants.items():
                run()
                started = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - started) * 1e3)
    size = dtype.itemsize
    weight_mb = sum(m.weight.numel() for m in step_linears(model)) * size / 1e6
    kv_mb = 2 * cfg.n_layer * args.rows * (cfg.n_kv_head or cfg.n_head) * cfg.head_dim * args.kv * size / 1e6
    print(f"# {args.model}, {args.rows} rows, kv {args.kv}, {args.dtype}, {args.threads} thread(s); torch "
          f"{torch.__version__}; a step streams {weight_mb:.0f} MB of linear weights and reads {kv_mb:.0f} MB "
          f"of keys/values")
    print("| variant | best ms | median ms | median / aten linears |")
    print("| --- | --- | --- | --- |")
    base = statistics.median(times["aten linears"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {min(values):.2f} | {median:.2f} | {median / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
