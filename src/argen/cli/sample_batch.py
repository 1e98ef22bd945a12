"""Generate an ADM-format npz of samples for evaluation (resumable, one GPU or many under torchrun).

  argen sample-batch --tokenizer vq_ds16_c2i.pt --tokenizer-config VQ-16 --gpt c2i_L_384.pt --gpt-config GPT-L \\
      --kind c2i --image-size 384 --num-samples 50000 --cfg-scale 2.0 --top-k 0 --top-p 1.0 --seed 0 \\
      --eval-size 256 --resize bicubic --out samples/GPT-L-384
  torchrun --nproc_per_node 8 -m argen.cli.main sample-batch ...   (same flags: same images)

Writes OUT/shards/*.npz as it goes (rerun the same command to resume) and finally OUT/samples.npz with
arr_0 = uint8 (N, E, E, 3) and arr_1 = class labels. Image i uses class i % C (class-balanced) or caption
row i % B of --features or --captions (--rows picks the captions), and its own generator seeded from (--seed, i) as in
`argen sample`. --captions FILE (one prompt per line, or COCO's captions JSON) encodes the prompts with
--text-encoder and writes them to OUT/prompts.json, which `argen evaluate --clip` pairs with the images.
E is --eval-size, by default the generator's image size. The work is
`argen.evaluation.sample_batch.sample_batch`.
"""

from __future__ import annotations

import argparse

from argen.cli.common import (
    add_checkpoint_arguments,
    add_progress_argument,
    load_models,
    nonneg_int,
    positive_int,
    say_bundled_generator,
    show_progress,
    use_bundled_generator,
)
from argen.cli.sample import SEED, add_decode_arguments, add_sampling_arguments, sampling_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    parser.add_argument("--num-samples", type=positive_int, default=50000, help="images to generate (default 50000)")
    cond = parser.add_mutually_exclusive_group()
    cond.add_argument("--num-classes", type=positive_int, default=None,
                      help="c2i: spread labels over classes 0..C-1, N/C each (default: all of the generator's)")
    cond.add_argument("--features", help="t2i: npz with caption features `features` (B,L,D) and `mask` (B,L), or a "
                      "folder written by argen extract-text-features")
    cond.add_argument("--captions", metavar="FILE",
                      help="t2i: prompts, one per line, or COCO's captions JSON; encoded with --text-encoder and "
                           "written to OUT/prompts.json for `argen evaluate --clip`")
    parser.add_argument("--text-encoder", default=None,
                        help="with --captions: 'minilm' (default) or a local transformers folder (flan-t5-xl)")
    parser.add_argument("--rows", metavar="START:STOP", default=None,
                        help="with --features or --captions: use only these caption rows, e.g. 0:1000 (default all)")
    add_sampling_arguments(parser, "neutral")
    add_decode_arguments(parser)
    parser.add_argument("--seed", type=SEED, default=0, help="global seed in [0, 2**63) (default 0)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per generation batch (default 32)")
    parser.add_argument("--shard-size", type=positive_int, default=1000,
                        help="images per resumable shard (default 1000)")
    parser.add_argument("--eval-size", type=nonneg_int, default=None,
                        help="resize samples to this size for evaluation (default, or 0: the generator's image "
                             "size; e.g. 256 for the ADM ImageNet reference)")
    parser.add_argument("--resize", metavar="{bicubic-antialias,bicubic}", default="bicubic-antialias",
                        help="resampling for --eval-size (default bicubic-antialias; `bicubic` = LlamaGen's script)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--png", action="store_true", help="also write OUT/png/NNNNNN.png per image")
    add_progress_argument(parser, quiet_alias=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from argen.data.caption_files import parse_rows, read_features
    from argen.evaluation.sample_batch import SampleBatchConfig, sample_batch
    from argen.utils.dist_env import process_ranks
    from argen.utils.errors import ArgenError

    if args.rows is not None and args.features is None and args.captions is None:
        raise ArgenError("--rows applies only to --features and --captions")
    if args.text_encoder is not None and args.captions is None:
        raise ArgenError("--text-encoder applies only to --captions")
    prompts = None
    if args.captions is not None:
        from argen.data.caption_files import read_captions

        prompts = read_captions(args.captions)
        prompts = [prompts[r] for r in parse_rows(args.rows, len(prompts))] if args.rows is not None else prompts
    ranks = process_ranks()
    if ranks.world_size > 1 and args.device == "auto" and torch.cuda.is_available():
        args.device = f"cuda:{ranks.local_rank % torch.cuda.device_count()}"
    sampling_params(args, None)  # check the sampling flags before the checkpoints load
    bundled = use_bundled_generator(args, "t2i" if args.features is not None or prompts is not None else "c2i")
    tokenizer, gpt, device, _ = load_models(args)
    if bundled:
        say_bundled_generator(args.gpt, gpt)
    features = mask = None
    if gpt.config.kind == "t2i" and prompts is not None:
        from argen.serving.text import prompt_encoder

        encode = prompt_encoder(gpt, args.text_encoder or "minilm", device)
        parts = [encode(prompts[i:i + 256]) for i in range(0, len(prompts), 256)]
        features, mask = torch.cat([f for f, _ in parts]), torch.cat([m for _, m in parts])
    elif gpt.config.kind == "t2i":
        if args.features is None:
            raise ArgenError("this is a text-conditional generator: pass --features (an npz, or a folder written "
                             "by argen extract-text-features)")
        features, mask = read_features(args.features, gpt.config.caption_len)
        if args.rows is not None:
            rows = parse_rows(args.rows, features.shape[0])
            features, mask = features[rows], mask[rows]
    elif args.features is not None or prompts is not None:
        raise ArgenError("this is a class-conditional generator: use --num-classes, not --features or --captions")
    config = SampleBatchConfig(num_samples=args.num_samples, num_classes=args.num_classes,
                               sampling=sampling_params(args, None), seed=args.seed, batch_size=args.batch_size,
                               shard_size=args.shard_size, eval_size=args.eval_size or None, resize=args.resize,
                               png=args.png, decode=args.decode, window=args.window,
                               tree=args.tree)
    from argen.checkpoint.hub import checkpoint_record, default_tokenizer

    tokenizer_ref = args.tokenizer or default_tokenizer(args.gpt)
    info = {"tokenizer": checkpoint_record(tokenizer_ref), "gpt": checkpoint_record(args.gpt),
            "gpt_config": gpt.config.name, "tokenizer_config": tokenizer.config.name, "dtype": args.dtype}
    if args.quantize != "none":  # int8 samples differ from fp32 ones; the key is left out otherwise, as before
        info["quantize"] = args.quantize
    if args.cpu_kernels != "aten":  # packed kernels may change sampled tokens, rarely
        info["cpu_kernels"] = args.cpu_kernels
    if args.lora:  # merged adapters change the samples; the key is left out otherwise, as before
        from argen.checkpoint.adapters import parse_lora

        info["lora"] = [[checkpoint_record(folder), scale] for folder, scale in map(parse_lora, args.lora)]
    path = sample_batch(tokenizer, gpt, config, args.out, features, mask, rank=ranks.rank,
                        world_size=ranks.world_size, checkpoint_info=info, progress=show_progress(args))
    if path is not None and prompts is not None:
        from pathlib import Path

        from argen.evaluation.clip_score import PROMPTS_FILE
        from argen.utils.io import atomic_write_json

        atomic_write_json(Path(args.out) / PROMPTS_FILE, {"prompts": prompts, "source": str(args.captions),
                                                          "rows": args.rows})
    if path is not None:
        print(f"wrote {path} ({config.num_samples} images, {config.eval_size or gpt.config.image_size}px)")
    return 0
