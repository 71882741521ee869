"""Security groups: golden rulesets and real TCP connections through the nftables rules."""

from __future__ import annotations

import re

import pytest

from network.desired import NodeUnderlay, VirtualNetwork, node_state
from network.errors import CommandFailed, InvalidSpec
from network.model import HostNames, NetworkAttachment, Port, SecurityGroup, SecurityGroupRule
from network.netlink import run_in_netns
from network.reconcile import reconcile
from network.secgroups import apply_ruleset, build_ruleset, rule_counters
from tests.network.golden import assert_golden
from tests.network.lab import Lab, listen, tcp_exchange, wait_ping

ANY_OUT = SecurityGroup("any-out", (SecurityGroupRule("egress"), SecurityGroupRule("egress", ethertype="ipv6")))


def ssh_only(remote_group: str | None = None) -> SecurityGroup:
    return SecurityGroup("ssh", (SecurityGroupRule("ingress", "tcp", 22, 22, remote_group=remote_group),))


@pytest.mark.unit
def test_ruleset_matches_golden_file() -> None:
    web = Port("web", "02:00:00:00:07:01", ("10.70.0.10", "fd00:70::10"), ("ssh", "web", "any-out"), "tp700-1")
    db = Port("db", "02:00:00:00:07:02", ("10.70.0.20",), ("db",), "tp700-2")
    groups = {
        "ssh": ssh_only(),
        "web": SecurityGroup("web", (
            SecurityGroupRule("ingress", "tcp", 80, 443, remote_cidr="0.0.0.0/0"),
            SecurityGroupRule("ingress", "icmp"),
            SecurityGroupRule("ingress", "tcp", 80, 80, remote_cidr="fd00::/8"),
        )),
        "db": SecurityGroup("db", (
            SecurityGroupRule("ingress", "tcp", 5432, 5432, remote_group="web"),
            SecurityGroupRule("egress", "udp", 53, 53, remote_cidr="10.70.0.1/32"),
        )),
        "any-out": ANY_OUT,
    }
    text = build_ruleset([NetworkAttachment(700, (web, db))], groups, {"web": ["10.70.0.10", "fd00:70::10"]})
    assert_golden("nft_two_ports.nft", text)


@pytest.mark.unit
def test_ruleset_rejects_unknown_group_and_bad_rules() -> None:
    p = Port("x", "02:00:00:00:07:03", ("10.0.0.3",), ("nope",), "tpx")
    with pytest.raises(InvalidSpec):
        build_ruleset([NetworkAttachment(7, (p,))], {}, {})
    with pytest.raises(InvalidSpec):
        SecurityGroupRule("ingress", "icmp", 1, 2)
    with pytest.raises(InvalidSpec):
        SecurityGroupRule("ingress", "tcp", 90, 80)


@pytest.mark.functional
def test_security_group_allows_tcp_22_not_80_both_directions_and_rule_changes_apply(lab: Lab) -> None:
    cli = Port("cli", "02:00:00:00:06:01", ("10.80.0.1",), ("client", "any-out"), "tp600-1")
    srv = Port("srv", "02:00:00:00:06:02", ("10.80.0.2",), ("ssh", "any-out"), "tp600-2")
    other = Port("oth", "02:00:00:00:06:03", ("10.80.0.3",), ("any-out",), "tp600-3")
    net = VirtualNetwork(600, {"n1": [cli], "n2": [srv], "n3": [other]})
    nodes = {f"n{n}": NodeUnderlay("ul0", lab.vtep(n)) for n in (1, 2, 3)}
    eps = {
        "cli": lab.endpoint(1, "sgc", cli, "10.80.0.1/24"),
        "srv": lab.endpoint(2, "sgs", srv, "10.80.0.2/24"),
        "oth": lab.endpoint(3, "sgo", other, "10.80.0.3/24"),
    }
    states = {n: node_state(f"n{n}", nodes, [net]) for n in (1, 2, 3)}
    for n, st in states.items():
        assert reconcile(lab.node(n), st).ok
    assert wait_ping(eps["cli"], "10.80.0.2")  # no firewall yet: plain reachability

    groups = {"ssh": ssh_only(remote_group="client"), "any-out": ANY_OUT,
              "client": SecurityGroup("client")}
    members = {"client": ["10.80.0.1"]}

    def firewall(g: dict[str, SecurityGroup]) -> None:
        for n, st in states.items():
            apply_ruleset(lab.node(n), build_ruleset(st.networks, g, members))

    firewall(groups)
    servers = {(ns, p): listen(eps[ns], f"10.80.0.{i}", p) for ns, i in (("srv", 2), ("cli", 1))
               for p in (22, 80)}
    try:
        assert tcp_exchange(eps["cli"], servers["srv", 22], "10.80.0.2", 22) == "ok"  # allowed, reply passes
        assert tcp_exchange(eps["cli"], None, "10.80.0.2", 80) == "timeout"  # not allowed: dropped
        assert tcp_exchange(eps["oth"], None, "10.80.0.2", 22) == "timeout"  # not in the remote group
        # the other direction: srv may send anything, but cli denies inbound by default
        assert tcp_exchange(eps["srv"], None, "10.80.0.1", 22) == "timeout"
        assert tcp_exchange(eps["srv"], None, "10.80.0.1", 80) == "timeout"
        assert "default deny inbound" in rule_counters(lab.node(2))
        # the nodes' own VXLAN packets (in on node 2, out on node 1) skip conntrack
        assert _notracked(lab.node(2), "zones") > 0 and _notracked(lab.node(1), "vxlan_out") > 0

        # change: srv now allows 80 from anywhere and no longer 22
        groups["ssh"] = SecurityGroup("ssh", (SecurityGroupRule("ingress", "tcp", 80, 80),))
        firewall(groups)
        res = tcp_exchange(eps["oth"], servers["srv", 80], "10.80.0.2", 80)
        assert res == "ok", rule_counters(lab.node(2)) + rule_counters(lab.node(3))
        assert tcp_exchange(eps["cli"], None, "10.80.0.2", 22) == "timeout"

        # egress rules bind too: without an egress rule cli cannot even start a connection
        no_out = {**groups, "any-out": SecurityGroup("any-out")}
        firewall(no_out)
        assert tcp_exchange(eps["cli"], None, "10.80.0.2", 80) == "timeout"
    finally:
        for s in servers.values():
            s.close()


def _notracked(ns: str, chain: str) -> int:
    """Packets the "overlay underlay" notrack rule of ``chain`` has matched."""
    text = run_in_netns(ns, ["nft", "list", "chain", "inet", HostNames().sg_table, chain]).stdout
    line = next(ln for ln in text.splitlines() if "notrack" in ln)
    return int(line.split("packets ")[1].split()[0])


@pytest.mark.functional
def test_a_rejected_ruleset_leaves_the_previous_one_in_place(lab: Lab) -> None:
    st = lab.state(3, (NetworkAttachment(610, ()),))
    apply_ruleset(lab.node(3), build_ruleset(st.networks, {}, {}))
    before = _rules(lab.node(3))
    with pytest.raises(CommandFailed):
        apply_ruleset(lab.node(3), build_ruleset(st.networks, {}, {}).replace("policy accept;", "policy bogus;", 1))
    assert _rules(lab.node(3)) == before


def _rules(ns: str) -> str:
    """The live table without counter values (stray overlay packets move those)."""
    return re.sub(r"packets \d+ bytes \d+", "", rule_counters(ns))
