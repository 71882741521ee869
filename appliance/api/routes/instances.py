"""VMs and containers: the same routes, the same flow, the same shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, PlainTextResponse

from appliance.api.deps import AppSettings, Caller, DbSession, access
from appliance.api.routes.tasks import accepted
from appliance.api.schemas import (
    ContainerCreate,
    ExecRequest,
    Limit,
    Metrics,
    MetricsRange,
    MigrateRequest,
    Name,
    ResourceList,
    ResourcePublic,
    VmClone,
    VmCreate,
    VmSnapshotCreate,
    VolumeRollback,
)
from appliance.errors import Conflict
from appliance.services import history, instances, vm_snapshots

router = APIRouter(tags=["vms", "containers"])
ProjectQuery = Annotated[str, Query(min_length=1, max_length=63, description="project name")]
Action = Literal["start", "stop", "reboot", "pause", "resume"]
StopTimeout = Annotated[float, Query(ge=0, le=3600, description="stop: graceful seconds before power-off")]


def _create(kind: str, body: VmCreate | ContainerCreate, session: Any, caller: Any) -> JSONResponse:
    spec = body.spec.model_dump(exclude_none=True)
    return accepted(instances.create(session, caller, kind, body.project, body.name, spec))


@router.post("/vms", status_code=202, openapi_extra=access("project:write"))
def create_vm(body: VmCreate, session: DbSession, caller: Caller) -> JSONResponse:
    """Answers 202: the task reports schedule → volumes → ports → define → start."""
    return _create("vm", body, session, caller)


@router.post("/containers", status_code=202, openapi_extra=access("project:write"))
def create_container(body: ContainerCreate, session: DbSession, caller: Caller) -> JSONResponse:
    """Answers 202: the task reports schedule → volumes → ports → define → start."""
    return _create("container", body, session, caller)


@router.post("/containers/{name}/exec", status_code=202, openapi_extra=access("project:write"))
def exec_in_container(name: Name, body: ExecRequest, session: DbSession, caller: Caller,
                      project: ProjectQuery = "default") -> JSONResponse:
    """Run a command in a running container (plain or ``isolation: vm``); the task's result
    has returncode, stdout, stderr (with ``tty``, everything in stdout)."""
    return accepted(instances.exec_(session, caller, project, name, body.command, body.timeout, body.tty))


@router.post("/vms/{name}/migrate", status_code=202, openapi_extra=access("project:write"))
def migrate_vm(name: Name, body: MigrateRequest, session: DbSession, caller: Caller,
               project: ProjectQuery = "default") -> JSONResponse:
    """Live migration: the guest keeps running; its port and network disks follow.
    The task result has the duration and the downtime the hypervisor measured."""
    return accepted(instances.migrate(session, caller, "vm", project, name, body.to))


@router.post("/containers/{name}/migrate", status_code=202, openapi_extra=access("project:write"))
def migrate_container(name: Name, body: MigrateRequest, session: DbSession, caller: Caller,
                      project: ProjectQuery = "default") -> JSONResponse:
    """Containers cannot move live: this restarts the container on the target node
    (task result ``mode: restart``)."""
    return accepted(instances.migrate(session, caller, "container", project, name, body.to))


@router.get("/vms/{name}/snapshots", openapi_extra=access("project:read"))
def list_vm_snapshots(name: Name, session: DbSession, caller: Caller,
                      project: ProjectQuery = "default") -> dict[str, Any]:
    return {"items": vm_snapshots.list_(session, caller, project, name)}


@router.post("/vms/{name}/snapshots", status_code=202, openapi_extra=access("project:write"))
def create_vm_snapshot(name: Name, body: VmSnapshotCreate, session: DbSession, caller: Caller,
                       project: ProjectQuery = "default") -> JSONResponse:
    """Snapshot every volume of the VM together (a running VM is paused for that moment);
    with ``memory_state`` its RAM too, so that a restore resumes it where it was."""
    return accepted(vm_snapshots.create(session, caller, project, name, body.name, body.memory_state))


@router.delete("/vms/{name}/snapshots/{snapshot}", status_code=202, openapi_extra=access("project:write"))
def delete_vm_snapshot(name: Name, snapshot: Name, session: DbSession, caller: Caller,
                       project: ProjectQuery = "default") -> JSONResponse:
    return accepted(vm_snapshots.delete(session, caller, project, name, snapshot))


@router.post("/vms/{name}/restore", status_code=202, openapi_extra=access("project:write"))
def restore_vm(name: Name, body: VolumeRollback, session: DbSession, caller: Caller,
               project: ProjectQuery = "default") -> JSONResponse:
    """Roll every volume of a stopped VM back to a snapshot; one with its memory state
    resumes running where it was."""
    return accepted(vm_snapshots.restore(session, caller, project, name, body.snapshot))


@router.post("/vms/{name}/clone", status_code=202, openapi_extra=access("project:write"))
def clone_vm(name: Name, body: VmClone, session: DbSession, caller: Caller,
             project: ProjectQuery = "default") -> JSONResponse:
    """A new VM on O(1) clones of a snapshot's volumes (new ports, same networks)."""
    return accepted(vm_snapshots.clone(session, caller, project, name, body.snapshot, body.name))


def _routes(kind: str, plural: str) -> None:
    base = f"/{plural}"

    @router.get(base, response_model=ResourceList, openapi_extra=access("authenticated"),
                name=f"list_{plural}")
    def list_(session: DbSession, caller: Caller, limit: Limit = 100, cursor: str | None = None,
              project: Annotated[str | None, Query(max_length=63)] = None,
              q: Annotated[str | None, Query(max_length=63, description="names containing this")] = None,
              state: Annotated[str | None, Query(max_length=16, pattern=r"^[a-z-]+$",
                                                 description="vm_state: active, stopped, error...")] = None,
              node: Annotated[str | None, Query(max_length=63, description="placed on this node")] = None,
              ) -> dict[str, Any]:
        """By project, then name; filtered in the database (thousands list fast)."""
        items, nxt = instances.list_filtered(session, caller, kind, project, limit, cursor, q, state, node)
        return {"items": items, "next_cursor": nxt}

    @router.get(base + "/{name}", response_model=ResourcePublic, openapi_extra=access("project:read"),
                name=f"get_{kind}")
    def get(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> dict[str, Any]:
        return instances.KINDS[kind].get(session, caller, project, name)

    @router.delete(base + "/{name}", status_code=202, openapi_extra=access("project:write"), name=f"delete_{kind}")
    def delete(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> JSONResponse:
        return accepted(instances.delete(session, caller, kind, project, name))

    @router.get(base + "/{name}/metrics", response_model=Metrics, openapi_extra=access("project:read"),
                name=f"metrics_of_{kind}")
    def metrics(name: Name, session: DbSession, caller: Caller, settings: AppSettings,
                project: ProjectQuery = "default", range: MetricsRange = "hour") -> dict[str, Any]:
        """History: CPU (percent of its vCPUs or CPU limit), memory, network in/out, disk
        read/write bytes and operations per second, over the last hour, day or week, across
        the nodes it ran on. Any member answers."""
        return history.instance(session, caller, settings, kind, project, name, range)

    @router.post(base + "/{name}/{action}", status_code=202, openapi_extra=access("project:write"),
                 name=f"act_on_{kind}")
    def act(name: Name, action: Action, session: DbSession, caller: Caller, project: ProjectQuery = "default",
            timeout: StopTimeout = 30) -> JSONResponse:
        """start / stop (graceful, then forced) / reboot / pause / resume; 409 if another
        operation holds the instance."""
        params = {"stop_timeout": timeout} if action == "stop" else {}
        return accepted(instances.action(session, caller, kind, project, name, action, params))

    @router.get(base + "/{name}/console-log", openapi_extra=access("project:read"), name=f"console_log_{kind}",
                response_class=PlainTextResponse)
    def console_log(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default",
                    tail: Annotated[int, Query(ge=1, le=1 << 20)] = 65536) -> PlainTextResponse:
        """What the serial console (VM) or the process (container) printed so far."""
        data = instances.KINDS[kind].get(session, caller, project, name)
        logs = [c["path"] for c in data["status"].get("consoles", []) if c["kind"] == "log"]
        if not logs or not Path(logs[0]).exists():
            raise Conflict(f"{kind} '{name}' has no console log on this node yet "
                           f"(node {data['status'].get('node', '?')})")
        with open(logs[0], "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - tail))
            return PlainTextResponse(f.read().decode(errors="replace"))


_routes("vm", "vms")
_routes("container", "containers")
