"""Lazy-XMem core: propagators, refiners, the Lazy controller and metrics (no web framework here)."""
from .errors import CheckpointError, LazyXMemError, MediaError
from .lazy import LazyConfig, LazySession, UserRequest
from .protocols import Propagator, Refiner
from .types import Box, Click, Correction, Decision, FrameRecord, ObjectRecord

__version__ = "0.1.0"

__all__ = [
    "Box", "CheckpointError", "Click", "Correction", "Decision", "FrameRecord", "LazyConfig",
    "LazySession", "LazyXMemError", "MediaError", "ObjectRecord", "Propagator", "Refiner",
    "UserRequest", "__version__",
]
