"""`argen` entry point: dispatches to one module per subcommand and turns `ArgenError` into a
one-line message with exit status 2.

Start-up stays light: only the module of the subcommand being run is imported (`argen --help` reads
the one-line summaries from the modules' docstrings without importing them), and each subcommand
module imports torch and the rest of the library inside its `run` function. So `--help`, `--version`
and argument errors answer without loading torch.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from argen.utils.errors import ArgenError

# subcommand -> module under argen.cli that defines add_arguments(parser) and run(args)
SUBCOMMANDS = {
    "sample": "sample",
    "edit": "edit",
    "serve": "serve",
    "train-tokenizer": "train_tokenizer",
    "eval-tokenizer": "eval_tokenizer",
    "extract-codes": "extract_codes",
    "extract-text-features": "extract_text_features",
    "train": "train",
    "demo": "demo",
    "sample-batch": "sample_batch",
    "evaluate": "evaluate",
    "score-shards": "score_shards",
    "merge-lora": "merge_lora",
    "push": "push",
}


def _argen_version() -> str:
    """The installed distribution's version; the package's own when argen runs from a source tree."""
    try:
        return version("argen")
    except PackageNotFoundError:
        from argen import __version__

        return __version__

def _summary(module_name: str) -> str:
    """First line of a subcommand module's docstring, read from its source without importing it."""
    spec = importlib.util.find_spec(f"argen.cli.{module_name}")
    try:
        doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError, TypeError):
        doc = ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _add_command(sub, name: str, module_name: str) -> None:
    module = importlib.import_module(f"argen.cli.{module_name}")
    sp = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0], description=module.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(sp)
    sp.set_defaults(_run=module.run)


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """The `argen` parser. Only the subcommands in `commands` (default: all) get their flags, which
    imports their modules; the others are listed with their summaries."""
    parser = _Parser(prog="argen", description="Autoregressive image generation (LlamaGen-style).")
    parser.add_argument("--version", action="version", version=f"argen {_argen_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        if commands is None or name in commands:
            _add_command(sub, name, module_name)
        else:
            sub.add_parser(name, help=_summary(module_name), add_help=False)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in `argv` (the first word that is not an option), if it is a known one."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in SUBCOMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    parser = build_parser([command] if command else [])
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named after the subcommand, whose --help lists its flags
        parser.exit(2, f"argen {command}: error: unrecognized arguments: {' '.join(unknown)} "
                       f"(see argen {command} --help)\n")
    try:
        result = args._run(args)
    except ArgenError as exc:
        print(f"argen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"argen {args.command}: {exc or 'interrupted'}", file=sys.stderr)  # a message may give progress
        return 130
    except (OSError, RuntimeError) as exc:  # a full disk met outside argen.utils.io's helpers (logs, appends)
        error = _disk_full(exc)
        if error is None:
            raise
        print(f"argen {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


def _disk_full(exc: BaseException) -> str | None:
    """The one-line message for a full disk or quota, or None for any other error."""
    from argen.utils.io import disk_full_error, is_disk_full

    if not is_disk_full(exc):
        return None
    path = getattr(exc, "filename", None)
    if path:
        return str(disk_full_error(exc, path, intact=False)).replace("; no partial file was left", "")
    return f"no space left on device ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"


if __name__ == "__main__":
    sys.exit(main())
