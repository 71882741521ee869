"""What viewers do not see. A container's ``env`` and a VM's cloud-init ``user_data``
routinely carry passwords and keys, and an exec's command line and output may too, so
only callers who may write in the project (operators and admins) get them; viewers
get the same shapes with the values hidden. Applied wherever they could leak: the
instance routes, task routes and the event stream."""

from __future__ import annotations

from typing import Any

from appliance.services.principal import Principal

HIDDEN = "(hidden: needs the operator role)"
SECRET_TASKS = ("container.exec",)


def may_see(principal: Principal, project_id: str | None) -> bool:
    return principal.can_project(project_id, "write") if project_id else principal.can_cluster("write")


def instance(data: dict[str, Any]) -> dict[str, Any]:
    spec = dict(data.get("spec") or {})
    if spec.get("env"):
        spec["env"] = {key: HIDDEN for key in spec["env"]}
    if spec.get("user_data") is not None:
        spec["user_data"] = HIDDEN
    return {**data, "spec": spec}


def task(data: dict[str, Any]) -> dict[str, Any]:
    if data.get("name") not in SECRET_TASKS:
        return data
    params = dict(data.get("params") or {})
    if "command" in params:
        params["command"] = [HIDDEN]
    result = data.get("result")
    if isinstance(result, dict):
        result = {k: (HIDDEN if k in ("stdout", "stderr") else v) for k, v in result.items()}
    return {**data, "params": params, "result": result}


def event_object(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    if kind in ("vm", "container"):
        return instance(obj)
    if kind == "task":
        return task(obj)
    return obj
