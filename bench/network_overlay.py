"""Overlay benchmark: iperf3 through VXLAN vs straight over the underlay, in one run,
and the time one reconcile pass takes on a node with 1000 ports.

Everything runs in throwaway namespaces (prefix ``cn<random>``) removed at the end.
Usage: .venv/bin/python bench/network_overlay.py [--seconds 5] [--rounds 5] [--streams 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from network.desired import NodeUnderlay, VirtualNetwork, node_state
from network.model import NetworkAttachment, Port, SecurityGroup, SecurityGroupRule
from network.netlink import node_links, popen_in_netns, run_in_netns
from network.reconcile import reconcile
from network.secgroups import apply_ruleset, build_ruleset
from tests.network.lab import Lab, wait_ping


def iperf(server_ns: str, client_ns: str, ip: str, seconds: int, streams: int = 1) -> float:
    """Gbit/s received over ``streams`` parallel TCP streams."""
    srv = popen_in_netns(server_ns, ["iperf3", "-s", "-1", "-B", ip, "-p", "5201"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        r = run_in_netns(client_ns, ["iperf3", "-c", ip, "-p", "5201", "-t", str(seconds), "-P", str(streams), "-J"],
                         timeout=seconds + 30)
        return float(json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        srv.wait(timeout=10)


def _pair(lab: Lab, a: int, b: int, vni: int, groups: dict[str, SecurityGroup]) -> tuple[str, str, str]:
    """Endpoints on nodes ``a`` (client) and ``b`` (server) in network ``vni``, the ports in
    every group of ``groups`` (then the nodes load the security-group ruleset, as the agent
    does). Returns (client namespace, server namespace, server address)."""
    addr = {a: f"10.{vni % 256}.0.1", b: f"10.{vni % 256}.0.2"}
    ports = {f"n{n}": [Port(f"p{n}", f"02:00:00:00:{vni % 256:02x}:{n:02x}", (addr[n],), tuple(groups),
                            host_ifname=f"tp{n}")] for n in (a, b)}
    eps = {n: lab.endpoint(n, f"e{n}", ports[f"n{n}"][0], f"{addr[n]}/24") for n in (a, b)}
    nodes = {f"n{n}": NodeUnderlay("ul0", lab.vtep(n)) for n in range(1, lab.nodes + 1)}
    for n in (a, b):
        state = node_state(f"n{n}", nodes, [VirtualNetwork(vni, ports)])
        assert reconcile(lab.node(n), state).ok
        if groups:
            apply_ruleset(lab.node(n), build_ruleset(state.networks, groups, {}))
    assert wait_ping(eps[a], addr[b])
    return eps[a], eps[b], addr[b]


def throughput(lab: Lab, seconds: int, rounds: int, streams: int) -> dict[str, object]:
    """Rounds interleave the three paths so a change in machine load hits them alike:
    node 1 -> node 2 over the underlay, endpoints on nodes 1 and 2 over the overlay, and
    endpoints on nodes 3 and 4 over the overlay with a security group (nftables,
    conntrack) on both ports, as the agent sets up for real instances."""
    plain = _pair(lab, 1, 2, 100, {})
    web = {"iperf": SecurityGroup("iperf", (SecurityGroupRule("ingress", "tcp", 5201, 5201),
                                            SecurityGroupRule("ingress", "icmp"),
                                            SecurityGroupRule("egress")))}
    guarded = _pair(lab, 3, 4, 101, web)
    under, over, sg = [], [], []
    for _ in range(rounds):
        under.append(iperf(lab.node(2), lab.node(1), lab.vtep(2), seconds, streams))
        over.append(iperf(plain[1], plain[0], plain[2], seconds, streams))
        sg.append(iperf(guarded[1], guarded[0], guarded[2], seconds, streams))
    u, o, s = (statistics.median(x) for x in (under, over, sg))
    return {"streams": streams, "underlay_gbps": [round(x, 2) for x in under],
            "overlay_gbps": [round(x, 2) for x in over], "overlay_secgroup_gbps": [round(x, 2) for x in sg],
            "ratio_median": round(o / u, 3), "ratio_secgroup_median": round(s / u, 3), "ratio_target": 0.8}


def reconcile_1000(lab: Lab, count: int = 1000, per_network: int = 20) -> dict[str, object]:
    node = lab.node(5)
    t0 = time.monotonic()
    with node_links(node) as nl:
        for i in range(count):
            nl.add_veth(f"tk{i}", f"tkp{i}", 1450)
    make = time.monotonic() - t0
    nets = []
    for k in range(count // per_network):
        ports = tuple(
            Port(f"p{i}", f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
                 (f"10.{100 + k // 200}.{k % 200}.{i % per_network + 10}",), ("web",), f"tk{i}")
            for i in range(k * per_network, (k + 1) * per_network)
        )
        nets.append(NetworkAttachment(1000 + k, ports, remote_vteps=(lab.vtep(1), lab.vtep(2))))
    desired = lab.state(5, tuple(nets))
    first = reconcile(node, desired)
    second = reconcile(node, desired)
    assert first.ok and second.ok and not second.changed, (first.error, second.error, second.changed[:3])
    groups = {"web": SecurityGroup("web", (SecurityGroupRule("ingress", "tcp", 22, 22),
                                           SecurityGroupRule("egress")))}
    t1 = time.monotonic()
    text = build_ruleset(desired.networks, groups, {})
    t2 = time.monotonic()
    apply_ruleset(node, text)
    t3 = time.monotonic()
    return {"ports": count, "networks": len(nets), "veth_create_s": round(make, 2),
            "reconcile_cold_s": round(first.seconds, 3), "reconcile_noop_s": round(second.seconds, 3),
            "reconcile_target_s": 5.0, "ruleset_build_s": round(t2 - t1, 3), "ruleset_apply_s": round(t3 - t2, 3),
            "ruleset_lines": text.count("\n")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--streams", type=int, default=1, help="parallel TCP streams per iperf3 run")
    ap.add_argument("--out", default=str(Path(__file__).with_name("network_overlay.result.json")))
    args = ap.parse_args()
    lab = Lab(nodes=5).up()
    try:
        result = {"throughput": throughput(lab, args.seconds, args.rounds, args.streams),
                  "reconcile": reconcile_1000(lab)}
    finally:
        lab.close()
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
