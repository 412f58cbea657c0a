"""A complete SAM 2.1 checkpoint file in a few hundred kB, for the download and loading tests.

Every key of the official layout with its shape, each tensor a stride-0 view of one number, so
``torch.save`` writes one element per tensor while a strict ``load_state_dict`` accepts it
(the official tiny file is 156 MB). Built once per test session: the shapes come from
building the model (about 2 s).
"""
from __future__ import annotations

import functools
import io

import torch


@functools.lru_cache(maxsize=None)
def sam2_shapes(sam2_type: str = "tiny") -> dict[str, tuple[int, ...]]:
    from lazyxmem_core.sam2.model import build_model

    return {k: tuple(v.shape) for k, v in build_model(sam2_type).state_dict().items()}


def sam2_state_dict(sam2_type: str = "tiny", value: float = 0.0) -> dict[str, torch.Tensor]:
    return {k: torch.full((1,) * len(s), value).expand(*s) for k, s in sam2_shapes(sam2_type).items()}


@functools.lru_cache(maxsize=None)
def sam2_checkpoint_bytes(sam2_type: str = "tiny") -> bytes:
    """The official file's form, ``{"model": state_dict}``."""
    buf = io.BytesIO()
    torch.save({"model": sam2_state_dict(sam2_type)}, buf)
    return buf.getvalue()
