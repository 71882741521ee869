"""Networks, subnets, ports and security groups through the API: IPAM (v4 and v6,
pools, static addresses, reservations, no duplicates under concurrency), VNIs, and
bad input that changes nothing."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from appliance.db.engine import session_scope
from appliance.errors import CairnError
from appliance.services import auth, networks

from .conftest import Api

pytestmark = pytest.mark.functional
V1 = "/api/v1"


def post(api: Api, path: str, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
    r = api.client.post(V1 + path, json=body, headers=api.admin)
    assert r.status_code == status, r.text
    return r.json()  # type: ignore[no-any-return]


def test_network_with_cidr_gets_a_vni_and_a_subnet(api: Api) -> None:
    net = post(api, "/networks", {"name": "blue", "spec": {"cidr": "10.20.0.0/24"}})
    assert net["status"]["vni"] >= 4096 and net["spec"]["mtu"] == 1450
    sub = net["status"]["subnets"][0]
    assert sub["cidr"] == "10.20.0.0/24" and sub["gateway"] == "10.20.0.1"
    assert sub["allocation_pools"] == [{"start": "10.20.0.2", "end": "10.20.0.254"}]
    other = post(api, "/networks", {"name": "red", "spec": {"cidr": "10.20.0.0/24"}})
    assert other["status"]["vni"] != net["status"]["vni"]  # same CIDR, another segment


def test_ports_get_mac_and_addresses_v4_and_v6(api: Api) -> None:
    post(api, "/networks", {"name": "dual", "spec": {"cidr": "10.30.0.0/29"}})
    post(api, "/subnets", {"name": "dual-v6", "spec": {"network": "dual", "cidr": "fd00:30::/64"}})
    port = post(api, "/ports", {"name": "p1", "spec": {"network": "dual"}})
    ips = {ip["subnet"]: ip["address"] for ip in port["status"]["ips"]}
    assert ips == {"dual-4": "10.30.0.2", "dual-v6": "fd00:30::2"}
    assert port["status"]["mac"].startswith(("02", "06", "0a", "0e")) or int(port["status"]["mac"][:2], 16) & 2
    static = post(api, "/ports", {"name": "p2", "spec": {"network": "dual", "fixed_ips": ["10.30.0.6"]}})
    assert static["status"]["ips"] == [{"subnet": "dual-4", "address": "10.30.0.6"}]
    post(api, "/subnets/dual-4/reservations", {"address": "10.30.0.3"})
    auto = post(api, "/ports", {"name": "p3", "spec": {"network": "dual"}})
    assert auto["status"]["ips"][0]["address"] == "10.30.0.4"  # .3 reserved, .2 taken
    post(api, "/ports", {"name": "p4", "spec": {"network": "dual"}})  # .5
    r = api.client.post(V1 + "/ports", json={"name": "p5", "spec": {"network": "dual"}}, headers=api.admin)
    assert r.status_code == 409 and "no free address" in r.json()["detail"]
    assert api.client.get(V1 + "/ports/p5", headers=api.admin).status_code == 404  # nothing half-made


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"name": "n", "spec": {"cidr": "10.0.0.1/24"}}, 422, "did you mean 10.0.0.0/24"),
    ({"name": "n", "spec": {"cidr": "banana"}}, 422, "is not a CIDR"),
    ({"name": "n", "spec": {"cidr": "10.0.0.0/31"}}, 422, "too small"),
    ({"name": "n", "spec": {"mtu": 1500}}, 422, "at most 1450"),
])
def test_bad_networks_are_refused_and_change_nothing(api: Api, body: dict[str, Any], status: int,
                                                     words: str) -> None:
    r = api.client.post(V1 + "/networks", json=body, headers=api.admin)
    assert r.status_code == status and words in r.json()["detail"], r.text
    assert api.client.get(V1 + "/networks", headers=api.admin).json()["items"] == []


def test_subnet_rules(api: Api) -> None:
    post(api, "/networks", {"name": "n", "spec": {"cidr": "10.40.0.0/24"}})
    cases = [
        ({"cidr": "10.40.0.128/25"}, 409, "overlaps"),
        ({"cidr": "10.41.0.0/24", "gateway": "10.42.0.1"}, 422, "outside the subnet"),
        ({"cidr": "10.41.0.0/24", "allocation_pools": [{"start": "10.41.0.1", "end": "10.41.0.9"}]},
         422, "contains the gateway"),
        ({"cidr": "10.41.0.0/24", "allocation_pools": [{"start": "10.41.0.9", "end": "10.41.0.5"}]},
         422, "ends before it starts"),
    ]
    for spec, status, words in cases:
        r = api.client.post(V1 + "/subnets", json={"name": "s", "spec": {"network": "n", **spec}}, headers=api.admin)
        assert r.status_code == status and words in r.json()["detail"], (spec, r.text)
    assert [s["name"] for s in api.client.get(V1 + "/subnets", headers=api.admin).json()["items"]] == ["n-4"]


def test_address_outside_the_subnet_and_taken_addresses(api: Api) -> None:
    post(api, "/networks", {"name": "n", "spec": {"cidr": "10.50.0.0/24"}})
    r = api.client.post(V1 + "/ports", json={"name": "p", "spec": {"network": "n", "fixed_ips": ["10.51.0.5"]}},
                        headers=api.admin)
    assert r.status_code == 422 and "not in any subnet" in r.json()["detail"]
    post(api, "/ports", {"name": "p", "spec": {"network": "n", "fixed_ips": ["10.50.0.5"]}})
    r = api.client.post(V1 + "/ports", json={"name": "q", "spec": {"network": "n", "fixed_ips": ["10.50.0.5"]}},
                        headers=api.admin)
    assert r.status_code == 409 and "already in use" in r.json()["detail"]
    assert api.client.get(V1 + "/ports/q", headers=api.admin).status_code == 404


def test_network_with_ports_cannot_be_deleted(api: Api) -> None:
    post(api, "/networks", {"name": "n", "spec": {"cidr": "10.60.0.0/24"}})
    post(api, "/ports", {"name": "p", "spec": {"network": "n"}})
    r = api.client.delete(V1 + "/networks/n", headers=api.admin)
    assert r.status_code == 409 and "still has 1 port" in r.json()["detail"]
    assert api.client.delete(V1 + "/ports/p", headers=api.admin).status_code == 204
    assert api.client.delete(V1 + "/networks/n", headers=api.admin).status_code == 204


def test_vni_pool_exhaustion_is_a_clear_409(api: Api) -> None:
    api.settings.vni_range = "5000-5001"
    post(api, "/networks", {"name": "a"})
    post(api, "/networks", {"name": "b"})
    r = api.client.post(V1 + "/networks", json={"name": "c"}, headers=api.admin)
    assert r.status_code == 409 and "VNI pool 5000-5001 is exhausted" in r.json()["detail"]


def test_ports_only_join_networks_of_their_project(api: Api) -> None:
    post(api, "/networks", {"name": "n", "spec": {"cidr": "10.70.0.0/24"}})
    eve = api.headers_for("eve", project="other", role="admin")
    r = api.client.post(V1 + "/ports", json={"name": "p", "project": "other", "spec": {"network": "n"}},
                        headers=eve)
    assert r.status_code == 404 and "no network 'n' in project 'other'" in r.json()["detail"]
    r = api.client.post(V1 + "/ports", json={"name": "p", "project": "default", "spec": {"network": "n"}},
                        headers=eve)
    assert r.status_code == 404


def test_security_group_rules(api: Api) -> None:
    post(api, "/security-groups", {"name": "web"})
    g = post(api, "/security-groups/web/rules", {"protocol": "tcp", "port_min": 22, "port_max": 22})
    assert g["generation"] == 2 and g["spec"]["rules"][0]["port_min"] == 22
    r = api.client.post(V1 + "/security-groups/web/rules", json={"protocol": "icmp", "port_min": 1},
                        headers=api.admin)
    assert r.status_code == 422 and "only apply to tcp and udp" in r.json()["detail"]
    r = api.client.post(V1 + "/security-groups/web/rules", json={"protocol": "icmp", "remote_cidr": "\u0019X\u00ffg"},
                        headers=api.admin)
    assert r.status_code == 422 and "not a CIDR" in r.json()["detail"]
    r = api.client.post(V1 + "/security-groups/web/rules", json={"protocol": "tcp", "remote_group": "ghost"},
                        headers=api.admin)
    assert r.status_code == 404
    stale = api.client.post(V1 + "/security-groups/web/rules", json={"protocol": "udp"},
                            headers={**api.admin, "If-Match": "1"})
    assert stale.status_code == 409
    post(api, "/networks", {"name": "n", "spec": {"cidr": "10.80.0.0/24"}})
    post(api, "/ports", {"name": "p", "spec": {"network": "n", "security_groups": ["web"]}})
    r = api.client.delete(V1 + "/security-groups/web", headers=api.admin)
    assert r.status_code == 409 and "used by port(s) p" in r.json()["detail"]
    rule_id = g["spec"]["rules"][0]["id"]
    after = api.client.delete(V1 + f"/security-groups/web/rules/{rule_id}", headers=api.admin).json()
    assert after["spec"]["rules"] == []


def test_50_concurrent_allocations_never_share_an_address(api: Api) -> None:
    url = api.settings.resolved_database_url
    post(api, "/networks", {"name": "busy", "spec": {"cidr": "10.90.0.0/24"}})
    results: list[str] = []
    errors: list[str] = []
    barrier = threading.Barrier(50)

    def one(i: int) -> None:
        barrier.wait()
        for _ in range(5):  # a port-name-level race is impossible here; address races retry inside
            try:
                with session_scope(url) as session:
                    admin = auth.principal_for(session, auth._user(session, "admin"), "token")
                    port = networks.create_port(session, admin, "default", f"c{i}", {"network": "busy"})
                results.append(port["status"]["ips"][0]["address"])
                return
            except CairnError as exc:
                errors.append(str(exc))
                return
            except Exception as exc:  # serialisation failures on PostgreSQL: retry the transaction
                errors.append(f"retry: {type(exc).__name__}")
        errors.append("gave up")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 50, errors
    assert len(set(results)) == 50


def test_subnets_overlapping_what_the_nodes_use_are_refused_naming_the_clash(api: Api) -> None:
    """A tenant subnet on a node's own network would put the tenant's gateway and DHCP
    on it and route the node's traffic into the tenant's segment: 409, naming the clash."""
    from appliance.services import nodes

    from .test_resources import INVENTORY

    inventory = {**INVENTORY, "host_networks": [
        {"cidr": "10.250.0.0/24", "interface": "eth0", "role": "underlay"},
        {"cidr": "172.30.0.0/16", "interface": "mgmt0", "role": "host"},
        {"cidr": "fd00:abcd::/64", "interface": "eth0", "role": "underlay"},
        {"cidr": "10.251.0.9/32", "interface": "", "role": "storage"}]}
    with session_scope(api.settings.resolved_database_url) as session:
        nodes.register(session, "node-b", inventory, {"cpu": 8, "memory_bytes": 8 << 30})
    api.settings.external_cidr = "198.51.100.0/24"
    try:
        for cidr, clash in (("10.250.0.0/16", "node node-b's underlay network on eth0, 10.250.0.0/24"),
                            ("172.30.5.0/24", "node node-b's host network on mgmt0, 172.30.0.0/16"),
                            ("10.251.0.0/24", "node node-b's storage network, 10.251.0.9/32"),
                            ("198.51.100.128/25", "the external network (CAIRN_EXTERNAL_CIDR)"),
                            ("169.254.0.0/24", "link-local range 169.254.0.0/16"),
                            ("127.1.0.0/24", "loopback range")):
            r = api.client.post(V1 + "/networks", json={"name": "clash", "spec": {"cidr": cidr}}, headers=api.admin)
            assert r.status_code == 409 and clash in r.json()["detail"], (cidr, r.text)
        assert api.client.get(V1 + "/networks/clash", headers=api.admin).status_code == 404  # nothing kept
        post(api, "/networks", {"name": "fine", "spec": {"cidr": "10.252.0.0/24"}})
        r = api.client.post(V1 + "/subnets", json={"name": "v6", "spec": {"network": "fine", "cidr": "fd00:abcd::/64"}},
                            headers=api.admin)
        assert r.status_code == 409 and "fd00:abcd::/64" in r.json()["detail"]
        r = api.client.post(V1 + "/subnets", json={"name": "ll", "spec": {"network": "fine", "cidr": "fe80::/64"}},
                            headers=api.admin)
        assert r.status_code == 409 and "link-local" in r.json()["detail"]
    finally:
        api.settings.external_cidr = ""
