"""Merge LoRA adapters into their base generator and write a plain argen generator.

    argen merge-lora --gpt c2i_B_256 --lora runs/pets --out runs/pets-merged
    argen merge-lora --gpt runs/base --lora runs/a:0.5 --lora runs/b --out runs/ab

Each adapter must have been trained on --gpt (its released name or the sha256 of its weights; anything
else is refused naming both). The update W + scale * alpha / rank * B A is added in float32; the result
keeps the adapter's class names, data shape and tokenizer record, and the base's recommended sampling
settings, and loads with --gpt like any argen generator. OUT is written atomically; an existing OUT that
already holds a generator is refused unless --overwrite is given.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpt", required=True, help="the base generator the adapters were trained on (anything "
                                                     "argen sample --gpt takes)")
    parser.add_argument("--gpt-config", default=None, help="named generator config for released files, e.g. GPT-B")
    parser.add_argument("--kind", choices=["c2i", "t2i"], default=None, help="generator kind for released files")
    parser.add_argument("--lora", action="append", required=True, metavar="DIR[:SCALE]",
                        help="an adapter directory (argen train --lora-rank), its update scaled by SCALE "
                             "(default 1); repeatable")
    parser.add_argument("--out", required=True, help="output directory (gpt.safetensors + gpt.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace a generator already in --out")


def run(args) -> int:
    from pathlib import Path

    from argen.checkpoint import load_gpt, save_gpt
    from argen.checkpoint.adapters import parse_lora, read_adapter
    from argen.checkpoint.hub import checkpoint_record
    from argen.utils.errors import ArgenError

    out = Path(args.out)
    if (out / "gpt.safetensors").exists() and not args.overwrite:
        raise ArgenError(f"{out} already holds a generator; choose another --out or pass --overwrite")
    gpt = load_gpt(args.gpt, config=args.gpt_config, kind=args.kind, lora=args.lora)
    adapters = [(read_adapter(parse_lora(item)[0]).info, parse_lora(item)) for item in args.lora]
    last = next((info for info, _ in reversed(adapters) if info.get("tokenizer")), {})
    extra = {"class_names": gpt.class_names, "tokenizer": last.get("tokenizer"),
             "training": {"merged_from": {"base": checkpoint_record(args.gpt),
                                          "adapters": [{"path": str(Path(p).resolve()), "scale": s}
                                                       for _, (p, s) in adapters]}}}
    if gpt.sampling_defaults:
        extra["sampling"] = gpt.sampling_defaults
    file = save_gpt(gpt, out, extra=extra)
    print(f"merged {len(adapters)} adapter(s) into {args.gpt}: {file} ({gpt.config.name}, {gpt.config.kind}, "
          f"{gpt.config.image_size} px)")
    return 0
