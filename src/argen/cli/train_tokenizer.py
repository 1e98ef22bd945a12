"""Train a VQ image tokenizer.

Not implemented yet.
"""

from argen.utils.errors import ArgenError


def add_arguments(parser):
    pass


def run(args):
    raise ArgenError("`argen train-tokenizer` is not implemented yet")
