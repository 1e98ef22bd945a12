"""Encode a dataset to image-token shards for generator training.

Not implemented yet.
"""

from argen.utils.errors import ArgenError


def add_arguments(parser):
    pass


def run(args):
    raise ArgenError("`argen extract-codes` is not implemented yet")
