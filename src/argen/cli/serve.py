"""Serve the generation engine over HTTP (FastAPI + uvicorn).

Not implemented yet.
"""

from argen.utils.errors import ArgenError


def add_arguments(parser):
    pass


def run(args):
    raise ArgenError("`argen serve` is not implemented yet")
