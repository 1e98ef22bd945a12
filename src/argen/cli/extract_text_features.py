"""Precompute caption features with a text encoder.

Not implemented yet.
"""

from argen.utils.errors import ArgenError


def add_arguments(parser):
    pass


def run(args):
    raise ArgenError("`argen extract-text-features` is not implemented yet")
