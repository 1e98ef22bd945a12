"""Generate an ADM-format npz of samples for evaluation.

Not implemented yet.
"""

from argen.utils.errors import ArgenError


def add_arguments(parser):
    pass


def run(args):
    raise ArgenError("`argen sample-batch` is not implemented yet")
