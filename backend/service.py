"""The service the Flask routes call (and the jobs, in this process or in a worker).

Every request reads top-down once: Label Studio JSON -> ``edits`` / ``convert`` (core types) ->
the task store (whose session, which lock) -> the core (``LazySession``, ``SessionView``) ->
``convert`` -> the response. The concurrency model is written down in ``task_store``; here:

- a web request never propagates a whole video: a batch prediction runs inside the request only
  when it is short (``SYNC_BUDGET_S``) and no other request is propagating (one sync slot); else
  it is queued on the batch lane and posted when done. An interactive call answers for its frame
  from the task's published view, or, for a task not held here, from the frames it needs alone;
  the re-propagation goes to the interactive lane.
- interactive answers first: while one is being computed, every propagation in this process
  pauses between frames (:class:`PriorityGate`), and correction jobs have a lane of their own, so
  they never wait behind pre-annotation.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lazyxmem_core import __version__
from lazyxmem_core.engines import build_propagator, build_refiner, propagator_name
from lazyxmem_core.errors import LazyXMemError
from lazyxmem_core.lazy import LazySession
from lazyxmem_core.media import FrameSequence
from lazyxmem_core.protocols import Refiner
from lazyxmem_core.review import review_spans
from lazyxmem_core.session_view import SessionView, correction_mask
from lazyxmem_core.types import Correction, PackedMask

from . import convert, edits
from .convert import ObjectPrompt, TaskError
from .edits import Corrections, initial_regions, start_digest
from .bounded_media import BoundedMedia
from .checks import InputError, check_annotation, check_task, safe_message, shown
from .fetch import MediaFetcher
from .frames import FrameMap, task_frame_map
from .jobs import JobSpec, PriorityGate, Progress, QueueFull, make_queue
from .labelconfig import LabelConfig, parse_label_config
from .ls_io import LabelStudioIO, PostLedger, upstream_status
from .notices import IMPORT, ConnectedProjects, Notice, Notifier, NotYet, notices_from
from .settings import BackendSettings
from .task_store import DiskViewStore, TaskState, TaskStore, ViewStore, anchor_corrections, video_key

log = logging.getLogger(__name__)
MAX_OBJECTS = 255  # index masks are 8-bit
MAX_INTERACTIVE_ANSWERS = 8  # refiner calls one interactive request may make
ANSWERED_S = 120.0  # how long a /predict answer keeps a job from posting the same prediction
# A project's prediction version (see ``check_version_soon``): looked at this long after the event
# (one look at a time), and once settled not again before VERSION_CHECK_S.
VERSION_DELAY_S, VERSION_CHECK_S = 1.5, 600.0


def is_cuda_oom(exc: BaseException) -> bool:
    # Without torch loaded there is no GPU to run out of; importing it here made the first bad
    # request of an embedded-engine server cost 3 s and 500 MB.
    torch = sys.modules.get("torch")
    return torch is not None and (isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc))


class Service:
    def __init__(self, settings: BackendSettings | None = None) -> None:
        settings = settings or BackendSettings.from_env()
        self.tasks = TaskStore(settings.max_sessions)
        # In-process jobs are journalled under CACHE_DIR/jobs; the web app re-queues them at start.
        self.jobs = make_queue(self.run_job, settings.redis_url, settings.job_retries, settings.job_timeout_s,
                               journal_dir=str(Path(settings.cache_dir) / "jobs"),
                               max_queued_per_project=settings.max_queued_per_project)
        self.redis = getattr(self.jobs, "redis", None)
        self.views = ViewStore(self.redis) if self.redis is not None else DiskViewStore(Path(settings.cache_dir) / "views")
        self.ledger = PostLedger(self.redis)
        self.settings = settings
        self._refiner: Refiner | None = None
        self._refiner_lock = threading.Lock()
        self._sync_slot = threading.Semaphore(1)
        self._sync_task: int | None = None  # the task the sync slot is propagating
        self._sync_lock = threading.Lock()
        # task id -> (start digest, monotonic time) of the last prediction answered in a /predict:
        # Label Studio stores it, so a job that made the same one within ANSWERED_S posts nothing.
        self._answered: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self.gate = PriorityGate()
        # Projects that called /setup (webhooks are acted on for these only) and their configs.
        self.projects = ConnectedProjects(Path(settings.cache_dir) / "projects.json", self.redis)
        # project -> (settled at, look pending, look again once it is done)
        self._version_checks: dict[int, tuple[float | None, bool, bool]] = {}
        self._version_lock = threading.Lock()
        self._project_configs: dict[int, tuple[float, str]] = {}  # read back from Label Studio
        self.notifier = Notifier(self.on_notice, settings.max_pending_notices)
        self.seconds_per_object_frame = 0.25  # running estimate, refined after each propagation

    @property
    def settings(self) -> BackendSettings:
        return self._settings

    @settings.setter
    def settings(self, s: BackendSettings) -> None:
        self._settings = s
        self.fetcher = MediaFetcher(s.ls_url, s.api_key, s.cache_dir, set(s.allowed_hosts), int(s.max_media_mb * 2**20),
                                    deadline_s=s.media_timeout_s, cache_bytes=int(s.media_cache_mb * 2**20))
        self.media = BoundedMedia(self.fetcher, s.max_frames, s.frame_store_mb, max_pixels=s.max_pixels)
        self.ls = LabelStudioIO(s.ls_url, s.api_key, self.ledger)
        self.tasks.max_sessions = s.max_sessions

    @property
    def model_version(self) -> str:
        return f"lazyxmem-{__version__}-{propagator_name(self.settings.engine)}"

    def refiner(self) -> Refiner:
        """The process's one refiner, shared by every task (its caches are keyed by video)."""
        with self._refiner_lock:
            if self._refiner is None:
                r = build_refiner(self.settings.engine)
                if r is None:
                    raise LazyXMemError("a refiner is needed to turn boxes and clicks into masks; set LAZYXMEM_REFINER")
                self._refiner = r
            return self._refiner

    # -- sessions --------------------------------------------------------------------------------
    @staticmethod
    def check_objects(task_id: int, cfg: LabelConfig, regions: list[dict]) -> None:
        """Refuse a task with more objects than an index mask holds, from its regions alone:
        before its media is fetched or a job is queued (a job that fails later says it to nobody)."""
        n = edits.object_count(cfg, regions)
        if n > MAX_OBJECTS:
            raise TaskError(f"task {task_id} has {n} objects; at most {MAX_OBJECTS} fit an index mask "
                            "(split the task or merge objects)")

    def initial_masks(self, frames: FrameSequence, prompts: list[ObjectPrompt], task_id: int,
                      key: str) -> tuple[dict[int, np.ndarray], list[tuple[int, str]]]:
        """The annotation's regions as index masks per frame, and the objects (value, label text)."""
        if len(prompts) > MAX_OBJECTS:
            raise TaskError(f"task {task_id} has {len(prompts)} objects; at most {MAX_OBJECTS} fit an index mask")
        h, w = frames[0].shape[:2]
        given: dict[int, np.ndarray] = {}
        objects = []
        for value, p in enumerate(prompts, start=1):
            corr = Correction(clicks=tuple(p.clicks), box=p.box, mask=p.mask)
            mask = correction_mask(self.refiner(), frames, p.frame, corr, None, None, key)
            if not mask.any():
                raise TaskError(f"task {task_id}: region {p.key} gives an empty mask on frame {p.frame + 1}")
            given.setdefault(p.frame, np.zeros((h, w), np.uint8))[mask] = value
            objects.append((value, p.label))
        return given, objects

    def new_session(self, frames: FrameSequence, given: dict[int, np.ndarray], key: str) -> LazySession:
        propagator = build_propagator(self.settings.engine, video_length=len(frames) - min(given))
        return LazySession(propagator, frames, given, refiner=self.refiner(), config=self.settings.lazy_config,
                           video_key=key)

    def build(self, task: dict, cfg: LabelConfig) -> TaskState | None:
        """A task's state from Label Studio's data (not propagated yet); None without regions."""
        task_id = int(task.get("id") or 0)
        frames, fps = self.media.open(task, cfg)
        h, w = frames[0].shape[:2]
        fmap = self.task_map(task, cfg, fps, len(frames))
        prompts = edits.initial_prompts(initial_regions(task), cfg, (w, h), len(frames), fmap)
        if not prompts:
            return None
        key = video_key(task)
        given, objects = self.initial_masks(frames, prompts, task_id, key)
        session = self.new_session(frames, given, key)
        return TaskState(task_id, cfg, frames, objects, session, fps, task=task, view=session.view(), frame_map=fmap)

    @staticmethod
    def task_map(task: dict, cfg: LabelConfig, fps: float, n: int) -> FrameMap | None:
        """How Label Studio numbers a video task's frames (its config's frameRate, the task's data)
        against the decoded ones; a mismatch is logged with the task id."""
        if cfg.mode != "video":
            return None
        return task_frame_map(cfg.frame_rate_attr, task.get("data"), fps, n, task.get("id"))

    def _stepper(self, state: TaskState, progress: Progress | None) -> Callable[[int], None]:
        """The per-frame callback of a propagation: progress, the view published once a second
        (a view costs a pass over the frame records: per second, not per frame, on a long video),
        and a pause while an interactive answer is computed (answers first)."""
        published = [time.monotonic()]

        def step(n: int) -> None:
            if progress is not None:
                progress(n)
            if time.monotonic() - published[0] >= 1.0:
                state.publish()
                published[0] = time.monotonic()
            self.gate.yield_to_interactive()

        return step

    def propagate(self, state: TaskState, progress: Progress | None = None, wait: bool = True) -> bool:
        """Run the session to the end of the video (nothing to do when it is there). Without
        ``wait`` (a web thread), nothing happens when another writer holds the task: False."""
        t0 = time.perf_counter()
        if not state.write_lock.acquire(blocking=wait):
            return False
        try:
            done = state.session.remaining
            if not done:
                return True
            state.session.run(progress=self._stepper(state, progress))
            state.publish()
        finally:
            state.write_lock.release()
        if done > 10:
            per = (time.perf_counter() - t0) / (done * max(1, len(state.objects)))
            self.seconds_per_object_frame = 0.5 * self.seconds_per_object_frame + 0.5 * per
        log.info("task %s: %d frames in %.1f s, %d review frames", state.task_id, done,
                 time.perf_counter() - t0, len(state.view.review))
        return True

    def state_for(self, task: dict, cfg: LabelConfig, progress: Progress | None = None) -> TaskState:
        """The task's state, propagated to the end: the one held here, or rebuilt from the task
        (after a restart, an eviction, or in a worker that has not seen the task)."""
        task_id = int(task.get("id") or 0)
        state = self.tasks.held_or_build(task_id, lambda: self.build(task, cfg))
        if state is None:
            raise TaskError(f"task {task_id} has no region to start from: draw the objects first")
        if progress is not None and hasattr(progress, "total") and state.session.remaining:
            progress.total = state.session.remaining  # known only now in a worker
        try:
            self.propagate(state, progress)
        except Exception:
            self.tasks.drop(task_id, state)  # a half-propagated session must not be served later
            raise
        return state

    def adopt_stored(self, state: TaskState) -> None:
        """With workers: the view the latest job stored, when newer than this process's own."""
        if self.views is None:
            return
        got = self.views.get(state.task, self.model_version, state.stamp)
        if got is not None and (got[1].n_frames, *got[1].shape) == (len(state.frames), *state.frames[0].shape[:2]):
            state.adopt(got[1], got[0], got[2])

    # -- predictions -----------------------------------------------------------------------------
    def prediction(self, state: TaskState) -> dict:
        """The task's prediction from its current view. The model version is the backend's own,
        the same for every revision: Label Studio's Data Manager scores, and its labeling stream
        shows, only predictions of the project's model version (pointed at ours: see
        ``check_version_soon``), and one of ours stays current (the older ones are retired when it
        is posted), so the revision is a field of its own."""
        with state.meta_lock:
            view, revision = state.view, state.revision
        masks = view.frame_masks()
        spans = review_spans(view, per_object=self.settings.review_spans)
        review = [t + 1 for t in view.review]
        if state.cfg.mode == "video":
            fmap = state.frame_map
            result = convert.video_results(state.cfg, masks, state.objects, spans, view.pseudo, state.fps,
                                           frames=fmap, drawn=self.drawn_boxes(state, view.shape, view.n_frames))
            if fmap is not None:  # in Label Studio's numbering, as the timeline shows them
                review = [k + 1 for k in fmap.ls_frames_of(list(view.review))]
        else:
            result = convert.image_results(state.cfg, masks, state.objects, view.review, view.pseudo, spans)
        return {"result": result, "score": view.score, "model_version": self.model_version,
                "revision": revision, "review_frames": review}

    def drawn_boxes(self, state: TaskState, shape: tuple[int, int], n: int,
                    sent: bool = False) -> dict[tuple[int, int], tuple[float, ...]]:
        """(frame, object) -> the box the user drew there, in percent: each object's starting box
        and every applied box correction (``sent``: every one sent to a job, applied or not). A
        track shows these as drawn (a mask's bounding box is not the box a user drew, and a
        corrected box that came back otherwise read as ignored)."""
        h, w = shape
        drawn = convert.drawn_boxes(edits.initial_prompts(initial_regions(state.task), state.cfg, (w, h), n,
                                                          state.frame_map))
        for (t, value), corr in (state.corrections if sent else state.applied).items():
            if corr.box is not None and corr.mask is None and not corr.clicks:
                drawn[(t, value)] = convert.pct(corr.box, shape)
        return drawn

    def predict(self, tasks: list[dict], label_config: str, context: dict | None) -> tuple[list, dict[int, str]]:
        """Label Studio's /predict: one entry per task, and the jobs queued for tasks answered later.

        A task answered later, or with nothing to start from, gets ``[]``: Label Studio 1.23.2
        takes a list as "the task's predictions" and stores none for an empty one (a dict it
        stores, even with an empty result), so no empty prediction blocks the one the job posts.
        """
        cfg = parse_label_config(label_config)
        if context and context.get("result") is not None:
            return [self.interactive(tasks[0], cfg, context["result"])], {}
        out: list = []
        jobs: dict[int, str] = {}
        deadline = time.monotonic() + self.settings.sync_budget_s
        for i, task in enumerate(tasks):
            task_id = int(task.get("id") or 0)
            unread = i > 0 and time.monotonic() >= deadline
            try:
                entry = self.guard_oom(task_id, lambda: self._predict_one(task, cfg, deadline, unread))
            except LazyXMemError as exc:
                if len(tasks) == 1:  # the caller sees the error itself (4xx with the message)
                    raise
                # in a batch, one bad task must not cost the others their predictions
                message = safe_message(str(exc))  # the reply and the log line quote no long value
                log.warning("task %s: no prediction: %s", task_id, message)
                entry = {"result": [], "score": 0.0, "model_version": self.model_version, "error": message}
            if isinstance(entry, str):
                jobs[task_id], entry = entry, []
            out.append(entry)
        return out, jobs

    def _predict_one(self, task: dict, cfg: LabelConfig, deadline: float, unread: bool = False) -> dict | list | str:
        """A prediction, ``[]`` (nothing to predict from) or the id of the job that will post it."""
        task_id = int(task.get("id") or 0)
        self.media.value(task, cfg)  # a task without the config's media is an error, regions or not
        # Asked again (a reopened task): the latest prediction, corrections included, rather than
        # a session rebuilt from the task, which would also drop the corrections made so far.
        if self.views is not None:
            stored = self.views.prediction(task, self.model_version)
            if stored is not None:
                return stored
        digest = start_digest(task)
        held = self.tasks.held(task_id)
        if held is not None and held.digest == digest and held.view.done:
            return self.prediction(held)
        regions = initial_regions(task)
        if not regions:
            log.info("task %s: no region to start from yet; nothing to predict", task_id)
            return []
        self.check_objects(task_id, cfg, regions)
        if unread:
            # The request's budget went on earlier tasks of the batch: even reading this one's
            # header (a download) is left to the job.
            job_id = self.submit("propagate", task, cfg.xml, 0)
            log.info("task %s: past this request's SYNC_BUDGET_S; queued unread (job %s)", task_id, job_id)
            return job_id
        n = self.media.declared_frames(task, cfg) if cfg.mode == "video" else len(
            (task.get("data") or {}).get(cfg.value_key) or [])
        fits = n is not None and n * max(1, len(regions)) * self.seconds_per_object_frame <= deadline - time.monotonic()
        with self._sync_lock:  # the twin check and taking the slot are one step: no request slips between
            if self._sync_task == task_id:
                # Label Studio asks twice for one task (on Submit): the request propagating it answers.
                log.info("task %s: another request is propagating it; that answer brings the prediction", task_id)
                return []
            took = fits and self._sync_slot.acquire(blocking=False)
            if took:
                self._sync_task = task_id
        if not took:
            # Too long for this request, or another request is propagating: the batch lane does
            # it, so the web threads stay free for interactive answers.
            job_id = self.submit("propagate", task, cfg.xml, n or 0)
            log.info("task %s: about %s frames run in the background (job %s)", task_id, n, job_id)
            return job_id
        try:
            state = self.tasks.held_or_build(task_id, lambda: self.build(task, cfg), accept=lambda s: s.digest == digest)
            if state is None:
                return []
            try:
                if not self.propagate(state, wait=False):  # a job is propagating it: it posts
                    log.info("task %s: a job is updating its session; its prediction is posted when done", task_id)
                    return []
            except Exception:
                self.tasks.drop(task_id, state)
                raise
            pred = self.prediction(state)
            # Stored like a job's (a restart, /tasks/<id>/masks and `ls export` find it); stamp 0: a job's are newer.
            self.views.put(task, self.model_version, 0.0, state.view, state.revision, pred, only_if_absent=True)
            if state.revision == 0:
                self._answered[task_id] = (digest, time.monotonic())
                self._answered.move_to_end(task_id)
                while len(self._answered) > 10000:
                    self._answered.popitem(last=False)
            return pred
        finally:
            self._sync_task = None
            self._sync_slot.release()

    # -- interactive answers and corrections -----------------------------------------------------
    def interactive(self, task: dict, cfg: LabelConfig, results: list[dict]) -> dict:
        """Clicks or a box on one frame: the refined region now, the re-propagation queued."""
        empty = {"result": [], "model_version": self.model_version}
        if not results:
            return empty
        task_id = int(task.get("id") or 0)
        with self.gate.interactive():
            state = self.tasks.held(task_id)
            if state is None and self.redis is not None and self.views.has(task, self.model_version):
                # Workers made this task's masks: hold its frames here (no propagation) and answer
                # from their view, which the held state keeps adopting as they store newer ones.
                # (In-process, a task not held, after a restart, takes the cold path: decoding
                # a long video whole inside the request is what that path avoids.)
                state = self.tasks.held_or_build(task_id, lambda: self.build(task, cfg))
            if state is None:
                return self._interactive_cold(task, cfg, results) or empty
            self.adopt_stored(state)
            view = state.view
            fmap = state.frame_map
            corrections = edits.interactive_corrections(cfg, state.objects, view.frame_masks(), results,
                                                        self.drawn_boxes(state, view.shape, view.n_frames, sent=True),
                                                        fmap)
            if not corrections:
                return empty
            answers = self._answers(task_id, view, state.frames, corrections)
            self.schedule_correction(state, corrections)
        return {"result": convert.as_drawn(convert.interactive_results(cfg, answers, state.objects, view.n_frames, state.fps,
                                                               fmap), corrections, view.shape, fmap),
                "model_version": self.model_version}

    def _interactive_cold(self, task: dict, cfg: LabelConfig, results: list[dict]) -> dict | None:
        """An interactive call on a task not held here: read only the frames the answer needs,
        propagate a short window when the frame is near the objects' start, and queue the rest."""
        task_id = int(task.get("id") or 0)
        regions = initial_regions(task)
        self.check_objects(task_id, cfg, regions)
        fmap = None
        if cfg.mode == "video":  # Label Studio's frame numbers, mapped from the container's header
            n_declared, rate = self.media.declared_rate(task, cfg)
            fmap = self.task_map(task, cfg, rate, n_declared) if n_declared else None
        clicked = edits.frames_named(cfg, results, frames=fmap)
        starts = edits.frames_named(cfg, regions, first_only=True, frames=fmap)
        if not starts:
            raise TaskError(f"task {task_id} has no region to start from: draw the objects first")
        if not clicked:
            return None
        start, last = min(starts), max(clicked)
        window = 0 <= last - start <= self.settings.interactive_window
        wanted = sorted((set(range(start, last + 1)) if window else set(clicked)) | set(starts))
        frames, fps = self.media.some(task, cfg, wanted)
        h, w = frames[start].shape[:2]
        key = video_key(task)
        fmap = self.task_map(task, cfg, fps, len(frames))
        prompts = edits.initial_prompts(regions, cfg, (w, h), len(frames), fmap)
        given, objects = self.initial_masks(frames, prompts, task_id, key)
        if window:
            session = self.new_session(frames, given, key)
            session.run(until=last + 1)
            view = session.view()
        else:  # what is known without propagating: the annotation's masks
            view = SessionView(
                key, len(frames), (h, w), tuple(v for v, _ in objects),
                tuple(PackedMask.pack(given[t]) if t in given else None for t in range(len(frames))), {},
                {v: tuple((f, PackedMask.pack(m == v)) for f, m in sorted(given.items()) if (m == v).any())
                 for v, _ in objects}, (), (), 0.0)
        corrections = edits.interactive_corrections(cfg, objects, view.frame_masks(), results, frames=fmap)
        if not corrections:
            return None
        answers = self._answers(task_id, view, frames, corrections)
        # The job rebuilds the session from the task: it carries the corrections the stored masks
        # hold (made before a restart, or by workers) with this one, and the next round's number.
        stored = self.views.get(task, self.model_version)
        earlier = anchor_corrections(stored[1]) if stored is not None else {}
        job_id = self.submit("correct", task, cfg.xml, len(frames) - min(t for t, _ in corrections),
                             corrections={**earlier, **corrections},
                             revision=(stored[2] + 1) if stored is not None else 0)
        log.info("task %s: not held here; answered frame(s) %s from %d frame(s) read, the rest queued (job %s)",
                 task_id, sorted({t + 1 for t, _ in corrections}), len(wanted), job_id)
        return {"result": convert.as_drawn(convert.interactive_results(cfg, answers, objects, len(frames), fps, fmap),
                                   corrections, (h, w), fmap),
                "model_version": self.model_version}

    def _answers(self, task_id: int, view: SessionView, frames: FrameSequence,
                 corrections: Corrections) -> dict[tuple[int, int], np.ndarray]:
        """The mask each correction gives now: refined against the frame's forward mask where
        the view has it (what the re-propagation will refine against too), else the frame alone
        with the object's last given mask as the reference."""
        if len(corrections) > MAX_INTERACTIVE_ANSWERS:
            # Each answer is a refiner call inside the request (a forged context with 1000
            # keyframes was 1000 GrabCuts, 21 s); the editor sends one region at a time.
            raise TaskError(f"task {task_id}: an interactive call names {len(corrections)} frame/object pairs; at most "
                            f"{MAX_INTERACTIVE_ANSWERS} are answered at once: submit the annotation instead "
                            "(its frames are re-propagated in the background)")
        refiner = self.refiner()
        answers = {}
        for (t, value), corr in corrections.items():
            try:
                if view.reached(t):
                    answers[(t, value)] = view.preview(frames, refiner, t, value, corr)
                else:
                    answers[(t, value)] = correction_mask(refiner, frames, t, corr, None,
                                                          view.reference(t, value), view.video_key)
            except ValueError as exc:
                raise TaskError(f"task {task_id}: {exc}") from None
        return answers

    def schedule_correction(self, state: TaskState, corrections: Corrections) -> str:
        """Re-propagate after corrections in the background and post the new prediction. The job
        carries every correction made so far (what the user gave, not masks refined here): it may
        run on a session rebuilt from the task (another worker, an eviction)."""
        first = min(t for t, _ in corrections)
        with state.meta_lock:  # submitted inside: rounds reach the queue in their order
            state.corrections.update(corrections)
            state.rounds = max(state.rounds, self.views.revision(state.task, self.model_version)) + 1
            job_id = self.submit("correct", state.task, state.cfg.xml, len(state.frames) - first,
                                 corrections=dict(state.corrections), revision=state.rounds)
        log.info("task %s: correction on frame(s) %s, re-propagating from %d (job %s)", state.task_id,
                 sorted({t + 1 for t, _ in corrections}), first + 1, job_id)
        return job_id

    def apply_corrections(self, state: TaskState, corrections: Corrections, progress: Progress | None = None,
                          revision: int = 0) -> None:
        """Apply the corrections this session has not applied yet (a job carries all of them, so
        a session rebuilt elsewhere gets every one, and a session that has them redoes nothing)."""
        with state.meta_lock:
            for k, c in corrections.items():
                state.corrections.setdefault(k, c)
        with state.write_lock:
            new = {k: c for k, c in corrections.items() if not edits.same_correction(state.applied.get(k), c)}
            if not new:
                return
            try:
                state.session.correct(new, progress=self._stepper(state, progress))
            except ValueError as exc:
                raise TaskError(f"task {state.task_id}: {exc}") from None
            state.applied.update(new)
            state.publish(revision=revision or max(state.revision, self.views.revision(state.task, self.model_version)) + 1)

    # -- webhooks: notices read back from Label Studio --------------------------------------------
    def webhook(self, body: dict) -> tuple[dict, int]:
        """A webhook, read for its ids only (see ``backend.notices``): the reply and its status."""
        notices = notices_from(body, self.settings.max_webhook_tasks)
        action = body.get("action")
        if notices is None:
            return {"status": "ignored", "action": None if action is None else shown(action)}, 200
        project = notices[0].project if notices else None
        if project is None or project not in self.projects:
            log.warning("webhook %s for project %s ignored: that project has not connected this backend "
                        "(Label Studio calls /setup when it does)", shown(action), project)
            return {"status": "ignored", "reason": f"project {project} is not connected to this backend"}, 200
        if notices[0].kind == IMPORT and not self.settings.preannotate_on_import:
            return {"status": "ignored", "reason": "PREANNOTATE_ON_IMPORT is off"}, 200
        new = self.notifier.submit(notices)
        return {"status": "accepted", "notices": new}, 202

    def check_version_soon(self, project: int | None) -> None:
        """See that Label Studio shows and scores this backend's predictions in ``project``
        (``LabelStudioIO.show_our_version``), a moment from now in a timer thread: after /setup
        (Label Studio names the project's version right after it returns), after a /predict answer
        and after a post (Label Studio accepts a version only once a prediction carries it). One
        look at a time per project; an event during a look gets a look of its own after it unless
        that one settled it (a post while the look a /predict set off is waiting, and that look
        finds no prediction of ours yet); once settled, the next after ``VERSION_CHECK_S``."""
        if not isinstance(project, int) or not self.ls.configured:
            return
        with self._version_lock:
            settled, pending, _ = self._version_checks.get(project, (None, False, False))
            if settled is not None and time.monotonic() - settled < VERSION_CHECK_S:
                return
            self._version_checks[project] = (settled, True, pending)
            if pending:
                return

        def check() -> None:
            settled = None
            try:
                if self.ls.show_our_version(project, self.model_version) != "unset":  # unset: not named yet
                    settled = time.monotonic()
            except Exception as exc:  # no prediction of ours there yet (400), or Label Studio away
                log.info("project %s: prediction version not set yet (Label Studio answers %s)", project,
                         upstream_status(exc) or type(exc).__name__)
            finally:
                with self._version_lock:
                    again = self._version_checks[project][2]
                    self._version_checks[project] = (settled, False, False)
            if again and settled is None:
                self.check_version_soon(project)

        timer = threading.Timer(VERSION_DELAY_S, check)
        timer.daemon = True
        timer.start()

    def on_notice(self, notice: Notice) -> None:
        """A notice, looked up in Label Studio (in the notifier's thread): what Label Studio holds
        decides what is done, never what the webhook said."""
        try:
            task = self.ls.task(notice.task)
            annotation = self.ls.annotation(notice.annotation) if notice.annotation is not None else None
        except Exception as exc:
            status = upstream_status(exc)
            if status == 404 and notice.kind == IMPORT:
                raise NotYet() from None  # an upload's webhook can come before the task is readable
            log.warning("task %s: %s webhook dropped: Label Studio answers %s for it", notice.task, notice.kind,
                        status if status is not None else type(exc).__name__)
            return
        try:  # Label Studio's data is checked like a request's: any user of it may have written it
            check_task(task, f"task {notice.task}", self.settings.max_pixels)
            if annotation is not None:
                check_annotation(annotation, f"annotation {notice.annotation}", self.settings.max_pixels)
        except InputError as exc:
            log.warning("task %s: %s webhook dropped: %s", notice.task, notice.kind, safe_message(str(exc)))
            return
        project = task.get("project") if isinstance(task.get("project"), int) else 0
        if project != notice.project or project not in self.projects:
            log.warning("task %s: webhook named project %s, but the task is in project %s%s; dropped", notice.task,
                        notice.project, project, "" if project in self.projects else " (not connected)")
            return
        try:
            self._act_on(notice, task, annotation, project)
        except LazyXMemError as exc:  # a task or config this backend cannot serve: said, no traceback
            log.warning("task %s: %s webhook: %s", notice.task, notice.kind, safe_message(str(exc)))

    def _act_on(self, notice: Notice, task: dict, annotation: dict | None, project: int) -> None:
        """What a checked notice asks for: an imported task pre-annotated, an annotation taken in."""
        cfg = parse_label_config(self.project_config(project))
        if annotation is None:
            outcome, what = self.preannotate_one(task, cfg.xml)
            log.info("task %s: imported; %s", notice.task, {"queued": f"pre-annotation queued (job {what})",
                     "skipped": "no region to pre-annotate from", "refused": "refused"}[outcome])
            return
        if int(annotation.get("task") or 0) != notice.task:
            log.warning("task %s: annotation %s belongs to task %s; webhook dropped", notice.task, notice.annotation,
                        annotation.get("task"))
            return
        self.on_annotation(task, annotation, cfg, self.parent_prediction(annotation))

    def parent_prediction(self, annotation: dict) -> dict | None:
        """The prediction of ours the annotation was made from (Label Studio records it), if any."""
        parent = annotation.get("parent_prediction")
        if not isinstance(parent, int) or isinstance(parent, bool):
            return None
        try:
            pred = self.ls.prediction(parent)
        except Exception as exc:  # deleted since: the annotation is compared with the masks alone
            log.info("annotation %s: its prediction %s is not readable (%s)", annotation.get("id"), parent,
                     upstream_status(exc) or type(exc).__name__)
            return None
        return pred if str(pred.get("model_version") or "").startswith("lazyxmem-") else None

    def project_config(self, project: int) -> str:
        """The project's label config as Label Studio has it now (read at most once a minute)."""
        now = time.monotonic()
        cached = self._project_configs.get(project)
        if cached is None or now - cached[0] > 60:
            cached = self._project_configs[project] = (now, self.ls.label_config(project))
        return cached[1]

    def on_annotation(self, task: dict, annotation: dict, cfg: LabelConfig, parent: dict | None = None) -> dict:
        """An annotation created or updated (as Label Studio holds it): what the annotator changed
        becomes corrections; an annotation that brings the task's first regions starts it, one that
        moves where an object starts starts it again (both posted whatever the edit tolerance says).
        ``parent``: the prediction the annotation was made from; what is as it was there (and the
        objects' starting keyframes) is not the annotator's edit."""
        task_id = int(task["id"])
        others = [a for a in task.get("annotations") or [] if a.get("id") != annotation.get("id")]
        result = annotation.get("result") or []
        # With Redis the job carries the annotation itself: whichever worker takes it rebuilds the
        # prediction and compares, so every edit so far counts, wherever earlier jobs ran.
        state = None if self.settings.redis_url else self.tasks.held(task_id)
        start = initial_regions(state.task if state is not None else {**task, "annotations": others})
        if not start or (state is not None and edits.moved_start(start, result)):
            # The task's first regions, or a starting box moved: the task starts (again) from this
            # annotation's starts, in a job that posts what it builds.
            fresh = {**task, "annotations": [{**annotation, "result": edits.start_regions(result)}], "drafts": []}
            regions = initial_regions(fresh)
            if not regions:
                log.info("task %s: annotation %s has no region; nothing to do", task_id, annotation.get("id"))
                return {"status": "no region"}
            self.check_objects(task_id, cfg, regions)
            if state is not None:
                log.info("task %s: annotation %s moves where an object starts; the task starts again", task_id,
                         annotation.get("id"))
                self.tasks.drop(task_id, state)
            job = self.submit("annotation", fresh, cfg.xml, 0, annotation={**annotation, "result": regions})
            return {"status": "starting", "job": job}
        edited = {**annotation, "result": edits.edited_since(
            edits.start_regions(start) + ((parent or {}).get("result") or []), result)}
        if state is None:
            # A restart or an evicted session: rebuilding means propagating the whole video, which
            # does not belong here.
            self.check_objects(task_id, cfg, start)
            job = self.submit("annotation", {**task, "annotations": others}, cfg.xml, 0, annotation=edited)
            return {"status": "rebuilding", "job": job}
        corrections = edits.annotation_corrections(cfg, state.objects, state.masks(), edited,
                                                   self.drawn_boxes(state, state.view.shape, state.view.n_frames, sent=True),
                                                   state.frame_map)
        if not corrections:
            log.info("task %s: annotation %s changes no frame; nothing to re-propagate", task_id, annotation.get("id"))
            return {"status": "no change"}
        job = self.schedule_correction(state, corrections)
        return {"status": "re-propagating", "job": job, "frames": sorted({t + 1 for t, _ in corrections})}

    # -- pre-annotation --------------------------------------------------------------------------
    def preannotate(self, tasks: list[dict], label_config: str) -> dict:
        """Queue a propagation job for each task that carries initial regions; skip the others.
        A task listed without annotations is read from Label Studio first."""
        parse_label_config(label_config)  # a config we cannot serve fails here, not in every job
        jobs, skipped, refused = {}, [], {}
        for task in tasks:
            if not initial_regions(task) and task.get("id") and self.ls.configured:
                try:
                    task = self.ls.task(int(task["id"]))
                except Exception as exc:
                    log.info("task %s: not readable from Label Studio (%s); skipped", task.get("id"),
                             upstream_status(exc) or type(exc).__name__)
                    skipped.append(task.get("id"))
                    continue
            outcome, what = self.preannotate_one(task, label_config)
            if outcome == "queued":
                jobs[task["id"]] = what
            elif outcome == "refused":
                refused[task.get("id")] = what
            else:
                skipped.append(task.get("id"))
        log.info("pre-annotation: %d task(s) queued, %d without regions skipped", len(jobs), len(skipped))
        return {"status": "queued", "jobs": jobs, "skipped": skipped, **({"refused": refused} if refused else {})}

    def preannotate_one(self, task: dict, label_config: str) -> tuple[str, str | None]:
        """("queued", job id), ("skipped", None) for a task without regions, or ("refused", why)."""
        regions = initial_regions(task)
        if not regions:
            return "skipped", None
        try:
            self.check_objects(int(task.get("id") or 0), parse_label_config(label_config), regions)
        except TaskError as exc:  # said in the reply and the log, not dropped in silence
            log.warning("%s", exc)
            return "refused", str(exc)
        data = task.get("data") or {}
        frames = next((len(v) for v in data.values() if isinstance(v, list)), 0)
        try:
            return "queued", self.submit("propagate", task, label_config, frames)
        except QueueFull as exc:  # the project's share of the queue is full: said, not dropped
            log.warning("task %s: %s", task.get("id"), exc)
            return "refused", str(exc)

    # -- jobs ------------------------------------------------------------------------------------
    def submit(self, kind: str, task: dict, label_config: str, total: int, **extra: Any) -> str:
        return self.jobs.submit(JobSpec(kind, task, label_config, self.model_version, **extra), total)

    def run_job(self, spec: JobSpec, progress: Progress | None = None) -> dict:
        """Do one job: in a thread of this process, or in a ``lazyxmem worker`` (any of them).

        The session is the one held here when there is one, else it is rebuilt from the task as
        Label Studio sent it, so a job does not depend on which process took it.
        """
        cfg = parse_label_config(spec.label_config)

        def work() -> dict:
            state = self.state_for(spec.task, cfg, progress)
            if spec.kind == "correct":
                self.apply_corrections(state, spec.corrections, progress, spec.revision)
            elif spec.kind == "annotation":
                # An annotation that is the task's start made the session: posted as it is.
                if initial_regions(spec.task) != (spec.annotation or {}).get("result"):
                    corrections = edits.annotation_corrections(cfg, state.objects, state.masks(), spec.annotation or {},
                                                               self.drawn_boxes(state, state.view.shape, state.view.n_frames),
                                                               state.frame_map)
                    if not corrections:
                        log.info("task %s: the annotation changes no frame; nothing to re-propagate", spec.task_id)
                        return {"posted": False, "frames": []}
                    self.apply_corrections(state, corrections, progress)
            pred = self.prediction(state)
            if self.views is not None:
                self.views.put(spec.task, self.model_version, spec.submitted, state.view, state.revision, pred,
                               only_if_absent=spec.kind == "propagate")
            answered = self._answered.get(state.task_id)
            # A request propagating this task right now answers with this prediction (it marks
            # it answered before it lets go of the task), or one answered it a moment ago.
            if state.revision == 0 and (self._sync_task == state.task_id or (
                    answered is not None and answered[0] == state.digest and time.monotonic() - answered[1] < ANSWERED_S)):
                # Label Studio is storing this very prediction from a /predict answer (it may not
                # show yet, so `unless_present` cannot see it): a second copy would be a second tab.
                log.info("task %s: job %s made the prediction a /predict answered; not posted again", state.task_id,
                         spec.key)
                return {"posted": False, "review_frames": pred["review_frames"]}
            posted = self.ls.post_prediction(state.task_id, pred, job_id=spec.key,
                                             unless_present=spec.kind == "propagate")
            if posted:
                self.check_version_soon(spec.task.get("project"))
            return {"posted": posted, "review_frames": pred["review_frames"]}

        return self.guard_oom(spec.task_id, work)

    def guard_oom(self, task_id: int, work: Callable[[], Any]) -> Any:
        """Run ``work``; on CUDA out-of-memory give a clear error, or redo it on the CPU when allowed."""
        try:
            return work()
        except Exception as exc:
            if not is_cuda_oom(exc):
                raise
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            device = self.settings.engine.device
            if not self.settings.cpu_fallback:
                log.error("task %s: CUDA out of memory on %s", task_id, device)
                raise LazyXMemError(
                    f"task {task_id}: the GPU ran out of memory (DEVICE={device}). Run fewer workers per GPU, "
                    "split the video, or set CPU_FALLBACK=true to finish such jobs on the CPU") from exc
            log.warning("task %s: CUDA out of memory on %s; falling back to the CPU (CPU_FALLBACK)", task_id, device)
            self.use_device("cpu")
            return work()

    def use_device(self, device: str) -> None:
        """Switch the engines to ``device``; sessions built on the old one are dropped and rebuilt."""
        self.settings = replace(self.settings, engine=replace(self.settings.engine, device=device))
        with self._refiner_lock:
            self._refiner = None
        self.tasks.clear()
