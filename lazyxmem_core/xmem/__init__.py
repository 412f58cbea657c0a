"""XMem (Cheng & Schwing, ECCV 2022) re-implemented for the official checkpoints: networks in
``model``, memory and per-frame inference in ``inference``, the Propagator in ``propagator``."""
from .propagator import XMemConfig, XMemPropagator

__all__ = ["XMemConfig", "XMemPropagator"]
