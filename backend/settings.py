"""The backend's settings: the one place that reads the environment (the engines' own variables
are read by ``lazyxmem_core.engines.EngineSettings.from_env``, called from here)."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

from lazyxmem_core.engines import EngineSettings, lazy_config
from lazyxmem_core.errors import LazyXMemError
from lazyxmem_core.lazy import LazyConfig


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


def _env_opt(name: str) -> float | None:
    return _env_float(name, 0.0) if os.environ.get(name) else None


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class BackendSettings:
    ls_url: str | None = None
    api_key: str | None = None
    cache_dir: str = os.path.join(tempfile.gettempdir(), "lazyxmem-cache")
    allowed_hosts: frozenset[str] = frozenset()
    max_media_mb: float = 2048
    media_timeout_s: float = 300  # a whole download (every redirect, every read), not one read
    media_cache_mb: float = 20480  # the media cache's bound: least recently used files are removed past it
    max_frames: int = 20000
    frame_store_mb: float = 8192  # a video whose raw frames are larger is kept JPEG-compressed on disk
    # Pixels per frame (and per brush region), read from the file or RLE header before decoding: a
    # 762 KB PNG can hold 16000x16000 pixels (9 GB once decoded and refined), a 100 KB H.264 file
    # three 6000x6000 frames (1.2 GB, 9 s). 10 M: 4K (4096x2160) fits, anything larger is refused.
    max_pixels: int = 10_000_000
    max_request_mb: float = 50  # request bodies; larger ones get a 413 before they are read
    max_sessions: int = 8
    # A batch /predict propagates inside the request only when it should end within this; longer
    # work goes to the batch lane and is posted when done.
    sync_budget_s: float = 60.0
    # An interactive call on a task whose session is not here propagates at most this many frames
    # inside the request (from the object's first frame) to get a prior; further away it refines
    # the frame alone and queues the rest.
    interactive_window: int = 12
    redis_url: str | None = None  # jobs on RQ over Redis (``lazyxmem worker`` processes); None: in-process
    cpu_fallback: bool = False  # finish a job on the CPU when the GPU runs out of memory
    preannotate_on_import: bool = True  # TASKS_CREATED: queue the imported tasks that carry regions
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    # Label Studio cannot sign its webhooks, but it sends the headers set on the webhook: with a
    # secret, /webhook answers only requests carrying it (X-Webhook-Secret header or ?secret=).
    webhook_secret: str | None = None
    max_webhook_tasks: int = 1000  # task ids one TASKS_CREATED may name (each is one Label Studio read)
    max_pending_notices: int = 10000  # webhook notices waiting to be read back from Label Studio
    job_retries: int = 2
    job_timeout_s: int = 6 * 3600
    # Queued (not yet running) jobs one Label Studio project may hold; past it a submission is a 422.
    max_queued_per_project: int = 200
    # Review spans listed per object (those asked about first, then the most uncertain); every unanswered
    # request gets one besides.
    review_spans: int = 3
    engine: EngineSettings = field(default_factory=EngineSettings)
    lazy: LazyConfig | None = None  # None: the engine's thresholds, object-loss detection on

    def __post_init__(self) -> None:
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            # A user without a password used to let anyone in with an empty one.
            raise LazyXMemError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together (or neither): "
                                "one of them is empty")

    @classmethod
    def from_env(cls) -> BackendSettings:
        engine = EngineSettings.from_env()
        return cls(
            ls_url=os.environ.get("LABEL_STUDIO_URL") or None,
            api_key=os.environ.get("LABEL_STUDIO_API_KEY") or None,
            cache_dir=os.environ.get("CACHE_DIR") or cls.cache_dir,
            allowed_hosts=frozenset(h for h in os.environ.get("ALLOWED_MEDIA_HOSTS", "").split(",") if h),
            max_media_mb=_env_float("MAX_MEDIA_MB", cls.max_media_mb),
            media_timeout_s=_env_float("MEDIA_TIMEOUT_S", cls.media_timeout_s),
            media_cache_mb=_env_float("MEDIA_CACHE_MB", cls.media_cache_mb),
            max_frames=int(_env_float("MAX_FRAMES", cls.max_frames)),
            frame_store_mb=_env_float("FRAME_STORE_MB", cls.frame_store_mb),
            max_pixels=int(_env_float("MAX_PIXELS", cls.max_pixels)),
            max_request_mb=_env_float("MAX_REQUEST_MB", cls.max_request_mb),
            max_sessions=int(_env_float("MAX_SESSIONS", cls.max_sessions)),
            sync_budget_s=_env_float("SYNC_BUDGET_S", cls.sync_budget_s),
            interactive_window=int(_env_float("INTERACTIVE_WINDOW", cls.interactive_window)),
            redis_url=os.environ.get("REDIS_URL") or None,
            cpu_fallback=_env_bool("CPU_FALLBACK", False),
            preannotate_on_import=_env_bool("PREANNOTATE_ON_IMPORT", True),
            basic_auth_user=os.environ.get("BASIC_AUTH_USER") or None,
            basic_auth_pass=os.environ.get("BASIC_AUTH_PASS") or None,
            webhook_secret=os.environ.get("WEBHOOK_SECRET") or None,
            max_webhook_tasks=int(_env_float("MAX_WEBHOOK_TASKS", cls.max_webhook_tasks)),
            max_pending_notices=int(_env_float("MAX_PENDING_NOTICES", cls.max_pending_notices)),
            job_retries=int(_env_float("JOB_RETRIES", cls.job_retries)),
            job_timeout_s=int(_env_float("JOB_TIMEOUT_S", cls.job_timeout_s)),
            max_queued_per_project=int(_env_float("MAX_QUEUED_PER_PROJECT", cls.max_queued_per_project)),
            review_spans=int(_env_float("REVIEW_SPANS", cls.review_spans)),
            engine=engine,
            lazy=lazy_config(engine, tau_u=_env_opt("TAU_U"), tau_p=_env_opt("TAU_P"), tau_m=_env_opt("TAU_M"),
                             user_budget=_int_or_none(_env_opt("REVIEW_BUDGET")),
                             detect_loss=_env_bool("DETECT_LOSS", True),
                             backward=_env_bool("BACKWARD_REVISION", True),
                             tau_s=_env_opt("TAU_S"),
                             level_run=_int_or_none(_env_opt("LEVEL_RUN")),
                             max_snapshots=_int_or_none(_env_opt("MAX_SNAPSHOTS")),
                             sustained=_env_bool("SUSTAINED_TRIGGER", True)),
        )

    @property
    def lazy_config(self) -> LazyConfig:
        return self.lazy or lazy_config(self.engine, detect_loss=True)


def log_level() -> str:
    return os.environ.get("LOG_LEVEL") or "INFO"
