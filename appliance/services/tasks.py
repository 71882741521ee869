"""Tasks: the database row is the truth about a long operation; Celery carries it.

State machine: pending → running → succeeded | failed | cancelled, and
running → pending again when a retry is due (worker lost, transient error).
Claiming is a compare-and-swap on ``state``, so a message delivered twice
never runs twice at once."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from appliance.db.engine import after_commit
from appliance.db.models import Project, Task
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.services import events, redact
from appliance.services.principal import Principal
from appliance.services.resources import iso, keyset, page, rowcount

STATES = ("pending", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")

Enqueue = Callable[[str, str, float], None]
_enqueue: Enqueue | None = None


def set_dispatcher(fn: Enqueue) -> None:
    """Install how task messages are sent (Celery in every process; tests may swap)."""
    global _enqueue
    _enqueue = fn


def _send_after_commit(session: Session, task_id: str, queue: str, countdown: float = 0.0) -> None:
    def send() -> None:
        if _enqueue is not None:
            try:
                _enqueue(task_id, queue, countdown)
            except Exception:  # broker down: the reaper re-sends pending tasks
                pass

    after_commit(session, send)


def task_public(task: Task, project: str | None = None) -> dict[str, Any]:
    resource = None
    if task.resource_kind:
        resource = {"kind": task.resource_kind, "id": task.resource_id, "name": task.resource_name}
    return {
        "id": task.id,
        "name": task.name,
        "project": project,
        "queue": task.queue,
        "state": task.state,
        "progress": {"percent": round(task.percent, 1), "message": task.message},
        "error": task.error,
        "params": task.params or {},
        "result": task.result,
        "resource": resource,
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "cancel_requested": task.cancel_requested,
        "created_by": task.created_by,
        "created_at": iso(task.created_at),
        "started_at": iso(task.started_at),
        "finished_at": iso(task.finished_at),
        "updated_at": iso(task.updated_at),
    }


def _project_name(session: Session, project_id: str | None) -> str | None:
    if project_id is None:
        return None
    return session.scalar(select(Project.name).where(Project.id == project_id))


def _emit(session: Session, task: Task, verb: str) -> dict[str, Any]:
    data = task_public(task, _project_name(session, task.project_id))
    events.record(session, "task", verb, data, task.project_id)
    return data


def create(session: Session, name: str, params: dict[str, Any], *, queue: str,
           principal: Principal | None, project_id: str | None = None,
           resource: tuple[str, str, str] | None = None, max_attempts: int = 3) -> dict[str, Any]:
    """Record a task and send it to ``queue`` once the transaction commits."""
    task = Task(name=name, params=params, queue=queue, project_id=project_id,
                created_by=principal.user_name if principal else None, max_attempts=max_attempts,
                message="queued")
    if resource:
        task.resource_kind, task.resource_id, task.resource_name = resource
    session.add(task)
    session.flush()
    _send_after_commit(session, task.id, queue)
    return _emit(session, task, "created")


def _task(session: Session, principal: Principal, task_id: str) -> Task:
    task = session.get(Task, task_id)
    if task is None or not _visible(principal, task):
        raise NotFound(f"there is no task {task_id} that you can see")
    return task


def _visible(principal: Principal, task: Task) -> bool:
    if task.project_id is None:
        return principal.can_cluster("read")
    return principal.can_project(task.project_id, "read")


def get(session: Session, principal: Principal, task_id: str) -> dict[str, Any]:
    task = _task(session, principal, task_id)
    return _shown(principal, task, task_public(task, _project_name(session, task.project_id)))


def _shown(principal: Principal, task: Task, data: dict[str, Any]) -> dict[str, Any]:
    return data if redact.may_see(principal, task.project_id) else redact.task(data)


def list_(session: Session, principal: Principal, limit: int, cursor: str | None,
          state: str | None = None, name: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    query = select(Task)
    if state is not None:
        if state not in STATES:
            raise InvalidInput(f"state must be one of {', '.join(STATES)}")
        query = query.where(Task.state == state)
    if name is not None:
        query = query.where(Task.name == name)
    visible = principal.readable_project_ids()
    if visible is not None:
        query = query.where(Task.project_id.in_(visible))
    rows = list(session.scalars(keyset(query, (Task.created_at, Task.id), cursor, limit, descending=True)))
    rows, nxt = page(rows, limit, lambda t: (t.created_at, t.id))
    names = dict(session.execute(select(Project.id, Project.name)).all()) if rows else {}
    return [_shown(principal, t, task_public(t, names.get(t.project_id or ""))) for t in rows], nxt


def counts(session: Session, principal: Principal) -> dict[str, int]:
    query = select(Task.state, func.count()).group_by(Task.state)
    visible = principal.readable_project_ids()
    if visible is not None:
        query = query.where(Task.project_id.in_(visible))
    found = dict(session.execute(query).all())
    return {state: int(found.get(state, 0)) for state in STATES}


def cancel(session: Session, principal: Principal, task_id: str) -> dict[str, Any]:
    task = _task(session, principal, task_id)
    principal.require_project(task.project_id, "write")
    # pending → cancelled is a compare-and-swap: a worker claiming it at the same moment
    # either runs it (and sees cancel_requested) or never does.
    now = datetime.now(UTC)
    if rowcount(session.execute(
            update(Task).where(Task.id == task_id, Task.state == "pending")
            .values(state="cancelled", finished_at=now, message="cancelled", updated_at=now)
            .execution_options(synchronize_session=False))):
        session.refresh(task)
        _ended(session, task)
        return _emit(session, task, "updated")
    session.refresh(task)
    if task.state in TERMINAL:
        raise Conflict(f"task {task_id} already {task.state}: nothing to cancel")
    task.cancel_requested = True
    task.message = "cancelling"
    return _emit(session, task, "updated")


def _ended(session: Session, task: Task) -> None:
    """However a task ends without succeeding, what it held is given back."""
    from appliance.services import task_guard

    task_guard.released(session, task, task.state)


# --- worker side ------------------------------------------------------------------------------

def claim(session: Session, task_id: str, worker: str) -> Task | None:
    """pending → running, atomically. None if someone else has it or it is gone."""
    now = datetime.now(UTC)
    claimed = rowcount(session.execute(
        update(Task)
        .where(Task.id == task_id, Task.state == "pending")
        .values(state="running", worker=worker, heartbeat_at=now, started_at=now,
                attempts=Task.attempts + 1, message="started", updated_at=now)
    ))
    if not claimed:
        return None
    task = session.get(Task, task_id)
    assert task is not None
    session.refresh(task)
    _emit(session, task, "updated")
    return task


def beat(session: Session, task_id: str) -> bool:
    """Task heartbeat; returns True if cancellation was requested."""
    task = session.get(Task, task_id)
    if task is None or task.state != "running":
        return True
    task.heartbeat_at = datetime.now(UTC)
    return task.cancel_requested


def progress(session: Session, task_id: str, percent: float, message: str) -> bool:
    """Report progress; returns True if cancellation was requested."""
    task = session.get(Task, task_id)
    if task is None or task.state != "running":
        return True
    task.percent = max(0.0, min(100.0, percent))
    task.message = message
    task.heartbeat_at = datetime.now(UTC)
    _emit(session, task, "updated")
    return task.cancel_requested


def finish(session: Session, task_id: str, state: str, *, result: dict[str, Any] | None = None,
           error: str | None = None, retry_in: float | None = None) -> None:
    """End an attempt: succeeded / failed / cancelled, or back to pending for a retry."""
    task = session.get(Task, task_id, with_for_update=True)
    if task is None or task.state != "running":
        return
    now = datetime.now(UTC)
    if state == "failed" and retry_in is not None and task.attempts < task.max_attempts:
        task.state, task.error = "pending", error
        task.message = f"retrying in {retry_in:g} s after: {error}"
        _send_after_commit(session, task.id, task.queue, retry_in)
    else:
        task.state, task.result, task.error, task.finished_at = state, result, error, now
        if state == "succeeded":
            task.percent, task.message = 100.0, "done"
        elif state == "cancelled":
            task.message = "cancelled"
        else:
            task.message = "failed"
        _ended(session, task)
    _emit(session, task, "updated")


def reap(session: Session, grace_seconds: float, resend_after: float = 30.0) -> list[str]:
    """Tasks whose worker died (no heartbeat within the grace period) are retried or
    failed, never left running; pending tasks whose message may be lost are re-sent."""
    now = datetime.now(UTC)
    touched = []
    stale = select(Task).where(
        Task.state == "running", Task.heartbeat_at < now - timedelta(seconds=grace_seconds)
    )
    for task in session.scalars(stale.with_for_update(skip_locked=True)):
        lost = f"worker {task.worker} stopped answering (no heartbeat for {grace_seconds:g} s)"
        if task.cancel_requested:
            task.state, task.finished_at, task.message = "cancelled", now, "cancelled"
            _ended(session, task)
        elif task.attempts < task.max_attempts:
            task.state, task.error, task.message = "pending", lost, f"retrying: {lost}"
            _send_after_commit(session, task.id, task.queue)
        else:
            task.state, task.error, task.finished_at = "failed", lost, now
            task.message = f"failed after {task.attempts} attempts"
            _ended(session, task)
        _emit(session, task, "updated")
        touched.append(task.id)
    waiting = select(Task).where(
        Task.state == "pending", Task.updated_at < now - timedelta(seconds=resend_after)
    )
    for task in session.scalars(waiting):
        task.updated_at = now
        _send_after_commit(session, task.id, task.queue)
    return touched


def counts_all(session: Session) -> dict[str, int]:
    found = dict(session.execute(select(Task.state, func.count()).group_by(Task.state)).all())
    return {state: int(found.get(state, 0)) for state in STATES}
