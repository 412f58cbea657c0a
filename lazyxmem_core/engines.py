"""Build propagators and refiners by name, picking the best one available for ``auto``.

``auto`` means XMem / SAM when their checkpoints are configured (argument or environment:
``XMEM_CHECKPOINT``, ``SAM_CHECKPOINT``, ``SAM_TYPE``), the embedded no-weights engine otherwise.
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

PROPAGATORS = ("auto", "xmem", "embedded")
REFINERS = ("auto", "sam", "embedded", "none")


@dataclass(frozen=True)
class EngineSettings:
    engine: str = "auto"
    refiner: str = "auto"
    xmem_checkpoint: str | None = None
    sam_checkpoint: str | None = None
    sam_type: str = "vit_h"
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
            "device": os.environ.get("DEVICE") or "cpu",
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def propagator_name(settings: EngineSettings) -> str:
    if settings.engine not in PROPAGATORS:
        raise LazyXMemError(f"unknown engine {settings.engine!r}: choose one of {', '.join(PROPAGATORS)}")
    if settings.engine == "auto":
        return "xmem" if settings.xmem_checkpoint else "embedded"
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


def lazy_config(settings: EngineSettings, sustained: bool = True, **overrides: Any) -> LazyConfig:
    """The Lazy controller's configuration for the engines ``settings`` picks: thresholds on the
    propagator's uncertainty scale (XMem: the paper's), pseudo-corrections only with a refiner
    that can make them (SAM), backward revision of corrections on, then ``overrides`` (None
    values ignored). ``sustained=False`` turns the sustained-uncertainty trigger off."""
    thresholds: dict[str, Any] = {}
    if propagator_name(settings) == "embedded":
        from .embedded import EmbeddedPropagator

        thresholds = dict(EmbeddedPropagator.lazy_thresholds)
    if refiner_name(settings) == "embedded":
        # A single automatic click tells GrabCut almost nothing that the propagated mask does not:
        # on DAVIS 2016 pseudo-corrections alone give 64.4 against 64.2 without, and Lazy with
        # them 64.4 against 64.7 without. SAM's objectness is what makes them pay in the paper,
        # so they are on only with SAM.
        thresholds["pseudo"] = False
    # A correction revises the frames before it too (not in the paper): with ground-truth masks as
    # corrections it adds 1.7 J&F on DAVIS 2016 (67.2 -> 68.9) at the same 9 corrections.
    values = {"backward": True, **thresholds, **{k: v for k, v in overrides.items() if v is not None}}
    if not sustained:
        values["tau_s"] = None
    return LazyConfig(**values)


def refiner_name(settings: EngineSettings) -> str:
    if settings.refiner not in REFINERS:
        raise LazyXMemError(f"unknown refiner {settings.refiner!r}: choose one of {', '.join(REFINERS)}")
    if settings.refiner == "auto":
        return "sam" if settings.sam_checkpoint else "embedded"
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
    from .embedded import GrabCutRefiner

    log.info("refiner: embedded GrabCut (no weights)%s", "" if settings.refiner == "embedded" else ", no SAM checkpoint configured")
    return GrabCutRefiner()
