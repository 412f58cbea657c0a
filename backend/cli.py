"""The ``lazyxmem`` command: the core's commands plus the Label Studio ones (``ls``, ``worker``)."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from typing import Any

from lazyxmem_core import cli as core_cli

log = logging.getLogger("lazyxmem")


def cmd_preannotate(args: argparse.Namespace) -> int:
    """Queue every task of a project that carries regions, wait for the predictions to be posted."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError
    from tqdm import tqdm

    from lazyxmem_core.errors import LazyXMemError

    from .ls_io import LabelStudioIO, PostLedger
    from .service import Service
    from .settings import BackendSettings

    settings = BackendSettings.from_env()
    settings = replace(settings, ls_url=args.url or settings.ls_url, api_key=args.api_key or settings.api_key,
                       redis_url=args.redis_url or settings.redis_url)
    client = LabelStudioIO(settings.ls_url, settings.api_key, PostLedger()).client()
    try:
        project = client.projects.get(id=args.project)
        tasks = [t.model_dump(mode="json") if hasattr(t, "model_dump") else dict(t)
                 for t in client.tasks.list(project=args.project, fields="all")]
    except ApiError as exc:
        raise LazyXMemError(f"Label Studio at {settings.ls_url} answered HTTP {exc.status_code} for project "
                            f"{args.project}: {str(exc.body)[:200]}; check the project id and the API key") from None
    except (httpx.HTTPError, OSError) as exc:
        raise LazyXMemError(f"cannot reach Label Studio at {settings.ls_url} ({exc}): check LABEL_STUDIO_URL") from None
    # This command's own in-process queue takes the whole project (the bound protects a server's).
    model = Service(settings if settings.redis_url else
                    replace(settings, max_queued_per_project=max(settings.max_queued_per_project, len(tasks))))
    out = model.preannotate(tasks, project.label_config)
    jobs: dict[Any, str] = out["jobs"]
    print(f"project {args.project}: {len(jobs)} task(s) queued, {len(out['skipped'])} without regions skipped"
          + (f" (on Redis: {settings.redis_url})" if settings.redis_url else ""))
    for task_id, why in (out.get("refused") or {}).items():
        print(f"task {task_id}: refused: {why}", file=sys.stderr)
    if not jobs or (settings.redis_url and args.no_wait):
        return 0
    finished: dict[str, dict] = {}
    with tqdm(total=len(jobs), unit="task", desc="pre-annotate") as bar:
        while len(finished) < len(jobs):
            for job_id in jobs.values():
                if job_id in finished:
                    continue
                status = model.jobs.status(job_id)
                if status and status["status"] in ("finished", "failed", "canceled"):
                    finished[job_id] = status
                    bar.update(1)
            time.sleep(0.5)
    failed = {t: finished[j]["error"] or finished[j]["status"] for t, j in jobs.items()
              if finished[j]["status"] != "finished"}
    for task_id, error in failed.items():
        print(f"task {task_id}: failed: {error}", file=sys.stderr)
    return 1 if failed or out.get("refused") else 0


def cmd_worker(args: argparse.Namespace) -> int:
    from .worker import work

    from .settings import BackendSettings

    url = args.redis_url or BackendSettings.from_env().redis_url
    if not url:
        print("lazyxmem worker: set REDIS_URL (or --redis-url) to the Redis that the backend queues on", file=sys.stderr)
        return 2
    work(url, name=args.name, burst=args.burst, heartbeat_s=args.heartbeat, grace_s=args.grace,
         maintenance_s=args.maintenance)
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("ls", help="Label Studio: pre-annotate a project's tasks")
    lsub = p.add_subparsers(dest="ls_command", required=True)
    pre = lsub.add_parser("preannotate", help="propagate every task that carries regions; post the predictions")
    pre.add_argument("--project", type=int, required=True, help="Label Studio project id")
    pre.add_argument("--url", default=None, help="Label Studio URL (default LABEL_STUDIO_URL)")
    pre.add_argument("--api-key", default=None, help="Label Studio API key (default LABEL_STUDIO_API_KEY)")
    pre.add_argument("--redis-url", default=None, help="queue on these workers (default REDIS_URL; none: run here)")
    pre.add_argument("--no-wait", action="store_true", help="with Redis: return once the jobs are queued")
    pre.set_defaults(func=cmd_preannotate)

    w = sub.add_parser("worker", help="run a job worker on the Redis queue (one model per process)")
    w.add_argument("--redis-url", default=None, help="default REDIS_URL")
    w.add_argument("--name", default=None, help="worker name (default: host and pid)")
    w.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    w.add_argument("--heartbeat", type=int, default=10, help="seconds between job lease renewals (default 10)")
    w.add_argument("--grace", type=int, default=30,
                   help="a job whose worker missed its beats this long is retried elsewhere (default 30 s)")
    w.add_argument("--maintenance", type=int, default=30, help="seconds between requeue checks (default 30)")
    w.set_defaults(func=cmd_worker)


def main(argv: list[str] | None = None) -> int:
    return core_cli.main(argv, extend=add_commands)


if __name__ == "__main__":
    raise SystemExit(main())
