"""Runs one task row: claim it, heartbeat while it runs, report progress, honour
cancel, and end it (succeeded / failed / retry)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from appliance.db.engine import session_scope
from appliance.services import tasks as task_service
from appliance.settings import get_settings
from appliance.tasks.celery_app import celery

log = logging.getLogger("cairn.tasks")

Handler = Callable[["TaskContext", dict[str, Any]], dict[str, Any] | None]
HANDLERS: dict[str, Handler] = {}


class TaskCancelled(Exception):
    """Raised inside a handler when the user cancelled the task."""


class TransientError(Exception):
    """A failure worth retrying (with backoff) up to the task's max_attempts."""


def handler(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[name] = fn
        return fn

    return register


class TaskContext:
    """What a handler gets: its task id, progress reporting, the cancel flag."""

    def __init__(self, task_id: str, db_url: str, params: dict[str, Any]) -> None:
        self.task_id = task_id
        self.db_url = db_url
        self.params = params
        self.cancelled = threading.Event()

    def progress(self, percent: float, message: str) -> None:
        with session_scope(self.db_url) as session:
            if task_service.progress(session, self.task_id, percent, message):
                self.cancelled.set()
        self.check()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise TaskCancelled()


def _heartbeat(ctx: TaskContext, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        try:
            with session_scope(ctx.db_url) as session:
                if task_service.beat(session, ctx.task_id):
                    ctx.cancelled.set()
        except Exception:
            log.exception("task heartbeat failed", extra={"task_id": ctx.task_id})


def run_task(task_id: str) -> str:
    """Run a task row to its end; returns its final state (or 'skipped')."""
    import appliance.tasks.handlers  # noqa: F401  (registers the handlers)

    settings = get_settings()
    url = settings.resolved_database_url
    worker = f"{socket.gethostname()}:{os.getpid()}"
    with session_scope(url) as session:
        task = task_service.claim(session, task_id, worker)
        if task is None:
            return "skipped"
        name, params, attempt = task.name, dict(task.params or {}), task.attempts
    ctx = TaskContext(task_id, url, params)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(ctx, stop, settings.task_heartbeat_interval),
                            daemon=True)
    beat.start()
    state, result, error, retry_in = "failed", None, None, None
    try:
        fn = HANDLERS.get(name)
        if fn is None:
            raise RuntimeError(f"this worker has no handler for task '{name}'")
        log.info("task started", extra={"task_id": task_id, "task": name, "attempt": attempt})
        result = fn(ctx, params) or {}
        state = "succeeded"
    except TaskCancelled:
        state = "cancelled"
    except TransientError as exc:
        error, retry_in = str(exc), float(min(60, 2 ** attempt))
    except Exception as exc:
        log.exception("task failed", extra={"task_id": task_id, "task": name})
        error = f"{type(exc).__name__}: {exc}"
    finally:
        stop.set()
        beat.join()
    with session_scope(url) as session:
        task_service.finish(session, task_id, state, result=result, error=error, retry_in=retry_in)
    log.info("task ended", extra={"task_id": task_id, "task": name, "state": state})
    return state


@celery.task(name="cairn.run")  # type: ignore[untyped-decorator]
def run(task_id: str) -> str:
    return run_task(task_id)
