"""Build SAM 2.1 from the ``sam2`` package's own configs and load an official checkpoint.

The configs are read with OmegaConf and instantiated with ``hydra.utils.instantiate``: no Hydra
``compose`` and no global Hydra state of ours. ``import sam2`` itself initialises Hydra's global
config module (its ``__init__``); :func:`import_sam2` undoes that when the process had none, so
the rest of the process (and any other Hydra user in it) sees the state it had before.

A checkpoint is the official ``{"model": state_dict}`` file; it is loaded strictly and every
failure is one :class:`CheckpointError` that says what to pass instead.
"""
from __future__ import annotations

import importlib.resources
import os
import threading
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, LazyXMemError
from ..sam.refiner import resolve_device

# name -> (config inside the sam2 package, official file name). Hiera depth tells them apart.
SAM2_TYPES: dict[str, tuple[str, str]] = {
    "tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "small": ("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "base_plus": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
    "large": ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
}
_BLOCKS_TO_TYPE = {12: "tiny", 16: "small", 24: "base_plus", 48: "large"}
BASE_CLASS = "sam2.modeling.sam2_base.SAM2Base"
VIDEO_PREDICTOR_CLASS = "sam2.sam2_video_predictor.SAM2VideoPredictor"

_IMPORT_LOCK = threading.Lock()


def import_sam2() -> Any:
    """``import sam2`` without leaving Hydra's global config initialised by it; a clear error
    when the package is missing."""
    with _IMPORT_LOCK:
        try:
            from hydra.core.global_hydra import GlobalHydra
        except ImportError as e:
            raise LazyXMemError("SAM 2 needs hydra-core: install the project's requirements "
                                "(make install, or pip install -r requirements.txt)") from e
        had_hydra = GlobalHydra.instance().is_initialized()
        try:
            import sam2
        except ImportError as e:
            raise LazyXMemError("the SAM 2 engine needs the sam2 package: "
                                "SAM2_BUILD_CUDA=0 pip install --no-build-isolation -r requirements-sam2.txt") from e
        if not had_hydra and GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
        return sam2


def check_type(sam2_type: str) -> str:
    if sam2_type not in SAM2_TYPES:
        raise LazyXMemError(f"unknown SAM 2.1 type {sam2_type!r}: use one of {', '.join(SAM2_TYPES)}")
    return sam2_type


def model_config(sam2_type: str, image_size: int = 1024, target: str = BASE_CLASS) -> Any:
    """The OmegaConf model config of ``sam2_type``: the package's yaml, ``image_size`` and the
    class to build set, no post-processing (the official VOS evaluation's setting)."""
    from omegaconf import OmegaConf

    check_type(sam2_type)
    if image_size < 64 or image_size % 32:
        raise LazyXMemError(f"SAM 2 image size must be a multiple of 32 and at least 64, got {image_size}")
    sam2 = import_sam2()
    rel = SAM2_TYPES[sam2_type][0]
    path = importlib.resources.files(sam2).joinpath(rel)
    cfg = OmegaConf.load(str(path))
    cfg.model._target_ = target
    cfg.model.image_size = int(image_size)
    OmegaConf.resolve(cfg)
    return cfg.model


def build_model(sam2_type: str = "tiny", image_size: int = 1024, target: str = BASE_CLASS,
                seed: int | None = None) -> torch.nn.Module:
    """A randomly initialised SAM 2.1 of ``sam2_type`` (``seed`` for reproducible weights)."""
    from hydra.utils import instantiate

    cfg = model_config(sam2_type, image_size, target)
    if seed is not None:
        torch.manual_seed(seed)
    return instantiate(cfg, _recursive_=True).eval()


def detect_type(state_dict: dict[str, Any]) -> str | None:
    """tiny / small / base_plus / large from the number of Hiera blocks, or None."""
    blocks = {int(k.split(".")[3]) for k in state_dict if k.startswith("image_encoder.trunk.blocks.")}
    return _BLOCKS_TO_TYPE.get(max(blocks) + 1) if blocks else None


def load_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an official SAM 2.1 checkpoint file (``{"model": state_dict}``)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"SAM 2 checkpoint {path} not found: run `lazyxmem weights download sam2 --type tiny` "
                              "(or small, base_plus, large) and pass its path (--sam2-checkpoint / SAM2_CHECKPOINT)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # data, never code
    except Exception as e:  # torch raises several types for a damaged or foreign file
        first = str(e).splitlines()[0] if str(e) else "no details"
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {first}): the "
                              "download may be truncated; download the official SAM 2.1 checkpoint again") from e
    sd = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = ", ".join(map(str, list(obj)[:3])) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} is not a SAM 2 checkpoint: the official files hold {{'model': state_dict}}, "
                              f"this one holds {keys}")
    if not any(k.startswith("memory_attention.") for k in sd):
        hint = " (it looks like a SAM 1 / SAM-HQ checkpoint: use --refiner sam / sam-hq for it)" \
            if any(k.startswith("image_encoder.blocks.") for k in sd) else ""
        raise CheckpointError(f"{path} has no memory_attention.* weights: not a SAM 2 checkpoint{hint}")
    return sd


def load_checkpoint(checkpoint: str | Path, sam2_type: str | None = None, image_size: int = 1024,
                    device: str | torch.device = "cpu", target: str = BASE_CLASS) -> torch.nn.Module:
    """Build SAM 2.1 and load ``checkpoint`` strictly; ``sam2_type`` None: read from the weights."""
    dev = resolve_device(device)  # a bad device is said before the file is read
    sd = load_state_dict(checkpoint)
    detected = detect_type(sd)
    if sam2_type is None:
        if detected is None:
            raise CheckpointError(f"{checkpoint}: cannot tell the SAM 2.1 type from its weights; pass --sam2-type")
        sam2_type = detected
    check_type(sam2_type)
    if detected is not None and detected != sam2_type:
        raise CheckpointError(f"{checkpoint} is a SAM 2.1 {detected} checkpoint but {sam2_type} was asked for: "
                              f"pass --sam2-type {detected} (SAM2_TYPE={detected})")
    model = build_model(sam2_type, image_size, target)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()
        raise CheckpointError(f"{checkpoint} does not match SAM 2.1 {sam2_type}: {' '.join(first[:2])[:400]}; "
                              "pass the official sam2.1_hiera_*.pt file of that type") from e
    return model.to(dev).eval()



_MODELS: dict[tuple, torch.nn.Module] = {}
_MODELS_LOCK = threading.Lock()


def shared_model(checkpoint: str | Path, sam2_type: str | None, image_size: int, device: str) -> torch.nn.Module:
    """The process's one copy of a checkpoint's model: the propagator of every task and the
    SAM 2 refiner share it (the weights are read-only at inference)."""
    try:
        stamp = os.stat(checkpoint).st_mtime_ns  # a replaced file is loaded again
    except OSError:
        stamp = None  # load_checkpoint says what is wrong with the path
    key = (os.path.realpath(checkpoint), stamp, sam2_type, int(image_size), str(device))
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_checkpoint(checkpoint, sam2_type, image_size, device)
        return _MODELS[key]
