"""``cairn audit …``, ``cairn project quota …`` and the user commands a cluster admin
(or a user for their own password) needs: disable, enable, set-password, password."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from appliance.cli import common
from appliance.cli.common import fail, run
from appliance.cli.output import Format, OutputOpt, emit
from appliance.errors import CairnError
from appliance.services.units import parse_size

audit_app = typer.Typer(no_args_is_help=True, help="The audit log: every write to the API (cluster admins).")
quota_app = typer.Typer(no_args_is_help=True, help="Project quotas (cluster admins set them).")
Limit = Annotated[str | None, typer.Option(help="a number, or 'unlimited'")]
SIZES = ("memory_bytes", "volume_bytes")


def register(app: typer.Typer, project_app: typer.Typer, user_app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
    project_app.add_typer(quota_app, name="quota")
    for command in (user_disable, user_enable, user_set_password, user_password):
        user_app.command(command.__name__.removeprefix("user_").replace("_", "-"))(command)


@audit_app.command("list")
def audit_list(user: Annotated[str | None, typer.Option(help="only this user's writes")] = None,
               outcome: Annotated[str | None, typer.Option(help="ok, denied, refused or failed")] = None,
               since: Annotated[str | None, typer.Option(help="ISO 8601 time, e.g. 2026-01-31T00:00:00Z")] = None,
               limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 100,
               output: OutputOpt = Format.table) -> None:
    """Who wrote what, from where, on which object, and how it ended (newest first)."""
    c = common.client()
    page = run(lambda: c.get("/audit", user=user, outcome=outcome, since=since, limit=min(limit, 1000)))
    rows = page["items"][:limit]
    if output == Format.json:
        emit(rows, output)
        return
    flat = [{**r, "object": "/".join(filter(None, (r["object"]["project"], r["object"]["kind"],
                                                   r["object"]["name"])))} for r in rows]
    emit(flat, output, "audit")


def _limit(key: str, value: str) -> int | None:
    if value.lower() in ("unlimited", "none", "-"):
        return None
    try:
        number = parse_size(value) if key in SIZES else int(value)
    except (ValueError, CairnError) as exc:
        fail(f"--{key.replace('_', '-')}: {exc}", 2)
    if number < 0:
        fail(f"--{key.replace('_', '-')} must not be negative", 2)
    return number


@quota_app.command("show")
def quota_show(project: str, output: OutputOpt = Format.table) -> None:
    """A project's limits and what it uses now."""
    c = common.client()
    emit(run(lambda: c.get(f"/projects/{project}/quota")), output)


@quota_app.command("set")
def quota_set(project: str, instances: Limit = None, cpu: Limit = None,
              memory: Annotated[str | None, typer.Option(help="e.g. 64GiB, or 'unlimited'")] = None,
              volume_bytes: Annotated[str | None, typer.Option(help="e.g. 2TiB, or 'unlimited'")] = None,
              snapshots: Limit = None, networks: Limit = None, floating_ips: Limit = None,
              routers: Limit = None, output: OutputOpt = Format.table) -> None:
    """Change some of a project's limits (the others stay as they are)."""
    given: dict[str, Any] = {"instances": instances, "cpu": cpu, "memory_bytes": memory,
                             "volume_bytes": volume_bytes, "snapshots": snapshots, "networks": networks,
                             "floating_ips": floating_ips, "routers": routers}
    c = common.client()
    limits = dict(run(lambda: c.get(f"/projects/{project}/quota"))["limits"])
    for key, value in given.items():
        if value is not None:
            limits[key] = _limit(key, value)
    emit(run(lambda: c.request("PUT", f"/projects/{project}/quota", json=limits).json()), output)


def _patch_user(name: str, body: dict[str, Any], output: Format) -> None:
    c = common.client()
    emit(run(lambda: c.request("PATCH", f"/users/{name}", json=body).json()), output)


def user_disable(name: str, output: OutputOpt = Format.table) -> None:
    """Disable a user: their tokens and sessions stop working at once, their streams close."""
    _patch_user(name, {"active": False}, output)


def user_enable(name: str, output: OutputOpt = Format.table) -> None:
    _patch_user(name, {"active": True}, output)


def user_set_password(name: str, password: Annotated[str, typer.Option(prompt=True, hide_input=True,
                                                                       confirmation_prompt=True)],
                      output: OutputOpt = Format.table) -> None:
    """Reset a user's password (cluster admins); their console sessions end."""
    _patch_user(name, {"password": password}, output)


def user_password(current: Annotated[str, typer.Option(prompt="Current password", hide_input=True)],
                  new: Annotated[str, typer.Option(prompt="New password", hide_input=True,
                                                   confirmation_prompt=True)],
                  output: OutputOpt = Format.table) -> None:
    """Change your own password."""
    c = common.client()
    run(lambda: c.request("POST", "/auth/password", json={"current_password": current, "new_password": new}))
    emit({"password": "changed"}, output)
