"""SAM (Segment Anything) and SAM-HQ mask refiners; each needs its package (segment-anything,
segment-anything-hq) and a checkpoint, imported only when a refiner is built."""
from .hq import SamHQRefiner, build_sam_hq
from .refiner import SamRefiner, build_sam, detect_model_type

__all__ = ["SamHQRefiner", "SamRefiner", "build_sam", "build_sam_hq", "detect_model_type"]
