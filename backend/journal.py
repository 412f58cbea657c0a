"""The in-process queue's journal: every queued or running job on disk, so a restart of the web
process (a deploy, a crash, a kill -9) re-queues it instead of losing it without a trace.

One file per job id in a private directory (0700, files 0600), written atomically (temp file,
fsync, ``os.replace``): a kill mid-write leaves the old file or none, never half of one. The
files are pickles of the :class:`~backend.jobs.JobSpec`: only this backend writes there, and a
directory another user owns is refused.

Several web processes may share one ``CACHE_DIR`` (gunicorn ``WORKERS``): each writes in a folder
of its own, beside a lock file it holds (``flock``) while it lives. The kernel drops the lock when
the process dies, however it dies, so a starting process takes over exactly the folders whose
owner is gone and never re-runs the jobs of a sibling that is still running them. A file that
does not load is moved aside (``corrupt/``) and logged; it never stops the start.
"""
from __future__ import annotations

import fcntl
import logging
import os
import pickle
import re
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from lazyxmem_core.errors import LazyXMemError

log = logging.getLogger(__name__)

SUFFIX = ".job"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")  # job ids are ours (JobSpec.key); a file name never escapes
_OWNER = re.compile(r"^owner-[0-9]+-[0-9a-f]{8}$")


class JournalError(LazyXMemError):
    pass


class Journal:
    """Jobs written on submit, removed when they end; :meth:`load` gives back what dead processes
    (and older versions, which wrote at the top level) left."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.root = Path(directory)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.root.stat()
        if st.st_uid != os.geteuid():
            raise JournalError(f"job journal {self.root} belongs to uid {st.st_uid}, not to this process "
                               f"(uid {os.geteuid()}): point CACHE_DIR at a directory of this user")
        if stat.S_IMODE(st.st_mode) != 0o700:
            # Ours but opened up (an old umask, a copied volume): the journal holds pickles, only we may write.
            os.chmod(self.root, 0o700)
        name = f"owner-{os.getpid()}-{secrets.token_hex(4)}"
        self._lock_fd = os.open(self.root / f"{name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # held until this process ends
        self.dir = self.root / name
        self.dir.mkdir(mode=0o700)

    def close(self) -> None:
        """Release this process's folder (its jobs become another process's to take over)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _path(self, job_id: str) -> Path:
        if not _SAFE_ID.match(job_id):
            raise JournalError(f"job id {job_id[:80]!r} cannot name a journal file")
        return self.dir / f"{job_id}{SUFFIX}"

    def add(self, job_id: str, spec: Any, total: int, attempts: int = 0) -> None:
        """Write (or rewrite) one job's entry atomically; ``attempts``: how often it was started."""
        data = pickle.dumps({"spec": spec, "total": int(total), "attempts": int(attempts)},
                            protocol=pickle.HIGHEST_PROTOCOL)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=SUFFIX)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(job_id))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def remove(self, job_id: str) -> None:
        try:
            self._path(job_id).unlink(missing_ok=True)
        except OSError:  # a full or read-only disk: the job re-runs after a restart, it does not fail now
            log.warning("job %s: its journal entry could not be removed", job_id, exc_info=True)

    def load(self, spec_type: type) -> list[tuple[Any, int, int]]:
        """Take over the entries of every process that is gone: (spec, total, attempts), oldest
        submission first, now in this process's folder. Temp files of an interrupted write are
        removed; a file that does not hold a ``spec_type`` filed under its own id goes to ``corrupt/``."""
        entries = [e for path in self._orphans() if (e := self._read(path, spec_type)) is not None]
        entries.sort(key=lambda e: e[0].submitted)
        return entries

    def _orphans(self) -> list[Path]:
        """The files of dead owners (and of the top level), moved into this process's folder."""
        folders = [self.root]
        for lock in sorted(self.root.glob("owner-*.lock")):
            folder = self.root / lock.stem
            if folder == self.dir or not _OWNER.match(lock.stem):
                continue
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:  # another starting process took it over first
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its owner lives: its jobs are running or queued there
                os.close(fd)
                continue
            try:  # ours now: its jobs move over, then the folder and its lock go
                if folder.is_dir():
                    for path in folder.iterdir():
                        if path.is_file() and path.suffix == SUFFIX:
                            self._take(path)
                    shutil.rmtree(folder, ignore_errors=True)
                lock.unlink(missing_ok=True)
            finally:
                os.close(fd)
        for path in sorted(self.root.iterdir()):  # files of an owner-less version, at the top level
            if path.is_file() and path.suffix == SUFFIX:
                self._take(path)
        return sorted(self.dir.glob(f"*{SUFFIX}"))

    def _take(self, path: Path) -> None:
        if path.name.startswith(".tmp-"):
            path.unlink(missing_ok=True)
        else:
            os.replace(path, self.dir / path.name)

    def _read(self, path: Path, spec_type: type) -> tuple[Any, int, int] | None:
        try:
            entry = pickle.loads(path.read_bytes())
            spec, total, attempts = entry["spec"], int(entry["total"]), int(entry["attempts"])
            if not isinstance(spec, spec_type) or f"{spec.key}{SUFFIX}" != path.name:
                raise ValueError(f"not a {spec_type.__name__} filed under its own id")
        except Exception as exc:  # truncated, foreign, or from an incompatible version
            self._set_aside(path, exc)
            return None
        return spec, total, attempts

    def _set_aside(self, path: Path, exc: Exception) -> None:
        aside = self.root / "corrupt"
        aside.mkdir(mode=0o700, exist_ok=True)
        target = aside / path.name
        try:
            os.replace(path, target)
        except OSError:
            log.error("job journal: %s is unreadable (%s) and could not be moved aside", path.name,
                      type(exc).__name__)
            return
        log.error("job journal: %s is unreadable (%s: %s); moved to %s, not re-queued", path.name,
                  type(exc).__name__, str(exc)[:200], target)
