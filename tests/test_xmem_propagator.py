"""XMemPropagator: the Propagator protocol, memory bounds, the CLI and the Lazy session."""
from __future__ import annotations

import zipfile

import cv2
import numpy as np
import pytest
import torch

from lazyxmem_core import cli
from lazyxmem_core.lazy import LazyConfig, LazySession
from lazyxmem_core.media import read_index_mask
from lazyxmem_core.protocols import Propagator
from lazyxmem_core.types import Correction
from lazyxmem_core.xmem import XMemConfig, XMemPropagator
from lazyxmem_core.xmem.model import XMemNet
from lazyxmem_core.xmem.random_weights import shared_random_state_dict

H, W = 64, 96


@pytest.fixture(scope="module")
def net():
    return XMemNet.from_state_dict(shared_random_state_dict(seed=0))


def make(net, **knobs) -> XMemPropagator:
    return XMemPropagator(net, XMemConfig(**{"size": -1, **knobs}))


def video(n=8, seed=0):
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8), (W + 40, H), interpolation=cv2.INTER_CUBIC)
    frames = [np.ascontiguousarray(np.roll(base, 2 * t, axis=1)[:, :W]) for t in range(n)]
    mask = np.zeros((H, W), np.uint8)
    mask[10:40, 10:40] = 5
    mask[30:60, 55:90] = 2
    return frames, mask


def label_map(p, probs):
    return np.asarray([0, *p.labels])[probs.argmax(0)]


def test_protocol_shapes_channel_order_and_given_mask_reproduced(net):
    frames, mask = video()
    p = make(net)
    assert isinstance(p, Propagator)
    probs = p.step(frames[0], mask)
    assert p.labels == [2, 5] and probs.shape == (3, H, W) and probs.dtype == np.float32
    assert np.array_equal(label_map(p, probs), mask)  # the given mask, exactly, channel k+1 = labels[k]
    assert p.commit() is True  # a given frame enters memory
    for f in frames[1:4]:
        probs = p.step(f)
        assert probs.shape == (3, H, W) and np.allclose(probs.sum(0), 1, atol=1e-5)
        p.commit()


def test_given_mask_with_a_resized_working_resolution(net):
    frames, mask = video(3)
    p = make(net, size=48)  # shorter side 64 -> 48: working grid differs from the frame
    # The propagator gives the official output (the mask through the working grid: soft edges) ...
    agree = (label_map(p, p.step(frames[0], mask)) == mask).mean()
    assert 0.97 < agree < 1.0
    # ... and the Lazy session outputs the annotation itself.
    session = LazySession(make(net, size=48), frames, {0: mask}, config=LazyConfig.off())
    assert np.array_equal(session.run()[0].mask, mask)


def test_object_added_later_adds_a_channel(net):
    frames, mask = video(6)
    p = make(net)
    p.step(frames[0], np.where(mask == 5, 5, 0).astype(np.uint8))
    p.commit()
    assert p.step(frames[1]).shape == (2, H, W)
    p.commit()
    new = np.where(mask == 2, 2, 0).astype(np.uint8)
    probs = p.step(frames[2], new)
    assert p.labels == [2, 5] and probs.shape == (3, H, W)
    assert np.array_equal(label_map(p, probs) == 2, new == 2)
    assert p.commit() is True
    assert p.step(frames[3]).shape == (3, H, W)
    p.commit()


def test_veto_keeps_memory_and_forced_write_grows_it(net):
    frames, mask = video(6)
    p = make(net, mem_every=1)
    p.step(frames[0], mask)
    p.commit()
    n = p.memory_elements
    p.step(frames[1])
    assert p.commit(write=False) is False and p.memory_elements == n  # UDU veto
    p.step(frames[2])
    assert p.commit() is True and p.memory_elements == 2 * n  # schedule: every frame
    q = make(net, mem_every=100)
    q.step(frames[0], mask)
    q.commit()
    probs = q.step(frames[1])
    assert q.commit() is False and q.memory_elements == n
    q.step(frames[2])
    corrected = label_map(q, probs).astype(np.uint8)
    corrected[:5] = 2
    assert q.commit(mask=corrected, write=True) is True and q.memory_elements == 2 * n  # IDU
    with pytest.raises(ValueError, match="never given"):
        q.step(frames[3])
        q.commit(mask=np.full((H, W), 7, np.uint8), write=True)


def test_snapshot_restore_reproduces_outputs_twice(net):
    frames, mask = video(9)
    p = make(net, mem_every=2)
    p.step(frames[0], mask)
    p.commit()
    for f in frames[1:3]:
        p.step(f)
        p.commit()
    state = p.snapshot()
    runs = []
    for _ in range(3):
        p.restore(state)
        out = []
        for t, f in enumerate(frames[3:]):
            out.append(p.step(f))
            p.commit(write=[None, False, True][t % 3])
        runs.append(out)
    for again in runs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(runs[0], again))
    p.restore(state)  # between step and commit too
    p.step(frames[3])
    mid = p.snapshot()
    p.commit()
    a = p.step(frames[4])
    p.restore(mid)
    p.commit()
    assert np.array_equal(a, p.step(frames[4]))


def test_long_term_memory_stays_bounded(net):
    frames, mask = video(40)
    cfg = {"mem_every": 1, "min_mid_term_frames": 2, "max_mid_term_frames": 4, "num_prototypes": 5,
           "max_long_term_elements": 30}
    p = make(net, **cfg)
    hw = (H // 16) * (W // 16)
    sizes = []
    for t, f in enumerate(frames):
        p.step(f, mask if t == 0 else None)
        p.commit()
        sizes.append(p.memory_elements)
    assert p._core.memory.long.size > 0  # consolidation happened, and removal (40 frames > 30 elements)
    assert max(sizes) <= 4 * hw + 30
    assert sizes[-1] == sizes[-9]  # flat once full


def test_cli_propagate_with_xmem_end_to_end(tmp_path):
    frames, mask = video(6)
    d = tmp_path / "frames"
    d.mkdir()
    for t, f in enumerate(frames):
        cv2.imwrite(str(d / f"{t:05d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    ckpt = tmp_path / "XMem.pth"
    torch.save(shared_random_state_dict(seed=0), ckpt)
    out, probs = tmp_path / "out", tmp_path / "probs.npz"
    rc = cli.main(["propagate", "--frames", str(d), "--mask", str(tmp_path / "mask.png"), "--out", str(out),
                   "--engine", "xmem", "--xmem-checkpoint", str(ckpt), "--no-lazy", "--save-probs", str(probs),
                   "--size", "-1", "--mem-every", "2", "--top-k", "10", "--no-long-term"])
    assert rc == 0
    with zipfile.ZipFile(probs) as z:
        assert sorted(z.namelist()) == sorted(f"prob_t{t}.npy" for t in range(6))
    data = np.load(probs)
    assert data["prob_t3"].shape == (3, H, W)
    assert np.array_equal(read_index_mask(out / "00000.png"), mask)
    rc = cli.main(["propagate", "--frames", str(d), "--mask", str(tmp_path / "mask.png"), "--out", str(out),
                   "--engine", "xmem", "--xmem-checkpoint", str(tmp_path / "frames" / "00000.png"), "--no-lazy"])
    assert rc == 2  # not a checkpoint: a clear error, no traceback


def test_lazy_session_runs_with_xmem_and_deferred_corrections(net):
    frames, mask = video(8)
    p = make(net)
    s = LazySession(p, frames, {0: mask}, refiner=None, config=LazyConfig(pseudo=False, snapshot_every=3))
    recs = s.run()
    assert len(recs) == 8 and all(r.mask.shape == (H, W) for r in recs)
    fixed = recs[5].mask.copy()
    fixed[:10] = 2
    first = s.correct({(5, 2): Correction(mask=fixed == 2)})
    assert first == 3 and len(s.ordered_records()) == 8
    assert np.array_equal(s.records[5].mask == 2, fixed == 2)


def test_consolidation_with_fewer_candidates_than_prototypes(net):
    """Tiny frames: fewer working-memory elements than num_prototypes; all become prototypes."""
    frames, mask = video(12)
    p = make(net, mem_every=1, min_mid_term_frames=2, max_mid_term_frames=4, num_prototypes=100,
             max_long_term_elements=500)
    hw = (H // 16) * (W // 16)  # 24 elements per memory frame, far fewer than 100 prototypes
    for t, f in enumerate(frames):
        probs = p.step(f, mask if t == 0 else None)
        p.commit()
        assert np.isfinite(probs).all()
    long = p._core.memory.long.size
    assert long > 0 and long % hw == 0  # each consolidation kept every candidate (a whole number of frames)
