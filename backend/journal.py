"""The in-process queue's journal: every queued or running job on disk, so a restart of the web
process (a deploy, a crash, a kill -9) re-queues it instead of losing it without a trace.

One file per job id in a private directory (0700, files 0600), written atomically (temp file,
fsync, ``os.replace``): a kill mid-write leaves the old file or none, never half of one. The
files are pickles of the :class:`~backend.jobs.JobSpec`: only this backend writes there, and the
directory is refused when another user owns it or can write to it. A file that does not load
is moved aside (``corrupt/``) and logged; it never stops the start.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from lazyxmem_core.errors import LazyXMemError

log = logging.getLogger(__name__)

SUFFIX = ".job"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")  # job ids are ours (JobSpec.key); a file name never escapes


class JournalError(LazyXMemError):
    pass


class Journal:
    """Jobs written on submit, removed when they end; :meth:`load` gives back what is left."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.dir.stat()
        if st.st_uid != os.geteuid():
            raise JournalError(f"job journal {self.dir} belongs to uid {st.st_uid}, not to this process "
                               f"(uid {os.geteuid()}): point CACHE_DIR at a directory of this user")
        if stat.S_IMODE(st.st_mode) != 0o700:
            # Ours but opened up (an old umask, a copied volume): the journal holds pickles, only we may write.
            os.chmod(self.dir, 0o700)

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
        """Every journalled (spec, total, attempts), oldest submission first. Temp files of an interrupted
        write are removed; a file that does not hold a ``spec_type`` is moved to ``corrupt/``."""
        entries = []
        for path in sorted(self.dir.iterdir()):
            if not path.is_file():
                continue
            if path.name.startswith(".tmp-"):
                path.unlink(missing_ok=True)
                continue
            if path.suffix != SUFFIX:
                continue
            try:
                entry = pickle.loads(path.read_bytes())
                spec, total, attempts = entry["spec"], int(entry["total"]), int(entry["attempts"])
                if not isinstance(spec, spec_type) or f"{spec.key}{SUFFIX}" != path.name:
                    raise ValueError(f"not a {spec_type.__name__} filed under its own id")
            except Exception as exc:  # truncated, foreign, or from an incompatible version
                self._set_aside(path, exc)
                continue
            entries.append((spec, total, attempts))
        entries.sort(key=lambda e: e[0].submitted)
        return entries

    def _set_aside(self, path: Path, exc: Exception) -> None:
        aside = self.dir / "corrupt"
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
