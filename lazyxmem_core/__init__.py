"""Lazy-XMem core: propagators, refiners, the Lazy controller and metrics (no web framework here)."""
from .errors import CheckpointError, LazyXMemError, MediaError
from .lazy import LazyConfig, LazySession, UserRequest
from .protocols import Propagator, Refiner
from .session_view import SessionView, correction_mask
from .types import Box, Click, Correction, Decision, FrameRecord, FrameRef, ObjectRecord

__version__ = "0.1.0"

__all__ = [
    "Box", "CheckpointError", "Click", "Correction", "Decision", "FrameRecord", "FrameRef", "LazyConfig",
    "LazySession", "LazyXMemError", "MediaError", "ObjectRecord", "Propagator", "Refiner",
    "SessionView", "UserRequest", "correction_mask", "__version__",
]
