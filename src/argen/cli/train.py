"""Train a class- or text-conditional generator on extracted codes.

The data shape (c2i/t2i, vocabulary = the tokenizer's codebook, token grid, classes, caption length and
width) comes from the codes and their caption features; --config names the architecture only, so any
size trains on any codes. The saved generator records the whole shape: `argen sample` needs no flags.
Runs on one device, or on several under torchrun (`torchrun --nproc_per_node 8 -m argen.cli.main train
...`; DDP, or FSDP2 with --strategy fsdp). Resumable: rerun with --resume. Final weights:
OUT/gpt.safetensors.

--recipe NAME starts from the settings of a released model (c2i_B_256 ... c2i_3B_384, t2i_XL_stage1_256,
t2i_XL_stage2_512; see docs/training.md); explicit flags override it.

Fine-tuning (docs/finetune.md): --init-from takes anything --gpt takes (c2i_B_256, hf://..., a released
.pt, an argen generator); the architecture comes from it, the codes must come from its tokenizer, new
classes rebuild the class embedding (--class-init, --class-map), --reinit caption-proj learns a new
caption projection. Without --recipe, --init-from starts from the `finetune` recipe (a lower lr).

--dry-run prints the resolved configuration, optimizer steps, tokens seen and the estimated GPU memory per
rank, and exits.

Examples:
  argen train --codes runs/codes --config GPT-mini --out runs/gpt --max-steps 2000 --batch-size 64 --lr 1e-3
  argen train --recipe c2i_XL_384 --dry-run
  argen train --init-from c2i_B_256 --codes runs/dogs-codes --out runs/dogs --max-steps 2000 --batch-size 64
"""

from __future__ import annotations

import argparse
import os

from argen.cli.common import positive_int, show_progress
from argen.cli.flags import add_config_flags, given, print_recipe_data, print_recipe_notes, print_resolved, resolve
from argen.training.config import TrainConfig
from argen.training.recipes import load_recipe, recipe_settings

FINETUNE_RECIPE = "finetune"  # the defaults of a run given --init-from and no --recipe


def add_arguments(parser):
    add_config_flags(parser, TrainConfig)
    parser.add_argument("--bf16", action="store_true", help="shorthand for --precision bf16")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved configuration, steps, tokens seen and GPU memory per rank; exit")
    parser.add_argument("--world-size", type=positive_int, default=None,
                        help="--dry-run: number of processes to plan for (default: $WORLD_SIZE, else the "
                             "recipe's reference GPU count, else 1)")


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, dict | None]:
    """Dataclass defaults < recipe < explicit flags."""
    from argen.utils.errors import ArgenError

    values = given(args, TrainConfig)
    if args.bf16 and "precision" not in values:
        values["precision"] = "bf16"
    values.setdefault("progress", show_progress(args))
    name = values.get("recipe") or (FINETUNE_RECIPE if values.get("init_from") else None)
    recipe = load_recipe(name, "train") if name else None
    base = recipe_settings(recipe) if recipe else {}
    if "max_steps" not in values and "max_steps" not in base:
        if not args.dry_run:
            raise ArgenError("--max-steps is required" + (f" (recipe {recipe['name']} publishes no step count)"
                                                          if recipe else ""))
        base["max_steps"] = None
    if not args.dry_run:
        for name in ("codes", "out"):
            if not values.get(name):
                raise ArgenError(f"--{name} is required")
    return resolve(TrainConfig, values, base), recipe


def _world_size(args, recipe) -> int:
    if args.world_size:
        return args.world_size
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    return int((recipe or {}).get("data", {}).get("reference_gpus") or 1)


def print_plan(args, cfg: TrainConfig, recipe: dict | None, world_size: int) -> None:
    from argen.training.plan import fmt_count, generator_plan

    plan = generator_plan(cfg, recipe, world_size)
    print_resolved(args, cfg, recipe)
    model = plan["model"]
    print(f"generator: {model['name']} ({fmt_count(plan['parameters'])} parameters), {model['n_layer']} layers, "
          f"width {model['dim']}, {model['n_head']} heads; data shape from {plan['data']}:")
    shape = {k: model[k] for k in ("kind", "vocab_size", "image_size", "downsample")}
    extra = ("num_classes",) if model["kind"] == "c2i" else ("caption_dim", "caption_len")
    shape.update({k: model[k] for k in extra})
    print("  " + ", ".join(f"{k}={v}" for k, v in shape.items()))
    print_recipe_data(recipe)
    print(f"world size {plan['world_size']} ({plan['strategy']}), {plan['micro_batch_per_rank']} samples per rank "
          f"per micro-step, effective lr {plan['lr_effective']:g}, precision {plan['precision']}")
    steps = plan["optimizer_steps"]
    print(f"optimizer steps: {fmt_count(steps) if steps else 'not published; pass --max-steps'}")
    print(f"samples seen: {fmt_count(plan['samples_seen'])}; image tokens seen: {fmt_count(plan['image_tokens_seen'])}"
          + (f"; epochs: {plan['epochs']:.1f}" if plan["epochs"] else ""))
    lora = plan["lora"]
    if lora is not None:
        share = 100 * lora["trainable"] / plan["parameters"]
        extra = " and the condition embedding" if lora["condition_embedding"] else ""
        print(f"LoRA rank {lora['rank']} on {', '.join(lora['targets'])}{extra}: {fmt_count(lora['trainable'])} "
              f"trainable parameters ({share:.2f}% of full fine-tuning's {fmt_count(plan['parameters'])})")
        _print_memory("LoRA adapter", lora["memory_per_rank"])
    _print_memory("full fine-tuning" if cfg.init_from else "", plan["memory_per_rank"])
    print_recipe_notes(recipe)


def _print_memory(what: str, memory: dict) -> None:
    from argen.training.plan import fmt_bytes

    label = f" ({what})" if what else ""
    print(f"estimated GPU memory per rank{label}: {fmt_bytes(memory['total'])} (see argen.training.plan for the "
          f"model)")
    for part, size in memory["parts"].items():
        if size:
            print(f"  {part:44s} {fmt_bytes(size)}")


def run(args):
    cfg, recipe = resolve_config(args)
    if args.dry_run:
        print_plan(args, cfg, recipe, _world_size(args, recipe))
        return 0
    from argen.training.generator import train

    result = train(cfg)
    where = (f"adapter in {result['out']} (adapter_model.safetensors; use it with --lora {result['out']})"
             if result["adapter"] else f"weights in {result['out']}/gpt.safetensors")
    if result["is_main"] and result["first_loss"] is None:
        print(f"nothing to train: {result['out']} is already at step {result['steps']} "
              f"(--max-steps {cfg.max_steps}); {where}")
    elif result["is_main"]:
        done = (f"trained {result['steps']} steps" if not result["start_step"] else
                f"trained steps {result['start_step'] + 1}-{result['steps']} (resumed at step {result['start_step']})")
        print(f"{done}; loss {result['first_loss']:.4f} -> {result['final_loss']:.4f}; {where}")
    return 0
