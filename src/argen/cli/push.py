"""Share a generator (or an argen LoRA adapter) on the Hugging Face Hub, with its tokenizer and a model card.

Example: argen push runs/t2i-xl --repo me/my-t2i [--private] [--revision v1] [--license apache-2.0]
Uploads the weights, the tokenizer (or a reference to the released or bundled one), `argen.json` (what
`argen.load_gpt("hf://me/my-t2i")` and `--gpt hf://me/my-t2i` read) and README.md: a model card made from
the run (config, data summary, steps, the recorded metrics, a sample grid, the licence, how to load it).
Everything is staged in a temp folder first and uploaded with huggingface_hub in one commit. Needs a token
(`hf auth login` or HF_TOKEN); `--stage DIR` writes the folder to DIR instead and uploads nothing.
"""

from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("run", help="a training run folder (argen train --out), an argen generator .safetensors "
                                    "file, or an argen LoRA adapter folder")
    parser.add_argument("--repo", required=True, help="the Hub repository, owner/name (created if it does not exist)")
    parser.add_argument("--private", action="store_true", help="create the repository private (an existing "
                                                               "repository keeps its visibility)")
    parser.add_argument("--revision", default=None, help="commit to this branch (created from main if needed)")
    parser.add_argument("--tokenizer", default=None,
                        help="the tokenizer the generator decodes with (default: the one the run records): a "
                             "folder or file (uploaded), or a released or bundled name or hf:// reference (recorded)")
    parser.add_argument("--tokenizer-config", default=None, help="config of a released (torch) tokenizer file")
    parser.add_argument("--license", default="other",
                        help="the card's licence id (Hub ids: apache-2.0, mit, cc-by-4.0, openrail, ...; "
                             "default other)")
    parser.add_argument("--grid", default=None, help="sample grid PNG for the card (default: the run's last one, "
                                                     "else made for a c2i generator)")
    parser.add_argument("--metrics", action="append", default=None, metavar="FILE",
                        help="an `argen evaluate --out` JSON to show in the card (repeatable; results JSON files "
                             "in the run folder are found without it)")
    parser.add_argument("--message", default=None, help="commit message (default: argen push)")
    parser.add_argument("--stage", default=None, metavar="DIR",
                        help="write the repository's files to DIR and stop: nothing is uploaded, no token needed")


def run(args):
    from argen.training.publish import push

    where = push(args.run, args.repo, private=args.private, revision=args.revision, tokenizer=args.tokenizer,
                 tokenizer_config=args.tokenizer_config, license_id=args.license, grid=args.grid,
                 metrics=args.metrics, stage_dir=args.stage, message=args.message)
    if args.stage is not None:
        print(f"staged {args.repo} in {where} (nothing uploaded)")
    else:
        print(f"pushed to {args.repo}: {where}\nload it with argen.load_gpt(\"hf://{args.repo}\") or "
              f"--gpt hf://{args.repo}")
    return 0
