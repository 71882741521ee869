"""``cairn router …`` and ``cairn floating-ip …``: routers (the gateway of their
networks, egress NAT through the node's external interface, port forwards) and
floating IPs (an external address that reaches one port)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from appliance.cli import common
from appliance.cli.common import ProjectArg, fail, run
from appliance.cli.output import Format, OutputOpt, emit

router_app = typer.Typer(no_args_is_help=True,
                         help="Routers: gateway of their networks, egress NAT, port forwards.")
forward_app = typer.Typer(no_args_is_help=True, help="Port forwards on a router's external address.")
router_app.add_typer(forward_app, name="forward")
fip_app = typer.Typer(no_args_is_help=True, help="Floating IPs: an external address that reaches one port.")
Repeat = Annotated[list[str] | None, typer.Option(help="repeatable")]


def _post(path: str, body: Any, project: str | None = None) -> Any:
    c = common.client()
    params = {"project": project} if project else None
    return run(lambda: c.request("POST", path, params=params, json=body).json())


@router_app.command("create")
def router_create(name: str, network: Repeat = None, subnet: Repeat = None,
                  external: Annotated[bool, typer.Option(
                      "--external/--no-external",
                      help="take an external address (egress NAT, port forwards, floating IPs)")] = True,
                  description: Annotated[str, typer.Option()] = "", project: ProjectArg = "default",
                  output: OutputOpt = Format.table) -> None:
    """Create a router and attach the IPv4 subnets of --network (or --subnet)."""
    spec = {"external": external, "networks": network or [], "subnets": subnet or [], "description": description}
    emit(_post("/routers", {"name": name, "project": project, "spec": spec}), output)


@router_app.command("get")
def router_get(name: str, project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    c = common.client()
    emit(run(lambda: c.get(f"/routers/{name}", project=project)), output)


@router_app.command("delete")
def router_delete(name: str, project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    """Delete a router (its external address goes back to the pool; floating IPs must be disassociated)."""
    c = common.client()
    run(lambda: c.request("DELETE", f"/routers/{name}", params={"project": project}))
    emit({"deleted": {"kind": "router", "name": name}}, output)


def _interface_command(verb: str, what: str) -> None:
    @router_app.command(f"{verb}-{what}")
    def command(router: str, target: str = typer.Argument(..., metavar=what.upper()),
                project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
        emit(_post(f"/routers/{router}/{verb}-interface", {what: target}, project), output)

    command.__doc__ = (f"{verb.capitalize()} a {what} ({'every IPv4 subnet of it' if what == 'network' else 'IPv4'})"
                       f" {'to' if verb == 'add' else 'from'} a router.")


for _verb in ("add", "remove"):
    for _what in ("network", "subnet"):
        _interface_command(_verb, _what)


def _address_port(value: str) -> tuple[str, int | None]:
    address, sep, port = value.rpartition(":") if ":" in value else (value, "", "")
    if sep and not port.isdigit():
        fail(f"--to must look like 10.20.0.5 or 10.20.0.5:22, not {value!r}", 2)
    return address, int(port) if sep else None


@forward_app.command("add")
def forward_add(router: str,
                external_port: Annotated[int, typer.Option("--external-port", help="on the router's address")],
                to: Annotated[str | None, typer.Option("--to", help="ADDRESS[:PORT] in the router's networks")] = None,
                port: Annotated[str | None, typer.Option("--port", help="or a port (by name)")] = None,
                internal_port: Annotated[int | None, typer.Option(help="default: the external port")] = None,
                proto: Annotated[str, typer.Option("--proto", help="tcp or udp")] = "tcp",
                project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    """Forward PROTO EXTERNAL_PORT of the router's external address to a port or an address."""
    body: dict[str, Any] = {"protocol": proto, "external_port": external_port, "internal_port": internal_port}
    if to:
        body["internal_address"], to_port = _address_port(to)
        body["internal_port"] = internal_port or to_port
    if port:
        body["port"] = port
    emit(_post(f"/routers/{router}/port-forwards", body, project), output)


@forward_app.command("remove")
def forward_remove(router: str, forward_id: str, project: ProjectArg = "default",
                   output: OutputOpt = Format.table) -> None:
    c = common.client()
    emit(run(lambda: c.request("DELETE", f"/routers/{router}/port-forwards/{forward_id}",
                               params={"project": project}).json()), output)


@forward_app.command("list")
def forward_list(router: str, project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    c = common.client()
    emit(run(lambda: c.get(f"/routers/{router}", project=project))["spec"]["port_forwards"], output,
         "port-forwards")


@fip_app.command("create")
def fip_create(name: str, port: Annotated[str | None, typer.Option(help="associate at once")] = None,
               project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    """Take an address of the external pool (and reach --port through it)."""
    emit(_post("/floating-ips", {"name": name, "project": project, "spec": {"port": port}}), output)


@fip_app.command("get")
def fip_get(name: str, project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    c = common.client()
    emit(run(lambda: c.get(f"/floating-ips/{name}", project=project)), output)


@fip_app.command("associate")
def fip_associate(name: str, port: str, project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    """Reach PORT through the floating IP (its network needs a router with an external address)."""
    emit(_post(f"/floating-ips/{name}/associate", {"port": port}, project), output)


@fip_app.command("disassociate")
def fip_disassociate(name: str, project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    emit(_post(f"/floating-ips/{name}/disassociate", None, project), output)


@fip_app.command("delete")
def fip_delete(name: str, project: ProjectArg = "default", output: OutputOpt = Format.table) -> None:
    """Give the address back to the pool."""
    c = common.client()
    run(lambda: c.request("DELETE", f"/floating-ips/{name}", params={"project": project}))
    emit({"deleted": {"kind": "floating-ip", "name": name}}, output)


def register(app: typer.Typer) -> None:
    app.add_typer(router_app, name="router")
    app.add_typer(fip_app, name="floating-ip")
