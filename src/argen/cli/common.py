"""Checkpoint flags shared by `argen sample`, `argen serve` and `argen sample-batch`."""

from __future__ import annotations

import argparse

import torch

from argen.checkpoint import load_gpt, load_tokenizer
from argen.utils.torch_utils import parse_device, parse_dtype


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints (the bracketed config flags are needed only for released files)")
    group.add_argument("--tokenizer", required=True, help="tokenizer: argen dir or .safetensors, or released .pt")
    group.add_argument("--tokenizer-config", default=None, help="named tokenizer config for released files, e.g. VQ-16")
    group.add_argument("--gpt", required=True, help="generator checkpoint: argen dir/.safetensors or released .pt")
    group.add_argument("--gpt-config", default=None, help="named generator config for released files, e.g. GPT-B")
    group.add_argument("--kind", choices=["c2i", "t2i"], default=None, help="generator kind for released files")
    group.add_argument("--image-size", type=int, default=None, help="generated image size, e.g. 256, 384, 512")
    group.add_argument("--downsample", type=int, default=None, help="tokenizer downsample factor (16 or 8)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    group.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")


def load_models(args: argparse.Namespace):
    """Load (tokenizer, gpt, device, dtype) from the shared checkpoint flags."""
    from argen.utils.errors import ArgenError

    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise ArgenError("fp16 is not supported on the CPU; use fp32 or bf16")
    tokenizer = load_tokenizer(args.tokenizer, config=args.tokenizer_config, device=device, dtype=dtype)
    downsample = args.downsample
    if downsample is None and args.gpt_config is not None:
        downsample = tokenizer.downsample
    gpt = load_gpt(args.gpt, config=args.gpt_config, kind=args.kind, image_size=args.image_size,
                   downsample=downsample, device=device, dtype=dtype)
    if gpt.config.downsample != tokenizer.downsample:
        raise ArgenError(f"the generator expects downsample {gpt.config.downsample} but the tokenizer has "
                         f"{tokenizer.downsample}")
    if gpt.config.vocab_size != tokenizer.config.codebook_size:
        raise ArgenError(f"the generator's vocabulary ({gpt.config.vocab_size}) differs from the tokenizer's "
                         f"codebook ({tokenizer.config.codebook_size})")
    return tokenizer, gpt, device, dtype
