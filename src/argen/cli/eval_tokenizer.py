"""Evaluate a tokenizer: PSNR, SSIM, LPIPS, codebook usage, rFID.

Not implemented yet.
"""

from argen.utils.errors import ArgenError


def add_arguments(parser):
    pass


def run(args):
    raise ArgenError("`argen eval-tokenizer` is not implemented yet")
