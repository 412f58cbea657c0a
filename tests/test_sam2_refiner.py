"""SAM2Refiner on a randomly initialised SAM 2.1 tiny, run by a propagator at image size 256.

The weights are random, so the masks mean nothing: the tests check the plumbing against
SAM2ImagePredictor called by hand with the same prompts, the per-frame cache, thread safety and
that the 1024 model the refiner predicts with holds the propagator model's tensors, not a copy.
An image encode at 1024 takes seconds on a CPU: the tests share one refiner and few frames.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from lazyxmem_core.protocols import Refiner  # noqa: E402
from lazyxmem_core.sam2 import SAM2Refiner, build_model, shared_model  # noqa: E402
from lazyxmem_core.sam2.refiner import image_model  # noqa: E402
from lazyxmem_core.types import Box, Click, FrameRef  # noqa: E402

from tiny_sam2 import sam2_checkpoint_bytes  # noqa: E402

H, W = 512, 768  # 2x and 3x the 256 mask-input grid: a block-aligned prior squashes exactly


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return [np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8) for seed in (0, 1)]


@pytest.fixture(scope="module")
def model256() -> torch.nn.Module:
    return build_model("tiny", 256, seed=0)  # what a SAM2Propagator at image size 256 runs


@pytest.fixture(scope="module")
def refiner(model256: torch.nn.Module) -> SAM2Refiner:
    return SAM2Refiner(model256, device="cpu")


def block_prior() -> np.ndarray:
    prior = np.zeros((H, W), bool)
    prior[128:384, 192:576] = True  # rows 64:192, columns 64:192 of the 256 grid
    return prior


def test_twin_shares_the_propagator_weights(model256: torch.nn.Module, refiner: SAM2Refiner) -> None:
    twin = refiner.model
    assert refiner.source_model is model256 and twin is not model256
    assert (model256.image_size, twin.image_size) == (256, 1024)
    assert twin.sam_prompt_encoder.mask_input_size == (256, 256)
    own = dict(model256.named_parameters())
    pairs = [(p, own[n]) for n, p in twin.named_parameters()]
    assert len(pairs) == len(own) and all(p is q and p.data_ptr() == q.data_ptr() for p, q in pairs)
    own_buffers = dict(model256.named_buffers())
    assert all(b.data_ptr() == own_buffers[n].data_ptr() for n, b in twin.named_buffers())
    # One copy: the storages of both models together are those of the propagator's model.
    def storages(m: torch.nn.Module) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in m.state_dict().values()}
    assert storages(twin) | storages(model256) == storages(model256)
    assert image_model(twin) is twin  # a 1024 model is used as it is


def test_mask_input_is_the_squashed_frame(refiner: SAM2Refiner) -> None:
    prior = np.zeros((60, 90), bool)
    prior[:, :45] = True  # left half
    logits = refiner._mask_input(prior)
    assert logits.shape == (1, 256, 256) and logits.dtype == np.float32
    # No padding (SAM 1 pads below a landscape frame): the bottom rows are frame rows.
    assert logits[0, 250, 10] == 10.0 and logits[0, 5, 250] == -10.0
    assert np.array_equal(refiner._mask_input(block_prior())[0, 64:192, 64:192], np.full((128, 128), 10.0))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_equals_the_image_predictor(refiner: SAM2Refiner, frames: list[np.ndarray],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    assert isinstance(refiner, Refiner)
    f, fid = frames[0], FrameRef("a", 0)
    prior = block_prior()
    low = prior.reshape(256, 2, 256, 3).mean(axis=(1, 3))  # the prior squashed to 256 x 256
    prior_logits = ((2 * low - 1) * 10.0)[None].astype(np.float32)
    clicks = [Click(300.0, 250.0), Click(500.0, 100.0, positive=False)]
    pts = np.array([[c.x, c.y] for c in clicks], np.float32)
    box = Box(100.0, 50.0, 600.0, 400.0)

    ref = SAM2ImagePredictor(refiner.model)
    with torch.inference_mode():
        ref.set_image(f)

    def by_hand(multimask: bool = False, **kwargs) -> np.ndarray:
        with torch.inference_mode():
            masks, scores, _ = ref.predict(multimask_output=multimask, **kwargs)
        return masks[int(np.argmax(scores))] > 0 if multimask else masks[0] > 0

    cases = [
        (dict(clicks=clicks[:1]), by_hand(True, point_coords=pts[:1], point_labels=np.array([1]))),
        (dict(clicks=clicks), by_hand(point_coords=pts, point_labels=np.array([1, 0]))),
        (dict(box=box), by_hand(box=np.array([100, 50, 600, 400], np.float32))),
    ]
    for kwargs, expected in cases:
        got = refiner.refine(f, frame_id=fid, **kwargs)
        assert got.shape == (H, W) and got.dtype == bool
        assert np.array_equal(got, expected), kwargs

    monkeypatch.setattr(refiner, "prior_prompt", "mask")
    got = refiner.refine(f, clicks[:1], prior=prior, frame_id=fid)  # a click and the prior's logits
    assert np.array_equal(got, by_hand(point_coords=pts[:1], point_labels=np.array([1]), mask_input=prior_logits))
    got = refiner.refine(f, prior=prior, frame_id=fid)  # alone, the prior brings its box along
    expected = by_hand(box=np.array([192, 128, 576, 384], np.float32), mask_input=prior_logits)
    assert got.dtype == bool and np.array_equal(got, expected)
    assert refiner.encodes == 1  # five calls on one frame, one encode


def test_cache_is_keyed_by_video_and_index(refiner: SAM2Refiner, frames: list[np.ndarray]) -> None:
    clicks = [Click(100, 400), Click(5, 5, positive=False)]
    refiner.refine(frames[0], [Click(30, 40)], frame_id=FrameRef("a", 0))  # cached by the previous test
    n = refiner.encodes
    a = refiner.refine(frames[0], clicks, frame_id=FrameRef("a", 0))
    assert refiner.encodes == n
    b = refiner.refine(frames[1], clicks, frame_id=FrameRef("b", 0))  # the same index of another video
    assert refiner.encodes == n + 1 and not np.array_equal(a, b)  # its own embedding, not a's


def test_two_threads_equal_sequential_calls(refiner: SAM2Refiner, frames: list[np.ndarray]) -> None:
    prompts = [([Click(300, 250)], FrameRef("a", 0)), ([Click(100, 400), Click(5, 5, False)], FrameRef("b", 0))]
    sequential = [refiner.refine(frames[i], c, frame_id=fid) for i, (c, fid) in enumerate(prompts)]  # cached
    fresh = SAM2Refiner(refiner.model)  # already 1024: no twin; an empty cache
    results: list[np.ndarray | None] = [None, None]
    start = threading.Barrier(2)

    def run(i: int) -> None:
        start.wait()
        results[i] = fresh.refine(frames[i], prompts[i][0], frame_id=prompts[i][1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert fresh.encodes == 2
    assert all(np.array_equal(r, s) for r, s in zip(results, sequential))


def test_errors(refiner: SAM2Refiner, model256: torch.nn.Module, frames: list[np.ndarray]) -> None:
    with pytest.raises(ValueError, match="does not move them"):
        SAM2Refiner(model256, device="meta")  # checked before anything is built
    with pytest.raises(ValueError, match="prior_prompt"):
        SAM2Refiner(refiner.model, prior_prompt="boxes")
    with pytest.raises(ValueError, match="at least one click"):
        refiner.refine(frames[0])
    prior = block_prior()
    assert np.array_equal(refiner.refine(frames[0], prior=prior), prior)  # nothing to refine with
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            SAM2Refiner.from_checkpoint("nowhere.pt", "tiny", device="cuda")


def test_from_checkpoint_shares_the_propagator_model(tmp_path) -> None:
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    path.write_bytes(sam2_checkpoint_bytes("tiny"))
    ref = SAM2Refiner.from_checkpoint(path, None, "cpu", image_size=256, prior_prompt="box")
    propagator_model = shared_model(path, None, 256, "cpu")  # what SAM2Propagator.from_checkpoint gets
    assert ref.source_model is propagator_model and ref.model.image_size == 1024
    key = "image_encoder.trunk.blocks.0.attn.qkv.weight"
    assert ref.model.state_dict()[key].data_ptr() == propagator_model.state_dict()[key].data_ptr()
