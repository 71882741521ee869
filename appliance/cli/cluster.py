"""``cairn cluster …`` (forming and inspecting a cluster) and ``cairn lab …`` (a cluster of
namespaced nodes on this machine, for trying things and for the tests)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from appliance.cli import common, local
from appliance.cli.common import fail, run
from appliance.cli.output import Format, OutputOpt, console, emit, err_console

cluster_app = typer.Typer(no_args_is_help=True, help="Form, join and inspect a cluster of Cairn nodes.")
token_app = typer.Typer(no_args_is_help=True, help="Join tokens (short-lived, single-use).")
cluster_app.add_typer(token_app, name="token")
lab_app = typer.Typer(no_args_is_help=True,
                      help="A lab cluster on this machine: nodes in their own namespaces, to kill, cut and heal.")
LabDir = Annotated[Path | None, typer.Option("--dir", help="the lab's folder (default $CAIRN_LAB_DIR or "
                                                             "/var/lib/cairn-lab)")]
Osd = Annotated[list[str] | None, typer.Option("--osd", help="a data disk for Ceph (block device, or "
                                                              "file:<bytes> for a sparse file); repeatable")]


class TimingChoice(str, Enum):  # appliance.cluster.config.TIMING_PROFILES
    fast = "fast"
    relaxed = "relaxed"


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
    app.add_typer(lab_app, name="lab")


def _local(fn: Any) -> Any:
    from appliance.errors import CairnError

    try:
        return fn()
    except CairnError as exc:
        fail(exc.detail)


# --- cluster ----------------------------------------------------------------------------------

@cluster_app.command("init")
def init(address: Annotated[str | None, typer.Option(help="this node's cluster-network address "
                                                          "(default: the underlay NIC's)")] = None,
         osd: Osd = None, name: Annotated[str, typer.Option(help="the cluster's name")] = "cairn",
         timing: Annotated[TimingChoice, typer.Option(
             help="fast: dedicated hardware, failover in about 20 s; relaxed: slow or oversubscribed "
                  "machines (emulated nodes), failover in about a minute. Every joiner inherits it")
         ] = TimingChoice.fast,
         timeout: Annotated[float, typer.Option(help="seconds to wait for the node")] = 300,
         output: OutputOpt = Format.table) -> None:
    """Make this node the first member: etcd, PostgreSQL under Patroni, Redis + Sentinel,
    a Ceph monitor, manager and OSDs, and the cluster CA; then start it."""
    from appliance.cluster import formation
    from appliance.settings import get_settings

    cfg = _local(lambda: formation.init(get_settings(), address, osd, name, timing.value))
    info = local.up(timeout, quiet=output == Format.json)
    emit({"cluster": cfg.name, "cluster_id": cfg.cluster_id, "node": cfg.node, "address": cfg.address,
          "timing": cfg.timing, **info}, output)


@cluster_app.command("join")
def join(member: Annotated[str, typer.Argument(help="address of any member")],
         token: Annotated[str, typer.Argument(help="from `cairn cluster token create` on a member")],
         address: Annotated[str | None, typer.Option(help="this node's cluster-network address")] = None,
         osd: Osd = None, timeout: Annotated[float, typer.Option()] = 300,
         output: OutputOpt = Format.table) -> None:
    """Join a cluster: the member's CA is checked against the token, this node's certificate
    is signed, and it becomes an etcd member, a database replica, a Redis replica with a
    Sentinel, a Ceph monitor (up to three) with its data disks as OSDs."""
    from appliance.cluster import formation
    from appliance.settings import get_settings

    cfg = _local(lambda: formation.join(get_settings(), member, token, address, osd))
    info = local.up(timeout, quiet=output == Format.json)
    emit({"cluster": cfg.name, "cluster_id": cfg.cluster_id, "node": cfg.node, "address": cfg.address, **info},
         output)


@cluster_app.command("status")
def status(output: OutputOpt = Format.table) -> None:
    """Members and their roles, quorum, the database primary, Ceph health."""
    c = common.client()
    view = run(lambda: c.get("/cluster"))
    if output == Format.json:
        emit(view, output)
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("NAME", "ADDRESS", "READY", "ROLES"):
        table.add_column(col)
    for m in view["members"]:
        table.add_row(m["name"], m["address"], "yes" if m["ready"] else "[red]no[/red]", ", ".join(m["roles"]))
    console.print(table)
    db = view.get("database", {})
    console.print(f"quorum: {'yes' if view['quorum'] else '[red]NO[/red]'}   database primary: "
                  f"{db.get('primary') or '[red]none[/red]'}   ceph: {view.get('ceph', {}).get('health')}")


@cluster_app.command("remove")
def remove(node: str, output: OutputOpt = Format.table) -> None:
    """Take a node that is down out of the cluster for good."""
    c = common.client()
    emit(run(lambda: c.request("DELETE", f"/cluster/members/{node}").json()), output)


@token_app.command("create")
def token_create(ttl: Annotated[int, typer.Option("--ttl", help="seconds the token is valid")] = 900,
                 output: OutputOpt = Format.table) -> None:
    """A join token for one new node (shown once)."""
    c = common.client()
    emit(run(lambda: c.post("/cluster/tokens", {"ttl_seconds": ttl})), output)


@token_app.command("list")
def token_list(output: OutputOpt = Format.table) -> None:
    """Join tokens: expiry, and the node that used each (secrets are never shown again)."""
    c = common.client()
    emit(run(lambda: c.get("/cluster/tokens")), output)


# --- lab --------------------------------------------------------------------------------------

def _lab(fn: Any) -> Any:
    from appliance.lab.host import LabError

    try:
        return fn()
    except (LabError, FileNotFoundError, KeyError) as exc:
        fail(str(exc).strip("'\""))


@lab_app.command("up")
def lab_up(nodes: Annotated[int, typer.Option(help="how many nodes")] = 3, directory: LabDir = None,
           osd_size: Annotated[int, typer.Option(help="bytes of each node's sparse OSD file")] = 8 << 30,
           timeout: Annotated[float, typer.Option()] = 600, output: OutputOpt = Format.table) -> None:
    """Build the lab and form its cluster (node 1 inits, the others join)."""
    from appliance.lab import ops

    def say(msg: str) -> None:
        if output != Format.json:
            err_console.print(f"[bold]==>[/bold] {msg}")

    info = _lab(lambda: ops.up(nodes, directory, osd_size, timeout, progress=say))
    if output == Format.json:
        emit(info, output)
        return
    console.print(f"Lab cluster up in {info['seconds']} s ({info['dir']}):")
    for n in info["nodes"]:
        console.print(f"  {n['name']}  {n['api']}  (`cairn --node {n['name']} …`)")


@lab_app.command("add")
def lab_add(directory: LabDir = None, join: Annotated[bool, typer.Option("--join/--no-join")] = True,
            osd_size: Annotated[int, typer.Option(help="bytes of the node's sparse OSD file")] = 8 << 30,
            output: OutputOpt = Format.table) -> None:
    """Cable one more node into the lab and join it to the cluster (scale out)."""
    from appliance.lab import ops

    emit(_lab(lambda: ops.add_node(directory, join, osd_size=osd_size)), output)


@lab_app.command("remove")
def lab_remove(node: str, directory: LabDir = None, output: OutputOpt = Format.table) -> None:
    """Take a node out of the lab for good (after `cairn cluster remove` took it out of the cluster)."""
    from appliance.lab import ops

    emit(_lab(lambda: ops.remove_node(node, directory)), output)


@lab_app.command("restart")
def lab_restart(node: str, directory: LabDir = None, output: OutputOpt = Format.table) -> None:
    """Reboot a node cleanly (new boot id, the code as checked out now)."""
    from appliance.lab import ops

    emit(_lab(lambda: ops.restart(node, directory)), output)


@lab_app.command("upgrade")
def lab_upgrade(directory: LabDir = None, only: Annotated[list[str] | None, typer.Option(
                    "--only", help="these nodes, in this order (default: all)")] = None,
                output: OutputOpt = Format.table) -> None:
    """Rolling upgrade: node by node, drain, reboot onto the current code, undrain."""
    from appliance.lab import ops

    def say(msg: str) -> None:
        if output != Format.json:
            err_console.print(f"[bold]==>[/bold] {msg}")

    emit(_lab(lambda: ops.upgrade(directory, only, progress=say)), output)


@lab_app.command("status")
def lab_status(directory: LabDir = None, output: OutputOpt = Format.table) -> None:
    """Each node: running, cable, API URL, memory (PSS) and CPU used."""
    from appliance.lab import ops

    info = _lab(lambda: ops.status(directory))
    if output == Format.json:
        emit(info, output)
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("NODE", "ADDRESS", "RUNNING", "CABLE", "PSS MiB", "CPU s", "API"):
        table.add_column(col)
    for n in info["nodes"]:
        table.add_row(n["name"], n["address"], "yes" if n["running"] else "[red]no[/red]", n["cable"],
                      str(n.get("pss_mib", "-")), f"{n.get('cpu_seconds', 0):.0f}", n["api"])
    console.print(table)


@lab_app.command("kill")
def lab_kill(node: str, directory: LabDir = None, output: OutputOpt = Format.table) -> None:
    """SIGKILL every process of a node at once (its cgroup): a power cut."""
    from appliance.lab import ops

    emit(_lab(lambda: ops.kill(node, directory)), output)


@lab_app.command("partition")
def lab_partition(node: str, directory: LabDir = None, output: OutputOpt = Format.table) -> None:
    """Cut a node's underlay cable: it keeps running, cut off from the others."""
    from appliance.lab import ops

    emit(_lab(lambda: ops.partition(node, directory)), output)


@lab_app.command("heal")
def lab_heal(directory: LabDir = None, wait: Annotated[bool, typer.Option("--wait/--no-wait")] = True,
             output: OutputOpt = Format.table) -> None:
    """Plug every cable back and boot every node that is down."""
    from appliance.lab import ops

    emit(_lab(lambda: ops.heal(directory, wait)), output)


@lab_app.command("down")
def lab_down(directory: LabDir = None, output: OutputOpt = Format.table) -> None:
    """Remove everything the lab made (also after a crash of the lab tool)."""
    from appliance.lab import ops

    emit(_lab(lambda: ops.down(directory)), output)
