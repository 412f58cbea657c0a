"""SamRefiner on a tiny randomly initialised SAM built from segment_anything's own classes.

The weights are random, so the masks mean nothing: these tests check the plumbing (shapes,
prompt combinations, the per-frame cache) and the checkpoint loader's errors.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")
from segment_anything import sam_model_registry  # noqa: E402

from lazyxmem_core.errors import CheckpointError  # noqa: E402
from lazyxmem_core.protocols import Refiner  # noqa: E402
from lazyxmem_core.sam import SamRefiner, build_sam, detect_model_type  # noqa: E402
from lazyxmem_core.types import Box, Click, FrameRef  # noqa: E402

from tiny_sam import DIM, IMG, tiny_sam  # noqa: E402, F401


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (60, 90, 3), dtype=np.uint8) for _ in range(3)]


@pytest.fixture()
def refiner() -> SamRefiner:
    torch.set_num_threads(1)
    return SamRefiner.from_model(tiny_sam(), device="cpu")


def count_encoder_calls(ref: SamRefiner) -> list[int]:
    calls = [0]
    ref.model.image_encoder.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_protocol_and_output(refiner: SamRefiner, frames: list[np.ndarray]) -> None:
    assert isinstance(refiner, Refiner)
    m = refiner.refine(frames[0], [Click(10, 20)])
    assert m.shape == (60, 90) and m.dtype == bool


def test_one_encode_per_frame(refiner: SamRefiner, frames: list[np.ndarray]) -> None:
    calls = count_encoder_calls(refiner)
    f = frames[0]
    refiner.refine(f, [Click(10, 20)])
    refiner.refine(f, [Click(50, 30), Click(5, 5, positive=False)])
    refiner.refine(f.copy(), box=Box(5, 5, 40, 40))  # same content, no id: hash key hits
    assert calls[0] == 1
    refiner.refine(frames[1], [Click(10, 20)], frame_id=FrameRef("v", 1))
    refiner.refine(frames[1], [Click(12, 20)], frame_id=FrameRef("v", 1))
    assert calls[0] == 2 and refiner.encodes == 2
    # Switching back to a cached frame restores its embedding, not the last one's.
    a = refiner.refine(f, [Click(10, 20)])
    assert calls[0] == 2
    fresh = SamRefiner.from_model(refiner.model)
    assert np.array_equal(a, fresh.refine(f, [Click(10, 20)]))


def test_lru_evicts(frames: list[np.ndarray]) -> None:
    ref = SamRefiner.from_model(tiny_sam(), cache_size=2)
    for i in (0, 1, 2, 0):
        ref.refine(frames[i], [Click(3, 3)], frame_id=FrameRef("v", i))
    assert ref.encodes == 4  # frame 0 was evicted by frame 2


def test_prompt_kinds(refiner: SamRefiner, frames: list[np.ndarray]) -> None:
    f = frames[0]
    for kwargs in (
        dict(box=Box(10, 10, 50, 40)),
        dict(clicks=[Click(20, 20, positive=False)]),
        dict(clicks=[Click(20, 20), Click(30, 25, positive=False)], box=Box(0, 0, 80, 50)),
        dict(box=Box(-10, -10, 500, 500)),  # clipped to the frame
    ):
        m = refiner.refine(f, **kwargs)
        assert m.shape == (60, 90) and m.dtype == bool


@pytest.mark.parametrize("mode", ["none", "box", "mask"])
def test_prior_modes(mode: str, frames: list[np.ndarray]) -> None:
    ref = SamRefiner.from_model(tiny_sam(), prior_prompt=mode)
    prior = np.zeros((60, 90), bool)
    prior[10:40, 20:60] = True
    for clicks in ([Click(30, 20)], []):
        m = ref.refine(frames[0], clicks, prior=prior)
        assert m.shape == (60, 90) and m.dtype == bool
    if mode == "none":  # no prompt at all: the prior comes back as it is
        assert np.array_equal(ref.refine(frames[0], prior=prior), prior)


def test_mask_input_geometry(refiner: SamRefiner, frames: list[np.ndarray]) -> None:
    refiner.refine(frames[0], [Click(1, 1)])  # sets input_size for 60x90 -> 85x128
    prior = np.zeros((60, 90), bool)
    prior[:, :45] = True  # left half of the frame
    logits = refiner._mask_input(prior)
    assert logits.shape == (1, 32, 32)  # 4 x the 8x8 embedding grid of the tiny model
    assert logits[0, 5, 2] > 0 and logits[0, 5, 25] < 0  # right half and the padding: outside
    assert logits[0, 30, 2] < 0  # below the resized frame (padding rows)


def test_bad_inputs(refiner: SamRefiner, frames: list[np.ndarray]) -> None:
    f = frames[0]
    with pytest.raises(ValueError, match="outside"):
        refiner.refine(f, [Click(90, 10)])
    with pytest.raises(ValueError, match="prior"):
        refiner.refine(f, [Click(1, 1)], prior=np.zeros((10, 10), bool))
    with pytest.raises(ValueError, match="at least one click"):
        refiner.refine(f)
    with pytest.raises(ValueError, match="uint8"):
        refiner.refine(f.astype(np.float32), [Click(1, 1)])
    with pytest.raises(ValueError, match="prior_prompt"):
        SamRefiner.from_model(tiny_sam(), prior_prompt="boxes")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            SamRefiner.from_model(tiny_sam(), device="cuda")


# ---- checkpoint loading -------------------------------------------------------------------

def test_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        SamRefiner(tmp_path / "nope.pth", "vit_b")


def test_garbage_checkpoint(tmp_path) -> None:
    p = tmp_path / "garbage.pth"
    p.write_bytes(b"<html>rate limited</html>" * 10)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        SamRefiner(p, "vit_b")


def test_not_a_sam_state_dict(tmp_path) -> None:
    p = tmp_path / "other.pth"
    torch.save({"backbone.conv1.weight": torch.zeros(3)}, p)
    with pytest.raises(CheckpointError, match="not a SAM one"):
        SamRefiner(p, "vit_b")


def test_wrong_type_is_detected(tmp_path) -> None:
    # Only the keys the type detection reads: the error must come before any model is built.
    p = tmp_path / "sam_vit_b_like.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 64, 64, 768),
                "image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, p)
    with pytest.raises(CheckpointError, match=r"vit_b checkpoint.*model_type='vit_b'"):
        SamRefiner(p, "vit_h")


def test_unknown_width_mismatch(tmp_path) -> None:
    p = tmp_path / "tiny.pth"
    torch.save(tiny_sam().state_dict(), p)
    assert detect_model_type(torch.load(p)) is None
    with pytest.raises(CheckpointError, match="does not match SAM vit_b"):
        build_sam(p, "vit_b")


def test_real_vit_b_round_trip(tmp_path) -> None:
    """The official vit_b layout (random weights, ~375 MB file, ~5 s on one CPU core) loads,
    and asking for the wrong type names the right one."""
    torch.manual_seed(0)
    p = tmp_path / "sam_vit_b.pth"
    saved = sam_model_registry["vit_b"]().state_dict()
    torch.save(saved, p)
    with pytest.raises(CheckpointError, match="pass model_type='vit_b'"):
        SamRefiner(p, "vit_l")
    ref = SamRefiner(p, "vit_b", prior_prompt="mask")
    # No refine() here: one 1024x1024 vit_b encode takes about a minute on one CPU core.
    key = "image_encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(ref.model.state_dict()[key], saved[key])
    assert not ref.model.training
