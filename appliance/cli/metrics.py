"""``cairn node|vm|container|pool metrics``: the latest value of each history series
(``--range`` and ``-o json`` give the whole series, as the API serves it)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.table import Table

from appliance.cli.common import ProjectArg, client, run
from appliance.cli.output import Format, OutputOpt, console, emit

RangeOpt = Annotated[str, typer.Option("--range", help="hour, day or week")]


def latest(history: dict[str, Any]) -> list[dict[str, Any]]:
    """Each series' newest point: name, value, unit, time (None when nothing was sampled)
    and what the series is."""
    out = []
    for s in history.get("series", []):
        t, v = s["points"][-1] if s["points"] else (None, None)
        out.append({"name": s["name"], "value": v, "unit": s["unit"], "time": t, "label": s.get("label", "")})
    return out


def show(value: float | None, unit: str) -> str:
    """A value for people: 12.3 %, 1.5 GiB, 4.0 MiB/s, 120 ops/s, 2.41x."""
    if value is None:
        return "-"
    if unit == "percent":
        return f"{value:.1f} %"
    if unit == "ratio":
        return f"{value:.2f}x"
    if unit.startswith("bytes"):
        suffix = unit[len("bytes"):]
        size = float(value)
        for name in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
            if abs(size) < 1024 or name == "PiB":
                return f"{size:.0f} {name}{suffix}" if name == "B" else f"{size:.1f} {name}{suffix}"
            size /= 1024
    return f"{value:.1f} {unit}"


def _print(path: str, span: str, output: Format, **params: str) -> None:
    c = client()
    history = run(lambda: c.get(path, range=span, **params))
    if output == Format.json:
        emit(history, output)
        return
    table = Table(box=None, header_style="bold")
    for header in ("SERIES", "LATEST", "AT", "WHAT"):
        table.add_column(header)
    for row in latest(history):
        at = datetime.fromtimestamp(row["time"]).strftime("%H:%M:%S") if row["time"] else "-"
        table.add_row(row["name"], show(row["value"], row["unit"]), at, row["label"])
    console.print(table)


def register(node_app: typer.Typer, vm_app: typer.Typer, container_app: typer.Typer,
             pool_app: typer.Typer) -> None:
    @node_app.command("metrics")
    def node_metrics(name: str, span: RangeOpt = "hour", output: OutputOpt = Format.table) -> None:
        """Latest CPU, memory, network and disk figures of a node (the graphs' last points)."""
        _print(f"/nodes/{quote(name)}/metrics", span, output)

    @vm_app.command("metrics")
    def vm_metrics(name: str, project: ProjectArg = "default", span: RangeOpt = "hour",
                   output: OutputOpt = Format.table) -> None:
        """Latest CPU, memory, network and disk figures of a VM (memory: what its guest uses, when
        it reports it; memory_host: what its QEMU process holds on the host)."""
        _print(f"/vms/{quote(name)}/metrics", span, output, project=project)

    @container_app.command("metrics")
    def container_metrics(name: str, project: ProjectArg = "default", span: RangeOpt = "hour",
                          output: OutputOpt = Format.table) -> None:
        """Latest CPU, memory, network and disk figures of a container."""
        _print(f"/containers/{quote(name)}/metrics", span, output, project=project)

    @pool_app.command("metrics")
    def pool_metrics(name: str, span: RangeOpt = "hour", output: OutputOpt = Format.table) -> None:
        """Latest logical / stored bytes and dedup / compression ratios of a pool."""
        _print(f"/pools/{quote(name)}/metrics", span, output)
