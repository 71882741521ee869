"""``cairn``: the command line over the REST API. Every command takes
``--output json`` for scripts."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from appliance.cli import admin as admin_cli
from appliance.cli import cluster as cluster_cli
from appliance.cli import local
from appliance.cli import metrics as metrics_cli
from appliance.cli import routers as routers_cli
from appliance.cli import storage as storage_cli
from appliance.cli.client import Client, load_config, save_config
from appliance.cli.common import NoWait, ProjectArg, client, fail, follow, run
from appliance.cli.output import Format, OutputOpt, emit, err_console

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Cairn hyperconverged appliance: VMs, containers, volumes, networks.")
task_app = typer.Typer(no_args_is_help=True, help="Follow and cancel tasks.")
node_app = typer.Typer(no_args_is_help=True, help="Node operations.")
token_app = typer.Typer(no_args_is_help=True, help="Your API tokens.")
user_app = typer.Typer(no_args_is_help=True, help="Users (cluster admins).")
project_app = typer.Typer(no_args_is_help=True, help="Projects and their members.")
app.add_typer(task_app, name="task")
app.add_typer(node_app, name="node")
app.add_typer(token_app, name="token")
app.add_typer(user_app, name="user")
app.add_typer(project_app, name="project")
network_app = typer.Typer(no_args_is_help=True, help="Virtual networks (VXLAN segments) and subnets.")
port_app = typer.Typer(no_args_is_help=True, help="Ports: MAC + addresses + security groups.")
secgroup_app = typer.Typer(no_args_is_help=True, help="Security groups (stateful, default deny inbound).")
rule_app = typer.Typer(no_args_is_help=True, help="Security group rules.")
secgroup_app.add_typer(rule_app, name="rule")
app.add_typer(network_app, name="network")
app.add_typer(port_app, name="port")
app.add_typer(secgroup_app, name="secgroup")
image_app = typer.Typer(no_args_is_help=True, help="Images VMs and containers boot from.")
vm_app = typer.Typer(no_args_is_help=True, help="Virtual machines.")
container_app = typer.Typer(no_args_is_help=True, help="Containers (same flow, network and scheduler as VMs).")
app.add_typer(image_app, name="image")
app.add_typer(vm_app, name="vm")
app.add_typer(container_app, name="container")
storage_cli.register(app, image_app, vm_app)
metrics_cli.register(node_app, vm_app, container_app, storage_cli.pool_app)
routers_cli.register(app)
cluster_cli.register(app)


@app.callback()
def _target(node: Annotated[str | None, typer.Option(
        "--node", envvar="CAIRN_LAB_NODE",
        help="run the command against (and on) this lab node: its API, its files")] = None) -> None:
    """Cairn hyperconverged appliance: VMs, containers, volumes, networks."""
    if not node:
        return
    import os

    from appliance.lab import ops
    from appliance.lab.host import LabError
    from appliance.settings import get_settings

    try:
        extra = ops.enter(node)
    except (LabError, FileNotFoundError, KeyError) as exc:
        fail(str(exc).strip("'\""))
    for key in [k for k in os.environ if k.startswith("CAIRN_") and k not in ("CAIRN_LAB_DIR", "CAIRN_LAB_NODE")]:
        del os.environ[key]  # the host's settings are not the node's
    os.environ.update(extra)
    get_settings.cache_clear()
admin_cli.register(app, project_app, user_app)

# kind (singular and plural) -> (collection path, table columns key)
KINDS: dict[str, tuple[str, str]] = {}
for plural in ("nodes", "tasks", "projects", "users", "tokens", "placement-groups", "networks", "subnets",
               "ports", "security-groups", "images", "vms", "containers", "volumes", "pools", "routers",
               "floating-ips"):
    KINDS[plural] = KINDS[plural[:-1]] = (f"/{plural}", plural)
KINDS["secgroups"] = KINDS["secgroup"] = KINDS["security-groups"]
SCOPED = {"/placement-groups", "/networks", "/subnets", "/ports", "/security-groups", "/images", "/vms",
          "/containers", "/volumes", "/routers", "/floating-ips"}
ProjectOpt = Annotated[str | None, typer.Option("--project", "-p", help="project (default: all you can see)")]

# --- appliance lifecycle (local) -------------------------------------------------------------

@app.command()
def up(output: OutputOpt = Format.table,
       timeout: Annotated[float, typer.Option(help="seconds to wait for the node to be Ready")] = 120,
       ceph: Annotated[bool, typer.Option("--ceph", help="also run an embedded Ceph cluster (3 OSDs on files) "
                                          "and serve the 'ceph' storage pool from it; kept for later ups")] = False,
       ) -> None:
    """Start this node (idempotent): its systemd units on an installed appliance, else the embedded appliance."""
    info = local.up(timeout, quiet=output == Format.json, ceph=ceph)
    if output == Format.json:
        emit(info, output)
        return
    verb = "started" if info["started"] else "already running"
    typer.echo(f"Cairn {verb}: node {info['node']} is {info['phase']}.")
    typer.echo(f"  console   {info['console']}  (CA: {info['ca_file']})")
    typer.echo(f"  user      {info['user']}, password in {info['password_file']} (root only)")
    typer.echo(f"  CLI       logged in as {info['user']}: try `cairn status`")
    typer.echo(f"  logs      {info['logs']}")


@app.command()
def down(output: OutputOpt = Format.table) -> None:
    """Stop this node's processes cleanly (its systemd units on an installed appliance)."""
    emit(local.down(), output)


@app.command()
def status(output: OutputOpt = Format.table) -> None:
    """Cluster health: nodes, tasks, and this machine's supervised processes."""
    c = client()
    data = run(lambda: c.get("/cluster/status"))
    data["nodes_detail"] = [
        {"name": n["name"], "phase": n["status"].get("phase"),
         "version": n["status"].get("version"), "last_heartbeat": n["status"].get("last_heartbeat")}
        for n in run(lambda: c.list_all("/nodes"))
    ]
    data["services"] = local.services()
    emit(data, output)


@app.command()
def login(url: Annotated[str, typer.Option(help="API URL, e.g. https://node1:8443")] = "",
          username: Annotated[str, typer.Option(prompt=True)] = "admin",
          password: Annotated[str, typer.Option(prompt=True, hide_input=True)] = "",
          ca_file: Annotated[str, typer.Option(help="CA certificate to trust")] = "",
          output: OutputOpt = Format.table) -> None:
    """Log in with a password; stores a new API token in ~/.config/cairn/config.json."""
    cfg = load_config()
    c = Client(url=url or None, token="", ca=ca_file or None)
    c.http.headers.pop("Authorization", None)
    me = run(lambda: c.request("POST", "/auth/login", json={"username": username, "password": password}))
    csrf = me.json()["csrf_token"]
    import socket
    import time

    name = f"cli-{socket.gethostname().split('.')[0].lower()}-{int(time.time())}"[:63]
    token = run(lambda: c.request("POST", "/tokens", json={"name": name},
                                  headers={"X-CSRF-Token": csrf}).json())
    cfg.update(url=c.url, token=token["token"], ca_file=ca_file or cfg.get("ca_file", ""), user=username)
    path = save_config(cfg)
    emit({"user": username, "url": c.url, "config": str(path)}, output)


# --- generic resource verbs ------------------------------------------------------------------

def _kind(kind: str) -> tuple[str, str]:
    if kind not in KINDS:
        fail(f"unknown kind '{kind}': one of {', '.join(sorted(k for k in KINDS if k.endswith('s')))}", 2)
    return KINDS[kind]


@app.command()
def get(kind: Annotated[str, typer.Argument(help="nodes, tasks, projects, users, tokens, placement-groups")],
        name: Annotated[str | None, typer.Argument()] = None,
        state: Annotated[str | None, typer.Option(help="tasks: filter by state")] = None,
        project: ProjectOpt = None,
        output: OutputOpt = Format.table) -> None:
    """List a kind, or show one object."""
    path, columns = _kind(kind)
    c = client()
    if name:
        params = {"project": project or "default"} if path in SCOPED else {}
        emit(run(lambda: c.get(f"{path}/{name}", **params)), output)
    elif path == "/tokens":
        emit(run(lambda: c.get(path))["items"], output, columns)
    else:
        emit(run(lambda: c.list_all(path, state=state, project=project)), output, columns)


@app.command()
def delete(kind: Annotated[str, typer.Argument()], name: Annotated[str, typer.Argument()],
           project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Delete one object."""
    path, _ = _kind(kind)
    c = client()
    params = {"project": project or "default"} if path in SCOPED else None
    run(lambda: c.request("DELETE", f"{path}/{name}", params=params))
    emit({"deleted": {"kind": kind, "name": name}}, output)


@app.command()
def events(follow: Annotated[bool, typer.Option("--follow", "-f", help="keep streaming")] = False,
           since: Annotated[int, typer.Option(help="replay events after this seq")] = 0,
           seconds: Annotated[float, typer.Option(help="stop after this long (without --follow)")] = 1.0,
           output: OutputOpt = Format.table) -> None:
    """Show resource changes (server-sent events from /api/v1/events)."""
    import json as _json

    c = client()
    params: dict[str, Any] = {"since": since}
    if not follow:
        params["max_seconds"] = seconds
    try:
        with c.http.stream("GET", "/api/v1/events", params=params, timeout=None) as r:
            if r.status_code >= 400:
                fail(_json.loads(r.read()).get("detail", f"HTTP {r.status_code}"))
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                ev = _json.loads(line[6:])
                if output == Format.json:
                    typer.echo(_json.dumps(ev))
                else:
                    obj = ev["object"]
                    state = obj.get("state") or obj.get("status", {}).get("phase") or ""
                    typer.echo(f"{ev['seq']:>7} {ev['time']} {ev['kind']:<16} {ev['verb']:<8} "
                               f"{ev['name']:<24} {state}")
    except KeyboardInterrupt:
        pass


# --- tasks -----------------------------------------------------------------------------------

@task_app.command("wait")
def task_wait(task_id: str, output: OutputOpt = Format.table) -> None:
    """Wait for a task, with a progress bar; exit 1 unless it succeeded."""
    c = client()
    follow(c, run(lambda: c.get(f"/tasks/{task_id}")), output)


@task_app.command("cancel")
def task_cancel(task_id: str, output: OutputOpt = Format.table) -> None:
    c = client()
    emit(run(lambda: c.post(f"/tasks/{task_id}/cancel")), output)


# --- nodes -----------------------------------------------------------------------------------

@node_app.command("benchmark")
def node_benchmark(name: str, seconds: Annotated[float, typer.Option()] = 6.0, no_wait: NoWait = False,
                   output: OutputOpt = Format.table) -> None:
    """pveperf-style benchmark of a node (CPU, fsyncs/s, write rate)."""
    c = client()
    task = run(lambda: c.post(f"/nodes/{name}/benchmark", {"seconds": seconds}))
    if no_wait:
        emit(task, output)
    else:
        follow(c, task, output)


@node_app.command("drain")
def node_drain(name: str, no_wait: NoWait = False, output: OutputOpt = Format.table) -> None:
    """Maintenance: live-migrate the node's VMs and restart its containers elsewhere (refused,
    changing nothing, when the other nodes lack room); it then takes no new work."""
    c = client()
    task = run(lambda: c.post(f"/nodes/{name}/drain"))
    if no_wait:
        emit(task, output)
    else:
        follow(c, task, output)


@node_app.command("undrain")
def node_undrain(name: str, output: OutputOpt = Format.table) -> None:
    """End a node's maintenance: it takes work again."""
    c = client()
    emit(run(lambda: c.post(f"/nodes/{name}/undrain")), output)


def _set_schedulable(name: str, value: bool, output: Format) -> None:
    c = client()
    node = run(lambda: c.get(f"/nodes/{name}"))
    emit(run(lambda: c.patch(f"/nodes/{name}", {"spec": {"schedulable": value}}, node["generation"])), output)


@node_app.command("cordon")
def node_cordon(name: str, output: OutputOpt = Format.table) -> None:
    """Stop placing new workloads on a node."""
    _set_schedulable(name, False, output)


@node_app.command("uncordon")
def node_uncordon(name: str, output: OutputOpt = Format.table) -> None:
    _set_schedulable(name, True, output)


# --- tokens, users, projects -----------------------------------------------------------------

@token_app.command("create")
def token_create(name: str, expires_days: Annotated[float | None, typer.Option()] = None,
                 output: OutputOpt = Format.table) -> None:
    """Create an API token; the secret is shown once."""
    c = client()
    emit(run(lambda: c.post("/tokens", {"name": name, "expires_days": expires_days})), output)


@token_app.command("delete")
def token_delete(name: str, output: OutputOpt = Format.table) -> None:
    c = client()
    run(lambda: c.delete(f"/tokens/{name}"))
    emit({"deleted": {"kind": "token", "name": name}}, output)


@user_app.command("create")
def user_create(name: str, password: Annotated[str, typer.Option(prompt=True, hide_input=True)],
                cluster_role: Annotated[str | None, typer.Option()] = None,
                output: OutputOpt = Format.table) -> None:
    c = client()
    emit(run(lambda: c.post("/users", {"name": name, "password": password, "cluster_role": cluster_role})),
         output)


@project_app.command("create")
def project_create(name: str, description: Annotated[str, typer.Option()] = "",
                   output: OutputOpt = Format.table) -> None:
    c = client()
    emit(run(lambda: c.post("/projects", {"name": name, "spec": {"description": description}})), output)


@project_app.command("add-member")
def project_add_member(project: str, user: str, role: Annotated[str, typer.Option()] = "viewer",
                       output: OutputOpt = Format.table) -> None:
    c = client()
    emit(run(lambda: c.request("PUT", f"/projects/{project}/members/{user}", json={"role": role}).json()),
         output)


# --- networks ----------------------------------------------------------------------------------

@network_app.command("create")
def network_create(name: str, cidr: Annotated[str | None, typer.Option(help="first subnet, e.g. 10.20.0.0/24")] = None,
                   mtu: Annotated[int | None, typer.Option()] = None, project: ProjectArg = "default",
                   output: OutputOpt = Format.table) -> None:
    """Create a network (one VXLAN VNI) and, with --cidr, its first subnet."""
    c = client()
    spec = {k: v for k, v in {"cidr": cidr, "mtu": mtu}.items() if v is not None}
    emit(run(lambda: c.post("/networks", {"name": name, "project": project, "spec": spec})), output)


@network_app.command("get")
def network_get(name: str, project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    c = client()
    emit(run(lambda: c.get(f"/networks/{name}", project=project)), output)


@network_app.command("delete")
def network_delete(name: str, project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    c = client()
    run(lambda: c.request("DELETE", f"/networks/{name}", params={"project": project}))
    emit({"deleted": {"kind": "network", "name": name}}, output)


@network_app.command("subnet-add")
def network_subnet_add(network: str, name: str, cidr: Annotated[str, typer.Option()],
                       gateway: Annotated[str | None, typer.Option()] = None, project: ProjectArg = "default",
                       output: OutputOpt = Format.table) -> None:
    """Add a subnet (IPv4 or IPv6) to a network."""
    c = client()
    spec = {"network": network, "cidr": cidr, **({"gateway": gateway} if gateway else {})}
    emit(run(lambda: c.post("/subnets", {"name": name, "project": project, "spec": spec})), output)


@port_app.command("create")
def port_create(network: str, name: str,
                ip: Annotated[list[str] | None, typer.Option("--ip", help="fixed address (repeatable)")] = None,
                secgroup: Annotated[list[str] | None, typer.Option("--secgroup", help="repeatable")] = None,
                mac: Annotated[str | None, typer.Option()] = None, project: ProjectArg = "default",
                output: OutputOpt = Format.table) -> None:
    """Create a port on a network: a MAC, an address per subnet, security groups."""
    c = client()
    spec: dict[str, Any] = {"network": network, "fixed_ips": ip or [], "security_groups": secgroup or []}
    if mac:
        spec["mac"] = mac
    emit(run(lambda: c.post("/ports", {"name": name, "project": project, "spec": spec})), output)


@port_app.command("delete")
def port_delete(name: str, project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    c = client()
    run(lambda: c.request("DELETE", f"/ports/{name}", params={"project": project}))
    emit({"deleted": {"kind": "port", "name": name}}, output)


@secgroup_app.command("create")
def secgroup_create(name: str, description: Annotated[str, typer.Option()] = "", project: ProjectArg = "default",
                    output: OutputOpt = Format.table) -> None:
    c = client()
    emit(run(lambda: c.post("/security-groups", {"name": name, "project": project,
                                                 "spec": {"description": description}})), output)


@rule_app.command("add")
def secgroup_rule_add(group: str, proto: Annotated[str, typer.Option(help="tcp, udp, icmp, icmpv6, any")] = "tcp",
                      port: Annotated[str | None, typer.Option(help="22 or 8000-8080")] = None,
                      remote: Annotated[str | None, typer.Option(help="remote CIDR")] = None,
                      remote_group: Annotated[str | None, typer.Option()] = None,
                      egress: Annotated[bool, typer.Option("--egress", help="outbound rule")] = False,
                      project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    """Allow traffic (ingress unless --egress); replies to allowed connections pass."""
    rule: dict[str, Any] = {"direction": "egress" if egress else "ingress", "protocol": proto}
    if port:
        lo, _, hi = port.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            fail(f"--port must look like 22 or 8000-8080, not {port!r}", 2)
        rule.update(port_min=int(lo), port_max=int(hi or lo))
    if remote:
        rule["remote_cidr"] = remote
    if remote_group:
        rule["remote_group"] = remote_group
    c = client()
    emit(run(lambda: c.request("POST", f"/security-groups/{group}/rules", params={"project": project},
                               json=rule).json()), output)


# --- images, VMs and containers ------------------------------------------------------------------

@image_app.command("import-test-guest")
def image_import_test_guest(project: ProjectArg = "default", no_wait: NoWait = False,
                            output: OutputOpt = Format.table) -> None:
    """Make the tiny test guest (a VM image) and busybox (a container image) available."""
    c = client()
    task = run(lambda: c.post("/images/import-test-guest", {"project": project}))
    if no_wait:
        emit(task, output)
        return
    final = c.wait_task(task["id"])
    if final["state"] != "succeeded":
        fail(f"importing the test guest failed: {final['error']}")
    emit(final["result"], output)


def _instance_commands(kind: str, plural: str, group: typer.Typer) -> None:
    def act(verb: str) -> None:
        @group.command(verb)
        def command(name: str, project: ProjectArg = "default", no_wait: NoWait = False,
                    timeout: Annotated[float, typer.Option(help="stop: graceful seconds before power-off")] = 30,
                    output: OutputOpt = Format.table) -> None:
            c = client()
            params: dict[str, Any] = {"project": project}
            if verb == "stop":
                params["timeout"] = timeout
            task = run(lambda: c.request("POST", f"/{plural}/{name}/{verb}", params=params).json())
            if no_wait:
                emit(task, output)
                return
            _finish(c, task, plural, name, project, output)

        command.__doc__ = f"{verb.capitalize()} a {kind}."

    for verb in ("start", "stop", "reboot", "pause", "resume"):
        act(verb)

    @group.command("get")
    def get_one(name: str, project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
        c = client()
        emit(run(lambda: c.get(f"/{plural}/{name}", project=project)), output)

    @group.command("delete")
    def delete_one(name: str, project: ProjectArg = "default", no_wait: NoWait = False,
                   output: OutputOpt = Format.table) -> None:
        c = client()
        task = run(lambda: c.request("DELETE", f"/{plural}/{name}", params={"project": project}).json())
        if no_wait:
            emit(task, output)
            return
        final = c.wait_task(task["id"])
        if final["state"] != "succeeded":
            fail(f"deleting {kind} {name} failed: {final['error']}")
        emit({"deleted": {"kind": kind, "name": name}}, output)

    @group.command("console")
    def console(name: str, project: ProjectArg = "default",
                follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
                output: OutputOpt = Format.table) -> None:
        """Print the serial console (VMs) or output (containers); --follow keeps reading."""
        import time as _time

        c = client()
        seen = 0
        while True:
            text = run(lambda: c.request("GET", f"/{plural}/{name}/console-log",
                                         params={"project": project, "tail": 1 << 20}).text)
            if output == Format.json and not follow:
                emit({"name": name, "console": text}, output)
                return
            typer.echo(text[seen:] if len(text) >= seen else text, nl=False)
            seen = len(text)
            if not follow:
                return
            _time.sleep(0.5)


def _finish(c: Client, task: dict[str, Any], plural: str, name: str, project: str, output: Format) -> None:
    """Wait for an instance task (progress bar for people), then show the instance."""
    if output == Format.json or not sys.stderr.isatty():
        final = c.wait_task(task["id"])
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[msg]}"),
                      TimeElapsedColumn(), console=err_console) as bar:
            row = bar.add_task(task["name"], total=100, msg="")
            final = c.wait_task(task["id"], lambda t: bar.update(row, completed=t["progress"]["percent"],
                                                                 msg=t["progress"]["message"]))
    if final["state"] != "succeeded":
        fail(f"{task['name']} failed: {final['error']}")
    emit(run(lambda: c.get(f"/{plural}/{name}", project=project)), output)


OnNode = Annotated[str | None, typer.Option("--on", help="run it on this node (a node selector on the "
                                                         "node's cairn.dev/hostname label)")]


HaOpt = Annotated[bool, typer.Option("--ha", help="restart it on another node if its node dies (fenced first); "
                                                "its disks must be on replicated storage")]


def _on(node: str | None) -> dict[str, Any]:
    return {"node_selector": {"cairn.dev/hostname": node}} if node else {}


def _create_instance(plural: str, name: str, project: str, spec: dict[str, Any], no_wait: bool,
                     output: Format) -> None:
    c = client()
    task = run(lambda: c.post(f"/{plural}", {"name": name, "project": project, "spec": spec}))
    if no_wait:
        emit(task, output)
    else:
        _finish(c, task, plural, name, project, output)


@vm_app.command("create")
def vm_create(name: str, image: Annotated[str, typer.Option()], cpu: Annotated[int, typer.Option()] = 1,
              memory: Annotated[str, typer.Option(help="e.g. 256MiB, 2GiB")] = "512MiB",
              network: Annotated[list[str] | None, typer.Option("--network", help="repeatable")] = None,
              qos: Annotated[str, typer.Option("--qos", help="guaranteed, burstable, best-effort")] = "burstable",
              group: Annotated[str | None, typer.Option("--placement-group")] = None,
              secgroup: Annotated[list[str] | None, typer.Option("--secgroup", help="repeatable")] = None,
              volume: Annotated[list[str] | None, typer.Option("--volume", help="attach, repeatable")] = None,
              root_size: Annotated[str | None, typer.Option(help="disk images: grow the root volume")] = None,
              on: OnNode = None, ha: HaOpt = False,
              kernel_args: Annotated[str, typer.Option(help="kernel images: added to the kernel command line")] = "",
              project: ProjectArg = "default", no_wait: NoWait = False, output: OutputOpt = Format.table) -> None:
    """Create and start a VM; waits for it to run (progress: schedule → … → start)."""
    spec: dict[str, Any] = {"cpu": cpu, "memory": memory, "image": image, "networks": network or [],
                            "qos_class": qos, "security_groups": secgroup or [], "volumes": volume or [],
                            "ha": ha, **_on(on)}
    if kernel_args:
        spec["kernel_args"] = kernel_args
    if root_size:
        spec["root_size"] = root_size
    if group:
        spec["placement_group"] = group
    _create_instance("vms", name, project, spec, no_wait, output)


@container_app.command("create", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def container_create(ctx: typer.Context, name: str, image: Annotated[str, typer.Option()],
                     cpu: Annotated[float, typer.Option()] = 0.5,
                     memory: Annotated[str, typer.Option(help="e.g. 64MiB")] = "128MiB",
                     network: Annotated[list[str] | None, typer.Option("--network", help="repeatable")] = None,
                     env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE, repeatable")] = None,
                     tty: Annotated[bool, typer.Option("--tty", help="give it an interactive terminal")] = False,
                     isolation: Annotated[str, typer.Option(help="container, or vm for its own microVM")] = "container",
                     secgroup: Annotated[list[str] | None, typer.Option("--secgroup", help="repeatable")] = None,
                     volume: Annotated[list[str] | None, typer.Option(
                         "--volume", help="VOLUME:PATH[:ext4|xfs][:ro], repeatable: mounted at PATH, "
                                          "formatted (ext4 by default) on first use")] = None,
                     on: OnNode = None, ha: HaOpt = False, project: ProjectArg = "default",
                     no_wait: NoWait = False, output: OutputOpt = Format.table) -> None:
    """Create and start a container: cairn container create NAME --image IMG -- CMD ARGS..."""
    envs = dict(e.split("=", 1) for e in env or [] if "=" in e)
    spec: dict[str, Any] = {"cpu": cpu, "memory": memory, "image": image, "networks": network or [],
                            "command": list(ctx.args), "env": envs, "tty": tty, "isolation": isolation,
                            "security_groups": secgroup or [], "volumes": [_mount(v) for v in volume or []],
                            "ha": ha, **_on(on)}
    _create_instance("containers", name, project, spec, no_wait, output)


def _mount(text: str) -> dict[str, Any]:
    """``VOLUME:PATH[:ext4|xfs][:ro]`` as the API's ``{volume, path, fs, readonly}``."""
    vol, _, rest = text.partition(":")
    parts = rest.split(":")
    path, options = parts[0], parts[1:]
    mount: dict[str, Any] = {"volume": vol, "path": path}
    for opt in options:
        if opt in ("ext4", "xfs"):
            mount["fs"] = opt
        elif opt in ("ro", "rw"):
            mount["readonly"] = opt == "ro"
        else:
            fail(f"--volume {text!r}: unknown option {opt!r} (ext4, xfs, ro or rw)", 2)
    if not vol or not path.startswith("/"):
        fail(f"--volume takes VOLUME:PATH with an absolute path, e.g. data:/var/lib/data, not {text!r}", 2)
    return mount


@container_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def container_exec(ctx: typer.Context, name: str, project: ProjectArg = "default",
                   timeout: Annotated[float, typer.Option()] = 60.0,
                   tty: Annotated[bool, typer.Option("--tty", "-t", help="run it on a terminal")] = False,
                   output: OutputOpt = Format.table) -> None:
    """Run a command in a container: cairn container exec NAME -- CMD ARGS... (exit code passes through)."""
    if not ctx.args:
        fail("give the command after --, e.g. cairn container exec web -- ls /", 2)
    c = client()
    task = run(lambda: c.request("POST", f"/containers/{name}/exec", params={"project": project},
                                 json={"command": list(ctx.args), "timeout": timeout, "tty": tty}).json())
    final = c.wait_task(task["id"])
    if final["state"] != "succeeded":
        fail(f"exec failed: {final['error']}")
    result = final["result"]
    if output == Format.json:
        emit(result, output)
    else:
        sys.stdout.write(result["stdout"])
        sys.stderr.write(result["stderr"])
    raise typer.Exit(result["returncode"])


def _migrate_command(kind: str, plural: str, group: typer.Typer) -> None:
    @group.command("migrate")
    def migrate(name: str, to: Annotated[str, typer.Option("--to", help="target node")],
                project: ProjectArg = "default", no_wait: NoWait = False, output: OutputOpt = Format.table) -> None:
        """VMs move live; containers are restarted on the target node."""
        c = client()
        task = run(lambda: c.request("POST", f"/{plural}/{name}/migrate", params={"project": project},
                                     json={"to": to}).json())
        if no_wait:
            emit(task, output)
            return
        _finish(c, task, plural, name, project, output)



_migrate_command("vm", "vms", vm_app)
_migrate_command("container", "containers", container_app)
_instance_commands("vm", "vms", vm_app)
_instance_commands("container", "containers", container_app)


if __name__ == "__main__":
    app()
