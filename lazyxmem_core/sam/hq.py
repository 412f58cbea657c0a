"""SAM-HQ (Ke et al., NeurIPS 2023) as the mask refiner: the Lazy-XMem paper's refiner is SAM-HQ ViT-L.

SAM-HQ keeps SAM's encoder and prompt encoder and adds to the decoder an HQ output token that
also reads early ViT features (the output of the first global-attention block). Its predictor
has SAM's interface, so :class:`SamHQRefiner` is :class:`SamRefiner` with three differences:
the model and predictor come from ``segment_anything_hq``; a cached frame holds those early
features next to the image embedding; and ``predict`` gets ``hq_token_only=True``, SAM-HQ's
setting for a single object (every refine() call is one object), as the Lazy-XMem research
code calls it. With it the mask is the HQ token's alone, whatever ``multimask_output`` says.

``segment_anything_hq`` (pip ``segment-anything-hq``) is a separate module from
``segment_anything``: both can be installed side by side. Its own builder loads checkpoints
with ``strict=False`` (a wrong file would load silently with random parts); we load strictly.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..errors import CheckpointError, LazyXMemError
from .refiner import SamRefiner, _Embedding, build_checked, is_sam_hq, load_state_dict

HQ_TYPES = ("vit_b", "vit_l", "vit_h")
HQ_URL = "https://huggingface.co/lkeab/hq-sam"
PIP_HINT = "pip install segment-anything-hq==0.3"
HQ_GET = ("download it with `lazyxmem weights download sam-hq --type vit_l` (or vit_b / vit_h), or "
          f"sam_hq_vit_l.pth by hand from {HQ_URL}")


def import_sam_hq() -> ModuleType:
    """``import segment_anything_hq``, or a LazyXMemError that says what to install."""
    try:
        with warnings.catch_warnings():
            # Its modeling package imports timm's deprecated module paths and registers its
            # TinyViT variants under names timm already has: noise on every start, no problem.
            warnings.filterwarnings("ignore", message=r"Importing from timm\.")
            warnings.filterwarnings("ignore", message=r"Overwriting tiny_vit_")
            import segment_anything_hq
    except ImportError as e:
        if (getattr(e, "name", None) or "").split(".")[0] == "timm":
            # segment-anything-hq 0.3 imports timm (for its TinyViT) without declaring it.
            raise LazyXMemError("the SAM-HQ refiner needs timm, which segment-anything-hq imports "
                                "without installing it: pip install timm") from e
        raise LazyXMemError(f"the SAM-HQ refiner needs the segment-anything-hq package, which is not "
                            f"installed ({e}): {PIP_HINT}") from e
    return segment_anything_hq


def hq_registry() -> dict[str, Any]:
    """SAM-HQ's builders of the three official ViT types (its registry also has a TinyViT
    variant, whose checkpoint has another layout: not offered here)."""
    registry = import_sam_hq().sam_model_registry
    return {t: registry[t] for t in HQ_TYPES}


def load_hq_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Read a SAM-HQ checkpoint on the CPU; a plain SAM one is refused by name."""
    state_dict = load_state_dict(checkpoint, name="SAM-HQ", get=HQ_GET)
    if not is_sam_hq(state_dict):
        # Both have the same encoder keys: without this check the strict load would report a
        # list of missing decoder keys instead of the actual mistake.
        raise CheckpointError(
            f"{checkpoint} is a plain SAM checkpoint, not a SAM-HQ one (it has no "
            "mask_decoder.hf_token.* / mask_decoder.compress_vit_feat.* keys): "
            f"{HQ_GET}; or use the plain SAM refiner (sam) with this file")
    return state_dict


def build_sam_hq(checkpoint: str | Path, model_type: str = "vit_l", device: str = "cpu") -> torch.nn.Module:
    """Build an official SAM-HQ of ``model_type`` and load ``checkpoint`` into it strictly, on ``device``.

    Every failure of the file is a CheckpointError that says what to do.
    """
    return build_checked(hq_registry(), checkpoint, model_type, device, name="SAM-HQ", type_option=None,
                         load=load_hq_state_dict)


class SamHQRefiner(SamRefiner):
    """Refiner protocol on top of ``segment_anything_hq.SamPredictor``; see the module docstring.

    Thread-safe and cached per frame exactly like :class:`SamRefiner` (one lock around setting a
    frame and predicting on it).
    """

    # SAM-HQ's advice: the HQ token's mask alone for a single object, HQ + SAM logits for several.
    hq_token_only = True

    def __init__(
        self,
        checkpoint: str | Path,
        model_type: str = "vit_l",  # the paper's; plain SAM's default is vit_h
        device: str = "cpu",
        prior_prompt: str = "none",
        cache_size: int = 4,
    ) -> None:
        super().__init__(checkpoint, model_type, device, prior_prompt, cache_size)

    @staticmethod
    def _build_model(checkpoint: str | Path, model_type: str, device: str) -> torch.nn.Module:
        return build_sam_hq(checkpoint, model_type, device)

    def _new_predictor(self, model: torch.nn.Module) -> Any:
        predictor_cls = import_sam_hq().SamPredictor
        if not hasattr(getattr(model, "mask_decoder", None), "hf_token"):
            raise TypeError(f"SamHQRefiner needs a SAM-HQ model (segment_anything_hq), got a "
                            f"{type(model).__module__}.{type(model).__name__} without an HQ decoder: "
                            "wrap a plain SAM with SamRefiner")
        return predictor_cls(model)

    def _capture(self) -> _Embedding:
        emb = super()._capture()
        # The encoder returns the output of every global-attention block (4 in the official
        # models, 16 MB each at vit_l) but the decoder reads only the first: cache just that.
        emb.interm_features = list(self.predictor.interm_features[:1])
        return emb

    def _restore(self, emb: _Embedding) -> None:
        super()._restore(emb)
        self.predictor.interm_features = emb.interm_features

    def _predict_options(self) -> dict[str, Any]:
        return {"hq_token_only": self.hq_token_only}
