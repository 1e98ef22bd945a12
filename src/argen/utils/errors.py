"""User-facing errors.

`ArgenError` marks a problem with the user's input (a file, a flag, a config). The CLI prints its
message on one line and exits non-zero; library callers can catch it. Programming errors stay
ordinary exceptions so that they keep their tracebacks.
"""


class ArgenError(Exception):
    """Bad input that the user can fix; the message says what to fix."""


class CheckpointError(ArgenError):
    """A checkpoint file is unreadable, corrupt, or does not match the requested config."""
