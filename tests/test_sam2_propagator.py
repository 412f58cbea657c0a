"""SAM 2.1 as a propagator, on random weights (``ckpt_path=None`` builds the real model, randomly
initialised): equality with the official video predictor, the protocol's semantics, bounded
memory, loading, and the installed ``sam2`` package's identity."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lazyxmem_core.errors import CheckpointError, LazyXMemError
from lazyxmem_core.lazy import LazyConfig, LazySession
from lazyxmem_core.sam2 import SAM2Config, SAM2Propagator, build_model, load_checkpoint
from lazyxmem_core.sam2.model import VIDEO_PREDICTOR_CLASS, detect_type

H, W = 96, 128
SIZE = 256  # reduced input side: same code path as 1024, ~20x cheaper on the CPU

# SHA-256 over the installed sam2/ tree's .py and .yaml files (path, then bytes, sorted by path):
# the PyPI sam2 1.1.0 upload whose sources are upstream commit 2b90b9f (sam2.md). Another upload
# or version under the same pin changes it.
SAM2_SOURCE_DIGEST = "4db935f77f17f8eabca17f6497d33dcffa07a7ba79ad9b84a1447b15d1c128e0"


def video(n: int, seed: int = 0) -> list[np.ndarray]:
    """A textured red block moving right and down over a noisy blue-grey background."""
    rng = np.random.default_rng(seed)
    frames = []
    for t in range(n):
        f = np.empty((H, W, 3), np.uint8)
        f[:] = (40, 60, 80)
        y, x = 20 + t % 30, 30 + (2 * t) % 50
        f[y:y + 30, x:x + 40] = (200, 50, 30)
        f[60:85, 10:35] = (30, 180, 60)  # a second, static object
        frames.append(np.clip(f + rng.integers(0, 25, f.shape), 0, 255).astype(np.uint8))
    return frames


def first_mask() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[20:50, 30:70] = 1
    m[60:85, 10:35] = 2
    return m


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model("tiny", SIZE, seed=1)


@pytest.fixture(scope="module")
def small_model() -> torch.nn.Module:
    return build_model("tiny", 128, seed=2)


def low_res_logits(prop: SAM2Propagator, label: int) -> np.ndarray:
    """The pending frame's logits of one object at the frame's resolution (what the official
    predictor yields)."""
    lg = prop._pending.outs[label]["pred_masks"].float()
    return torch.nn.functional.interpolate(lg, size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy()


def test_equals_official_video_predictor(model, tmp_path):
    """Same weights and JPEG frames, the first mask by add_new_mask, no veto or forced write: the
    per-object logits equal the official predictor's, beyond the memory window too (our window
    holds exactly what the model reads)."""
    n = 20  # > max_obj_ptrs_in_encoder (16): the trimmed memory is exercised
    for t, f in enumerate(video(n)):
        Image.fromarray(f).save(tmp_path / f"{t:05d}.jpg")
    frames = [np.asarray(Image.open(tmp_path / f"{t:05d}.jpg").convert("RGB")) for t in range(n)]
    official = build_model("tiny", SIZE, target=VIDEO_PREDICTOR_CLASS)
    official.load_state_dict(model.state_dict())
    state = official.init_state(str(tmp_path), offload_video_to_cpu=True)
    given = first_mask()
    for label in (1, 2):
        official.add_new_mask(state, 0, label, given == label)
    expected = {t: logits[:, 0].numpy() for t, _, logits in official.propagate_in_video(state)}

    prop = SAM2Propagator(model, SAM2Config(image_size=SIZE), video_length=n)
    worst, fg = 0.0, []
    for t in range(n):
        probs = prop.step(frames[t], given if t == 0 else None)
        for k, label in enumerate((1, 2)):
            ours = low_res_logits(prop, label)
            worst = max(worst, float(np.abs(ours - expected[t][k]).max()))
            if t > 0:
                fg.append(float((expected[t][k] > 0).mean()))
        if t > 0:
            # two objects: the argmax is the official non-overlap rule (highest positive logit),
            # wherever the logits are not tied to within float rounding
            with_bg = np.concatenate([np.zeros((1, H, W), np.float32), expected[t]])
            top2 = np.sort(with_bg, axis=0)[-2:]
            clear = top2[1] - top2[0] > 1e-3
            assert clear.mean() > 0.3  # random weights: many logits sit near 0
            official_index = with_bg.argmax(0)
            assert np.array_equal(probs.argmax(0)[clear], official_index[clear]), f"frame {t}: argmax differs"
        prop.commit()
    assert worst <= 1e-4, f"max |logit difference| {worst}"
    assert 0.01 < np.mean(fg) < 0.99, "the official masks are trivial: the comparison would be blind"


def test_single_object_probability_is_the_official_sigmoid(model):
    frames = video(4)
    prop = SAM2Propagator(model, SAM2Config(image_size=SIZE))
    prop.step(frames[0], (first_mask() == 1).astype(np.uint8))
    prop.commit()
    probs = prop.step(frames[1])
    logits = low_res_logits(prop, 1)
    prop.commit()
    assert probs.shape == (2, H, W) and probs.dtype == np.float32
    np.testing.assert_allclose(probs[1], 1 / (1 + np.exp(-logits)), atol=1e-6)
    assert np.array_equal(probs[1] > 0.5, logits > 0)


def run(prop: SAM2Propagator, frames, given, writes=None, masks=None) -> list[np.ndarray]:
    outs = []
    for t, f in enumerate(frames):
        outs.append(prop.step(f, given.get(t)))
        prop.commit(mask=(masks or {}).get(t), write=(writes or {}).get(t))
    return outs


def test_veto_keeps_the_frame_out_of_memory(small_model):
    frames, given = video(6), {0: first_mask()}
    plain = run(SAM2Propagator(small_model, SAM2Config(image_size=128)), frames, given)
    prop = SAM2Propagator(small_model, SAM2Config(image_size=128))
    vetoed = run(prop, frames, given, writes={3: False})
    assert all(3 not in prop._mem[label].non_cond and 3 not in prop._mem[label].cond for label in (1, 2))
    assert np.array_equal(vetoed[3], plain[3])  # the veto changes what later frames read, not frame 3
    assert not np.allclose(vetoed[4], plain[4]), "frame 4 reads frame 3's memory in one run, not in the other"


def test_forced_write_is_a_conditioning_frame_that_stays(small_model):
    frames, given = video(20), {0: first_mask()}
    corrected = first_mask()
    corrected[corrected == 1] = 0
    corrected[40:70, 60:110] = 1  # the user moves object 1
    prop = SAM2Propagator(small_model, SAM2Config(image_size=128))
    before = prop.snapshot()
    written = run(prop, frames[:3], given, writes={2: True}, masks={2: corrected})
    entry = prop._mem[1].cond[2]
    assert 2 in prop._mem[2].cond  # object 2's mask differs from its prediction too
    run(prop, frames[3:], {})  # 17 more frames: past the non-conditioning window (15)
    assert prop._mem[1].cond[2] is entry, "the corrected frame was dropped or re-encoded"
    assert 2 not in prop._mem[1].non_cond
    assert len(written) == 3
    # The correction matters to what later frames see.
    prop.restore(before)
    plain = run(prop, frames[:5], given)
    prop2 = SAM2Propagator(small_model, SAM2Config(image_size=128))
    with_idu = run(prop2, frames[:5], given, writes={2: True}, masks={2: corrected})
    assert not np.allclose(plain[4], with_idu[4])


def test_forced_write_pins_only_what_the_correction_changed(small_model):
    frames = video(3)
    prop = SAM2Propagator(small_model, SAM2Config(image_size=128))
    run(prop, frames[:2], {0: first_mask()})
    prop.step(frames[2])
    predicted = prop.predicted_mask()
    fixed = predicted.copy()
    fixed[fixed == 1] = 0
    fixed[40:70, 60:110] = 1  # object 1 corrected, object 2 (where not covered) as predicted
    fixed[predicted == 2] = 2
    assert not np.array_equal(fixed == 1, predicted == 1)
    prop.commit(mask=fixed, write=True)
    assert 2 in prop._mem[1].cond and 2 not in prop._mem[1].non_cond
    assert 2 not in prop._mem[2].cond and 2 in prop._mem[2].non_cond, "an object left as predicted was pinned"


def test_snapshot_restore_repeats_exactly(small_model):
    frames, given = video(12), {0: first_mask()}
    prop = SAM2Propagator(small_model, SAM2Config(image_size=128))
    run(prop, frames[:5], given)
    prop.step(frames[5])
    state = prop.snapshot()  # between step and commit, as the Lazy session takes it
    prop.commit()
    first = run(prop, frames[6:9], {})
    for _ in range(2):
        prop.restore(state)
        prop.commit()
        again = run(prop, frames[6:9], {})
        for a, b in zip(first, again):
            assert np.array_equal(a, b)


def test_new_object_on_a_later_frame(small_model):
    frames = video(6)
    one = first_mask()
    one[one == 2] = 0
    later = np.zeros((H, W), np.uint8)
    later[60:85, 10:35] = 5
    prop = SAM2Propagator(small_model, SAM2Config(image_size=128))
    outs = run(prop, frames, {0: one, 3: later})
    assert [o.shape[0] for o in outs] == [2, 2, 2, 3, 3, 3]
    assert prop.labels == [1, 5]
    assert prop._mem[5].first == 3 and 3 in prop._mem[5].cond
    np.testing.assert_allclose(outs[4].sum(0), 1.0, atol=1e-5)


def test_memory_is_bounded_over_a_long_video(small_model):
    cfg = SAM2Config(image_size=128, max_cond_frames=3)
    prop = SAM2Propagator(small_model, cfg)
    frames, mask = video(8), first_mask()
    sizes = {}
    for t in range(120):  # at 128 px: cheap frames, the same bookkeeping
        corrected = t % 10 == 5  # a correction every 10 frames: 12 conditioning frames offered
        prop.step(frames[t % 8], mask if t == 0 else None)
        prop.commit(mask=mask if corrected else None, write=True if corrected else None)
        if t in (59, 119):  # the same layout: two corrections in the window
            sizes[t] = prop.memory_bytes
    for label in (1, 2):
        mem = prop._mem[label]
        assert len(mem.cond) == 3 and 0 in mem.cond, "the first annotation is kept, then the latest corrections"
        assert sorted(mem.cond)[1:] == [105, 115]
        assert len(mem.non_cond) <= small_model.max_obj_ptrs_in_encoder - 1
        with_features = [s for s, o in mem.non_cond.items() if "maskmem_features" in o]
        assert len(with_features) <= small_model.num_maskmem - 1
    assert sizes[119] == sizes[59]


def test_object_score_reaches_the_lazy_controller(small_model, monkeypatch):
    """SAM 2 blanks an absent object's mask (entropy 0): the session asks from the score."""
    frames = video(6)
    prop = SAM2Propagator(small_model, SAM2Config(image_size=128))
    scores = iter([5.0, 5.0, 5.0, -3.0, -3.0, -3.0])
    real_step = prop.step

    def step(frame, given=None):
        out = real_step(frame, given)
        prop._scores = {label: s for label, s in zip(prop.labels, [next(scores)] * len(prop.labels))}
        return out

    monkeypatch.setattr(prop, "step", step)
    one = first_mask()
    one[one == 2] = 0
    cfg = LazyConfig(tau_u=9.0, tau_p=9.0, tau_m=9.0, detect_loss=True, pseudo=False)
    session = LazySession(prop, frames, {0: one}, config=cfg)
    session.run()
    asked = [t for t, r in session.records.items() if r.objects[1].decision.name == "USER"]
    assert asked == [3], f"asked on {asked}: expected once, when the score turned negative"


def test_lazy_session_with_deferred_correction(small_model):
    frames = video(10)
    prop = SAM2Propagator(small_model, SAM2Config(image_size=128), video_length=10)
    session = LazySession(prop, frames, {0: first_mask()}, config=LazyConfig(user_budget=2, pseudo=False))
    session.run()
    from lazyxmem_core.types import Correction

    fix = np.zeros((H, W), bool)
    fix[30:60, 50:100] = True
    session.correct({(6, 1): Correction(mask=fix)})
    assert np.array_equal(session.records[6].mask == 1, fix)
    assert len(session.records) == 10


def test_checkpoint_loads_strictly_and_bad_files_say_why(tmp_path, small_model):
    sd = build_model("tiny", 1024, seed=3).state_dict()
    good = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": sd}, good)
    assert detect_type(sd) == "tiny"
    loaded = load_checkpoint(good, None, image_size=128)  # type read from the weights
    assert torch.equal(loaded.state_dict()["memory_attention.layers.0.linear1.weight"],
                       sd["memory_attention.layers.0.linear1.weight"])
    with pytest.raises(CheckpointError, match="small"):
        load_checkpoint(good, "small", image_size=128)
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(truncated, "tiny")
    bare = tmp_path / "bare.pt"
    torch.save(sd, bare)  # a state dict without the official {"model": ...} wrapper
    with pytest.raises(CheckpointError, match="'model'"):
        load_checkpoint(bare, "tiny")
    sam1 = tmp_path / "sam1.pt"
    torch.save({"model": {"image_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, sam1)
    with pytest.raises(CheckpointError, match="SAM 1"):
        load_checkpoint(sam1, "tiny")
    broken = dict(sd)
    broken.pop("memory_attention.layers.0.linear1.weight")
    partial = tmp_path / "partial.pt"
    torch.save({"model": broken}, partial)
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(partial, "tiny", image_size=128)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt", "tiny")
    with pytest.raises(LazyXMemError, match="multiple of 32"):
        build_model("tiny", 100)


def test_protocol_errors(small_model):
    prop = SAM2Propagator(small_model, SAM2Config(image_size=128))
    with pytest.raises(LazyXMemError, match="first frame"):
        prop.step(video(1)[0])
    with pytest.raises(LazyXMemError, match="image size"):
        SAM2Propagator(small_model, SAM2Config(image_size=256))
    with pytest.raises(LazyXMemError, match="CUDA"):
        SAM2Propagator(small_model, SAM2Config(image_size=128, bf16=True))


def test_import_leaves_no_global_hydra_state():
    code = ("from hydra.core.global_hydra import GlobalHydra\n"
            "from lazyxmem_core.sam2.model import build_model\n"
            "build_model('tiny', 128)\n"
            "print(GlobalHydra.instance().is_initialized())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def sam2_source_digest() -> str:
    import importlib.util

    root = Path(importlib.util.find_spec("sam2").origin).parent
    h = hashlib.sha256()
    for p in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_installed_sam2_is_the_pinned_code():
    from importlib.metadata import version

    assert version("sam2") == "1.1.0"
    assert sam2_source_digest() == SAM2_SOURCE_DIGEST, "the installed sam2 is not the pinned 1.1.0 upload"


def test_tasks_of_one_size_on_one_shared_model_in_threads(small_model):
    """Two tasks (same frame size, different content) propagated at the same time on the one
    shared model give exactly what each gives alone: no state of one task leaks into the other."""
    import threading

    a, b = video(6, seed=0), [f[:, ::-1].copy() for f in video(6, seed=5)]
    given_b = first_mask()[:, ::-1].copy()
    alone = {k: run(SAM2Propagator(small_model, SAM2Config(image_size=128)), v, {0: g})
             for k, v, g in (("a", a, first_mask()), ("b", b, given_b))}
    together: dict[str, list[np.ndarray]] = {}

    def task(k, frames, g):
        together[k] = run(SAM2Propagator(small_model, SAM2Config(image_size=128)), frames, {0: g})

    threads = [threading.Thread(target=task, args=args) for args in (("a", a, first_mask()), ("b", b, given_b))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not np.allclose(alone["a"][3], alone["b"][3])  # the two tasks really differ
    for k in ("a", "b"):
        for x, y in zip(alone[k], together[k]):
            np.testing.assert_allclose(x, y, atol=1e-5)
