"""Generation engine: the default sampling path of argen (`argen.generate`)."""

from argen.engine.generate import generate

__all__ = ["generate"]
