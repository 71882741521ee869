"""Routers, port forwards and floating IPs through the API: addresses from the external
pool, attached subnets, and bad input that gets a clear 4xx and changes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import Api

pytestmark = pytest.mark.functional
V1 = "/api/v1"


def post(api: Api, path: str, body: dict[str, Any] | None = None, status: int = 201, **params: str) -> Any:
    r = api.client.post(V1 + path, json=body, headers=api.admin, params=params)
    assert r.status_code == status, r.text
    return r.json()


def get(api: Api, path: str) -> Any:
    r = api.client.get(V1 + path, headers=api.admin)
    assert r.status_code == 200, r.text
    return r.json()


def refused(api: Api, method: str, path: str, body: dict[str, Any] | None, status: int, words: str) -> None:
    r = api.client.request(method, V1 + path, json=body, headers=api.admin)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert words in r.json()["detail"], r.json()["detail"]


@pytest.fixture
def ext(api: Api) -> Api:
    """The API with an external network of three pool addresses."""
    api.settings.external_cidr = "203.0.113.0/24"
    api.settings.external_pool = "203.0.113.10-203.0.113.12"
    api.settings.external_project_share = 1.0  # one project uses the whole pool here (see test_quotas)
    return api


def test_router_takes_an_external_address_and_routes_its_networks(ext: Api) -> None:
    post(ext, "/networks", {"name": "lab", "spec": {"cidr": "10.20.0.0/24"}})
    r = post(ext, "/routers", {"name": "r1", "spec": {"networks": ["lab"]}})
    assert r["status"]["external_address"] == "203.0.113.10"
    assert r["spec"]["interfaces"] == [{"network": "lab", "subnet": "lab-4", "cidr": "10.20.0.0/24",
                                        "gateway": "10.20.0.1"}]
    assert r["spec"]["external"] is True and r["spec"]["port_forwards"] == []
    assert [x["name"] for x in get(ext, "/routers")["items"]] == ["r1"]
    assert get(ext, "/routers/r1")["status"]["external_address"] == "203.0.113.10"
    internal = post(ext, "/routers", {"name": "inner", "spec": {"external": False}})
    assert internal["status"]["external_address"] is None
    # detach and attach again, by subnet
    r = post(ext, "/routers/r1/remove-interface", {"network": "lab"}, status=200)
    assert r["spec"]["interfaces"] == [] and r["generation"] == 2
    r = post(ext, "/routers/r1/add-interface", {"subnet": "lab-4"}, status=200)
    assert [i["subnet"] for i in r["spec"]["interfaces"]] == ["lab-4"]
    # deleting the router gives its address back to the pool
    assert ext.client.delete(V1 + "/routers/r1", headers=ext.admin).status_code == 204
    assert post(ext, "/routers", {"name": "r2"})["status"]["external_address"] == "203.0.113.10"


def test_port_forwards_reach_ports_or_addresses_of_the_routers_networks(ext: Api) -> None:
    post(ext, "/networks", {"name": "lab", "spec": {"cidr": "10.20.0.0/24"}})
    port = post(ext, "/ports", {"name": "web", "spec": {"network": "lab"}})
    post(ext, "/routers", {"name": "r1", "spec": {"networks": ["lab"]}})
    r = post(ext, "/routers/r1/port-forwards", {"external_port": 2222, "internal_port": 22, "port": "web"},
             project="default")
    pf = r["spec"]["port_forwards"][0]
    assert (pf["protocol"], pf["external_port"], pf["internal_address"], pf["internal_port"]) == (
        "tcp", 2222, port["status"]["ips"][0]["address"], 22)
    r = post(ext, "/routers/r1/port-forwards", {"protocol": "udp", "external_port": 53,
                                                "internal_address": "10.20.0.9"})
    assert r["spec"]["port_forwards"][1]["internal_port"] == 53  # defaults to the external port
    r = ext.client.delete(V1 + f"/routers/r1/port-forwards/{pf['id']}", headers=ext.admin)
    assert r.status_code == 200 and [p["external_port"] for p in r.json()["spec"]["port_forwards"]] == [53]


def test_floating_ip_is_allocated_associated_moved_and_released(ext: Api) -> None:
    post(ext, "/networks", {"name": "lab", "spec": {"cidr": "10.20.0.0/24"}})
    a = post(ext, "/ports", {"name": "a", "spec": {"network": "lab"}})
    post(ext, "/ports", {"name": "b", "spec": {"network": "lab"}})
    post(ext, "/routers", {"name": "r1", "spec": {"networks": ["lab"]}})  # takes .10
    fip = post(ext, "/floating-ips", {"name": "web-ip", "spec": {"port": "a"}})
    assert fip["status"]["address"] == "203.0.113.11"
    assert fip["status"]["associated"] is True and fip["status"]["router"] == "r1"
    assert fip["status"]["fixed_address"] == a["status"]["ips"][0]["address"]
    moved = post(ext, "/floating-ips/web-ip/associate", {"port": "b"}, status=200)
    assert moved["spec"]["port"] == "b" and moved["status"]["fixed_address"] != fip["status"]["fixed_address"]
    free = post(ext, "/floating-ips/web-ip/disassociate", status=200)
    assert free["status"]["associated"] is False and free["spec"]["port"] is None
    assert ext.client.delete(V1 + "/floating-ips/web-ip", headers=ext.admin).status_code == 204
    assert post(ext, "/floating-ips", {"name": "again"})["status"]["address"] == "203.0.113.11"
    # a port deleted under its floating IP leaves it unassociated (and the router deletable)
    post(ext, "/floating-ips/again/associate", {"port": "a"}, status=200)
    assert ext.client.delete(V1 + "/ports/a", headers=ext.admin).status_code == 204
    assert get(ext, "/floating-ips/again")["status"]["associated"] is False
    assert ext.client.delete(V1 + "/routers/r1", headers=ext.admin).status_code == 204


def snapshot(api: Api) -> dict[str, Any]:
    """Everything a refused request must leave as it was."""
    return {kind: get(api, f"/{kind}")["items"] for kind in ("routers", "floating-ips", "networks", "subnets")}


def test_bad_router_input_is_refused_and_changes_nothing(ext: Api) -> None:
    post(ext, "/networks", {"name": "lab", "spec": {"cidr": "10.20.0.0/24"}})
    post(ext, "/networks", {"name": "same", "spec": {"cidr": "10.20.0.0/25"}})
    post(ext, "/networks", {"name": "v6"})
    post(ext, "/subnets", {"name": "v6-6", "spec": {"network": "v6", "cidr": "fd00:20::/64"}})
    post(ext, "/networks", {"name": "bare"})
    outside = post(ext, "/networks", {"name": "outside", "spec": {"cidr": "203.0.113.0/26"}}, 409)
    assert "overlaps the external network" in outside["detail"]  # refused when the network is made
    post(ext, "/networks", {"name": "far", "spec": {"cidr": "10.30.0.0/24"}})
    post(ext, "/ports", {"name": "far-port", "spec": {"network": "far"}})
    post(ext, "/routers", {"name": "r1", "spec": {"networks": ["lab"]}})
    before = snapshot(ext)
    cases = [
        ("POST", "/routers", {"name": "r2", "spec": {"networks": ["nope"]}}, 404, "no network 'nope'"),
        ("POST", "/routers", {"name": "r2", "spec": {"subnets": ["nope"]}}, 404, "no subnet 'nope'"),
        ("POST", "/routers", {"name": "r2", "spec": {"networks": ["same"]}}, 409, "overlaps 10.20.0.0/24"),
        ("POST", "/routers", {"name": "r2", "spec": {"networks": ["v6"]}}, 422, "no IPv4 subnet"),
        ("POST", "/routers", {"name": "r2", "spec": {"subnets": ["v6-6"]}}, 422, "routers route IPv4"),
        ("POST", "/routers", {"name": "r2", "spec": {"networks": ["bare"]}}, 422, "no IPv4 subnet"),
        ("POST", "/routers", {"name": "r1"}, 409, "already exists"),
        ("POST", "/routers", {"name": "R2"}, 422, "name"),
        ("POST", "/routers/r1/add-interface", {"network": "lab"}, 409, "already attached to this router"),
        ("POST", "/routers/r1/add-interface", {"network": "same"}, 409, "already attached to this router"),
        ("POST", "/routers/r1/add-interface", {"network": "lab", "subnet": "lab-4"}, 422, "either"),
        ("POST", "/routers/r1/add-interface", {}, 422, "either"),
        ("POST", "/routers/r1/remove-interface", {"network": "far"}, 404, "no interface on far"),
        ("POST", "/routers/nope/add-interface", {"network": "lab"}, 404, "no router 'nope'"),
        ("POST", "/routers/r1/port-forwards", {"external_port": 70000, "internal_address": "10.20.0.5"}, 422,
         "external_port"),
        ("POST", "/routers/r1/port-forwards", {"external_port": 22, "internal_port": 0,
                                               "internal_address": "10.20.0.5"}, 422, "internal_port"),
        ("POST", "/routers/r1/port-forwards", {"protocol": "icmp", "external_port": 22,
                                               "internal_address": "10.20.0.5"}, 422, "protocol"),
        ("POST", "/routers/r1/port-forwards", {"external_port": 22, "internal_address": "10.30.0.5"}, 422,
         "not in the networks of router 'r1'"),
        ("POST", "/routers/r1/port-forwards", {"external_port": 22, "port": "far-port"}, 422,
         "no IPv4 address in the networks of router 'r1'"),
        ("POST", "/routers/r1/port-forwards", {"external_port": 22, "internal_address": "banana"}, 422,
         "not an IP address"),
        ("POST", "/routers/r1/port-forwards", {"external_port": 22}, 422, "either port or internal_address"),
        ("DELETE", "/routers/r1/port-forwards/nope", None, 404, "no port forward nope"),
        ("POST", "/floating-ips", {"name": "f", "spec": {"port": "far-port"}}, 409,
         "no network that a router with an external address routes"),
        ("POST", "/floating-ips", {"name": "f", "spec": {"port": "nope"}}, 404, "no port 'nope'"),
        ("DELETE", "/networks/lab", None, 409, "attached to router 'r1'"),
        ("DELETE", "/subnets/lab-4", None, 409, "attached to router 'r1'"),
    ]
    for method, path, body, status, words in cases:
        refused(ext, method, path, body, status, words)
    assert snapshot(ext) == before


def test_overlapping_subnets_are_refused_across_routers_and_projects(ext: Api) -> None:
    post(ext, "/networks", {"name": "lab", "spec": {"cidr": "10.20.0.0/24"}})
    post(ext, "/routers", {"name": "r1", "spec": {"networks": ["lab"]}})
    eve = ext.headers_for("eve", project="other", role="admin")
    r = ext.client.post(V1 + "/networks", json={"name": "lab", "project": "other",
                                                "spec": {"cidr": "10.20.0.128/25"}}, headers=eve)
    assert r.status_code == 201
    r = ext.client.post(V1 + "/routers", json={"name": "r1", "project": "other", "spec": {"networks": ["lab"]}},
                        headers=eve)
    assert r.status_code == 409 and "another project already routes" in r.json()["detail"]
    assert "r1" not in r.json()["detail"]  # nothing about the other project's names
    # and nobody attaches, sees or deletes another project's router
    r = ext.client.post(V1 + "/routers/r1/add-interface", json={"network": "lab"}, params={"project": "default"},
                        headers=eve)
    assert r.status_code in (403, 404)
    assert ext.client.get(V1 + "/routers", headers=eve).json()["items"] == []


def test_pool_exhaustion_and_missing_external_network_are_clear_409s(ext: Api) -> None:
    post(ext, "/routers", {"name": "r1"})
    post(ext, "/floating-ips", {"name": "f1"})
    post(ext, "/floating-ips", {"name": "f2"})
    before = snapshot(ext)
    refused(ext, "POST", "/floating-ips", {"name": "f3"}, 409,
            "the external pool 203.0.113.10-203.0.113.12 is exhausted (3 addresses in use)")
    refused(ext, "POST", "/routers", {"name": "r2"}, 409, "is exhausted")
    assert snapshot(ext) == before
    assert post(ext, "/routers", {"name": "inner", "spec": {"external": False}})["status"]["external_address"] is None
    ext.settings.external_cidr = ""
    refused(ext, "POST", "/floating-ips", {"name": "f3"}, 409, "no external network is configured")
    refused(ext, "POST", "/routers", {"name": "r3"}, 409, "set CAIRN_EXTERNAL_CIDR")


def test_in_use_routers_and_interfaces_cannot_be_removed(ext: Api) -> None:
    post(ext, "/networks", {"name": "lab", "spec": {"cidr": "10.20.0.0/24"}})
    post(ext, "/ports", {"name": "web", "spec": {"network": "lab"}})
    post(ext, "/routers", {"name": "r1", "spec": {"networks": ["lab"]}})
    post(ext, "/floating-ips", {"name": "f1", "spec": {"port": "web"}})
    refused(ext, "DELETE", "/routers/r1", None, 409, "still carries floating IP(s) f1")
    refused(ext, "POST", "/routers/r1/remove-interface", {"network": "lab"}, 409, "floating IP 'f1'")
    post(ext, "/floating-ips/f1/disassociate", status=200)
    fw = post(ext, "/routers/r1/port-forwards", {"external_port": 80, "port": "web"})["spec"]["port_forwards"][0]
    refused(ext, "POST", "/routers/r1/remove-interface", {"subnet": "lab-4"}, 409, f"port forward {fw['id']}")
    refused(ext, "POST", "/routers/r1/port-forwards", {"external_port": 80, "internal_address": "10.20.0.7"}, 409,
            "already forwards")
    post(ext, "/floating-ips", {"name": "f2", "spec": {"port": "web"}})
    refused(ext, "POST", "/floating-ips/f1/associate", {"port": "web"}, 409, "already has floating IP 'f2'")


@pytest.fixture
def cli(ext: Api, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``cairn …`` in-process against this API; returns (exit code, JSON or stderr)."""
    import json

    from typer.testing import CliRunner

    from appliance.cli import common, main
    from appliance.cli.client import Client

    c = Client(url="https://testserver", token="unused")
    c.http = ext.client
    ext.client.headers.update(ext.admin)
    for module in (common, main):  # `cairn get` lives in main
        monkeypatch.setattr(module, "client", lambda: c)
    runner = CliRunner()

    def invoke(*args: str) -> tuple[int, Any]:
        r = runner.invoke(main.app, [*args, "--output", "json"])
        return r.exit_code, (json.loads(r.stdout) if r.exit_code == 0 else r.stderr)

    return invoke


def test_cli_router_forward_and_floating_ip_spellings(ext: Api, cli: Any) -> None:
    post(ext, "/networks", {"name": "lab", "spec": {"cidr": "10.20.0.0/24"}})
    post(ext, "/networks", {"name": "lab2", "spec": {"cidr": "10.21.0.0/24"}})
    port = post(ext, "/ports", {"name": "web", "spec": {"network": "lab"}})["status"]["ips"][0]["address"]
    code, r = cli("router", "create", "r1", "--network", "lab")
    assert code == 0 and r["status"]["external_address"] == "203.0.113.10"
    code, r = cli("router", "add-network", "r1", "lab2")
    assert code == 0 and [i["network"] for i in r["spec"]["interfaces"]] == ["lab", "lab2"]
    code, r = cli("router", "forward", "add", "r1", "--external-port", "2222", "--to", f"{port}:22")
    assert code == 0 and r["spec"]["port_forwards"][0]["internal_port"] == 22
    code, r = cli("router", "forward", "add", "r1", "--proto", "udp", "--external-port", "53", "--port", "web")
    assert code == 0 and r["spec"]["port_forwards"][1]["internal_address"] == port
    code, forwards = cli("router", "forward", "list", "r1")
    assert code == 0 and [f["external_port"] for f in forwards] == [2222, 53]
    code, err = cli("router", "forward", "add", "r1", "--external-port", "99999", "--to", "10.20.0.5")
    assert code == 1 and "external_port" in err
    code, err = cli("router", "forward", "add", "r1", "--external-port", "80", "--to", "192.0.2.1:80")
    assert code == 1 and "not in the networks of router 'r1'" in err
    code, r = cli("router", "forward", "remove", "r1", forwards[1]["id"])
    assert code == 0 and len(r["spec"]["port_forwards"]) == 1
    code, r = cli("router", "remove-network", "r1", "lab2")
    assert code == 0 and len(r["spec"]["interfaces"]) == 1
    code, fip = cli("floating-ip", "create", "web-ip")
    assert code == 0 and fip["status"]["address"] == "203.0.113.11"
    code, fip = cli("floating-ip", "associate", "web-ip", "web")
    assert code == 0 and fip["status"]["fixed_address"] == port
    code, listed = cli("get", "floating-ips")
    assert code == 0 and [f["name"] for f in listed] == ["web-ip"]
    code, err = cli("router", "delete", "r1")
    assert code == 1 and "disassociate" in err
    assert cli("floating-ip", "disassociate", "web-ip")[0] == 0
    assert cli("floating-ip", "delete", "web-ip") == (0, {"deleted": {"kind": "floating-ip", "name": "web-ip"}})
    assert cli("router", "get", "r1")[1]["status"]["external_address"] == "203.0.113.10"
    assert cli("router", "delete", "r1") == (0, {"deleted": {"kind": "router", "name": "r1"}})
    code, listed = cli("get", "routers")
    assert code == 0 and listed == []
