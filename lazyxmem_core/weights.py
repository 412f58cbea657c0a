"""Download the official XMem and SAM checkpoints: resumable, progress bar, checked by loading.

A download goes to ``<file>.part`` (resumed with an HTTP Range request when it is run again),
is loaded and checked when complete, and only then renamed to ``<file>``. Neither release
publishes a checksum, so the SHA-256 of the first good file is written to ``<file>.sha256``
and later runs compare against it. A complete, valid file is never downloaded again.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CheckpointError, LazyXMemError

log = logging.getLogger(__name__)

XMEM_URL = "https://github.com/hkchengrex/XMem/releases/download/v1.0"
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything"
XMEM_VARIANTS = ("XMem", "XMem-s012", "XMem-no-sensory")
SAM_FILES = {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_b": "sam_vit_b_01ec64.pth"}
SAM_HQ_URL = "https://huggingface.co/lkeab/hq-sam/resolve/main"  # SAM-HQ's authors' release (SysCV/sam-hq)
SAM_HQ_FILES = {"vit_b": "sam_hq_vit_b.pth", "vit_l": "sam_hq_vit_l.pth", "vit_h": "sam_hq_vit_h.pth"}
SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"  # SAM 2.1 (the file names: sam2.model.SAM2_TYPES)
# Bytes of the official SAM 2.1 files: a download of another size from there is not the release.
SAM2_SIZES = {"tiny": 156_008_466, "small": 184_416_285, "base_plus": 323_606_802, "large": 898_083_611}
URL_ENV = "LAZYXMEM_WEIGHTS_URL"  # a mirror (base URL) for both kinds, e.g. for tests or air-gapped sites
TIMEOUT_S = 30.0  # connect / read timeout: a stalled server must not hang the command
CHUNK = 1 << 20


class DownloadError(LazyXMemError):
    """The file could not be fetched (no connection, HTTP error, interrupted transfer)."""


def default_dir() -> Path:
    """``$MODEL_DIR`` or ``./models``."""
    return Path(os.environ.get("MODEL_DIR") or "models")


def file_url(filename: str, default_base: str, url: str | None = None) -> str:
    """The address of ``filename``: ``url`` (a full URL or a base), else ``$LAZYXMEM_WEIGHTS_URL``, else the release."""
    base = url or os.environ.get(URL_ENV) or default_base
    return base if base.rstrip("/").endswith("/" + filename) else f"{base.rstrip('/')}/{filename}"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _no_connection(url: str, exc: Exception) -> DownloadError:
    return DownloadError(f"cannot download {url}: no connection to the server ({type(exc).__name__}). "
                         "Check the internet connection (or set LAZYXMEM_WEIGHTS_URL / --url to a mirror), "
                         "or download the file by hand into the models folder")


def fetch(url: str, dest: str | Path, progress: bool = True, timeout: float = TIMEOUT_S) -> Path:
    """Download ``url`` into ``dest`` (resuming ``dest`` if it is partial); returns ``dest``.

    ``dest`` is the ``.part`` file: the caller renames it once it has checked the content.
    """
    import requests
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = dest.stat().st_size if dest.is_file() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        r = requests.get(url, headers=headers, stream=True, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise _no_connection(url, e) from e
    except requests.RequestException as e:
        raise DownloadError(f"cannot download {url}: {e}") from e
    with r:
        if r.status_code == 416 and offset:
            # Nothing left to send: the part file is already complete (or longer than the file).
            size = r.headers.get("Content-Range", "").rpartition("/")[2]
            if size.isdigit() and int(size) == offset:
                return dest
            dest.unlink()
            return fetch(url, dest, progress, timeout)
        if r.status_code >= 400:
            raise DownloadError(f"cannot download {url}: HTTP {r.status_code} {r.reason}")
        resumed = r.status_code == 206 and r.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
        if offset and not resumed:
            log.info("the server did not resume at byte %d: downloading %s from the start", offset, url)
            offset = 0
        length = r.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        written = offset
        try:
            with open(dest, "ab" if offset else "wb") as f, \
                    tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=dest.name.removesuffix(".part"), disable=not progress) as bar:
                for chunk in r.iter_content(CHUNK):
                    f.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
        except (requests.RequestException, OSError) as e:
            raise DownloadError(f"the download of {url} stopped after {written} bytes ({type(e).__name__}); "
                                f"the partial file {dest} is kept: run the command again to resume") from e
    if total is not None and written != total:
        raise DownloadError(f"the download of {url} ended after {written} of {total} bytes; the partial file "
                            f"{dest} is kept: run the command again to resume")
    return dest


def ensure(filename: str, url: str, validate: Callable[[Path], object], directory: str | Path | None = None,
           progress: bool = True) -> Path:
    """The checked file ``directory/filename``, downloaded from ``url`` unless it is already there."""
    path = Path(directory) if directory is not None else default_dir()
    path = path / filename
    sidecar = path.with_name(path.name + ".sha256")
    if path.is_file():
        if sidecar.is_file():
            recorded = sidecar.read_text().split()[0] if sidecar.read_text().strip() else ""
            actual = sha256_file(path)
            if actual != recorded:
                raise CheckpointError(f"{path} has SHA-256 {actual} but {sidecar} recorded {recorded} when it was "
                                      f"downloaded: the file changed or is damaged; delete {path} and {sidecar} "
                                      "and download it again")
            log.info("%s is present and matches its recorded SHA-256", path)
            return path
        validate(path)  # a file put there by hand: check it, then record its hash
        sidecar.write_text(f"{sha256_file(path)}  {path.name}\n")
        return path
    part = path.with_name(path.name + ".part")
    fetch(url, part, progress=progress)
    try:
        validate(part)
    except CheckpointError as e:
        part.unlink(missing_ok=True)  # resuming a wrong file would not fix it
        raise CheckpointError(f"the file downloaded from {url} is not valid and was deleted: {e}") from e
    digest = sha256_file(part)
    part.replace(path)
    sidecar.write_text(f"{digest}  {path.name}\n")
    return path


def check_xmem(path: str | Path, variant: str = "XMem") -> None:
    """Load ``path`` and check it has the layout of the official ``variant``."""
    from .xmem_layout import load_xmem_state_dict

    load_xmem_state_dict(path, sensory=variant != "XMem-no-sensory")


def check_sam(path: str | Path, model_type: str = "vit_h") -> None:
    """Load ``path`` with the SAM loader and check it is a complete SAM ``model_type`` state dict."""
    from .sam.refiner import load_state_dict

    def reference() -> dict[str, Any]:
        from segment_anything import sam_model_registry

        return sam_model_registry[model_type]().state_dict()

    _check_sam_layout(path, load_state_dict(path), model_type, reference, "SAM")


def check_sam_hq(path: str | Path, model_type: str = "vit_l") -> None:
    """Load ``path`` with the SAM-HQ loader and check it is a complete SAM-HQ ``model_type`` state dict."""
    from .sam.hq import hq_registry, load_hq_state_dict

    sd = load_hq_state_dict(path)  # refuses a plain SAM file by name
    _check_sam_layout(path, sd, model_type, lambda: hq_registry()[model_type]().state_dict(), "SAM-HQ")


def _check_sam_layout(path: str | Path, sd: dict[str, Any], model_type: str,
                      reference: Callable[[], dict[str, Any]], name: str) -> None:
    """``sd`` has the type, key names and shapes of ``reference()`` (the registry model's state dict)."""
    import torch

    from .sam.refiner import detect_model_type

    detected = detect_model_type(sd)
    if detected is None:
        raise CheckpointError(f"{path} is a {name}-like state dict but its image encoder width matches no official "
                              f"{name} type (vit_b / vit_l / vit_h)")
    if detected != model_type:
        raise CheckpointError(f"{path} is a {name} {detected} checkpoint, not {model_type}")
    with torch.device("meta"):  # the model's key names and shapes, without allocating its weights
        expected = reference()
    _compare_layout(path, sd, expected, f"{name} {model_type}")


def _compare_layout(path: str | Path, sd: dict[str, Any], expected: dict[str, Any], what: str,
                    extra_ok: bool = True) -> None:
    """``sd`` has every key of ``expected`` with its shape (and, unless ``extra_ok``, no other key)."""
    missing = [k for k in expected if k not in sd]
    wrong = [k for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    extra = [] if extra_ok else [k for k in sd if k not in expected]
    if missing or wrong or extra:
        more = f", {len(extra)} unexpected (e.g. {extra[:2]})" if extra else ""
        raise CheckpointError(f"{path} does not match {what}: {len(missing)} missing keys "
                              f"(e.g. {missing[:2]}), {len(wrong)} with other shapes (e.g. {wrong[:2]}){more}")


def check_sam2(path: str | Path, sam2_type: str = "tiny", expected_size: int | None = None) -> None:
    """Check ``path`` is a complete official SAM 2.1 ``sam2_type`` checkpoint: its size (when
    ``expected_size`` is given), its form, its type and every key and shape, as a strict load needs."""
    from .sam2.model import build_model, check_type, detect_type, load_state_dict

    check_type(sam2_type)
    size = Path(path).stat().st_size
    if expected_size is not None and size != expected_size:
        # Cheap, and before reading up to 900 MB: a truncated or foreign file says so at once.
        raise CheckpointError(f"{path} has {size} bytes but the official SAM 2.1 {sam2_type} checkpoint has "
                              f"{expected_size}: the download is incomplete or is another file")
    sd = load_state_dict(path)  # refuses a SAM 1 file or a foreign dict by name
    detected = detect_type(sd)
    if detected != sam2_type:
        what = f"a SAM 2.1 {detected}" if detected else "a SAM 2-like checkpoint of no official type"
        raise CheckpointError(f"{path} is {what} checkpoint, not {sam2_type}")
    # On the CPU, not the meta device: Hiera's constructor reads tensor values (.item()), which
    # meta tensors have not. Building large takes seconds, far less than downloading it.
    expected = build_model(sam2_type).state_dict()
    _compare_layout(path, sd, expected, f"SAM 2.1 {sam2_type}", extra_ok=False)


def download_xmem(variant: str = "XMem", directory: str | Path | None = None, url: str | None = None,
                  progress: bool = True) -> Path:
    """Fetch (or find) the official XMem checkpoint ``variant``; returns its path."""
    if variant not in XMEM_VARIANTS:
        raise ValueError(f"unknown XMem variant {variant!r}: use one of {', '.join(XMEM_VARIANTS)}")
    filename = f"{variant}.pth"
    return ensure(filename, file_url(filename, XMEM_URL, url), lambda p: check_xmem(p, variant), directory, progress)


def download_sam(model_type: str = "vit_h", directory: str | Path | None = None, url: str | None = None,
                 progress: bool = True) -> Path:
    """Fetch (or find) the official SAM checkpoint of ``model_type``; returns its path."""
    if model_type not in SAM_FILES:
        raise ValueError(f"unknown SAM model type {model_type!r}: use one of {', '.join(SAM_FILES)}")
    filename = SAM_FILES[model_type]
    return ensure(filename, file_url(filename, SAM_URL, url), lambda p: check_sam(p, model_type), directory, progress)


def download_sam_hq(model_type: str = "vit_l", directory: str | Path | None = None, url: str | None = None,
                    progress: bool = True) -> Path:
    """Fetch (or find) the official SAM-HQ checkpoint of ``model_type`` (the paper's refiner: vit_l); returns its path."""
    if model_type not in SAM_HQ_FILES:
        raise ValueError(f"unknown SAM-HQ model type {model_type!r}: use one of {', '.join(SAM_HQ_FILES)}")
    filename = SAM_HQ_FILES[model_type]
    return ensure(filename, file_url(filename, SAM_HQ_URL, url), lambda p: check_sam_hq(p, model_type), directory,
                  progress)


def download_sam2(sam2_type: str = "tiny", directory: str | Path | None = None, url: str | None = None,
                  progress: bool = True) -> Path:
    """Fetch (or find) the official SAM 2.1 checkpoint of ``sam2_type``; returns its path."""
    if sam2_type not in SAM2_SIZES:
        raise ValueError(f"unknown SAM 2.1 type {sam2_type!r}: use one of {', '.join(SAM2_SIZES)}")
    from .sam2.model import SAM2_TYPES

    filename = SAM2_TYPES[sam2_type][1]
    source = file_url(filename, SAM2_URL, url)
    # The sizes are the release's: a mirror is checked by loading alone.
    size = SAM2_SIZES[sam2_type] if source == f"{SAM2_URL}/{filename}" else None
    return ensure(filename, source, lambda p: check_sam2(p, sam2_type, size), directory, progress)
