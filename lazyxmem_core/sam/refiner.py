"""SAM (Segment Anything) as the mask refiner: clicks / box (and optionally the prior) -> mask.

Prompting follows SAM's own advice (``SamPredictor.predict`` docstring): a single click is
ambiguous (part / object / group), so SAM returns three masks and we keep the one with the
highest predicted IoU; with several prompts (clicks + box, several clicks, a mask prompt) one
mask output is better. The image embedding of the last few frames is cached, so several
objects or several correction rounds on one frame cost one encoder pass.

``prior_prompt`` says what to do with the propagated mask:

* ``"none"``  -- ignore it (the paper's behaviour: clicks only);
* ``"box"``   -- add the prior's bounding box as the box prompt when no box is given;
* ``"mask"``  -- feed the prior to SAM's mask input as low-resolution logits.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import torch

from ..errors import CheckpointError
from ..refine_common import FrameCache, check_prompts, frame_key
from ..types import Box, Click, FrameRef

PRIOR_PROMPTS = ("none", "box", "mask")
# Image-encoder width of each official SAM variant: the width of image_encoder.pos_embed.
EMBED_DIM_TO_TYPE = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
# Logit magnitude used to turn a binary prior into SAM's mask input; SAM's own low-res logits
# are typically of this order inside / outside confident regions.
MASK_LOGIT = 10.0
# Parameters only SAM-HQ's decoder has (its HQ output token and the fusion of early ViT features):
# they tell a SAM-HQ checkpoint from a plain SAM one, whose layout is otherwise the same.
HQ_KEY_PREFIXES = ("mask_decoder.hf_token.", "mask_decoder.compress_vit_feat.")
SAM_GET = "download the official checkpoint of your model type (e.g. sam_vit_h_4b8939.pth or sam_vit_b_01ec64.pth)"

_R = TypeVar("_R", bound="SamRefiner")


@dataclass
class _Embedding:
    """What SamPredictor.set_image computes for one frame."""

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    # SAM-HQ's predictor also keeps early ViT features, which its decoder reads on every predict.
    interm_features: list[torch.Tensor] | None = None


def resolve_device(device: str) -> torch.device:
    """torch.device for ``device``; a clear error if CUDA is asked for but not usable."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda' (or 'cuda:N')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available "
                         "(torch.cuda.is_available() is False): use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA "
                         "device(s) are visible")
    return dev


def detect_model_type(state_dict: dict[str, Any]) -> str | None:
    """Guess vit_b / vit_l / vit_h from the image encoder's width, or None if unknown."""
    for key, dim_axis in (("image_encoder.pos_embed", -1), ("image_encoder.patch_embed.proj.weight", 0)):
        t = state_dict.get(key)
        if isinstance(t, torch.Tensor) and t.ndim >= 1:
            return EMBED_DIM_TO_TYPE.get(int(t.shape[dim_axis]))
    return None


def is_sam_hq(state_dict: Mapping[str, Any]) -> bool:
    """Whether a SAM-layout state dict carries SAM-HQ's extra decoder parameters."""
    return any(k.startswith(HQ_KEY_PREFIXES) for k in state_dict)


def load_state_dict(checkpoint: str | Path, name: str = "SAM", get: str = SAM_GET) -> dict[str, torch.Tensor]:
    """Read a SAM checkpoint (a plain state dict, as Meta publishes them) on the CPU.

    name: the model family in messages (SAM-HQ checkpoints have the same form); get: how to
    obtain the file, said when it is missing.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"{name} checkpoint {path} not found: {get} and pass its path")
    try:
        # weights_only: a checkpoint is data, it must not run code when it is opened.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged / non-torch file
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no details'}): the download may be "
            f"truncated or the file is something else; re-download the official {name} checkpoint"
        ) from e
    # Tolerate the usual training wrappers {"model": sd} / {"state_dict": sd}.
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a {name} state dict "
                              "(a mapping of parameter names to tensors)")
    if not any(k.startswith("image_encoder.") for k in obj):
        first = ", ".join(list(obj)[:3])
        raise CheckpointError(f"{path} is a PyTorch state dict but not a {name} one (no "
                              f"image_encoder.* keys; it starts with: {first}); pass an official "
                              f"{name} checkpoint")
    return obj


def build_sam(checkpoint: str | Path, model_type: str = "vit_h", device: str = "cpu") -> torch.nn.Module:
    """Build an official SAM of ``model_type`` and load ``checkpoint`` into it, on ``device``.

    Every failure is a CheckpointError that says what is wrong and what to pass instead.
    """
    from segment_anything import sam_model_registry  # heavy import: only when SAM is used

    return build_checked(sam_model_registry, checkpoint, model_type, device)


def build_checked(
    registry: Mapping[str, Callable[[], torch.nn.Module]],
    checkpoint: str | Path,
    model_type: str,
    device: str,
    name: str = "SAM",
    type_option: str | None = "--sam-type",
    load: Callable[[str | Path], dict[str, torch.Tensor]] = load_state_dict,
) -> torch.nn.Module:
    """Build ``registry[model_type]()`` and load ``checkpoint`` into it strictly, on ``device``.

    Shared by SAM and SAM-HQ (same encoder, same key names up to the decoder): ``name`` is the
    family in messages, ``type_option`` the command-line option that sets the type (None: none),
    ``load`` reads and pre-checks the file.
    """
    if model_type not in registry:
        raise ValueError(f"unknown {name} model type {model_type!r}: use one of "
                         f"{sorted(k for k in registry if k != 'default')}")
    dev = resolve_device(device)
    state_dict = load(checkpoint)
    detected = detect_model_type(state_dict)
    wanted = "vit_h" if model_type == "default" else model_type
    # Check the type before building: building vit_h just to fail takes seconds and GBs.
    if detected is not None and detected != wanted:
        option = f" ({type_option} {detected})" if type_option else ""
        raise CheckpointError(f"{checkpoint} is a {name} {detected} checkpoint but model type "
                              f"{wanted} was asked for: pass model_type={detected!r}{option}")
    model = registry[model_type]()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        missing = [k for k in model.state_dict() if k not in state_dict]
        unexpected = [k for k in state_dict if k not in model.state_dict()]
        hint = (f"detected type: {detected}" if detected else
                f"its image encoder width matches no official {name} type")
        other = ("it is a SAM-HQ checkpoint (mask_decoder.hf_token.* keys): load it with the SAM-HQ "
                 "refiner (sam-hq)" if name == "SAM" and is_sam_hq(state_dict) else
                 "other SAM variants need their own loader")
        raise CheckpointError(
            f"{checkpoint} does not match {name} {wanted} ({hint}; {len(missing)} missing keys "
            f"e.g. {missing[:2]}, {len(unexpected)} unexpected e.g. {unexpected[:2]}, or "
            f"shape mismatches). Pass the official {name} checkpoint of that type; {other}") from e
    return model.to(dev).eval()


class SamRefiner:
    """Refiner protocol on top of ``segment_anything.SamPredictor`` with a per-frame LRU cache."""

    def __init__(
        self,
        checkpoint: str | Path,
        model_type: str = "vit_h",
        device: str = "cpu",
        prior_prompt: str = "none",
        cache_size: int = 4,
    ) -> None:
        model = self._build_model(checkpoint, model_type, device)
        self._setup(model, prior_prompt, cache_size)

    @classmethod
    def from_model(
        cls: type[_R], model: torch.nn.Module, device: str = "cpu", prior_prompt: str = "none",
        cache_size: int = 4,
    ) -> _R:
        """Wrap an already-built ``segment_anything.modeling.Sam`` (moved to ``device``)."""
        self = cls.__new__(cls)
        self._setup(model.to(resolve_device(device)).eval(), prior_prompt, cache_size)
        return self

    # The hooks below are what a SAM variant with SAM's predictor interface (SAM-HQ, SAM 2) changes.

    @staticmethod
    def _build_model(checkpoint: str | Path, model_type: str, device: str) -> torch.nn.Module:
        return build_sam(checkpoint, model_type, device)

    def _new_predictor(self, model: torch.nn.Module) -> Any:
        from segment_anything import SamPredictor

        return SamPredictor(model)

    def _capture(self) -> _Embedding:
        """What set_image left in the predictor, to be cached."""
        p = self.predictor
        return _Embedding(p.features, tuple(p.original_size), tuple(p.input_size))

    def _restore(self, emb: _Embedding) -> None:
        """Put a cached frame back into the predictor, as if set_image had just run on it."""
        p = self.predictor
        p.features, p.original_size, p.input_size = emb.features, emb.original_size, emb.input_size
        p.is_image_set = True

    def _predict_options(self) -> dict[str, Any]:
        """Extra keyword arguments of the predictor's predict()."""
        return {}

    def _encode(self, frame: np.ndarray) -> None:
        """Run the image encoder on an RGB frame, leaving its embedding in the predictor."""
        self.predictor.set_image(frame, image_format="RGB")

    def _setup(self, model: torch.nn.Module, prior_prompt: str, cache_size: int) -> None:
        if prior_prompt not in PRIOR_PROMPTS:
            raise ValueError(f"prior_prompt must be one of {PRIOR_PROMPTS}, got {prior_prompt!r}")
        self.model = model
        self.prior_prompt = prior_prompt
        self.predictor = self._new_predictor(model)
        self._cache: FrameCache[_Embedding] = FrameCache(cache_size)
        # One SamPredictor holds one image at a time: setting a frame and predicting on it is one
        # critical section, or another thread's frame slips in between (web threads and a job
        # thread share this refiner). The encoder itself runs inside it too: one model, one pass
        # at a time.
        self._lock = threading.Lock()

    @property
    def encodes(self) -> int:
        """How many image encoder passes were run so far (cache misses)."""
        return self._cache.misses

    def _set_frame(self, frame: np.ndarray, frame_id: FrameRef | None) -> None:
        """Put the frame's embedding into the predictor, computing it only on a cache miss."""
        def encode() -> _Embedding:
            self._encode(frame)
            return self._capture()

        self._restore(self._cache.get(frame_key(frame, frame_id), encode))

    def _mask_input(self, prior: np.ndarray) -> np.ndarray:
        """The prior as SAM's (1, 256, 256) mask-input logits, in the padded model frame."""
        p = self.predictor
        ih, iw = p.input_size
        size = self.model.image_encoder.img_size
        # Same geometry as the image: resized longest side, then zero padding right / bottom.
        resized = cv2.resize(prior.astype(np.float32), (iw, ih), interpolation=cv2.INTER_LINEAR)
        padded = np.zeros((size, size), np.float32)
        padded[:ih, :iw] = resized
        mh, mw = self.model.prompt_encoder.mask_input_size
        low = cv2.resize(padded, (mw, mh), interpolation=cv2.INTER_AREA)
        return ((2.0 * low - 1.0) * MASK_LOGIT)[None].astype(np.float32)

    def refine(
        self,
        frame: np.ndarray,
        clicks: Sequence[Click] = (),
        box: Box | None = None,
        prior: np.ndarray | None = None,
        frame_id: FrameRef | None = None,
        reference: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Bool (H, W) mask from SAM; see the module docstring for how prompts are combined."""
        clicks, box, prior = check_prompts(frame, clicks, box, prior)
        has_prior = prior is not None and bool(prior.any())
        use_prior = self.prior_prompt if has_prior else "none"
        if use_prior == "none" and not clicks and box is None:
            if prior is not None:
                return prior.copy()  # nothing to refine with
            raise ValueError("refine needs at least one click or a box (or a prior mask with "
                             "prior_prompt 'box' or 'mask')")

        prior_box = None
        if use_prior in ("box", "mask") and box is None:
            ys, xs = np.nonzero(prior)
            prior_box = Box(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        if use_prior == "box":
            box = prior_box
        elif use_prior == "mask" and box is None and not clicks:
            # A mask prompt alone is a weak prompt for SAM (it was trained as a refinement
            # input next to points / boxes): give the prior's box along with it.
            box = prior_box

        coords = labels = None
        if clicks:
            coords = np.array([[c.x, c.y] for c in clicks], np.float32)
            labels = np.array([1 if c.positive else 0 for c in clicks], np.int64)
        box_arr = None if box is None else np.array([box.x0, box.y0, box.x1, box.y1], np.float32)
        # SAM's advice: three candidate masks for one ambiguous click, one mask otherwise.
        single_click = len(clicks) == 1 and box is None and use_prior != "mask"

        with self._lock, torch.inference_mode():
            self._set_frame(frame, frame_id)
            mask_input = self._mask_input(prior) if use_prior == "mask" else None
            masks, scores, _ = self.predictor.predict(
                point_coords=coords, point_labels=labels, box=box_arr, mask_input=mask_input,
                multimask_output=single_click, **self._predict_options())
        best = int(np.argmax(scores)) if single_click else 0
        return np.asarray(masks[best], dtype=bool)
