from .model import SAM2_TYPES, build_model, load_checkpoint, shared_model
from .refiner import SAM2Refiner
