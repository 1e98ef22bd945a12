"""Train a class- or text-conditional generator on extracted codes.

Not implemented yet.
"""

from argen.utils.errors import ArgenError


def add_arguments(parser):
    pass


def run(args):
    raise ArgenError("`argen train` is not implemented yet")
