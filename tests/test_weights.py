"""`lazyxmem weights download` against a local HTTP server: complete and resumed downloads, the
SHA-256 sidecar, checkpoint validation, and clean failures without a connection."""
from __future__ import annotations

import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lazyxmem_core import weights
from lazyxmem_core.cli import main
from lazyxmem_core.errors import CheckpointError
from lazyxmem_core.xmem_layout import (
    check_xmem_state_dict,
    expected_keys,
    identifying_shapes,
)


def fake_xmem(sensory: bool = True) -> bytes:
    """An XMem-layout state dict in a few kB: every key, the identifying shapes as stride-0 views."""
    shapes = identifying_shapes(hidden_dim=64 if sensory else 0)
    sd = {k: torch.zeros(1).expand(*shapes[k]) if k in shapes else torch.zeros(1) for k in expected_keys(sensory)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def fake_sam() -> bytes:
    """SAM-like key names, but an image-encoder width of no official SAM type."""
    buf = io.BytesIO()
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 4, 4, 100),
                "image_encoder.patch_embed.proj.weight": torch.zeros(100, 3, 16, 16)}, buf)
    return buf.getvalue()


class Server:
    """Serves ``files`` (path -> bytes) with HTTP Range support and logs every request."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


XMEM = fake_xmem()


@pytest.fixture
def server():
    s = Server({"/XMem.pth": XMEM, "/XMem-no-sensory.pth": fake_xmem(False), "/sam_vit_b_01ec64.pth": fake_sam(),
                "/XMem-s012.pth": b"this is not a torch file" * 10})
    yield s
    s.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_layout_rules_accept_variants_and_reject_others():
    sd = torch.load(io.BytesIO(XMEM), weights_only=True)
    assert check_xmem_state_dict(sd).hidden_dim == 64
    no_sensory = torch.load(io.BytesIO(fake_xmem(False)), weights_only=True)
    layout = check_xmem_state_dict(no_sensory, sensory=False)
    assert not layout.sensory and layout.key_dim == 64 and layout.value_dim == 512
    with pytest.raises(CheckpointError, match="no-sensory"):
        check_xmem_state_dict(no_sensory, sensory=True)
    stage0 = dict(sd, **{"value_encoder.conv1.weight": torch.zeros(1).expand(64, 4, 7, 7)})
    assert check_xmem_state_dict(stage0).stage0
    no_counters = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    check_xmem_state_dict(no_counters)
    with pytest.raises(CheckpointError, match="1 missing keys"):
        check_xmem_state_dict({k: v for k, v in sd.items() if k != "decoder.pred.bias"})
    with pytest.raises(CheckpointError, match="XMem key names but not its shapes: key_proj.e_proj.weight"):
        check_xmem_state_dict(dict(sd, **{"key_proj.key_proj.weight": torch.zeros(1).expand(32, 1024, 3, 3)}))
    with pytest.raises(CheckpointError, match="key_dim 32"):  # consistent, but not the released dims
        check_xmem_state_dict(dict(sd, **{f"key_proj.{m}.weight": torch.zeros(1).expand(32, 1024, 3, 3)
                                          for m in ("key_proj", "e_proj")}))
    with pytest.raises(CheckpointError, match="not an XMem checkpoint"):
        check_xmem_state_dict({"image_encoder.pos_embed": torch.zeros(1)})


def test_download_then_no_request_when_present(server, tmp_path, capsys):
    assert main(["weights", "download", "xmem", "--dir", str(tmp_path), "--url", server.url]) == 0
    path = tmp_path / "XMem.pth"
    assert path.read_bytes() == XMEM and not (tmp_path / "XMem.pth.part").exists()
    assert capsys.readouterr().out.strip() == str(path)
    assert (tmp_path / "XMem.pth.sha256").read_text().split()[0] == weights.sha256_file(path)
    assert server.requests == [("/XMem.pth", None)]
    assert main(["weights", "download", "xmem", "--dir", str(tmp_path), "--url", server.url]) == 0
    assert len(server.requests) == 1  # complete and valid: nothing fetched


def test_env_url_and_model_dir(server, tmp_path, monkeypatch):
    monkeypatch.setenv(weights.URL_ENV, server.url + "/")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "m"))
    path = weights.download_xmem("XMem-no-sensory", progress=False)
    assert path == tmp_path / "m" / "XMem-no-sensory.pth" and path.is_file()


def test_resume_requests_only_the_rest(server, tmp_path):
    part = tmp_path / "XMem.pth.part"
    part.write_bytes(XMEM[:1000])
    weights.download_xmem("XMem", tmp_path, server.url, progress=False)
    assert server.requests == [("/XMem.pth", "bytes=1000-")]
    assert (tmp_path / "XMem.pth").read_bytes() == XMEM and not part.exists()


def test_complete_part_file_is_not_fetched_again(server, tmp_path):
    (tmp_path / "XMem.pth.part").write_bytes(XMEM)
    weights.download_xmem("XMem", tmp_path, server.url, progress=False)
    assert server.requests == [("/XMem.pth", f"bytes={len(XMEM)}-")]  # answered 416: nothing left
    assert (tmp_path / "XMem.pth").read_bytes() == XMEM


def test_sha256_sidecar_detects_tampering(server, tmp_path, capsys):
    path = weights.download_xmem("XMem", tmp_path, server.url, progress=False)
    path.write_bytes(XMEM[:-1] + bytes([XMEM[-1] ^ 1]))
    assert main(["weights", "download", "xmem", "--dir", str(tmp_path), "--url", server.url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lazyxmem: error:") and "SHA-256" in err and "delete" in err
    assert "Traceback" not in err and len(server.requests) == 1


def test_hand_placed_file_is_checked_and_hash_recorded(tmp_path):
    (tmp_path / "XMem.pth").write_bytes(XMEM)
    weights.download_xmem("XMem", tmp_path, "http://127.0.0.1:1", progress=False)  # never contacted
    assert (tmp_path / "XMem.pth.sha256").is_file()
    (tmp_path / "XMem-s012.pth").write_bytes(XMEM[: len(XMEM) // 2])  # truncated
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        weights.download_xmem("XMem-s012", tmp_path, "http://127.0.0.1:1", progress=False)


def test_corrupt_or_wrong_downloads_are_rejected(server, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        weights.download_xmem("XMem-s012", tmp_path, server.url, progress=False)
    assert not list(tmp_path.iterdir())  # the bad download was deleted, nothing to resume
    assert main(["weights", "download", "sam", "--type", "vit_b", "--dir", str(tmp_path), "--url", server.url,
                 "-q"]) == 2
    err = capsys.readouterr().err
    assert "matches no official SAM type" in err and "Traceback" not in err
    assert not (tmp_path / "sam_vit_b_01ec64.pth").exists()


def test_http_error_is_clean(server, tmp_path, capsys):
    assert main(["weights", "download", "sam", "--type", "vit_h", "--dir", str(tmp_path), "--url", server.url]) == 2
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "sam_vit_h_4b8939.pth" in err and "Traceback" not in err


def test_no_connection_is_clean(tmp_path, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    assert main(["weights", "download", "xmem", "--dir", str(tmp_path), "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lazyxmem: error:") and f"{url}/XMem.pth" in err and "no connection" in err
    assert "Traceback" not in err


def test_default_urls_and_bad_names(monkeypatch):
    monkeypatch.delenv(weights.URL_ENV, raising=False)
    assert weights.file_url("XMem.pth", weights.XMEM_URL) == \
        "https://github.com/hkchengrex/XMem/releases/download/v1.0/XMem.pth"
    assert weights.file_url("x.pth", weights.SAM_URL, "http://m/x.pth") == "http://m/x.pth"
    with pytest.raises(ValueError, match="unknown XMem variant"):
        weights.download_xmem("XMem2")


def test_sam_download_accepts_a_complete_state_dict(tmp_path):
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in sam_model_registry["vit_b"]().state_dict().items()}
    buf = io.BytesIO()
    torch.save({k: torch.zeros(1).expand(*s) if len(s) else torch.zeros(()) for k, s in shapes.items()}, buf)
    s = Server({"/sam_vit_b_01ec64.pth": buf.getvalue()})
    try:
        path = weights.download_sam("vit_b", tmp_path, s.url, progress=False)
        assert path.name == "sam_vit_b_01ec64.pth" and (tmp_path / "sam_vit_b_01ec64.pth.sha256").is_file()
        with pytest.raises(CheckpointError, match="SAM vit_b checkpoint, not vit_l"):
            weights.check_sam(path, "vit_l")
    finally:
        s.close()
