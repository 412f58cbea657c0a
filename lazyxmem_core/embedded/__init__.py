"""Embedded classical propagator (optical flow + colour models), no learned weights,
and the GrabCut mask refiner."""
from .propagator import EmbeddedPropagator
from .refiner import GrabCutRefiner

__all__ = ["EmbeddedPropagator", "GrabCutRefiner"]
