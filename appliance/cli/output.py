"""Rendering for people (rich tables) and scripts (``--output json``)."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line for scripts


class Format(str, Enum):
    table = "table"
    json = "json"


OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table for people, json for scripts")]

COLUMNS: dict[str, list[tuple[str, str]]] = {
    "nodes": [("NAME", "name"), ("PHASE", "status.phase"), ("CPU", "status.inventory.threads"),
              ("MEMORY", "status.inventory.memory_bytes"), ("VIRT", "status.inventory.virt_type"),
              ("VERSION", "status.version.code"), ("SCHEMA", "status.version.schema"),
              ("HEARTBEAT", "status.last_heartbeat")],
    "tasks": [("ID", "id"), ("NAME", "name"), ("STATE", "state"), ("PROGRESS", "progress.percent"),
              ("MESSAGE", "progress.message"), ("RESOURCE", "resource.name"), ("CREATED", "created_at")],
    "projects": [("NAME", "name"), ("DESCRIPTION", "spec.description"), ("CREATED", "created_at")],
    "users": [("NAME", "name"), ("CLUSTER ROLE", "status.cluster_role"), ("ROLES", "status.roles")],
    "tokens": [("NAME", "name"), ("EXPIRES", "status.expires_at"), ("CREATED", "created_at")],
    "placement-groups": [("PROJECT", "project"), ("NAME", "name"), ("POLICY", "spec.policy")],
    "networks": [("PROJECT", "project"), ("NAME", "name"), ("VNI", "status.vni"), ("MTU", "spec.mtu"),
                 ("CIDR", "spec.cidr")],
    "subnets": [("PROJECT", "project"), ("NAME", "name"), ("NETWORK", "spec.network"), ("CIDR", "spec.cidr"),
                ("GATEWAY", "spec.gateway")],
    "ports": [("PROJECT", "project"), ("NAME", "name"), ("NETWORK", "spec.network"), ("MAC", "status.mac"),
              ("IPS", "status.ips")],
    "security-groups": [("PROJECT", "project"), ("NAME", "name"), ("RULES", "spec.rules")],
    "images": [("PROJECT", "project"), ("NAME", "name"), ("KIND", "spec.kind"), ("FORMAT", "spec.format")],
    "vms": [("PROJECT", "project"), ("NAME", "name"), ("STATE", "status.vm_state"), ("TASK", "status.task_state"),
            ("POWER", "status.power_state"), ("NODE", "status.node"), ("CPU", "spec.cpu"),
            ("MEMORY", "spec.memory_bytes")],
    "volumes": [("PROJECT", "project"), ("NAME", "name"), ("PHASE", "status.phase"), ("SIZE", "status.size_bytes"),
                ("CLASS", "status.class"), ("TASK", "status.task_state"), ("EXPORT", "status.export")],
    "pools": [("NAME", "name"), ("NODE", "status.node"), ("BACKEND", "spec.backend"), ("PHASE", "status.phase"),
              ("LOGICAL", "status.stats.logical_bytes"), ("STORED", "status.stats.stored_bytes"),
              ("DEDUP", "status.stats.dedup_ratio")],
    "snapshots": [("NAME", "name"), ("VOLUME", "volume"), ("SIZE", "size_bytes"), ("CREATED", "created_at")],
    "containers": [("PROJECT", "project"), ("NAME", "name"), ("STATE", "status.vm_state"),
                   ("POWER", "status.power_state"), ("NODE", "status.node"), ("IMAGE", "spec.image")],
    "routers": [("PROJECT", "project"), ("NAME", "name"), ("EXTERNAL", "status.external_address"),
                ("NODE", "status.node"), ("PHASE", "status.phase"), ("SUBNETS", "spec.interfaces")],
    "port-forwards": [("ID", "id"), ("PROTO", "protocol"), ("EXTERNAL", "external_port"),
                      ("TO", "internal_address"), ("PORT", "internal_port")],
    "audit": [("SEQ", "seq"), ("TIME", "time"), ("USER", "user"), ("FROM", "source"), ("ACTION", "action"),
              ("OBJECT", "object"), ("STATUS", "status"), ("OUTCOME", "outcome"), ("DETAIL", "detail")],
    "floating-ips": [("PROJECT", "project"), ("NAME", "name"), ("ADDRESS", "status.address"),
                     ("PORT", "spec.port"), ("FIXED", "status.fixed_address"), ("ROUTER", "status.router")],
}


def dig(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def human(value: Any, key: str = "") -> str:
    if value is None:
        return "-"
    if key.endswith("bytes") and isinstance(value, int):
        size = float(value)
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if size < 1024 or unit == "TiB":
                return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
            size /= 1024
    if isinstance(value, list):
        return ", ".join(human(v) if not isinstance(v, dict) else
                         "/".join(str(x) for x in v.values()) for v in value)
    return str(value)


def emit(data: Any, output: Format, kind: str | None = None) -> None:
    """Print ``data`` as JSON, or as a table / key-value view for people."""
    if output == Format.json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    if kind in COLUMNS and isinstance(data, list):
        table = Table(box=None, header_style="bold")
        for header, _ in COLUMNS[kind]:
            table.add_column(header)
        for item in data:
            table.add_row(*(human(dig(item, path), path) for _, path in COLUMNS[kind]))
        console.print(table)
        return
    console.print_json(json.dumps(data, default=str))
