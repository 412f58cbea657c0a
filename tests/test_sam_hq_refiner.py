"""SamHQRefiner on a tiny randomly initialised SAM-HQ built from segment_anything_hq's own classes,
its strict checkpoint loader, and `lazyxmem weights download sam-hq` against a local HTTP server.

The weights are random, so the masks mean nothing: these tests check the plumbing (prompts,
the per-frame cache with SAM-HQ's early ViT features, hq_token_only, threads) and the errors.
"""
from __future__ import annotations

import io
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from lazyxmem_core import weights
from lazyxmem_core.cli import main
from lazyxmem_core.errors import CheckpointError, LazyXMemError
from lazyxmem_core.protocols import Refiner
from lazyxmem_core.sam import SamHQRefiner, build_sam, build_sam_hq
from lazyxmem_core.sam import hq as hq_module
from lazyxmem_core.types import Box, Click, FrameRef

try:
    sam_hq = hq_module.import_sam_hq()
except LazyXMemError as exc:  # the package is in requirements.txt; without it there is nothing to test
    pytest.skip(str(exc), allow_module_level=True)

from test_weights import Server  # noqa: E402  (the Range-capable local server of the download tests)
from tiny_sam import tiny_sam, tiny_sam_hq  # noqa: E402

H, W = 60, 90


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(3)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_sam_hq()


@pytest.fixture()
def refiner(model: torch.nn.Module) -> SamHQRefiner:
    return SamHQRefiner.from_model(model)


# SAM-HQ's additions to SAM's decoder: without them an official layout is plain SAM's.
HQ_ONLY = tuple(f"mask_decoder.{m}." for m in ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder",
                                                "embedding_maskfeature"))


def official_layout(model_type: str = "vit_b", drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every key and shape of the registry's SAM-HQ ``model_type`` (less the ``drop`` prefixes),
    each tensor a stride-0 view of one zero: torch.save stores one element per tensor, so the
    file is a few tens of kB."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in sam_hq.sam_model_registry[model_type]().state_dict().items()}
    return {k: torch.zeros(1).expand(*s) if len(s) else torch.zeros(()) for k, s in shapes.items()
            if not k.startswith(drop)}


def as_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


# ---- refining --------------------------------------------------------------------------------

def test_prompt_kinds_give_bool_masks(refiner: SamHQRefiner, frames: list[np.ndarray]) -> None:
    assert isinstance(refiner, Refiner)
    for kwargs in (dict(clicks=[Click(10, 20)]),
                   dict(box=Box(10, 10, 50, 40)),
                   dict(clicks=[Click(20, 20), Click(30, 25, positive=False)], box=Box(0, 0, 80, 50))):
        m = refiner.refine(frames[0], **kwargs)
        assert m.shape == (H, W) and m.dtype == bool
    prior = np.zeros((H, W), bool)
    prior[10:40, 20:60] = True
    m = SamHQRefiner.from_model(refiner.model, prior_prompt="mask").refine(frames[0], [Click(30, 20)], prior=prior)
    assert m.shape == (H, W) and m.dtype == bool


def test_cache_holds_both_features_per_frame_ref(refiner: SamHQRefiner, frames: list[np.ndarray]) -> None:
    calls = [0]
    hook = refiner.model.image_encoder.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    try:
        check_cache(refiner, frames, calls)
    finally:
        hook.remove()  # the model is shared by the module's tests


def check_cache(refiner: SamHQRefiner, frames: list[np.ndarray], calls: list[int]) -> None:
    a0 = refiner.refine(frames[0], [Click(10, 20)], frame_id=FrameRef("a", 0))
    refiner.refine(frames[0], [Click(50, 30)], frame_id=FrameRef("a", 0))
    assert calls[0] == 1 and refiner.encodes == 1
    # Same index, another video: its own frame, its own encode.
    refiner.refine(frames[1], [Click(10, 20)], frame_id=FrameRef("b", 0))
    assert calls[0] == 2
    # The cached entry holds the embedding and the one early-feature map the decoder reads
    # (the encoder returned two), and switching back restores both: same mask as a fresh refiner.
    emb = refiner._cache._items[("id", "a", 0, frames[0].shape)]
    assert emb.interm_features is not None and len(emb.interm_features) == 1
    assert len(refiner.predictor.interm_features) == 1
    assert np.array_equal(refiner.refine(frames[0], [Click(10, 20)], frame_id=FrameRef("a", 0)), a0)
    assert calls[0] == 2
    assert np.array_equal(a0, SamHQRefiner.from_model(refiner.model).refine(frames[0], [Click(10, 20)]))


def test_hq_token_only_is_passed(refiner: SamHQRefiner, frames: list[np.ndarray], monkeypatch) -> None:
    f, click = frames[0], [Click(10, 20)]
    direct = sam_hq.SamPredictor(refiner.model)
    direct.set_image(f)
    expected = {hq: direct.predict(point_coords=np.array([[10, 20]], np.float32), point_labels=np.array([1]),
                                   hq_token_only=hq)[0][0] for hq in (True, False)}
    assert not np.array_equal(expected[True], expected[False])  # the flag matters for this prompt
    assert np.array_equal(refiner.refine(f, click), expected[True])

    seen: list[Any] = []
    predict = refiner.predictor.predict
    monkeypatch.setattr(refiner.predictor, "predict",
                        lambda *a, **kw: seen.append(kw.get("hq_token_only")) or predict(*a, **kw))
    refiner.refine(f, box=Box(5, 5, 40, 40))
    refiner.refine(f, [Click(20, 20), Click(30, 25, positive=False)], box=Box(0, 0, 80, 50))
    assert seen == [True, True]
    refiner.hq_token_only = False  # the switch is honoured (HQ + SAM logits, SAM-HQ's multi-object setting)
    assert np.array_equal(refiner.refine(f, click), expected[False])


def test_concurrent_calls_match_sequential(model: torch.nn.Module, frames: list[np.ndarray]) -> None:
    jobs = [(i % 2, [Click(10 + 3 * i, 20)]) for i in range(12)]
    sequential = SamHQRefiner.from_model(model)
    want = [sequential.refine(frames[k], c, frame_id=FrameRef("v", k)) for k, c in jobs]
    # cache_size 1: the two frames keep evicting each other, so threads interleave set-image
    # and predict on different frames, which the lock must keep apart.
    shared = SamHQRefiner.from_model(model, cache_size=1)

    def run(job: tuple[int, list[Click]]) -> np.ndarray:
        k, c = job
        return shared.refine(frames[k], c, frame_id=FrameRef("v", k))

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, jobs))
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_plain_sam_model_is_refused() -> None:
    with pytest.raises(TypeError, match="SAM-HQ model"):
        SamHQRefiner.from_model(tiny_sam())


def test_missing_package_says_what_to_install(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "segment_anything_hq", None)
    with pytest.raises(LazyXMemError, match=r"pip install segment-anything-hq==0\.3"):
        SamHQRefiner(tmp_path / "sam_hq_vit_l.pth")
    with pytest.raises(LazyXMemError, match=r"pip install segment-anything-hq==0\.3"):
        SamHQRefiner.from_model(torch.nn.Linear(1, 1))


def test_missing_timm_is_named(monkeypatch) -> None:
    # segment-anything-hq 0.3 imports timm without declaring it: a fresh import without timm.
    for name in [n for n in sys.modules if n.split(".")[0] in ("segment_anything_hq", "timm")]:
        monkeypatch.delitem(sys.modules, name)  # all restored afterwards
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(LazyXMemError, match="pip install timm"):
        hq_module.import_sam_hq()


# ---- loading ---------------------------------------------------------------------------------

def test_official_vit_b_layout_loads_strictly(tmp_path) -> None:
    """The registry's vit_b (random init ~2 s, ~0.4 GB) takes an official-layout file; the wrong
    type is named before anything is built."""
    p = tmp_path / "sam_hq_vit_b.pth"
    torch.save(official_layout("vit_b"), p)
    with pytest.raises(CheckpointError, match="SAM-HQ vit_b checkpoint.*model_type='vit_b'"):
        SamHQRefiner(p)  # the default type is the paper's vit_l
    ref = SamHQRefiner(p, "vit_b")
    sd = ref.model.state_dict()
    assert not sd["mask_decoder.hf_token.weight"].any() and not sd["image_encoder.pos_embed"].any()
    assert not ref.model.training


def test_strict_load_of_the_tiny_model(tmp_path, monkeypatch, frames: list[np.ndarray]) -> None:
    # The registry builds the tiny model: the whole constructor path, then refine, in a second.
    monkeypatch.setattr(hq_module, "hq_registry", lambda: {t: tiny_sam_hq for t in hq_module.HQ_TYPES})
    sd = tiny_sam_hq().state_dict()
    p = tmp_path / "tiny_hq.pth"
    torch.save({k: v + 1 for k, v in sd.items()}, p)  # other values than the init, to see them loaded
    ref = SamHQRefiner(p, "vit_b")
    assert torch.equal(ref.model.state_dict()["mask_decoder.hf_token.weight"], sd["mask_decoder.hf_token.weight"] + 1)
    assert ref.refine(frames[0], [Click(3, 3)]).shape == (H, W)
    torch.save({k: v for k, v in sd.items() if k != "mask_decoder.hf_mlp.layers.0.bias"}, p)
    with pytest.raises(CheckpointError, match=r"does not match SAM-HQ vit_b.*1 missing keys"):
        build_sam_hq(p, "vit_b")


def test_unusable_files_are_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found.*weights download sam-hq"):
        SamHQRefiner(tmp_path / "sam_hq_vit_l.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"<html>rate limited</html>" * 10)
    truncated = tmp_path / "truncated.pth"
    data = as_bytes(tiny_sam_hq().state_dict())
    truncated.write_bytes(data[: len(data) // 2])
    for p in (garbage, truncated):
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint.*re-download the official SAM-HQ"):
            SamHQRefiner(p)
    other = tmp_path / "other.pth"
    torch.save([1, 2, 3], other)
    with pytest.raises(CheckpointError, match="not a SAM-HQ state dict"):
        SamHQRefiner(other)


def test_plain_sam_checkpoint_is_named_both_ways(tmp_path, monkeypatch) -> None:
    plain = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(tiny_sam().state_dict(), plain)
    with pytest.raises(CheckpointError, match=r"plain SAM checkpoint, not a SAM-HQ one.*hf_token.*sam-hq"):
        SamHQRefiner(plain, "vit_b")
    # The other way round, plain SAM's loader names SAM-HQ (its registry builds the tiny SAM).
    from segment_anything import sam_model_registry

    monkeypatch.setitem(sam_model_registry, "vit_b", tiny_sam)
    hq_file = tmp_path / "sam_hq_vit_b.pth"
    torch.save(tiny_sam_hq().state_dict(), hq_file)
    with pytest.raises(CheckpointError, match="it is a SAM-HQ checkpoint.*SAM-HQ refiner"):
        build_sam(hq_file, "vit_b")


# ---- weights download ------------------------------------------------------------------------

VIT_B = as_bytes(official_layout("vit_b"))


@pytest.fixture
def server():
    s = Server({"/sam_hq_vit_b.pth": VIT_B, "/sam_hq_vit_l.pth": as_bytes(official_layout("vit_b")),
                "/sam_hq_vit_h.pth": as_bytes(official_layout("vit_b", drop=HQ_ONLY))})
    yield s
    s.close()


def test_download_records_sha256_and_is_not_repeated(server, tmp_path, capsys) -> None:
    assert main(["weights", "download", "sam-hq", "--type", "vit_b", "--dir", str(tmp_path), "--url", server.url,
                 "-q"]) == 0
    path = tmp_path / "sam_hq_vit_b.pth"
    assert capsys.readouterr().out.strip() == str(path) and path.read_bytes() == VIT_B
    assert (tmp_path / "sam_hq_vit_b.pth.sha256").read_text().split()[0] == weights.sha256_file(path)
    assert weights.download_sam_hq("vit_b", tmp_path, server.url, progress=False) == path
    assert server.requests == [("/sam_hq_vit_b.pth", None)]


def test_download_resumes(server, tmp_path) -> None:
    part = tmp_path / "sam_hq_vit_b.pth.part"
    part.write_bytes(VIT_B[:1000])
    path = weights.download_sam_hq("vit_b", tmp_path, server.url, progress=False)
    assert server.requests == [("/sam_hq_vit_b.pth", "bytes=1000-")]
    assert path.read_bytes() == VIT_B and not part.exists()


def test_invalid_downloads_are_deleted(server, tmp_path, capsys) -> None:
    # vit_l's address serves a vit_b file; vit_h's a plain SAM one (no SAM-HQ decoder keys).
    with pytest.raises(CheckpointError, match="SAM-HQ vit_b checkpoint, not vit_l"):
        weights.download_sam_hq("vit_l", tmp_path, server.url, progress=False)
    assert not list(tmp_path.iterdir())  # the .part is gone: resuming a wrong file would not fix it
    assert main(["weights", "download", "sam-hq", "--type", "vit_h", "--dir", str(tmp_path), "--url", server.url,
                 "-q"]) == 2
    err = capsys.readouterr().err
    assert "plain SAM checkpoint" in err and "was deleted" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_layout_check_and_names(tmp_path, monkeypatch) -> None:
    p = tmp_path / "sam_hq_vit_b.pth"
    torch.save(official_layout("vit_b", drop=("mask_decoder.hf_mlp.layers.2.",)), p)
    with pytest.raises(CheckpointError, match=r"does not match SAM-HQ vit_b: 2 missing keys"):
        weights.check_sam_hq(p, "vit_b")
    monkeypatch.delenv(weights.URL_ENV, raising=False)
    assert weights.file_url(weights.SAM_HQ_FILES["vit_l"], weights.SAM_HQ_URL) == \
        "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_l.pth"
    with pytest.raises(ValueError, match="unknown SAM-HQ model type"):
        weights.download_sam_hq("vit_tiny")
