"""Errors that carry a message meant for the user: what is wrong and what to do."""
from __future__ import annotations


class LazyXMemError(ValueError):
    """Base class: bad input or configuration, reported without a traceback by the CLI."""


class CheckpointError(LazyXMemError):
    """A model checkpoint is missing, unreadable, or not the model it claims to be."""


class MediaError(LazyXMemError):
    """Frames, videos or masks that cannot be read or do not fit together."""
