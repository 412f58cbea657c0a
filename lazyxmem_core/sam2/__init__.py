"""SAM 2.1 (the ``sam2`` package's model) as a propagator and as a refiner on the same weights."""
from .model import SAM2_TYPES, build_model, load_checkpoint, shared_model
from .propagator import SAM2Config, SAM2Propagator
from .refiner import SAM2Refiner
