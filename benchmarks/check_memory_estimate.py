"""Check the activation model of `argen train --dry-run` against what autograd really keeps (CPU).

One training forward of a generator with autocast on the CPU; a saved-tensors hook sums the storage bytes of
every tensor autograd keeps for backward (parameters excluded, each storage counted once). The estimate
compared is the dry-run's activations plus, in bf16, its autocast weight copies (matmuls keep the bf16 copy
of their weight). Usage: python benchmarks/check_memory_estimate.py [GPT-B] [grid ...] [--batch B]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from argen.models.gpt import GPT, gpt_config
from argen.training.plan import estimate_memory


def saved_bytes(cfg, batch: int, dtype: torch.dtype) -> int:
    torch.manual_seed(0)
    model = GPT(cfg).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = torch.randint(cfg.vocab_size, (batch, cfg.num_image_tokens))
    cond = torch.randint(cfg.num_classes, (batch,))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model(tokens, cond)
    return sum(seen.values())


def estimated_bytes(cfg, batch: int, precision: str) -> float:
    parts = estimate_memory(cfg, batch, 1, precision, ema=False)["parts"]
    return sum(v for k, v in parts.items() if k.startswith("activations") or k == "autocast weight copies")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="GPT-B")
    parser.add_argument("grids", nargs="*", type=int, default=[16, 24])
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    for grid in args.grids:
        cfg = replace(gpt_config(args.config), image_size=grid * 16, downsample=16)
        for dtype, precision in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            got = saved_bytes(cfg, args.batch, dtype)
            est = estimated_bytes(cfg, args.batch, precision)
            print(f"{args.config} {grid}x{grid} batch {args.batch} {precision}: saved {got / 2**20:.1f} MiB, "
                  f"estimated {est / 2**20:.1f} MiB, saved/estimated {got / est:.2f}")


if __name__ == "__main__":
    main()
