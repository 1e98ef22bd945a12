"""Train a VQ image tokenizer (L2 + LPIPS + PatchGAN + codebook losses), resumable.

Shape flags for the paper's ablations (codebook size and dimension, L2 normalisation, downsample 8 or
16) and --init-from (a released LlamaGen tokenizer .pt, with its discriminator, or an argen tokenizer)
to fine-tune; all of it is recorded in the saved tokenizer's config. --recipe NAME starts from the
settings of a released tokenizer (vq_ds16_c2i, vq_ds8_c2i, vq_ds16_t2i); explicit flags override it.
--dry-run prints the resolved configuration, steps and parameter counts, and exits.

Example: argen train-tokenizer --data demo --config VQ-demo --out runs/vq-demo --max-steps 2000 --batch-size 32
Writes OUT/tokenizer.safetensors (+ .json, loadable with argen.load_tokenizer(OUT)), OUT/checkpoints/
(exact-resume state), OUT/train_config.json and OUT/log.jsonl. Rerun with --resume to continue a run.
"""

from __future__ import annotations

import argparse
import json

from argen.cli.common import show_progress
from argen.cli.flags import add_config_flags, given, print_recipe_data, print_recipe_notes, print_resolved, resolve
from argen.training.config import TokenizerTrainConfig
from argen.training.recipes import load_recipe, recipe_settings


def add_arguments(parser):
    add_config_flags(parser, TokenizerTrainConfig)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved configuration, steps and parameter counts; exit")


def resolve_config(args: argparse.Namespace) -> tuple[TokenizerTrainConfig, dict | None]:
    """Dataclass defaults < recipe < explicit flags."""
    from argen.utils.errors import ArgenError

    values = given(args, TokenizerTrainConfig)
    values.setdefault("progress", show_progress(args))
    recipe = load_recipe(values["recipe"], "train-tokenizer") if values.get("recipe") else None
    base = recipe_settings(recipe) if recipe else {}
    if "max_steps" not in values and "max_steps" not in base and not args.dry_run:
        raise ArgenError("--max-steps is required" + (f" (recipe {recipe['name']} publishes no step count)"
                                                      if recipe else ""))
    if not args.dry_run and not values.get("out"):
        raise ArgenError("--out is required")
    return resolve(TokenizerTrainConfig, values, base), recipe


def print_plan(args, cfg: TokenizerTrainConfig, recipe: dict | None) -> None:
    from argen.training.plan import fmt_bytes, fmt_count, tokenizer_plan

    plan = tokenizer_plan(cfg, recipe)
    print_resolved(args, cfg, recipe)
    vq = plan["tokenizer"]
    print(f"tokenizer: {vq['name']}, {fmt_count(plan['parameters'])} parameters, codebook {vq['codebook_size']} x "
          f"{vq['codebook_embed_dim']} (L2 norm {'on' if vq['codebook_l2_norm'] else 'off'}), "
          f"{plan['tokens_per_image']} tokens per {cfg.image_size} px image; discriminator "
          f"{fmt_count(plan['discriminator_parameters'])} parameters")
    print_recipe_data(recipe, skip=())
    print(f"optimizer steps: {fmt_count(plan['optimizer_steps'])}; images seen: {fmt_count(plan['images_seen'])}"
          + (f"; epochs: {plan['epochs']:.1f}" if plan["epochs"] else ""))
    print(f"weights + gradients + AdamW moments (fp32): {fmt_bytes(plan['weights_gradients_adamw_bytes'])} "
          f"(activations not estimated for the conv nets)")
    print_recipe_notes(recipe)


def run(args):
    import logging

    cfg, recipe = resolve_config(args)
    if args.dry_run:
        print_plan(args, cfg, recipe)
        return 0
    from argen.training.tokenizer import train_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = train_tokenizer(cfg)
    print(json.dumps(summary, indent=2, default=str))
    return 0
