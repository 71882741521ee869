"""Tasks: long operations with progress; cancel."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from appliance.api.deps import Caller, DbSession, access
from appliance.api.schemas import Limit, TaskList, TaskPublic
from appliance.services import tasks

router = APIRouter(prefix="/tasks", tags=["tasks"])
TaskState = Literal["pending", "running", "succeeded", "failed", "cancelled"]


def accepted(task: dict[str, Any]) -> JSONResponse:
    """202 + Location, the shape of every long write."""
    return JSONResponse(task, status_code=202, headers={"Location": f"/api/v1/tasks/{task['id']}"})


@router.get("", response_model=TaskList, openapi_extra=access("authenticated"))
def list_tasks(session: DbSession, caller: Caller, limit: Limit = 100, cursor: str | None = None,
               state: TaskState | None = None, name: str | None = None) -> dict[str, Any]:
    """Newest first; the tasks of the projects you can see."""
    items, nxt = tasks.list_(session, caller, limit, cursor, state, name)
    return {"items": items, "next_cursor": nxt}


@router.get("/{task_id}", response_model=TaskPublic, openapi_extra=access("project:read"))
def get_task(task_id: str, session: DbSession, caller: Caller) -> dict[str, Any]:
    return tasks.get(session, caller, task_id)


@router.post("/{task_id}/cancel", status_code=202, response_model=TaskPublic,
             openapi_extra=access("project:write"))
def cancel_task(task_id: str, session: DbSession, caller: Caller) -> JSONResponse:
    return accepted(tasks.cancel(session, caller, task_id))
