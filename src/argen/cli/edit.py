"""Edit an image: regenerate a masked region (inpainting) or extend it (outpainting), under a class or prompt.

    argen edit --image in.png --box 16,16,48,48 --classes 3 --n 4 --seed 0 --out edits
    argen edit --image in.png --mask mask.png --prompts "an emoji of a cat" --out edits
    argen edit --image in.png --extend right:128 --classes 3 --out panorama

Contract:
- Exactly one of --mask, --box, --extend. Mask PNGs: transparent pixels (alpha 0) are edited, as in
  OpenAI's images API; a mask with no alpha channel edits its white pixels (grey level >= 128). The mask
  must be the image's size. --box x0,y0,x1,y1 is in the image's pixels, x1 and y1 exclusive.
- The image (and mask) are centre-cropped to a square and resized to the generator's size; a token is
  regenerated when any pixel it covers is masked (OUT/mask.png shows the mask that was used). The kept
  tokens are the tokenizer's codes of the input and never change.
- --extend SIDE:PIXELS (right, down, or left through a mirror image; not up, which a raster-order model
  cannot condition on what lies below) grows the image with a sliding window of the generator's grid,
  --stride tokens at a time; PIXELS are at the generator's scale, rounded up to whole tokens.
- The condition may differ from the image's own (conditional editing). Image i is seeded like
  `argen sample`'s image i (--seed, i): a mask of everything gives `argen sample`'s images. A mask that
  keeps everything is not an error: the images are the tokenizer's round trip, and the command says so.
- Writes OUT/NNNNN_<tag>.png, OUT/input.png, OUT/mask.png (white = regenerated) and OUT/side_by_side.png
  (input, the regenerated pixels tinted on it, results). With no --gpt, the bundled demo generator for
  the kind of condition is used.
- Bad input (unreadable image or mask, mask of another size, box outside the image, extension <= 0 or
  up) is one line and exit 2, before the models load.
"""

from __future__ import annotations

import argparse

from argen.cli.common import (
    add_checkpoint_arguments,
    add_progress_argument,
    positive_int,
    show_progress,
)
from argen.cli.sample import SEED, add_sampling_arguments, load_with_conditions, sampling_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    parser.add_argument("--image", required=True, help="the image to edit (PNG, JPEG, ...)")
    what = parser.add_argument_group("what to change (exactly one)").add_mutually_exclusive_group(required=True)
    what.add_argument("--mask", help="mask PNG of the image's size: alpha 0 = edit (OpenAI's convention); "
                                     "without alpha, white = edit")
    what.add_argument("--box", metavar="X0,Y0,X1,Y1", help="edit this box (image pixels, x1/y1 exclusive)")
    what.add_argument("--extend", metavar="SIDE:PIXELS",
                      help="outpaint: right, down or left (mirrored) by PIXELS at the generator's scale, "
                           "e.g. right:128; up is not supported")
    parser.add_argument("--stride", type=positive_int, default=None,
                        help="with --extend: window step in tokens (default half the grid)")
    group = parser.add_argument_group("condition of the regenerated part (exactly one)")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--classes", help="c2i: comma-separated class ids; each gives --n images")
    source.add_argument("--prompts", nargs="+", metavar="PROMPT", help="t2i: prompts, each quoted")
    group.add_argument("--text-encoder", default=None, help="with --prompts: 'minilm' (default) or a local folder")
    group.add_argument("--n", type=positive_int, default=1, help="images per class id or prompt (default 1)")
    add_sampling_arguments(parser, "kind")
    parser.add_argument("--seed", type=SEED, default=0, help="random seed (default 0); image i is seeded as "
                                                             "argen sample's image i")
    parser.add_argument("--out", default="edits", help="output directory (default ./edits)")
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    import sys

    from tqdm.auto import tqdm

    from argen.editing.folder import EditTarget, edit_to_folder, parse_box, parse_extend
    from argen.editing.masks import box_mask, check_mask, mask_from_image, read_image
    from argen.evaluation.pipeline import parse_classes, read_prompts
    from argen.utils.errors import ArgenError

    if args.stride is not None and args.extend is None:
        raise ArgenError("--stride applies only to --extend")
    if args.text_encoder is not None and args.prompts is None:
        raise ArgenError("--text-encoder applies only to --prompts")
    sampling_params(args, "c2i")  # checks the given values before anything loads
    image = read_image(args.image)
    width, height = image.size
    if args.extend is not None:
        target = EditTarget(extend=parse_extend(args.extend))
    elif args.box is not None:
        target = EditTarget(mask=box_mask(height, width, parse_box(args.box)))
    else:
        target = EditTarget(mask=check_mask(mask_from_image(read_image(args.mask, "mask")), height, width))
    classes = parse_classes(args.classes) if args.classes is not None else None
    prompts = read_prompts(args.prompts, None) if classes is None else None
    tokenizer, gpt, conditions = load_with_conditions(args, classes, prompts)
    params = sampling_params(args, gpt.config.kind, gpt)
    with tqdm(desc="edit", unit="step", disable=not show_progress(args), file=sys.stderr) as bar:
        done = edit_to_folder(tokenizer, gpt, image, target, conditions, params, args.out, n=args.n, seed=args.seed,
                              stride=args.stride, progress=bar.update)
    if done.kept_everything:
        print(f"the mask keeps every token: nothing was regenerated; the {done.total} images are the tokenizer's "
              f"round trip of the input; wrote {done.out}/")
        return 0
    print(f"edited {done.total} images ({done.regenerated} of {done.tokens} tokens regenerated each, the mask grown "
          f"to whole {gpt.config.downsample}x{gpt.config.downsample} px tokens) in {done.seconds:.2f} s; "
          f"wrote {done.out}/ (side_by_side.png: input, mask, results)")
    return 0
