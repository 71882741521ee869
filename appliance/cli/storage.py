"""``cairn volume|snapshot|pool …`` and ``cairn image upload``: storage from the shell.
Every write waits for its task (progress bar for people) unless ``--no-wait``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from appliance.cli.client import Client
from appliance.cli.common import NoWait, ProjectArg, client, fail, run, wait
from appliance.cli.output import Format, OutputOpt, emit, err_console

volume_app = typer.Typer(no_args_is_help=True, help="Volumes: dedup (NBD) or rbd block devices.")
snapshot_app = typer.Typer(no_args_is_help=True, help="Volume snapshots (O(1)).")
pool_app = typer.Typer(no_args_is_help=True, help="Storage pools and their space stats.")
SizeOpt = Annotated[str | None, typer.Option("--size", help="e.g. 10GiB")]


def _after(c: Client, task: dict[str, Any], output: Format, no_wait: bool,
           show: Callable[[dict[str, Any]], Any]) -> None:
    """Print the task at once with --no-wait; else follow it and print ``show(final task)``."""
    if no_wait:
        emit(task, output)
        return
    emit(show(wait(c, task, output)), output)


def _wait_then_show(c: Client, task: dict[str, Any], name: str, project: str, output: Format,
                    no_wait: bool) -> None:
    """Follow a volume task, then print the volume as it is now."""
    _after(c, task, output, no_wait, lambda _: run(lambda: c.get(f"/volumes/{name}", project=project)))


@volume_app.command("create")
def volume_create(name: str, size: SizeOpt = None,
                  pool: Annotated[str | None, typer.Option(help="default: 'default'")] = None,
                  storage_class: Annotated[str, typer.Option("--class", help="dedup or rbd")] = "dedup",
                  image: Annotated[str | None, typer.Option("--image", help="clone this image (O(1))")] = None,
                  project: ProjectArg = "default", no_wait: NoWait = False, output: OutputOpt = Format.table) -> None:
    """Create an empty volume, or one cloned from an image."""
    body: dict[str, Any] = {"name": name, "project": project, "class": storage_class}
    if size:
        body["size"] = size
    if pool:
        body["pool"] = pool
    if image:
        body["source"] = {"image": image}
    c = client()
    _wait_then_show(c, run(lambda: c.post("/volumes", body)), name, project, output, no_wait)


@volume_app.command("get")
def volume_get(name: str, project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    """Show a volume; ``status.export`` is its NBD URI (qemu-img, QEMU, nbdcopy)."""
    c = client()
    emit(run(lambda: c.get(f"/volumes/{name}", project=project)), output)


@volume_app.command("resize")
def volume_resize(name: str, size_arg: Annotated[str | None, typer.Argument(metavar="[SIZE]")] = None,
                  size: SizeOpt = None,
                  force: Annotated[bool, typer.Option(help="allow shrinking (loses data past the end)")] = False,
                  project: ProjectArg = "default", no_wait: NoWait = False, output: OutputOpt = Format.table) -> None:
    """Grow a volume (or shrink it with --force)."""
    new = size or size_arg
    if not new:
        fail("give the new size, e.g. `cairn volume resize data 20GiB`", 2)
    c = client()
    task = run(lambda: c.post(f"/volumes/{name}/resize?project={project}", {"size": new, "force": force}))
    _wait_then_show(c, task, name, project, output, no_wait)


@volume_app.command("delete")
def volume_delete(name: str, project: ProjectArg = "default", no_wait: NoWait = False,
                  output: OutputOpt = Format.table) -> None:
    """Delete a volume and its snapshots (space returns at the next garbage collection)."""
    c = client()
    task = run(lambda: c.request("DELETE", f"/volumes/{name}", params={"project": project}).json())
    _after(c, task, output, no_wait, lambda _: {"deleted": {"kind": "volume", "name": name}})


@volume_app.command("rollback")
def volume_rollback(name: str, snapshot: str, project: ProjectArg = "default", no_wait: NoWait = False,
                    output: OutputOpt = Format.table) -> None:
    """Make a volume's content a snapshot's again (O(1))."""
    c = client()
    task = run(lambda: c.post(f"/volumes/{name}/rollback?project={project}", {"snapshot": snapshot}))
    _wait_then_show(c, task, name, project, output, no_wait)


@volume_app.command("clone")
def volume_clone(source: Annotated[str, typer.Argument(metavar="VOLUME@SNAPSHOT")], new: str, size: SizeOpt = None,
                 project: ProjectArg = "default", no_wait: NoWait = False, output: OutputOpt = Format.table) -> None:
    """A new volume from a snapshot (O(1)); the two diverge independently."""
    volume, at, snap = source.partition("@")
    if not at or not volume or not snap:
        fail(f"give the source as VOLUME@SNAPSHOT, not {source!r}", 2)
    body: dict[str, Any] = {"snapshot": snap, "name": new}
    if size:
        body["size"] = size
    c = client()
    task = run(lambda: c.post(f"/volumes/{volume}/clone?project={project}", body))
    _wait_then_show(c, task, new, project, output, no_wait)


@snapshot_app.command("create")
def snapshot_create(volume: str, name: str, project: ProjectArg = "default", no_wait: NoWait = False,
                    output: OutputOpt = Format.table) -> None:
    """Snapshot a volume (O(1) whatever its size)."""
    c = client()
    task = run(lambda: c.post(f"/volumes/{volume}/snapshots?project={project}", {"name": name}))

    def show(_: Any) -> Any:
        items = run(lambda: c.get(f"/volumes/{volume}/snapshots", project=project))["items"]
        return next((s for s in items if s["name"] == name), {})

    _after(c, task, output, no_wait, show)


@snapshot_app.command("list")
def snapshot_list(volume: str, project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    """A volume's snapshots, oldest first."""
    c = client()
    emit(run(lambda: c.get(f"/volumes/{volume}/snapshots", project=project))["items"], output, "snapshots")


@snapshot_app.command("delete")
def snapshot_delete(volume: str, name: str, project: ProjectArg = "default", no_wait: NoWait = False,
                    output: OutputOpt = Format.table) -> None:
    """Forget a snapshot (its blocks go at the next GC unless still shared)."""
    c = client()
    task = run(lambda: c.request("DELETE", f"/volumes/{volume}/snapshots/{name}",
                                 params={"project": project}).json())
    _after(c, task, output, no_wait, lambda _: {"deleted": {"kind": "snapshot", "volume": volume, "name": name}})


@pool_app.command("get")
def pool_get(name: str, output: OutputOpt = Format.table) -> None:
    """A pool with its stats: logical and stored bytes, dedup and compression ratios."""
    c = client()
    pool = run(lambda: c.get(f"/pools/{name}"))
    if output == Format.json:
        emit(pool, output)
        return
    emit(pool, output)
    stats = (pool.get("status") or {}).get("stats") or {}
    if stats:
        _draw_space(stats)


def _draw_space(stats: dict[str, Any]) -> None:
    """Logical vs stored as two bars: the picture of what dedup and compression save."""
    logical = max(int(stats.get("logical_bytes", 0)), 1)
    width = 40
    for label, value in (("logical", stats.get("logical_bytes", 0)), ("unique", stats.get("unique_bytes", 0)),
                         ("stored", stats.get("stored_bytes", 0))):
        bar = "█" * max(1 if value else 0, round(width * int(value) / logical))
        err_console.print(f"{label:>8} {bar:<{width}} {int(value) / (1 << 20):,.1f} MiB")
    err_console.print(f"   dedup {float(stats.get('dedup_ratio', 1)):.2f}×   "
                      f"compression {float(stats.get('compression_ratio', 1)):.2f}×")


@pool_app.command("create")
def pool_create(name: str, node: Annotated[str, typer.Option(help="the node that serves it")],
                url: Annotated[str, typer.Option(help="directory, or rados://<pool>/<ns>?conf=...")],
                backend: Annotated[str, typer.Option(help="local or rados")] = "local",
                chunk_size: Annotated[int, typer.Option(help="dedup block size")] = 65536,
                output: OutputOpt = Format.table) -> None:
    """Add a storage pool (cluster admins)."""
    c = client()
    emit(run(lambda: c.post("/pools", {"name": name, "node": node, "backend": backend, "url": url,
                                       "chunk_size": chunk_size})), output)


def _chunks(path: Path, bar: Progress, row: Any) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            bar.update(row, advance=len(chunk))
            yield chunk


def image_upload(file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)], name: str,
                 fmt: Annotated[str | None, typer.Option("--format", help="raw or qcow2 (default: detect)")] = None,
                 pool: Annotated[str | None, typer.Option(help="default: 'default'")] = None,
                 storage_class: Annotated[str, typer.Option("--class", help="dedup or rbd (a Ceph pool)")] = "dedup",
                 project: ProjectArg = "default", no_wait: NoWait = False, output: OutputOpt = Format.table) -> None:
    """Upload a raw or qcow2 disk image; VMs then clone it in O(1) (their root volumes
    have the image's class)."""
    c = client()
    params = {k: v for k, v in {"project": project, "format": fmt, "pool": pool, "class": storage_class}.items()
              if v}
    quiet = output == Format.json or not err_console.is_terminal
    with Progress(TextColumn("upload"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=err_console,
                  disable=quiet) as bar:
        row = bar.add_task("upload", total=file.stat().st_size)
        task = run(lambda: c.request("PUT", f"/images/{name}/upload", params=params,
                                     content=_chunks(file, bar, row),
                                     headers={"Content-Type": "application/octet-stream"}, timeout=None).json())
    _after(c, task, output, no_wait, lambda _: run(lambda: c.get(f"/images/{name}", project=project)))


vm_snapshot_app = typer.Typer(no_args_is_help=True, help="VM snapshots: all of a VM's volumes at once.")


@vm_snapshot_app.command("create")
def vm_snapshot_create(vm: str, name: str, project: ProjectArg = "default", no_wait: NoWait = False,
                       memory_state: Annotated[bool, typer.Option(
                           "--memory-state", help="keep its RAM too: a restore resumes it where it was")] = False,
                       output: OutputOpt = Format.table) -> None:
    """Snapshot every volume of a VM together (a running VM pauses for that moment)."""
    c = client()
    task = run(lambda: c.post(f"/vms/{vm}/snapshots?project={project}", {"name": name, "memory_state": memory_state}))
    _after(c, task, output, no_wait, lambda final: final["result"])


@vm_snapshot_app.command("list")
def vm_snapshot_list(vm: str, project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    c = client()
    emit(run(lambda: c.get(f"/vms/{vm}/snapshots", project=project))["items"], output)


@vm_snapshot_app.command("delete")
def vm_snapshot_delete(vm: str, name: str, project: ProjectArg = "default", no_wait: NoWait = False,
                       output: OutputOpt = Format.table) -> None:
    c = client()
    task = run(lambda: c.request("DELETE", f"/vms/{vm}/snapshots/{name}", params={"project": project}).json())
    _after(c, task, output, no_wait, lambda _: {"deleted": {"kind": "vm-snapshot", "vm": vm, "name": name}})


def vm_restore(vm: str, snapshot: str, project: ProjectArg = "default", no_wait: NoWait = False,
               output: OutputOpt = Format.table) -> None:
    """Roll every volume of a stopped VM back to a snapshot (one with memory resumes it where it was)."""
    c = client()
    task = run(lambda: c.post(f"/vms/{vm}/restore?project={project}", {"snapshot": snapshot}))
    _after(c, task, output, no_wait, lambda _: run(lambda: c.get(f"/vms/{vm}", project=project)))


def vm_clone(source: Annotated[str, typer.Argument(metavar="VM@SNAPSHOT")], new: str, project: ProjectArg = "default",
             no_wait: NoWait = False, output: OutputOpt = Format.table) -> None:
    """A new VM on O(1) clones of a snapshot's volumes."""
    vm, at, snap = source.partition("@")
    if not at or not vm or not snap:
        fail(f"give the source as VM@SNAPSHOT, not {source!r}", 2)
    c = client()
    task = run(lambda: c.post(f"/vms/{vm}/clone?project={project}", {"snapshot": snap, "name": new}))
    _after(c, task, output, no_wait, lambda _: run(lambda: c.get(f"/vms/{new}", project=project)))


def register(app: typer.Typer, image_app: typer.Typer, vm_app: typer.Typer) -> None:
    vm_app.add_typer(vm_snapshot_app, name="snapshot")
    vm_app.command("restore")(vm_restore)
    vm_app.command("clone")(vm_clone)
    app.add_typer(volume_app, name="volume")
    app.add_typer(snapshot_app, name="snapshot")
    app.add_typer(pool_app, name="pool")
    image_app.command("upload")(image_upload)
