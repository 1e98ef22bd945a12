"""Train a class- or text-conditional generator on extracted codes.

The mode (c2i or t2i) comes from the codes. Runs on one device, or on several under torchrun
(`torchrun --nproc_per_node 8 -m argen.cli.main train ...`; DDP, or FSDP2 with --strategy fsdp).
Resumable: rerun with --resume after any interruption. Final weights: OUT/gpt.safetensors.

Example:
  argen train --codes runs/codes --config GPT-mini --out runs/gpt --max-steps 2000 --batch-size 64 --lr 1e-3
"""

from __future__ import annotations

from argen.training.generator import TrainConfig, train


def add_arguments(parser):
    parser.add_argument("--codes", required=True, help="codes directory from `argen extract-codes`")
    parser.add_argument("--config", required=True, help="named generator config, e.g. GPT-tiny, GPT-mini, GPT-B")
    parser.add_argument("--out", required=True, help="output directory (checkpoints, logs, final weights)")
    parser.add_argument("--max-steps", type=int, required=True, help="optimizer steps to train for")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest if present")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", choices=["c2i", "t2i"], default=None, help="must match the codes (default: theirs)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch size (default 256)")
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="learning rate per 256 samples; the effective lr is lr * batch/256 (default 1e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation micro-steps")
    parser.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="autocast precision (default bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--bf16", action="store_true", help="shorthand for --precision bf16")
    parser.add_argument("--ema", action="store_true", help="keep an EMA of the weights; the final file holds it")
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (default: config's)")
    parser.add_argument("--dropout", type=float, default=None,
                        help="token/attention-output/FFN dropout (default: config's, 0.1)")
    parser.add_argument("--class-dropout", type=float, default=None,
                        help="condition dropout for guidance (default: config's, 0.1)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="override the config's image size (stage II fine-tune at a higher resolution)")
    parser.add_argument("--text-features", default=None, help="caption features (t2i; default: from the codes)")
    parser.add_argument("--init-from", default=None, help="start from these generator weights (stage II)")
    parser.add_argument("--strategy", choices=["auto", "none", "ddp", "fsdp"], default="auto",
                        help="under torchrun: ddp, fsdp (sharded), or auto (fsdp above 1B parameters)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms(True) for bit-exact resume")
    parser.add_argument("--ckpt-every", type=int, default=1000, help="training-state checkpoint interval")
    parser.add_argument("--keep", type=int, default=2, help="training-state checkpoints to keep")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--sample-every", type=int, default=0, help="sample grid interval (needs --tokenizer)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for the periodic sample grids")
    parser.add_argument("--sample-cfg", type=float, default=3.0, help="guidance scale for the sample grids")
    parser.add_argument("--no-tensorboard", action="store_true", help="skip TensorBoard event files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args):
    precision = "bf16" if args.bf16 and args.precision is None else args.precision
    cfg = TrainConfig(
        codes=args.codes, out=args.out, config=args.config, max_steps=args.max_steps, resume=args.resume,
        seed=args.seed, kind=args.kind, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, grad_accum=args.grad_accum, warmup=args.warmup, schedule=args.schedule,
        precision=precision, ema=args.ema, ema_decay=args.ema_decay, compile=args.compile,
        drop_path=args.drop_path, dropout=args.dropout, class_dropout=args.class_dropout,
        image_size=args.image_size, text_features=args.text_features, init_from=args.init_from,
        strategy=args.strategy, device=args.device, deterministic=args.deterministic,
        ckpt_every=args.ckpt_every, keep=args.keep, log_every=args.log_every, sample_every=args.sample_every,
        tokenizer=args.tokenizer, sample_cfg=args.sample_cfg, tensorboard=not args.no_tensorboard,
        progress=not args.no_progress,
    )
    result = train(cfg)
    if result["is_main"] and result["first_loss"] is not None:
        print(f"trained {result['steps']} steps; loss {result['first_loss']:.4f} -> {result['final_loss']:.4f}; "
              f"weights in {result['out']}/gpt.safetensors")
    return 0
