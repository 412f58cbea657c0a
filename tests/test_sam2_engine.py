"""SAM 2.1 behind the engine registry and the command line: one copy of the weights for the
propagator and the refiner, its Lazy defaults, ``lazyxmem propagate --engine sam2``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lazyxmem_core.cli import main
from lazyxmem_core.engines import EngineSettings, build_propagator, build_refiner, lazy_config, propagator_name, refiner_name
from lazyxmem_core.errors import LazyXMemError
from lazyxmem_core.media import read_index_mask, write_index_mask
from lazyxmem_core.sam2 import SAM2Propagator, SAM2Refiner, build_model
from lazyxmem_core.sam2.propagator import SAM2Config
from test_media_cli import write_frames
from synthetic import make_video


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": build_model("tiny", 1024, seed=4).state_dict()}, path)
    return path


def test_registry_shares_one_copy_of_the_weights(checkpoint):
    settings = EngineSettings(engine="sam2", sam2_checkpoint=str(checkpoint), sam2_image_size=128)
    prop = build_propagator(settings, video_length=10)
    refiner = build_refiner(settings)
    assert isinstance(prop, SAM2Propagator) and isinstance(refiner, SAM2Refiner)
    assert prop.config.image_size == 128 and prop.video_length == 10
    ours = {p.data_ptr() for p in prop.model.parameters()}
    assert {p.data_ptr() for p in refiner.model.parameters()} == ours, "the refiner holds a second copy"
    assert build_propagator(settings).model is prop.model, "a second task loaded the weights again"
    cfg = lazy_config(settings)
    assert cfg.user_budget == 20 and cfg.pseudo and cfg.backward  # provisional thresholds, bounded requests


def test_auto_and_errors(checkpoint, monkeypatch):
    assert propagator_name(EngineSettings(sam2_checkpoint=str(checkpoint))) == "sam2"
    assert refiner_name(EngineSettings(sam2_checkpoint=str(checkpoint))) == "sam2"
    assert refiner_name(EngineSettings(sam2_checkpoint="x", sam_hq_checkpoint="y")) == "sam-hq"
    assert propagator_name(EngineSettings(xmem_checkpoint="x", sam2_checkpoint="y")) == "xmem"
    with pytest.raises(LazyXMemError, match="SAM2_CHECKPOINT"):
        build_propagator(EngineSettings(engine="sam2"))
    with pytest.raises(LazyXMemError, match="SAM_HQ_CHECKPOINT"):
        build_refiner(EngineSettings(refiner="sam-hq"))
    monkeypatch.setenv("LAZYXMEM_ENGINE", "sam2")
    monkeypatch.setenv("SAM2_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("SAM2_IMAGE_SIZE", "512")
    monkeypatch.setenv("SAM2_TYPE", "tiny")
    env = EngineSettings.from_env()
    assert (env.engine, env.sam2_checkpoint, env.sam2_image_size, env.sam2_type) == ("sam2", str(checkpoint), 512, "tiny")
    monkeypatch.setenv("SAM2_IMAGE_SIZE", "big")
    with pytest.raises(LazyXMemError, match="SAM2_IMAGE_SIZE"):
        EngineSettings.from_env()


def test_cli_propagate_with_sam2(checkpoint, tmp_path):
    video = make_video(n_frames=6, size=(72, 96), radius=14)
    frames = write_frames(tmp_path / "frames", video.frames)
    write_index_mask(tmp_path / "first.png", video.masks[0])
    out = tmp_path / "out"
    rc = main(["propagate", "--frames", str(frames), "--mask", str(tmp_path / "first.png"), "--out", str(out),
               "--engine", "sam2", "--sam2-checkpoint", str(checkpoint), "--sam2-image-size", "128",
               "--no-lazy", "--save-probs", str(tmp_path / "p.npz")])
    assert rc == 0
    probs = np.load(tmp_path / "p.npz")
    # The same frames through the propagator directly: the command adds nothing of its own.
    from lazyxmem_core.media import open_frames

    frames_read = open_frames(str(frames), None)
    direct = SAM2Propagator(build_propagator(EngineSettings(engine="sam2", sam2_checkpoint=str(checkpoint),
                                                            sam2_image_size=128)).model, SAM2Config(image_size=128),
                            video_length=6)
    for t in range(6):
        p = direct.step(frames_read[t], read_index_mask(tmp_path / "first.png") if t == 0 else None)
        direct.commit()
        np.testing.assert_allclose(probs[f"prob_t{t}"], p, atol=1e-6)
    assert read_index_mask(out / "00005.png").shape == (72, 96)
