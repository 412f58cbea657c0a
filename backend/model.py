"""The one model class: Label Studio tasks in, predictions out; sessions kept per task.

Everything here translates (Label Studio JSON <-> core types, via ``convert``) and schedules;
the Lazy logic is ``lazyxmem_core.LazySession``.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lazyxmem_core import __version__
from lazyxmem_core.engines import EngineSettings, build_propagator, build_refiner, lazy_config, propagator_name
from lazyxmem_core.errors import LazyXMemError
from lazyxmem_core.lazy import LazyConfig, LazySession
from lazyxmem_core.media import FrameSequence, ImageFiles, VideoFrames, video_frame_count
from lazyxmem_core.protocols import Refiner
from lazyxmem_core.refine_common import prior_inside
from lazyxmem_core.types import Click, Correction, Decision, FrameRecord, PackedMask

from . import convert
from .convert import ObjectPrompt, TaskError
from .fetch import MediaFetcher
from .jobs import FrameMasks, JobSpec, MaskStore, PostLedger, Progress, initial_regions, make_queue, start_digest
from .labelconfig import LabelConfig, parse_label_config

log = logging.getLogger(__name__)


def _env_float(name: str, default: float) -> float:
    """A number from the environment; unset or empty (compose's ``${X:-}``) means the default."""
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        raise LazyXMemError(f"{name}={os.environ[name]!r} is not a number") from None


def _env_bool(name: str, default: bool) -> bool:
    value = (os.environ.get(name) or "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise LazyXMemError(f"{name}={os.environ[name]!r} is not a boolean: use true or false")


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)


def is_cuda_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def _same(a: Correction | None, b: Correction) -> bool:
    if a is None or (a.mask is None) != (b.mask is None) or a.clicks != b.clicks or a.box != b.box:
        return False
    return a.mask is None or np.array_equal(np.asarray(a.mask, bool), np.asarray(b.mask, bool))


@dataclass(frozen=True)
class BackendSettings:
    ls_url: str | None = None
    api_key: str | None = None
    cache_dir: str = os.path.join(tempfile.gettempdir(), "lazyxmem-cache")
    allowed_hosts: frozenset[str] = frozenset()
    max_media_mb: float = 2048
    max_frames: int = 20000
    frame_store_mb: float = 8192  # a video whose raw frames are larger is kept JPEG-compressed on disk
    max_sessions: int = 8
    sync_budget_s: float = 60.0  # propagate inside /predict only when it should end within this
    redis_url: str | None = None  # jobs on RQ over Redis (``lazyxmem worker`` processes); None: in-process
    cpu_fallback: bool = False  # finish a job on the CPU when the GPU runs out of memory
    preannotate_on_import: bool = True  # TASKS_CREATED: queue the imported tasks that carry regions
    engine: EngineSettings = field(default_factory=EngineSettings)
    lazy: LazyConfig | None = None  # None: the engine's thresholds, object-loss detection on

    @classmethod
    def from_env(cls) -> BackendSettings:
        def opt(name: str) -> float | None:
            return _env_float(name, 0.0) if os.environ.get(name) else None

        engine = EngineSettings.from_env()
        return cls(
            ls_url=os.environ.get("LABEL_STUDIO_URL") or None,
            api_key=os.environ.get("LABEL_STUDIO_API_KEY") or None,
            cache_dir=os.environ.get("CACHE_DIR") or cls.cache_dir,
            allowed_hosts=frozenset(h for h in os.environ.get("ALLOWED_MEDIA_HOSTS", "").split(",") if h),
            max_media_mb=_env_float("MAX_MEDIA_MB", cls.max_media_mb),
            max_frames=int(_env_float("MAX_FRAMES", cls.max_frames)),
            frame_store_mb=_env_float("FRAME_STORE_MB", cls.frame_store_mb),
            max_sessions=int(_env_float("MAX_SESSIONS", cls.max_sessions)),
            sync_budget_s=_env_float("SYNC_BUDGET_S", cls.sync_budget_s),
            redis_url=os.environ.get("REDIS_URL") or None,
            cpu_fallback=_env_bool("CPU_FALLBACK", False),
            preannotate_on_import=_env_bool("PREANNOTATE_ON_IMPORT", True),
            engine=engine,
            lazy=lazy_config(engine, tau_u=opt("TAU_U"), tau_p=opt("TAU_P"), tau_m=opt("TAU_M"),
                             user_budget=_int_or_none(opt("REVIEW_BUDGET")),
                             detect_loss=_env_bool("DETECT_LOSS", True),
                             backward=_env_bool("BACKWARD_REVISION", True),
                             tau_s=opt("TAU_S"),
                             level_run=_int_or_none(opt("LEVEL_RUN")),
                             max_snapshots=_int_or_none(opt("MAX_SNAPSHOTS")),
                             sustained=_env_bool("SUSTAINED_TRIGGER", True)),
        )


@dataclass
class TaskState:
    """A task's video, its objects and its Lazy session (deferred mode: review frames, no callback)."""

    task_id: int
    cfg: LabelConfig
    frames: FrameSequence
    objects: list[tuple[int, str]]  # (core label value, label text)
    session: LazySession
    fps: float
    task: dict = field(default_factory=dict)  # as Label Studio sent it: what a job needs to rebuild this
    label_config: str = ""
    revision: int = 0
    corrections: dict[tuple[int, int], Correction] = field(default_factory=dict)  # sent to jobs so far
    applied: dict[tuple[int, int], Correction] = field(default_factory=dict)  # in this session
    rounds: int = 0  # correction rounds sent: the "-rN" of the predictions they give
    lock: threading.Lock = field(default_factory=threading.Lock)
    # With workers: (stamp, masks) of the latest job a worker finished (see jobs.MaskStore);
    # newer than this process's own session, which never sees the corrections.
    stored: tuple[float, Sequence[np.ndarray]] | None = None

    def masks(self) -> Sequence[np.ndarray]:
        if self.stored is not None:
            return self.stored[1]
        return SessionMasks(self.session.records, len(self.frames), self.frames[0].shape[:2])


class SessionMasks(FrameMasks):
    """A session's output masks, one unpacked per read; frames the session has not reached are empty."""

    def __init__(self, records: Mapping[int, FrameRecord], n: int, shape: tuple[int, int]) -> None:
        self.records, self.n, self.shape = records, n, shape
        self._empty: PackedMask | None = None  # packed once, shared by every frame not reached

    def packed(self, t: int) -> PackedMask:
        rec = self.records.get(t)
        if rec is not None:
            return rec.packed
        if self._empty is None:
            self._empty = PackedMask.pack(np.zeros(self.shape, np.uint8))
        return self._empty


class LazyXMemModel:
    def __init__(self, settings: BackendSettings | None = None) -> None:
        self.settings = settings or BackendSettings.from_env()
        self.fetcher = MediaFetcher(self.settings.ls_url, self.settings.api_key, self.settings.cache_dir,
                                    set(self.settings.allowed_hosts), int(self.settings.max_media_mb * 2**20))
        self.sessions: OrderedDict[int, TaskState] = OrderedDict()
        self._sessions_lock = threading.Lock()
        self.jobs = make_queue(self.run_job, self.settings.redis_url)
        self.ledger = PostLedger(getattr(self.jobs, "redis", None))
        self.store = MaskStore(self.jobs.redis) if getattr(self.jobs, "redis", None) is not None else None
        self._ls_client: tuple[tuple[str, str], Any] | None = None
        self._refiner: Refiner | None = None
        self._refiner_lock = threading.Lock()
        self.label_configs: dict[str, str] = {}  # project id -> label config, from /setup
        self.seconds_per_object_frame = 0.25  # running estimate, refined after each propagation

    @property
    def model_version(self) -> str:
        return f"lazyxmem-{__version__}-{propagator_name(self.settings.engine)}"

    # -- engines ------------------------------------------------------------------------------
    def refiner(self) -> Refiner:
        with self._refiner_lock:
            if self._refiner is None:
                r = build_refiner(self.settings.engine)
                if r is None:
                    raise LazyXMemError("a refiner is needed to turn boxes and clicks into masks; set LAZYXMEM_REFINER")
                self._refiner = r
            return self._refiner

    # -- sessions -----------------------------------------------------------------------------
    def _keep(self, state: TaskState) -> None:
        with self._sessions_lock:
            self.sessions[state.task_id] = state
            self.sessions.move_to_end(state.task_id)
            while len(self.sessions) > self.settings.max_sessions:
                old, _ = self.sessions.popitem(last=False)
                log.info("task %s: session dropped (LRU, MAX_SESSIONS=%d)", old, self.settings.max_sessions)

    def held(self, task_id: int) -> TaskState | None:
        with self._sessions_lock:
            state = self.sessions.get(task_id)
            if state is not None:
                self.sessions.move_to_end(task_id)
            return state

    # -- media --------------------------------------------------------------------------------
    def load_frames(self, task: dict, cfg: LabelConfig) -> tuple[FrameSequence, float]:
        data = task.get("data") or {}
        if cfg.value_key not in data:
            raise TaskError(f"task {task.get('id')} has no data field {cfg.value_key!r} (the config's value)")
        value = data[cfg.value_key]
        if cfg.mode == "video":
            if not isinstance(value, str):
                raise TaskError(f"task {task.get('id')}: data.{cfg.value_key} must be a video URL")
            path = self.fetcher.fetch(value)
            frames = VideoFrames(path, max_frames=self.settings.max_frames, raw_limit_mb=self.settings.frame_store_mb)
            return frames, cfg.frame_rate or frames.fps
        if not isinstance(value, list) or not value or not all(isinstance(u, str) for u in value):
            raise TaskError(f"task {task.get('id')}: data.{cfg.value_key} must be a non-empty list of image URLs")
        if len(value) > self.settings.max_frames:
            raise TaskError(f"task {task.get('id')} has {len(value)} frames, over MAX_FRAMES={self.settings.max_frames}")
        import cv2

        # Checked whole now (a bad image is an error before any work), then decoded again when
        # read: a long sequence's decoded images are never all in memory.
        files, shapes = [], set()
        for url in value:
            path = self.fetcher.fetch(url)
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise TaskError(f"task {task.get('id')}: image {url} cannot be decoded")
            files.append(path)
            shapes.add(bgr.shape)
        if len(shapes) > 1:
            raise TaskError(f"task {task.get('id')}: the images of a sequence must all have one size")
        return ImageFiles(files), 1.0

    def declared_frames(self, task: dict, cfg: LabelConfig) -> int | None:
        """A video task's frame count as its container declares it (the file is fetched, not
        decoded); None for image sequences or containers that do not say."""
        value = (task.get("data") or {}).get(cfg.value_key)
        if cfg.mode != "video" or not isinstance(value, str):
            return None
        return video_frame_count(self.fetcher.fetch(value))

    # -- building a session from Label Studio's data -------------------------------------------------
    def prompts(self, results: list[dict], cfg: LabelConfig, frames: FrameSequence) -> list[ObjectPrompt]:
        h, w = frames[0].shape[:2]
        if cfg.mode == "video":
            return convert.first_per_object(convert.video_prompts(results, cfg, w, h, len(frames)))
        return convert.first_per_object(convert.image_prompts(results, cfg, [(w, h)] * len(frames)))

    def prompt_mask(self, frames: FrameSequence, p: ObjectPrompt) -> np.ndarray:
        if p.mask is not None:
            return p.mask
        frame = frames[p.frame]
        return self.refiner().refine(frame, clicks=p.clicks, box=p.box, frame_id=("prompt", p.frame))

    def build(self, task: dict, cfg: LabelConfig) -> TaskState | None:
        task_id = int(task.get("id") or 0)
        frames, fps = self.load_frames(task, cfg)
        prompts = self.prompts(initial_regions(task), cfg, frames)
        if not prompts:
            return None
        h, w = frames[0].shape[:2]
        given: dict[int, np.ndarray] = {}
        objects = []
        for value, p in enumerate(prompts[:255], start=1):
            mask = self.prompt_mask(frames, p)
            if not mask.any():
                raise TaskError(f"task {task_id}: region {p.key} gives an empty mask on frame {p.frame + 1}")
            given.setdefault(p.frame, np.zeros((h, w), np.uint8))[mask] = value
            objects.append((value, p.label))
        propagator = build_propagator(self.settings.engine, video_length=len(frames) - min(given))
        session = LazySession(propagator, frames, given, refiner=self.refiner(),
                              config=self.settings.lazy or lazy_config(self.settings.engine, detect_loss=True))
        return TaskState(task_id, cfg, frames, objects, session, fps, task=task, label_config=cfg.xml)

    # -- predictions ------------------------------------------------------------------------
    def prediction(self, state: TaskState) -> dict:
        s = state.session
        review = s.review_frames
        pseudo = [r.index for r in s.ordered_records() if r.decision is Decision.PSEUDO]
        masks = state.masks()
        if state.cfg.mode == "video":
            result = convert.video_results(state.cfg, masks, state.objects, review, pseudo, state.fps)
        else:
            result = convert.image_results(state.cfg, masks, state.objects, review, pseudo)
        S = [min(1.0, o.S) for r in s.ordered_records() for o in r.objects.values() if o.area > 0]
        score = round(1.0 - float(np.mean(S)), 4) if S else 0.0
        version = self.model_version + (f"-r{state.revision}" if state.revision else "")
        return {"result": result, "score": score, "model_version": version,
                "review_frames": [t + 1 for t in review]}

    def estimate_seconds(self, n_frames: int, n_objects: int) -> float:
        return n_frames * max(1, n_objects) * self.seconds_per_object_frame

    def propagate(self, state: TaskState, progress: Progress | None = None) -> None:
        """Run the session to the end of the video (nothing to do when it is there)."""
        t0 = time.perf_counter()
        with state.lock:
            n0 = len(state.session.records)
            state.session.run(progress=progress)
            done = len(state.session.records) - n0
        if not done:
            return
        if done > 10:
            per = (time.perf_counter() - t0) / (done * max(1, len(state.objects)))
            self.seconds_per_object_frame = 0.5 * self.seconds_per_object_frame + 0.5 * per
        log.info("task %s: %d frames in %.1f s, %d review frames", state.task_id, done,
                 time.perf_counter() - t0, len(state.session.review_frames))

    def ls_client(self) -> Any:
        """One API client per (URL, key), kept: every posted prediction used to build its own."""
        if not (self.settings.ls_url and self.settings.api_key):
            raise LazyXMemError("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set to talk to Label Studio")
        key = (self.settings.ls_url, self.settings.api_key)
        if self._ls_client is None or self._ls_client[0] != key:
            from label_studio_sdk import LabelStudio

            self._ls_client = (key, LabelStudio(base_url=key[0], api_key=key[1]))
        return self._ls_client[1]

    def post_prediction(self, state: TaskState, job_id: str | None = None, unless_present: bool = False,
                        pred: dict | None = None) -> bool:
        """Post the task's current prediction (``pred``, else made here) through the Label Studio
        API, once per job id.

        ``unless_present``: not when Label Studio holds a prediction of this model version for the
        task already (on import, LS may call /predict itself while the TASKS_CREATED job runs).
        """
        pred = pred or self.prediction(state)
        if not (self.settings.ls_url and self.settings.api_key):
            log.warning("task %s: prediction ready but LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY are not set", state.task_id)
            return False

        def post() -> None:
            self.ls_client().predictions.create(task=state.task_id, result=pred["result"], score=pred["score"],
                                                model_version=pred["model_version"])
            log.info("task %s: posted prediction %s%s", state.task_id, pred["model_version"],
                     f" (job {job_id})" if job_id else "")

        def already_posted() -> bool:
            existing = self.ls_client().predictions.list(task=state.task_id)
            return any(p.model_version == pred["model_version"] for p in existing)

        if job_id is None:
            post()
            return True
        if unless_present and already_posted():
            log.info("task %s: Label Studio has a %s prediction already; job %s posts nothing", state.task_id,
                     pred["model_version"], job_id)
            return False
        posted = self.ledger.post_once(job_id, post, already_posted)
        if not posted:
            log.info("task %s: job %s posted its prediction already; not posting again", state.task_id, job_id)
        return posted

    # -- jobs ---------------------------------------------------------------------------------
    def submit(self, kind: str, task: dict, label_config: str, total: int, **extra: Any) -> str:
        spec = JobSpec(kind, task, label_config, self.model_version, **extra)
        return self.jobs.submit(spec, total)

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
                corrections = self.annotation_corrections(state, spec.annotation or {})
                if not corrections:
                    log.info("task %s: the annotation changes no frame; nothing to re-propagate", spec.task_id)
                    return {"posted": False, "frames": []}
                self.apply_corrections(state, corrections, progress)
            pred = self.prediction(state)
            if self.store is not None:
                self.store.put(spec.task, self.model_version, getattr(spec, "submitted", 0.0), state.masks(),
                               only_if_absent=spec.kind == "propagate", prediction=pred)
            posted = self.post_prediction(state, job_id=spec.key, unless_present=spec.kind == "propagate", pred=pred)
            return {"posted": posted, "review_frames": [t + 1 for t in state.session.review_frames]}

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
        with self._sessions_lock:
            self.sessions.clear()

    def predict(self, tasks: list[dict], label_config: str, context: dict | None) -> list[dict]:
        cfg = parse_label_config(label_config)
        if context and context.get("result") is not None:
            return [self.interactive(tasks[0], cfg, context["result"])]
        out = []
        deadline = time.monotonic() + self.settings.sync_budget_s
        for task in tasks:
            if len(tasks) == 1:  # the caller sees the error itself (4xx with the message)
                out.append(self._predict_one(task, cfg, deadline))
                continue
            try:  # in a batch, one bad task must not cost the others their predictions
                out.append(self._predict_one(task, cfg, deadline))
            except LazyXMemError as exc:
                log.warning("task %s: no prediction: %s", task.get("id"), exc)
                out.append({"result": [], "score": 0.0, "model_version": self.model_version, "error": str(exc)})
        return out

    def _predict_one(self, task: dict, cfg: LabelConfig, deadline: float) -> dict:
        task_id = int(task.get("id") or 0)
        return self.guard_oom(task_id, lambda: self._predict_now(task, cfg, deadline))

    def _predict_now(self, task: dict, cfg: LabelConfig, deadline: float) -> dict:
        task_id = int(task.get("id") or 0)
        # Asked again (a reopened task): the latest prediction, corrections included, rather than
        # a session rebuilt from the task, which would also drop the corrections made so far.
        if self.store is not None:
            stored = self.store.prediction(task, self.model_version)
            if stored is not None:
                return stored
        held = self.held(task_id)
        if held is not None and start_digest(held.task) == start_digest(task):
            if not held.lock.acquire(blocking=False):
                log.info("task %s: a job is updating its session; its prediction is posted when done", task_id)
                return {"result": [], "score": 0.0, "model_version": self.model_version + "-pending"}
            try:
                if held.session.remaining == 0:
                    return self.prediction(held)
            finally:
                held.lock.release()
        regions = initial_regions(task)
        declared = self.declared_frames(task, cfg) if regions else None
        if declared and self.estimate_seconds(declared, len(regions)) > deadline - time.monotonic():
            # Too long for this request by the container's own frame count: queue it before
            # decoding, so the answer comes back within Label Studio's timeout whatever the length.
            job_id = self.submit("propagate", task, cfg.xml, declared)
            log.info("task %s: about %d frames run in the background (job %s)", task_id, declared, job_id)
            return {"result": [], "score": 0.0, "model_version": self.model_version + "-pending", "job": job_id}
        state = self.build(task, cfg)
        if state is None:
            log.info("task %s: no region to start from; empty prediction", task_id)
            return {"result": [], "score": 0.0, "model_version": self.model_version}
        remaining = deadline - time.monotonic()
        if self.estimate_seconds(len(state.frames), len(state.objects)) > remaining:
            spec = JobSpec("propagate", task, cfg.xml, self.model_version)
            known = self.jobs.status(spec.key)
            # In-process, the job continues this session (unless the same job ran already); a
            # worker elsewhere builds its own.
            if not self.settings.redis_url and (known is None or known["status"] == "failed"):
                self._keep(state)
            job_id = self.jobs.submit(spec, len(state.frames))
            log.info("task %s: %d frames run in the background (job %s)", task_id, len(state.frames), job_id)
            return {"result": [], "score": 0.0, "model_version": self.model_version + "-pending", "job": job_id}
        self._keep(state)
        try:
            self.propagate(state)
        except Exception:
            self.drop(task_id)  # a half-propagated session must not be served later
            raise
        return self.prediction(state)

    def drop(self, task_id: int) -> None:
        with self._sessions_lock:
            self.sessions.pop(task_id, None)

    # -- corrections ------------------------------------------------------------------------
    def state_for(self, task: dict, cfg: LabelConfig, progress: Progress | None = None,
                  from_store: bool = False) -> TaskState:
        """The task's session, propagated to the end: the one held here, or rebuilt from the task
        (after a restart, an eviction, or in a worker that has not seen the task).

        ``from_store`` (the web process, with workers): the masks the workers made last, when
        there are any, instead of propagating here.
        """
        task_id = int(task.get("id") or 0)
        state = self.held(task_id)
        if state is None:
            state = self.build(task, cfg)
            if state is None:
                raise TaskError(f"task {task_id} has no region to start from: draw the objects first")
            self._keep(state)
        if from_store and self.store is not None:
            got = self.store.get(state.task, self.model_version, state.stored[0] if state.stored else -1.0)
            shape = (len(state.frames), *state.frames[0].shape[:2])
            if got is not None and (len(got[1]), *got[1].packed(0).shape) == shape:
                state.stored = got
            if state.stored is not None:
                return state
        if progress is not None and hasattr(progress, "total"):
            progress.total = state.session.remaining  # known only now in a worker
        try:
            self.propagate(state, progress)
        except Exception:
            self.drop(task_id)
            raise
        return state

    def object_for(self, state: TaskState, frame: int, label: str | None, point: tuple[float, float] | None) -> int:
        """The object a click or box on ``frame`` refers to: by label text when unambiguous, else by position."""
        candidates = [v for v, text in state.objects if label is not None and text == label] or [v for v, _ in state.objects]
        if len(candidates) == 1 or point is None:
            return candidates[0]
        mask = state.masks()[frame]
        x, y = int(point[0]), int(point[1])
        if mask[y, x] in candidates:
            return int(mask[y, x])
        dists = []
        for v in candidates:
            ys, xs = np.nonzero(mask == v)
            dists.append(np.min((xs - x) ** 2 + (ys - y) ** 2) if len(xs) else np.inf)
        return candidates[int(np.argmin(dists))]

    def interactive(self, task: dict, cfg: LabelConfig, context_results: list[dict]) -> dict:
        """Clicks or a box on one frame: answer with the refined region now, re-propagate after."""
        if not context_results:
            return {"result": [], "model_version": self.model_version}
        state = self.state_for(task, cfg, from_store=True)
        h, w = state.frames[0].shape[:2]
        corrections = self.corrections_from(state, context_results)
        if not corrections:
            return {"result": [], "model_version": self.model_version}
        refined = {(t, value): Correction(mask=self.correction_mask(state, t, value, corr))
                   for (t, value), corr in corrections.items()}
        self.schedule_correction(state, refined)
        result = []
        for (t, value), corr in refined.items():
            single = np.where(corr.mask, value, 0).astype(np.uint8)
            text = dict(state.objects)[value]
            if cfg.mode == "images":
                result += convert.image_results(cfg, [single if i == t else np.zeros_like(single) for i in range(t + 1)],
                                                [(value, text)], (), ())
            else:
                box = convert.mask_box(corr.mask)
                if box is not None:
                    kf = convert.keyframe(t, box, True)
                    kf["time"] = round(t / state.fps, 4)
                    result.append({"id": f"lazyxmem-{value}", "from_name": cfg.output.name, "to_name": cfg.object_tag,
                                   "type": "videorectangle",
                                   "value": {"framesCount": len(state.frames), "labels": [text], "sequence": [kf]}})
        return {"result": result, "model_version": self.model_version}

    def correction_mask(self, state: TaskState, t: int, value: int, corr: Correction) -> np.ndarray:
        """The mask a correction sets for object ``value`` on frame ``t``; clicks and boxes go through the refiner.

        The predicted mask is the refiner's prior, but with a box only its part inside the box: the
        annotator's box says where the object is, and a prediction elsewhere (the mistake being
        corrected) must not pull the refined mask back to it.
        """
        if corr.mask is not None:
            return np.asarray(corr.mask, bool)
        prior = state.masks()[t] == value
        if corr.box is not None:
            prior = prior_inside(prior, corr.box)
        mask = self.refiner().refine(state.frames[t], clicks=corr.clicks, box=corr.box, prior=prior,
                                     frame_id=("frame", state.task_id, t))
        return np.asarray(mask, bool)

    def corrections_from(self, state: TaskState, results: list[dict]) -> dict[tuple[int, int], Correction]:
        """Interactive context regions -> corrections {(frame, object): Correction}."""
        h, w = state.frames[0].shape[:2]
        cfg = state.cfg
        out: dict[tuple[int, int], Correction] = {}
        if cfg.mode == "images":
            clicks: dict[tuple[int, int], list[Click]] = {}
            for p in convert.image_prompts(results, cfg, [(w, h)] * len(state.frames)):
                point = (p.clicks[0].x, p.clicks[0].y) if p.clicks else (
                    ((p.box.x0 + p.box.x1) / 2, (p.box.y0 + p.box.y1) / 2) if p.box else None)
                value = self.object_for(state, p.frame, p.label, point)
                if p.mask is not None:
                    out[(p.frame, value)] = Correction(mask=p.mask)
                elif p.box is not None:
                    out[(p.frame, value)] = Correction(box=p.box, clicks=tuple(clicks.get((p.frame, value), ())))
                else:
                    clicks.setdefault((p.frame, value), []).extend(p.clicks)
            for key, cl in clicks.items():
                prev = out.get(key)
                out[key] = Correction(clicks=tuple(cl), box=prev.box if prev else None)
            return out
        return self.video_box_edits(state, results)

    def video_box_edits(self, state: TaskState, results: list[dict], tolerance: float = 1.0) -> dict[tuple[int, int], Correction]:
        """Keyframes whose box differs from the predicted track by more than ``tolerance`` percent."""
        masks = state.masks()
        out: dict[tuple[int, int], Correction] = {}
        h, w = state.frames[0].shape[:2]
        for r in results:
            if r.get("type") != "videorectangle":
                continue
            value_d = r.get("value") or {}
            text = convert.label_of(value_d)
            seq = [k for k in value_d.get("sequence") or [] if k.get("enabled", True)]
            rid = str(r.get("id", ""))
            for k in seq:
                t = int(k.get("frame", 1)) - 1
                if not 0 <= t < len(state.frames):
                    raise TaskError(f"region {rid}: keyframe {t + 1} is outside the video (1..{len(state.frames)})")
                box = convert.pct_box(k, w, h, f"region {rid} frame {t + 1}")
                if rid.startswith("lazyxmem-") and rid[9:].isdigit():
                    value = int(rid[9:])
                else:
                    value = self.object_for(state, t, text, ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2))
                predicted = convert.mask_box(masks[t] == value)
                given = (k["x"], k["y"], k["width"], k["height"])
                if predicted is None or max(abs(float(a) - b) for a, b in zip(given, predicted)) > tolerance:
                    out[(t, value)] = Correction(box=box)
        return out

    def apply_corrections(self, state: TaskState, corrections: dict[tuple[int, int], Correction],
                          progress: Progress | None = None, revision: int = 0) -> None:
        """Apply the corrections this session has not applied yet (a job carries all of them, so
        a session rebuilt elsewhere gets every one, and a session that has them redoes nothing)."""
        with state.lock:
            new = {k: c for k, c in corrections.items() if not _same(state.applied.get(k), c)}
            if not new:
                return
            state.session.correct(new, progress=progress)
            state.applied.update(new)
            state.revision = revision or state.revision + 1

    def schedule_correction(self, state: TaskState, corrections: dict[tuple[int, int], Correction]) -> str:
        """Re-propagate after corrections (final masks) in the background and post the new prediction."""
        first = min(t for t, _ in corrections)
        # The job may run on a session rebuilt from the task (another worker, an eviction): it
        # carries every correction made so far, not only this one.
        state.corrections.update(corrections)
        state.rounds += 1
        job_id = self.submit("correct", state.task, state.label_config, len(state.frames) - first,
                             corrections=dict(state.corrections), revision=state.rounds)
        log.info("task %s: correction on frame(s) %s, re-propagating from %d (job %s)", state.task_id,
                 sorted({t + 1 for t, _ in corrections}), first + 1, job_id)
        return job_id

    def on_annotation(self, payload: dict) -> dict:
        """ANNOTATION_CREATED / UPDATED: frames the annotator changed become corrections."""
        annotation = payload.get("annotation") or {}
        task = payload.get("task") or {}
        project = payload.get("project") or {}
        if not task.get("id"):
            raise TaskError("webhook payload has no task")
        cfg = parse_label_config(project.get("label_config") or "")
        # With Redis the job carries the annotation itself: whichever worker takes it rebuilds the
        # prediction and compares, so every edit so far counts, wherever earlier jobs ran.
        state = None if self.settings.redis_url else self.held(int(task["id"]))
        if state is None:
            # A restart or an evicted session: rebuilding means propagating the whole video, which
            # does not belong inside the webhook call. The annotation that fired the webhook must
            # not be mistaken for the initial regions.
            base = dict(task)
            base["annotations"] = [a for a in task.get("annotations") or [] if a.get("id") != annotation.get("id")]
            if not initial_regions(base):
                base["annotations"] = [annotation]

            job = self.submit("annotation", base, cfg.xml, 0, annotation=annotation)
            return {"status": "rebuilding", "job": job}
        return self.apply_annotation(state, annotation)

    def annotation_corrections(self, state: TaskState, annotation: dict) -> dict[tuple[int, int], Correction]:
        """The frames where ``annotation`` differs from the prediction, as final masks."""
        results = annotation.get("result") or []
        if state.cfg.mode == "images":
            corrections = self.image_edits(state, results)
        else:
            corrections = self.video_box_edits(state, results)
        return {(t, value): Correction(mask=self.correction_mask(state, t, value, corr))
                for (t, value), corr in corrections.items()}

    def apply_annotation(self, state: TaskState, annotation: dict) -> dict:
        """The frames where ``annotation`` differs from the prediction become corrections."""
        refined = self.annotation_corrections(state, annotation)
        if not refined:
            return {"status": "no change"}
        job = self.schedule_correction(state, refined)
        return {"status": "re-propagating", "job": job, "frames": sorted({t + 1 for t, _ in refined})}

    # -- pre-annotation on import -------------------------------------------------------------------
    def full_task(self, task_id: int) -> dict:
        """A task with its annotations, from the Label Studio API."""
        task = self.ls_client().tasks.get(id=str(task_id))
        return task.model_dump(mode="json") if hasattr(task, "model_dump") else dict(task)

    def preannotate(self, tasks: list[dict], label_config: str) -> dict:
        """Queue a propagation job for each task that carries initial regions; skip the others."""
        parse_label_config(label_config)  # a config we cannot serve fails here, not in every job
        jobs, skipped = {}, []
        for task in tasks:
            if not initial_regions(task) and task.get("id") and self.settings.ls_url and self.settings.api_key:
                task = self.full_task(int(task["id"]))  # webhook tasks come without annotations
            if not initial_regions(task):
                skipped.append(task.get("id"))
                continue
            data = task.get("data") or {}
            frames = next((len(v) for v in data.values() if isinstance(v, list)), 0)
            jobs[task["id"]] = self.submit("propagate", task, label_config, frames)
        log.info("pre-annotation: %d task(s) queued, %d without regions skipped", len(jobs), len(skipped))
        return {"status": "queued", "jobs": jobs, "skipped": skipped}

    def on_tasks_created(self, payload: dict) -> dict:
        """TASKS_CREATED (an import): pre-annotate the tasks that carry regions."""
        if not self.settings.preannotate_on_import:
            return {"status": "ignored", "reason": "PREANNOTATE_ON_IMPORT is off"}
        project = payload.get("project") or {}
        config = project.get("label_config") or self.label_configs.get(str(project.get("id", "")))
        if not config:
            raise TaskError(f"TASKS_CREATED for project {project.get('id')} without its label config: "
                            "connect the backend to the project (it calls /setup) and import again")
        tasks = [t for t in payload.get("tasks") or [] if isinstance(t, dict)]
        return self.preannotate(tasks, config)

    def image_edits(self, state: TaskState, results: list[dict], min_iou: float = 0.97) -> dict[tuple[int, int], Correction]:
        """Brush masks that differ from the predicted mask of their object on that item."""
        h, w = state.frames[0].shape[:2]
        masks = state.masks()
        out = {}
        for p in convert.image_prompts(results, state.cfg, [(w, h)] * len(state.frames)):
            if p.mask is None:
                continue
            candidates = [v for v, text in state.objects if text == p.label] or [v for v, _ in state.objects]
            ious = []
            for v in candidates:
                pred = masks[p.frame] == v
                union = (pred | p.mask).sum()
                ious.append((pred & p.mask).sum() / union if union else 1.0)
            best = int(np.argmax(ious))
            if ious[best] < min_iou:
                out[(p.frame, candidates[best])] = Correction(mask=p.mask)
        return out
