"""XMem network: official checkpoint layouts load strictly; bad checkpoints give one clear error."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lazyxmem_core import xmem_layout
from lazyxmem_core.errors import CheckpointError, LazyXMemError
from lazyxmem_core.xmem import XMemPropagator
from lazyxmem_core.xmem.model import XMemNet
from lazyxmem_core.xmem.random_weights import shared_random_state_dict


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("xmem")
    sd, no_sensory = shared_random_state_dict(seed=0), shared_random_state_dict(seed=1, sensory=False)
    s012 = {k: v * 0.5 if k.endswith("bias") else v for k, v in sd.items()}  # same layout, other weights
    stage0 = {**sd, "value_encoder.conv1.weight": sd["value_encoder.conv1.weight"][:, :4].clone()}
    paths = {}
    for name, weights in (("XMem", sd), ("XMem-s012", s012), ("XMem-no-sensory", no_sensory), ("stage0", stage0)):
        paths[name] = d / f"{name}.pth"
        torch.save(weights, paths[name])
    return paths


@pytest.mark.parametrize("sensory", [True, False])
def test_random_weights_have_exactly_the_official_keys_and_shapes(sensory):
    sd = shared_random_state_dict(seed=0 if sensory else 1, sensory=sensory)
    assert list(sd) == xmem_layout.expected_keys(sensory)
    layout = xmem_layout.check_xmem_state_dict(sd)
    assert (layout.key_dim, layout.value_dim, layout.hidden_dim) == (64, 512, 64 if sensory else 0)
    ref = "xmem_state_dict_XMem.txt" if sensory else "xmem_state_dict_XMem-no-sensory.txt"
    listing = Path(__file__).resolve().parents[2] / "shared" / "reference" / ref
    if listing.is_file():  # the reference listing, where this checkout has it
        shapes = dict(line.split(" ", 1) for line in listing.read_text().splitlines() if " " in line)
        assert {k: str(tuple(v.shape)) for k, v in sd.items()} == shapes


@pytest.mark.parametrize("name,hidden", [("XMem", 64), ("XMem-s012", 64), ("XMem-no-sensory", 0)])
def test_official_layouts_load_strictly_and_run(ckpts, name, hidden):
    p = XMemPropagator.from_checkpoint(ckpts[name], device="cpu", size=-1)
    assert p.net.hidden_dim == hidden and p.net.key_dim == 64 and p.net.value_dim == 512
    frame = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    mask = np.zeros((64, 96), np.uint8)
    mask[10:40, 20:60] = 1
    p.step(frame, mask)
    p.commit()
    probs = p.step(frame)
    assert probs.shape == (2, 64, 96) and np.isfinite(probs).all()
    assert np.allclose(probs.sum(0), 1, atol=1e-5)


def test_stage0_checkpoint_gets_a_zero_fifth_input_channel(ckpts):
    sd = torch.load(ckpts["stage0"], weights_only=True)
    assert sd["value_encoder.conv1.weight"].shape == (64, 4, 7, 7)
    net = XMemNet.from_state_dict(sd, fast=False)
    w = net.value_encoder.conv1.weight
    assert w.shape == (64, 5, 7, 7)
    assert torch.equal(w[:, :4], sd["value_encoder.conv1.weight"]) and not w[:, 4].any()


def test_folded_and_split_network_computes_what_the_plain_one_does():
    sd = shared_random_state_dict(seed=0)
    plain, fast = XMemNet.from_state_dict(sd, fast=False), XMemNet.from_state_dict(sd, fast=True)
    torch.manual_seed(0)
    img = torch.randn(1, 3, 64, 96)
    masks = torch.rand(2, 64, 96)
    with torch.inference_mode():
        a, b = plain.encode_key(img), fast.encode_key(img)
        def close(x, y):  # float rounding only (BN folding, split convs change the summation order)
            return float((x - y).abs().max()) <= 1e-5 * max(1.0, float(x.abs().max()))

        for k in a:
            assert close(a[k], b[k]), k
        hidden = torch.randn(2, 64, 4, 6)
        va, ha = plain.encode_value(img, a["f16"], masks, hidden, True)
        vb, hb = fast.encode_value(img, a["f16"], masks, hidden, True)
        assert close(va, vb) and close(ha, hb)
        da, db = plain.decode(a, va, hidden), fast.decode(a, va, hidden)
        for x, y in zip(da, db):
            assert close(x, y)


def test_moving_the_network_moves_the_split_fuser_convs():
    """.to() / .cuda() reach the fuser's split convs, which live outside the module tree (so the
    state dict stays the checkpoint's): a dtype move shows it on the CPU as a device move would."""
    sd = shared_random_state_dict(seed=0)
    fast = XMemNet.from_state_dict(sd, fast=True).to(torch.float64)
    assert not any("_split" in k for k in fast.state_dict())
    torch.manual_seed(0)
    img = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    masks = torch.rand(2, 64, 96, dtype=torch.float64)
    with torch.inference_mode():
        f16 = fast.encode_key(img)["f16"]
        value, hidden = fast.encode_value(img, f16, masks, torch.zeros(2, 64, 4, 6, dtype=torch.float64), True)
    assert value.dtype == hidden.dtype == torch.float64


def _bad(tmp_path, name, sd):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_bad_checkpoints_give_one_clear_error(ckpts, tmp_path):
    sd = torch.load(ckpts["XMem"], weights_only=True)
    missing = dict(sd)
    del missing["decoder.pred.weight"]
    extra = {**sd, "decoder.extra.weight": torch.zeros(1)}
    shapes = {**sd, "key_proj.key_proj.weight": torch.zeros(32, 1024, 3, 3), "key_proj.key_proj.bias": torch.zeros(32)}
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    blob = ckpts["XMem"].read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(blob[: len(blob) // 2])
    cases = {
        "missing key": (_bad(tmp_path, "missing.pth", missing), "key layout"),
        "unexpected key": (_bad(tmp_path, "extra.pth", extra), "key layout"),
        "wrong shapes": (_bad(tmp_path, "shapes.pth", shapes), "shapes"),
        "not a torch file": (text, "not a readable PyTorch checkpoint"),
        "truncated": (truncated, "not a readable PyTorch checkpoint"),
        "absent": (tmp_path / "nope.pth", "not found"),
    }
    for what, (path, words) in cases.items():
        with pytest.raises(CheckpointError) as err:
            XMemPropagator.from_checkpoint(path)
        assert words in str(err.value), (what, str(err.value))
        assert str(path) in str(err.value), what


def test_cuda_asked_without_cuda_is_a_clear_error(ckpts, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LazyXMemError, match="CUDA is not available"):
        XMemPropagator.from_checkpoint(ckpts["XMem"], device="cuda")
