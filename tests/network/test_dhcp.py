"""DHCP/DNS: the pure dnsmasq builder (golden files) and dnsmasq serving across the overlay."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from network.desired import NodeUnderlay, VirtualNetwork, node_state
from network.dhcp import DhcpConfig, DhcpHost, DhcpSubnet, DnsmasqSupervisor, build_dnsmasq_config, parse_leases
from network.errors import InvalidSpec
from network.model import Port, bridge_name
from network.netlink import node_links, run_in_netns
from network.reconcile import reconcile
from tests.network.golden import assert_golden
from tests.network.lab import Lab, ping

UDHCPC_HOOK = """#!/bin/sh
case "$1" in bound|renew) echo "$ip $mask $router $mtu $dns" > {out} ;; esac
exit 0
"""


def sample_config(run_dir: str = "/run/cairn/dnsmasq") -> DhcpConfig:
    return DhcpConfig(
        network_id="net-blue",
        interface="cbr500",
        subnets=(DhcpSubnet("10.60.0.0/24", "10.60.0.1"), DhcpSubnet("fd00:60::/64")),
        hosts=(
            DhcpHost("02:00:00:00:05:02", ("10.60.0.12", "fd00:60::12"), "vm2"),
            DhcpHost("02:00:00:00:05:01", ("10.60.0.11",), "web1"),
        ),
        dns_server="10.60.0.1",
        run_dir=run_dir,
    )


@pytest.mark.unit
def test_dnsmasq_config_matches_golden_file() -> None:
    assert_golden("dnsmasq_dual_stack.conf", build_dnsmasq_config(sample_config()))


@pytest.mark.unit
def test_dnsmasq_config_rejects_bad_mac_and_subnet() -> None:
    with pytest.raises(InvalidSpec):
        build_dnsmasq_config(DhcpConfig("n", "cbr1", (DhcpSubnet("10.0.0.1/24"),), ()))
    with pytest.raises(InvalidSpec):
        build_dnsmasq_config(DhcpConfig("n", "cbr1", (DhcpSubnet("10.0.0.0/24"),), (DhcpHost("zz", ("10.0.0.5",)),)))


@pytest.mark.functional
def test_udhcpc_on_node2_gets_its_fixed_lease_from_dnsmasq_on_node1_and_names_resolve(
    lab: Lab, tmp_path: Path
) -> None:
    vm = Port(id="vm2", mac="02:00:00:00:05:02", ips=("10.60.0.12",), host_ifname="tp500-2", name="vm2")
    nodes = {f"n{n}": NodeUnderlay("ul0", lab.vtep(n)) for n in (1, 2, 3)}
    net = VirtualNetwork(500, {"n2": [vm]}, gateways={"n1": ["10.60.0.1/24"]})
    ep = lab.endpoint(2, "dhcp2", vm)  # no address: it has to ask
    for n in (1, 2):
        assert reconcile(lab.node(n), node_state(f"n{n}", nodes, [net])).ok
    cfg = sample_config(str(tmp_path / "run"))
    # a deleted port's lease of the same address to its own MAC (a VM deleted, another given
    # its address): dnsmasq would refuse the address to the new MAC until that lease expired
    lease_file = Path(cfg.run_dir) / "net-blue.leases"
    lease_file.parent.mkdir(parents=True)
    lease_file.write_text(f"{int(time.time()) + 3600} 02:00:00:00:0a:0a 10.60.0.12 gone-vm *\n")
    sup = DnsmasqSupervisor(lab.node(1), tmp_path / "dnsmasq.conf")
    try:
        assert sup.ensure(build_dnsmasq_config(cfg)) is True
        assert sup.ensure(build_dnsmasq_config(cfg)) is False  # unchanged config: no restart
        hook, out = tmp_path / "hook.sh", tmp_path / "lease"
        hook.write_text(UDHCPC_HOOK.format(out=out))
        hook.chmod(0o755)
        t0 = time.monotonic()
        r = run_in_netns(ep, ["busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "6", "-T", "1",
                              "-O", "mtu", "-s", str(hook)], timeout=30)
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 < 10
        ip, mask, router, mtu, dns = out.read_text().split()
        assert (ip, mask, router, mtu, dns) == ("10.60.0.12", "24", "10.60.0.1", "1450", "10.60.0.1")
        assert ("02:00:00:00:05:02", "10.60.0.12", "vm2") in parse_leases(lease_file.read_text())
        with node_links(ep) as nl:
            nl.addr_add(nl.index("eth0"), "10.60.0.12/24")
        assert ping(ep, "10.60.0.1")
        for name in ("vm2.cairn.internal", "web1.cairn.internal"):
            r = run_in_netns(ep, ["busybox", "nslookup", name, "10.60.0.1"], timeout=15)
            assert r.returncode == 0, r.stdout + r.stderr
        assert "10.60.0.11" in r.stdout
    finally:
        sup.stop()
    with node_links(lab.node(1)) as nl:
        assert "10.60.0.1/24" in nl.addresses(nl.index(bridge_name(500)))
