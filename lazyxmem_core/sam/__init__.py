"""SAM (Segment Anything) mask refiner; needs the segment-anything package and a checkpoint."""
from .refiner import SamRefiner, build_sam, detect_model_type

__all__ = ["SamRefiner", "build_sam", "detect_model_type"]
