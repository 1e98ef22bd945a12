"""FID, sFID, IS, precision and recall of a sample batch against a reference batch.

Not implemented yet.
"""

from argen.utils.errors import ArgenError


def add_arguments(parser):
    pass


def run(args):
    raise ArgenError("`argen evaluate` is not implemented yet")
