"""Label Studio I/O: the API client, tasks read back, predictions posted once per job."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from lazyxmem_core.errors import LazyXMemError

from .checks import shown

log = logging.getLogger(__name__)


def upstream_status(exc: BaseException) -> int | None:
    """The HTTP status of a failed Label Studio call (None: no answer). Only the status is ever
    shown or logged: Label Studio's error body and headers (a session cookie) stay here."""
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


class PostLedger:
    """Remembers which job ids have posted their prediction (in memory, or in Redis when shared)."""

    def __init__(self, redis: Any = None, ttl_s: int = 30 * 86400) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._posted: set[str] = set()
        self._lock = threading.Lock()

    def post_once(self, key: str, post: Callable[[], Any], already_posted: Callable[[], bool] | None = None) -> bool:
        """Run ``post`` unless ``key`` has posted already; returns whether it posted.

        With Redis, a lock serialises duplicates running at once. A worker killed between its post
        and the mark leaves a "posting" flag; the retry then asks ``already_posted`` (Label
        Studio's own record) rather than posting blindly.
        """
        if self.redis is None:
            with self._lock:
                if key in self._posted:
                    return False
                post()
                self._posted.add(key)
                return True
        with self.redis.lock(f"lazyxmem:post-lock:{key}", timeout=60, blocking_timeout=120):
            if self.redis.exists(f"lazyxmem:posted:{key}"):
                return False
            flag = f"lazyxmem:posting:{key}"
            if self.redis.exists(flag) and already_posted is not None and already_posted():
                self.redis.set(f"lazyxmem:posted:{key}", "1", ex=self.ttl_s)
                return False
            self.redis.set(flag, "1", ex=self.ttl_s)
            post()
            self.redis.set(f"lazyxmem:posted:{key}", "1", ex=self.ttl_s)
            return True


class LabelStudioIO:
    """Everything the backend asks of Label Studio's API, with the backend's own key."""

    def __init__(self, url: str | None, api_key: str | None, ledger: PostLedger) -> None:
        self.url, self.api_key = url, api_key
        self.ledger = ledger  # outlives a change of settings (a CPU fallback): posts stay once per job
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def configured(self) -> bool:
        return bool(self.url and self.api_key)

    def client(self) -> Any:
        """One API client, kept: every posted prediction used to build its own."""
        if not self.configured:
            raise LazyXMemError("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set to talk to Label Studio")
        with self._lock:
            if self._client is None:
                from label_studio_sdk import LabelStudio

                self._client = LabelStudio(base_url=self.url, api_key=self.api_key)
            return self._client

    def task(self, task_id: int) -> dict:
        """A task with its annotations."""
        task = self.client().tasks.get(id=str(task_id))
        return task.model_dump(mode="json") if hasattr(task, "model_dump") else dict(task)

    def annotation(self, annotation_id: int) -> dict:
        """An annotation as Label Studio holds it (its result, its task, the prediction it came from)."""
        ann = self.client().annotations.get(id=annotation_id)
        return ann.model_dump(mode="json") if hasattr(ann, "model_dump") else dict(ann)

    def prediction(self, prediction_id: int) -> dict:
        pred = self.client().predictions.get(id=prediction_id)
        return pred.model_dump(mode="json") if hasattr(pred, "model_dump") else dict(pred)

    def label_config(self, project_id: int) -> str:
        return str(self.client().projects.get(id=project_id).label_config or "")

    def show_our_version(self, project_id: int, ours: str) -> str:
        """Make the project's prediction version this backend's, when Label Studio set it to this
        backend's title by itself; returns what was found: "ours", "moved", "unset" or "other".

        With its model-version dropdown flag off (the default in 1.23.2), Label Studio scores the
        Data Manager's prediction column and shows predictions in the labeling stream only for
        predictions whose version is the project's ``model_version``; connecting a backend sets
        that to the backend's *title*, which no prediction carries, while "Retrieve predictions"
        skips tasks by the version ``/setup`` answered. Pointing the project at that version (what
        picking it under Settings > Predictions does) makes the three agree. A version the user
        chose (another model's, or none) is left alone.
        """
        current = self.client().projects.get(id=project_id).model_version or ""
        if current == ours:
            return "ours"
        if not current:
            return "unset"
        mine = {b.title for b in self.client().ml.list(project=project_id) if (b.model_version or "") == ours}
        if current not in mine:
            return "other"
        self.client().projects.update(id=project_id, model_version=ours)
        log.info("project %s: predictions are shown and scored under %s (Label Studio had set the backend's "
                 "title %r, which no prediction carries)", project_id, ours, shown(current))
        return "moved"

    def has_prediction(self, task_id: int, model_version: str, result: list[dict] | None = None) -> bool:
        """Whether Label Studio holds a prediction of this version for the task (with ``result``:
        this very one; every revision of ours carries the same version)."""
        return any(p.model_version == model_version and (result is None or p.result == result)
                   for p in self.client().predictions.list(task=task_id))

    def retire_older(self, task_id: int, keep: int | None) -> None:
        """One prediction of ours per task stays current: the older ones this backend posted are
        deleted once a newer one is in, except those an annotation was made from (Label Studio
        records them as its ``parent_prediction``; the backend diffs the annotation against it).
        Predictions of other models are never touched."""
        if keep is None:
            return
        try:
            parents = {a.get("parent_prediction") for a in self.task(task_id).get("annotations") or []}
            older = [p.id for p in self.client().predictions.list(task=task_id)
                     if p.id != keep and str(p.model_version or "").startswith("lazyxmem-") and p.id not in parents]
            for pid in older:
                self.client().predictions.delete(id=pid)
        except Exception as exc:  # the new prediction is in; an old tab left over is not an error
            log.info("task %s: older predictions not retired (%s)", task_id, upstream_status(exc) or type(exc).__name__)
            return
        if older:
            log.info("task %s: prediction %s replaces %s", task_id, keep, ", ".join(map(str, older)))

    def post_prediction(self, task_id: int, pred: dict, job_id: str | None = None, unless_present: bool = False) -> bool:
        """Post ``pred`` for the task, once per job id.

        ``unless_present``: not when Label Studio holds a prediction of this model version for the
        task already (on import, LS may call /predict itself while the TASKS_CREATED job runs).
        """
        if not self.configured:
            log.warning("task %s: prediction ready but LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY are not set", task_id)
            return False
        version = pred["model_version"]

        def post() -> None:
            made = self.client().predictions.create(task=task_id, result=pred["result"], score=pred["score"],
                                                    model_version=version)
            log.info("task %s: posted prediction %s revision %s%s", task_id, version, pred.get("revision", 0),
                     f" (job {job_id})" if job_id else "")
            self.retire_older(task_id, getattr(made, "id", None))

        if job_id is None:
            post()
            return True
        if unless_present and self.has_prediction(task_id, version):
            log.info("task %s: Label Studio has a %s prediction already; job %s posts nothing", task_id, version, job_id)
            return False
        posted = self.ledger.post_once(job_id, post, lambda: self.has_prediction(task_id, version, pred["result"]))
        if not posted:
            log.info("task %s: job %s posted its prediction already; not posting again", task_id, job_id)
        return posted
