"""`argen` entry point: dispatches to one module per subcommand and turns `ArgenError` into a
one-line message with exit status 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import version

from argen.utils.errors import ArgenError

# subcommand -> module under argen.cli that defines add_arguments(parser) and run(args)
SUBCOMMANDS = {
    "sample": "sample",
    "serve": "serve",
    "train-tokenizer": "train_tokenizer",
    "eval-tokenizer": "eval_tokenizer",
    "extract-codes": "extract_codes",
    "extract-text-features": "extract_text_features",
    "train": "train",
    "demo": "demo",
    "sample-batch": "sample_batch",
    "evaluate": "evaluate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="argen", description="Autoregressive image generation (LlamaGen-style).")
    parser.add_argument("--version", action="version", version=f"argen {version('argen')}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(f"argen.cli.{module_name}")
        sp = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0],
                            description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args._run(args)
    except ArgenError as exc:
        print(f"argen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"argen {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
