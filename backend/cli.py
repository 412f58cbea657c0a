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


def project_tasks(settings: Any, project_id: int) -> tuple[Any, list[dict]]:
    """A project (its label config) and all its tasks, read from Label Studio with the backend's key;
    an unreachable Label Studio or an unknown project is one clear error."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    from lazyxmem_core.errors import LazyXMemError

    from .ls_io import LabelStudioIO, PostLedger

    client = LabelStudioIO(settings.ls_url, settings.api_key, PostLedger()).client()
    try:
        project = client.projects.get(id=project_id)
        tasks = [t.model_dump(mode="json") if hasattr(t, "model_dump") else dict(t)
                 for t in client.tasks.list(project=project_id, fields="all")]
    except ApiError as exc:
        raise LazyXMemError(f"Label Studio at {settings.ls_url} answered HTTP {exc.status_code} for project "
                            f"{project_id}: {str(exc.body)[:200]}; check the project id and the API key") from None
    except (httpx.HTTPError, OSError) as exc:
        raise LazyXMemError(f"cannot reach Label Studio at {settings.ls_url} ({exc}): check LABEL_STUDIO_URL") from None
    return project, tasks


def cmd_preannotate(args: argparse.Namespace) -> int:
    """Queue every task of a project that carries regions, wait for the predictions to be posted."""
    from tqdm import tqdm

    from .service import Service
    from .settings import BackendSettings

    settings = BackendSettings.from_env()
    settings = replace(settings, ls_url=args.url or settings.ls_url, api_key=args.api_key or settings.api_key,
                       redis_url=args.redis_url or settings.redis_url)
    project, tasks = project_tasks(settings, args.project)
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


def cmd_export(args: argparse.Namespace) -> int:
    """Write the masks of every task of a project, from the views the backend's jobs stored."""
    from pathlib import Path

    from tqdm import tqdm

    from lazyxmem_core.errors import LazyXMemError

    from . import export
    from .labelconfig import parse_label_config
    from .service import Service
    from .settings import BackendSettings

    settings = BackendSettings.from_env()
    settings = replace(settings, ls_url=args.url or settings.ls_url, api_key=args.api_key or settings.api_key,
                       redis_url=args.redis_url or settings.redis_url)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LazyXMemError(f"--out {out} is a file: give a folder (it is created when missing)")
    project, tasks = project_tasks(settings, args.project)
    # The server's store: Redis when REDIS_URL is set, else CACHE_DIR/views (the same settings).
    model = Service(settings)
    cfg = parse_label_config(project.label_config) if args.recompute else None
    exported, missing = 0, {}
    for task in tqdm(tasks, unit="task", desc="export"):
        task_id = int(task.get("id") or 0)
        # Any engine's latest masks: what the task holds now, whichever engine the server ran.
        stored = model.views.latest(task_id, None)
        if stored is not None:
            view, objects = stored.view, export.objects_of(stored.prediction, stored.view)
        elif cfg is not None:
            try:
                state = model.state_for(task, cfg)
            except LazyXMemError as exc:
                missing[task_id] = f"cannot recompute: {exc}"
                continue
            view, objects = state.view, state.objects
            # Stored like a job's masks, never over a server's newer ones; the server serves them too.
            model.views.put(task, model.model_version, time.time(), view, state.revision, model.prediction(state),
                            only_if_absent=True)
            model.tasks.drop(task_id, state)  # one task's frames in memory at a time
        else:
            missing[task_id] = "no masks yet: run a prediction first (or pass --recompute)"
            continue
        export.write_task(view, objects, out / f"task-{task_id}", args.format)
        exported += 1
    print(f"project {args.project}: {exported} task(s) exported to {out}"
          + (f", {len(missing)} without masks" if missing else ""))
    for task_id, why in missing.items():
        print(f"task {task_id}: {why}", file=sys.stderr)
    return 1 if missing else 0


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
    p = sub.add_parser("ls", help="Label Studio: pre-annotate a project's tasks, export their masks")
    lsub = p.add_subparsers(dest="ls_command", required=True)
    pre = lsub.add_parser("preannotate", help="propagate every task that carries regions; post the predictions")
    pre.add_argument("--project", type=int, required=True, help="Label Studio project id")
    pre.add_argument("--url", default=None, help="Label Studio URL (default LABEL_STUDIO_URL)")
    pre.add_argument("--api-key", default=None, help="Label Studio API key (default LABEL_STUDIO_API_KEY)")
    pre.add_argument("--redis-url", default=None, help="queue on these workers (default REDIS_URL; none: run here)")
    pre.add_argument("--no-wait", action="store_true", help="with Redis: return once the jobs are queued")
    pre.set_defaults(func=cmd_preannotate)
    exp = lsub.add_parser("export", help="write every task's masks (DAVIS PNGs, COCO RLE) from the stored views")
    exp.add_argument("--project", type=int, required=True, help="Label Studio project id")
    exp.add_argument("--out", required=True, help="folder: one task-<id>/ per task (00001.png ..., masks.json)")
    exp.add_argument("--format", choices=("png", "coco", "both"), default="both", help="default both")
    exp.add_argument("--recompute", action="store_true",
                     help="propagate a task without stored masks from its annotation here (and store them)")
    exp.add_argument("--url", default=None, help="Label Studio URL (default LABEL_STUDIO_URL)")
    exp.add_argument("--api-key", default=None, help="Label Studio API key (default LABEL_STUDIO_API_KEY)")
    exp.add_argument("--redis-url", default=None, help="the server's Redis (default REDIS_URL; none: CACHE_DIR/views)")
    exp.set_defaults(func=cmd_export)

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
