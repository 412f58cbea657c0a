"""Build propagators and refiners by name, picking the best one available for ``auto``.

``auto`` means XMem, else SAM 2.1, when their checkpoints are configured (argument or environment:
``XMEM_CHECKPOINT``, ``SAM2_CHECKPOINT``), the embedded no-weights engine otherwise; for the
refiner SAM-HQ, else SAM (``SAM_HQ_CHECKPOINT``, ``SAM_CHECKPOINT``), else SAM 2.1 when it is the
propagator (the same weights, one copy), else GrabCut. A new engine is one entry here.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from .errors import LazyXMemError
from .lazy import LazyConfig
from .protocols import Propagator, Refiner

log = logging.getLogger(__name__)

PROPAGATORS = ("auto", "xmem", "sam2", "embedded")
REFINERS = ("auto", "sam", "sam-hq", "sam2", "embedded", "none")
# SAM 2.1's Lazy thresholds are provisional: no checkpoint could be downloaded to calibrate them
# on its own uncertainty, so they are the paper's (XMem's) values, and a review budget per video
# keeps the requests bounded until they are measured (bench/gpu_check.py, with a checkpoint).
SAM2_LAZY = {"user_budget": 20}


@dataclass(frozen=True)
class EngineSettings:
    engine: str = "auto"
    refiner: str = "auto"
    xmem_checkpoint: str | None = None
    sam_checkpoint: str | None = None
    sam_type: str = "vit_h"
    sam2_checkpoint: str | None = None
    sam2_type: str | None = None  # None: read from the checkpoint's weights
    sam2_image_size: int = 1024
    sam2_bf16: bool = False
    sam_hq_checkpoint: str | None = None
    sam_hq_type: str = "vit_l"
    device: str = "cpu"

    @classmethod
    def from_env(cls, **overrides: Any) -> EngineSettings:
        values = {
            # Empty counts as unset: compose passes ${X:-} through as "".
            "engine": os.environ.get("LAZYXMEM_ENGINE") or "auto",
            "refiner": os.environ.get("LAZYXMEM_REFINER") or "auto",
            "xmem_checkpoint": os.environ.get("XMEM_CHECKPOINT") or None,
            "sam_checkpoint": os.environ.get("SAM_CHECKPOINT") or None,
            "sam_type": os.environ.get("SAM_TYPE") or "vit_h",
            "sam2_checkpoint": os.environ.get("SAM2_CHECKPOINT") or None,
            "sam2_type": os.environ.get("SAM2_TYPE") or None,
            "sam2_image_size": _env_int("SAM2_IMAGE_SIZE", 1024),
            "sam2_bf16": (os.environ.get("SAM2_BF16") or "").strip().lower() in ("1", "true", "yes", "on"),
            "sam_hq_checkpoint": os.environ.get("SAM_HQ_CHECKPOINT") or None,
            "sam_hq_type": os.environ.get("SAM_HQ_TYPE") or "vit_l",
            "device": os.environ.get("DEVICE") or "cpu",
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def propagator_name(settings: EngineSettings) -> str:
    if settings.engine not in PROPAGATORS:
        raise LazyXMemError(f"unknown engine {settings.engine!r}: choose one of {', '.join(PROPAGATORS)}")
    if settings.engine == "auto":
        return "xmem" if settings.xmem_checkpoint else "sam2" if settings.sam2_checkpoint else "embedded"
    return settings.engine


def build_propagator(settings: EngineSettings, xmem_knobs: dict[str, Any] | None = None,
                     video_length: int | None = None) -> Propagator:
    """xmem_knobs: XMemConfig fields (size, mem_every, top_k, ...) for the XMem engine; None: defaults.
    video_length: frames from the first annotated one to the end, when known (XMem decides usage
    counting and skips the last memory write by it, as the official evaluation does)."""
    name = propagator_name(settings)
    if name == "xmem":
        if not settings.xmem_checkpoint:
            raise LazyXMemError("the XMem engine needs a checkpoint: pass --xmem-checkpoint PATH or set XMEM_CHECKPOINT")
        return _xmem_propagator(settings.xmem_checkpoint, settings.device, xmem_knobs or {}, video_length)
    if name == "sam2":
        from .sam2 import SAM2Config, SAM2Propagator

        log.info("engine: SAM 2.1 %s (%s) at %d on %s", settings.sam2_type or "(type from the weights)",
                 settings.sam2_checkpoint, settings.sam2_image_size, settings.device)
        config = SAM2Config(image_size=settings.sam2_image_size, bf16=settings.sam2_bf16)
        return SAM2Propagator(_sam2_model(settings), config, video_length=video_length)
    from .embedded import EmbeddedPropagator

    log.info("engine: embedded (no weights)%s", "" if settings.engine == "embedded" else ", no XMem checkpoint configured")
    return EmbeddedPropagator()


_XMEM_NETS: dict[tuple, tuple[Any, Any, Any]] = {}
_XMEM_LOCK = threading.Lock()


def _xmem_propagator(path: str, device: str, knobs: dict[str, Any], video_length: int | None) -> Propagator:
    """An XMem propagator with its own memory on the process's one copy of the network: the
    weights load once per process (a worker serves many tasks), not once per task."""
    from .xmem import XMemPropagator

    try:
        stamp = os.stat(path).st_mtime_ns  # a replaced checkpoint file is loaded again
    except OSError:
        stamp = None  # from_checkpoint says what is wrong with the path
    key = (os.path.realpath(path), stamp, str(device), tuple(sorted(knobs.items())))
    with _XMEM_LOCK:
        if key not in _XMEM_NETS:
            log.info("engine: XMem (%s) on %s", path, device)
            # CheckpointError (a LazyXMemError) says what is wrong with a bad checkpoint.
            loaded = XMemPropagator.from_checkpoint(path, device=device, **knobs)
            _XMEM_NETS[key] = (loaded.net, loaded.config, loaded.device)
        net, config, dev = _XMEM_NETS[key]
    return XMemPropagator(net, config, dev, video_length=video_length)


def _sam2_model(settings: EngineSettings) -> Any:
    """The process's one copy of the SAM 2.1 weights (propagator and refiner share it)."""
    if not settings.sam2_checkpoint:
        raise LazyXMemError("SAM 2.1 needs a checkpoint: pass --sam2-checkpoint PATH or set SAM2_CHECKPOINT "
                            "(lazyxmem weights download sam2 --type tiny|small|base_plus|large)")
    from .sam2 import shared_model

    return shared_model(settings.sam2_checkpoint, settings.sam2_type, settings.sam2_image_size, settings.device)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name) or ""
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise LazyXMemError(f"{name}={value!r} is not a whole number") from None


def lazy_config(settings: EngineSettings, sustained: bool = True, **overrides: Any) -> LazyConfig:
    """The Lazy controller's configuration for the engines ``settings`` picks: thresholds on the
    propagator's uncertainty scale (XMem: the paper's), pseudo-corrections only with a refiner
    that can make them (SAM), backward revision of corrections on, then ``overrides`` (None
    values ignored). ``sustained=False`` turns the sustained-uncertainty trigger off."""
    thresholds: dict[str, Any] = {}
    if propagator_name(settings) == "embedded":
        from .embedded import EmbeddedPropagator

        thresholds = dict(EmbeddedPropagator.lazy_thresholds)
    elif propagator_name(settings) == "sam2":
        thresholds = dict(SAM2_LAZY)
    if refiner_name(settings) == "embedded":
        # A single automatic click tells GrabCut almost nothing that the propagated mask does not:
        # on DAVIS 2016 pseudo-corrections alone give 64.4 against 64.2 without, and Lazy with
        # them 64.4 against 64.7 without. SAM's objectness is what makes them pay in the paper,
        # so they are on only with SAM.
        thresholds["pseudo"] = False
    # A correction revises the frames before it too (not in the paper): with ground-truth masks as
    # corrections it adds 1.7 J&F on DAVIS 2016 (67.2 -> 68.9) at the same 9 corrections.
    given = {k: v for k, v in overrides.items() if v is not None}
    values = {"backward": True, **thresholds, **given}
    if values.get("score", "S") != "combined" and "ask_clear" not in given:
        # An engine's ask_clear is on its failure score F, which the triggers see only with the
        # combined score: asking for S alone (the paper's triggers) leaves it out.
        values.pop("ask_clear", None)
    if not sustained:
        values["tau_s"] = None
    return LazyConfig(**values)


def refiner_name(settings: EngineSettings) -> str:
    if settings.refiner not in REFINERS:
        raise LazyXMemError(f"unknown refiner {settings.refiner!r}: choose one of {', '.join(REFINERS)}")
    if settings.refiner == "auto":
        if settings.sam_hq_checkpoint:
            return "sam-hq"
        if settings.sam_checkpoint:
            return "sam"
        if propagator_name(settings) == "sam2":
            return "sam2"
        return "embedded"
    return settings.refiner


def build_refiner(settings: EngineSettings) -> Refiner | None:
    name = refiner_name(settings)
    if name == "none":
        return None
    if name == "sam":
        if not settings.sam_checkpoint:
            raise LazyXMemError("the SAM refiner needs a checkpoint: pass --sam-checkpoint PATH or set SAM_CHECKPOINT")
        from .sam import SamRefiner

        log.info("refiner: SAM %s (%s) on %s", settings.sam_type, settings.sam_checkpoint, settings.device)
        return SamRefiner(settings.sam_checkpoint, model_type=settings.sam_type, device=settings.device)
    if name == "sam-hq":
        if not settings.sam_hq_checkpoint:
            raise LazyXMemError("the SAM-HQ refiner needs a checkpoint: pass --sam-hq-checkpoint PATH or set "
                                "SAM_HQ_CHECKPOINT (lazyxmem weights download sam-hq --type vit_l)")
        from .sam import SamHQRefiner

        log.info("refiner: SAM-HQ %s (%s) on %s", settings.sam_hq_type, settings.sam_hq_checkpoint, settings.device)
        return SamHQRefiner(settings.sam_hq_checkpoint, model_type=settings.sam_hq_type, device=settings.device)
    if name == "sam2":
        from .sam2 import SAM2Refiner

        log.info("refiner: SAM 2.1 image predictor on the propagator's weights (%s)", settings.sam2_checkpoint)
        return SAM2Refiner(_sam2_model(settings), device=settings.device)
    from .embedded import GrabCutRefiner

    log.info("refiner: embedded GrabCut (no weights)%s", "" if settings.refiner == "embedded" else ", no SAM checkpoint configured")
    return GrabCutRefiner()
