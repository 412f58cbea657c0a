"""SAM 2.1 (the ``sam2`` package's model) as a propagator and as a refiner on the same weights."""
from .model import SAM2_TYPES, build_model, load_checkpoint, shared_model
from .propagator import SAM2Config, SAM2Propagator
from .refiner import SAM2Refiner

__all__ = ["SAM2_TYPES", "SAM2Config", "SAM2Propagator", "SAM2Refiner", "build_model", "load_checkpoint", "shared_model"]
