"""`lazyxmem weights download sam2` against a local HTTP server: a complete SAM 2.1 file is
accepted, recorded and loadable; wrong or truncated files are rejected and deleted."""
from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from lazyxmem_core import weights  # noqa: E402
from lazyxmem_core.cli import main  # noqa: E402
from lazyxmem_core.errors import CheckpointError  # noqa: E402
from lazyxmem_core.sam2 import load_checkpoint  # noqa: E402

from test_weights import Server  # noqa: E402
from tiny_sam2 import sam2_checkpoint_bytes, sam2_state_dict  # noqa: E402

TINY = "/sam2.1_hiera_tiny.pt"
SMALL = "/sam2.1_hiera_small.pt"
LARGE = "/sam2.1_hiera_large.pt"
BASE = "/sam2.1_hiera_base_plus.pt"


def saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture
def server():
    s = Server({TINY: sam2_checkpoint_bytes("tiny")})
    yield s
    s.close()


def test_download_check_and_load(server, tmp_path, capsys):
    assert main(["weights", "download", "sam2", "--type", "tiny", "--dir", str(tmp_path), "--url", server.url,
                 "-q"]) == 0
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    assert capsys.readouterr().out.strip() == str(path)
    assert path.read_bytes() == sam2_checkpoint_bytes("tiny") and not (tmp_path / "sam2.1_hiera_tiny.pt.part").exists()
    assert (tmp_path / "sam2.1_hiera_tiny.pt.sha256").read_text().split()[0] == weights.sha256_file(path)
    assert weights.download_sam2("tiny", tmp_path, server.url, progress=False) == path
    assert server.requests == [(TINY, None)]  # present and recorded: not fetched again
    model = load_checkpoint(path, "tiny", 256)  # loads strictly into the package's model
    assert model.image_size == 256
    with pytest.raises(CheckpointError, match="SAM 2.1 tiny checkpoint, not small"):
        weights.check_sam2(path, "small")


def test_wrong_files_are_rejected_and_deleted(tmp_path):
    sd = sam2_state_dict("tiny")
    files = {
        # A SAM 1 checkpoint is a plain state dict of image_encoder.blocks.* keys.
        TINY: saved({"image_encoder.blocks.0.attn.qkv.weight": torch.zeros(3)}),
        SMALL: sam2_checkpoint_bytes("tiny")[:-1000],  # truncated
        LARGE: saved({"model": {k: v for k, v in sd.items() if k != "sam_mask_decoder.iou_token.weight"}}),
        BASE: saved({"model": dict(sd, **{"image_encoder.trunk.blocks.30.extra": torch.zeros(1)})}),
    }
    s = Server(files)
    try:
        for sam2_type, message in (("tiny", "not a SAM 2 checkpoint"),
                                   ("small", "not a readable PyTorch checkpoint"),
                                   ("large", "tiny checkpoint, not large"),
                                   ("base_plus", "SAM 2-like checkpoint of no official type")):
            with pytest.raises(CheckpointError, match=message):
                weights.download_sam2(sam2_type, tmp_path, s.url, progress=False)
            assert not list(tmp_path.iterdir()), sam2_type  # deleted: resuming would not fix it
        # Right type, a key missing: found by comparing with the model's own key names and shapes.
        s.files[TINY] = files[LARGE]
        with pytest.raises(CheckpointError, match=r"does not match SAM 2.1 tiny: 1 missing keys"):
            weights.download_sam2("tiny", tmp_path, s.url, progress=False)
        s.files[TINY] = saved({"model": dict(sd, **{"obj_ptr_proj.extra": torch.zeros(1)})})
        with pytest.raises(CheckpointError, match=r"1 unexpected \(e.g. \['obj_ptr_proj.extra'\]\)"):
            weights.download_sam2("tiny", tmp_path, s.url, progress=False)
        assert not list(tmp_path.iterdir())
    finally:
        s.close()


def test_official_source_checks_the_size(server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(weights.URL_ENV, raising=False)
    monkeypatch.setattr(weights, "SAM2_URL", server.url)  # stands in for the release
    size = len(sam2_checkpoint_bytes("tiny"))
    with pytest.raises(CheckpointError, match=f"has {size} bytes but the official SAM 2.1 tiny checkpoint has "
                                              "156008466"):
        weights.download_sam2("tiny", tmp_path, progress=False)
    assert not list(tmp_path.iterdir())
    assert main(["weights", "download", "sam2", "--dir", str(tmp_path), "-q"]) == 2  # tiny is the default
    err = capsys.readouterr().err
    assert "156008466" in err and "Traceback" not in err


def test_default_url_and_bad_type(monkeypatch):
    monkeypatch.delenv(weights.URL_ENV, raising=False)
    assert weights.file_url("sam2.1_hiera_large.pt", weights.SAM2_URL) == \
        "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt"
    with pytest.raises(ValueError, match="unknown SAM 2.1 type 'huge'"):
        weights.download_sam2("huge")
    with pytest.raises(SystemExit):
        main(["weights", "download", "sam2", "--type", "huge"])
