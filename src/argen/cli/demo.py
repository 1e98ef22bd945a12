"""The quickstart: train and sample small models on the bundled emoji dataset.

Not implemented yet.
"""

from argen.utils.errors import ArgenError


def add_arguments(parser):
    pass


def run(args):
    raise ArgenError("`argen demo` is not implemented yet")
