"""Overlay benchmark: iperf3 through VXLAN vs straight over the underlay, in one run,
and the time one reconcile pass takes on a node with 1000 ports.

Everything runs in throwaway namespaces (prefix ``cn<random>``) removed at the end.
Usage: .venv/bin/python bench/network_overlay.py [--seconds 5] [--rounds 3] [--out FILE]
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


def iperf(server_ns: str, client_ns: str, ip: str, seconds: int) -> float:
    """Gbit/s received, one TCP stream."""
    srv = popen_in_netns(server_ns, ["iperf3", "-s", "-1", "-B", ip, "-p", "5201"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        r = run_in_netns(client_ns, ["iperf3", "-c", ip, "-p", "5201", "-t", str(seconds), "-J"],
                         timeout=seconds + 30)
        return float(json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        srv.wait(timeout=10)


def throughput(lab: Lab, seconds: int, rounds: int) -> dict[str, object]:
    ports = {f"n{n}": [Port(f"p{n}", f"02:00:00:00:01:{n:02x}", (f"10.10.0.{n}",), host_ifname=f"tp{n}")]
             for n in (1, 2)}
    eps = {n: lab.endpoint(n, f"e{n}", ports[f"n{n}"][0], f"10.10.0.{n}/24") for n in (1, 2)}
    nodes = {f"n{n}": NodeUnderlay("ul0", lab.vtep(n)) for n in (1, 2, 3)}
    for n in (1, 2):
        assert reconcile(lab.node(n), node_state(f"n{n}", nodes, [VirtualNetwork(100, ports)])).ok
    assert wait_ping(eps[1], "10.10.0.2")
    under, over = [], []
    for _ in range(rounds):
        under.append(iperf(lab.node(2), lab.node(1), lab.vtep(2), seconds))
        over.append(iperf(eps[2], eps[1], "10.10.0.2", seconds))
    u, o = statistics.median(under), statistics.median(over)
    return {"underlay_gbps": [round(x, 2) for x in under], "overlay_gbps": [round(x, 2) for x in over],
            "ratio_median": round(o / u, 3), "ratio_target": 0.8}


def reconcile_1000(lab: Lab, count: int = 1000, per_network: int = 20) -> dict[str, object]:
    node = lab.node(3)
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
    desired = lab.state(3, tuple(nets))
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
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).with_name("network_overlay.result.json")))
    args = ap.parse_args()
    lab = Lab().up()
    try:
        result = {"throughput": throughput(lab, args.seconds, args.rounds), "reconcile": reconcile_1000(lab)}
    finally:
        lab.close()
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
