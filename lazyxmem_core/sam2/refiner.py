"""SAM 2.1 as the mask refiner, on the very weights the SAM 2 propagator runs (one copy in memory).

The refiner is ``sam2.sam2_image_predictor.SAM2ImagePredictor``, whose ``set_image`` /
``predict`` mirror SAM's, so :class:`SAM2Refiner` is :class:`~lazyxmem_core.sam.SamRefiner` with
its hooks changed: the prompt rules (one ambiguous click -> three masks, the best kept;
``prior_prompt`` none / box / mask), the per-frame embedding cache and the lock come from there.

Image size. The predictor always works at 1024, the size SAM 2 was trained at: its backbone
feature sizes are hard-coded (``_bb_feat_sizes``). The propagator may run the model at 512 or
256 for speed. Rather than patching the feature sizes and refining at that lower size (a 512
input gives a 32x32 embedding grid: coarser masks exactly where a human asked for a precise
one), a propagator model of another size gets a 1024 twin: the package's own SAM2Base built at
1024, whose parameters and buffers are then *replaced* by the propagator model's tensors
(``load_state_dict(assign=True)``), not copied. Every learned tensor of SAM 2 is independent of
the image size; what depends on it (the prompt encoder's grid, RoPE tables, ``image_size``) is
plain attributes, which the twin has at 1024. The twin's random initial weights are freed once
replaced; building it costs about 2 s (tiny) to 6 s (large) of CPU once.

Mask prompt. SAM2Transforms squashes the whole frame to ``image_size`` x ``image_size`` (no
longest-side resize and padding, unlike SAM 1), so the prior's low-resolution logits are the
prior squashed to the prompt encoder's mask size (256 x 256 at 1024).
"""
from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..errors import LazyXMemError
from ..sam.refiner import MASK_LOGIT, SamRefiner, resolve_device
from .model import build_model, detect_type, import_sam2, shared_model

# The input side SAM2ImagePredictor is written for (its _bb_feat_sizes), and SAM 2's training size.
PREDICTOR_SIZE = 1024


@dataclass
class _Features:
    """What SAM2ImagePredictor.set_image leaves in the predictor for one frame."""

    features: dict[str, Any]  # image_embed and the high-resolution feature maps
    orig_hw: list[tuple[int, int]]


# One 1024 twin per source model: building one costs seconds, and a refiner is built per
# evaluated sequence; the twin goes when its model does.
_TWINS: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()
_TWINS_LOCK = threading.Lock()


def image_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` when it runs at 1024, else a 1024 SAM2Base holding ``model``'s own tensors.

    The twin shares every parameter and buffer with ``model`` (same storage: nothing copied), so
    both see one set of weights; ``model`` itself is not changed.
    """
    if int(model.image_size) == PREDICTOR_SIZE:
        return model
    with _TWINS_LOCK:
        if model not in _TWINS:
            _TWINS[model] = _twin(model)
        return _TWINS[model]


def _twin(model: torch.nn.Module) -> torch.nn.Module:
    sam2_type = detect_type(dict.fromkeys(name for name, _ in model.named_parameters()))
    if sam2_type is None:
        raise LazyXMemError(f"cannot tell the SAM 2.1 type of a {type(model).__name__} (its Hiera depth is "
                            "not tiny / small / base_plus / large): pass a model built by lazyxmem_core.sam2")
    twin = build_model(sam2_type, PREDICTOR_SIZE)
    # keep_vars + assign: the twin's slots get model's Parameter objects themselves, so no second
    # copy exists and a later in-place change of the weights reaches both.
    twin.load_state_dict(model.state_dict(keep_vars=True), strict=True, assign=True)
    return twin.eval()


def _same_device(a: torch.device, b: torch.device) -> bool:
    def index(d: torch.device) -> int:
        if d.index is not None:
            return d.index
        return torch.cuda.current_device() if d.type == "cuda" else 0

    return a.type == b.type and index(a) == index(b)


class SAM2Refiner(SamRefiner):
    """Refiner protocol on ``SAM2ImagePredictor``, sharing the propagator's SAM 2.1 weights.

    Thread-safe and cached per frame like :class:`SamRefiner` (one lock around setting a frame
    and predicting on it; ``cache_size`` frame embeddings kept, keyed by ``frame_key``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: str | None = None,
        prior_prompt: str = "none",
        cache_size: int = 4,
    ) -> None:
        """model: a built SAM2Base (e.g. the propagator's ``model``), at any image size.
        device: None, or the device the model is on (a check: the weights are shared, so the
        refiner does not move them)."""
        import_sam2()  # the package's own error when it is missing
        on = next(model.parameters()).device
        if device is not None and not _same_device(resolve_device(device), on):
            raise ValueError(f"the SAM 2 model is on {on} but device {device!r} was asked for: the refiner "
                             "shares the model's weights and does not move them; build the model on that device")
        self.source_model = model  # what the twin's weights belong to (the propagator's model)
        self._setup(image_model(model), prior_prompt, cache_size)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        sam2_type: str | None = None,
        device: str = "cpu",
        image_size: int = PREDICTOR_SIZE,
        prior_prompt: str = "none",
        cache_size: int = 4,
    ) -> SAM2Refiner:
        """The refiner on the process's shared model of ``checkpoint``.

        image_size: the size the SAM 2 propagator runs at (its ``SAM2Config.image_size``): with
        the same checkpoint, type and device strings, both get one loaded model from
        :func:`shared_model`; the refiner still predicts at 1024.
        """
        return cls(shared_model(checkpoint, sam2_type, image_size, device), None, prior_prompt, cache_size)

    # ---- SamRefiner's hooks

    def _new_predictor(self, model: torch.nn.Module) -> Any:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        with warnings.catch_warnings():
            # Its transforms are TorchScript, which recent torch calls deprecated: noise, no problem.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
            return SAM2ImagePredictor(model)

    def _encode(self, frame: np.ndarray) -> None:
        self.predictor.set_image(frame)  # RGB HWC uint8 is what it expects

    def _capture(self) -> _Features:  # type: ignore[override]
        p = self.predictor
        return _Features(p._features, list(p._orig_hw))

    def _restore(self, emb: _Features) -> None:  # type: ignore[override]
        p = self.predictor
        p._features, p._orig_hw = emb.features, list(emb.orig_hw)
        p._is_image_set, p._is_batch = True, False

    def _mask_input(self, prior: np.ndarray) -> np.ndarray:
        """The prior as (1, 256, 256) mask-input logits in SAM 2's model frame (the whole frame squashed)."""
        mh, mw = self.model.sam_prompt_encoder.mask_input_size
        low = cv2.resize(prior.astype(np.float32), (mw, mh), interpolation=cv2.INTER_AREA)
        return ((2.0 * low - 1.0) * MASK_LOGIT)[None].astype(np.float32)
