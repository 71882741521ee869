"""HA on the lab cluster (issue: HA): a dead node's HA instances run again elsewhere,
fenced first (its watchdog kills it before its lease can expire; its storage is cut off
before anything restarts), never twice; non-HA instances say why they are gone;
drain and undrain."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.lab import daemon, ops
from tests.lab_cluster import LabCluster, wait_for

pytestmark = [pytest.mark.functional, pytest.mark.slow]
NODES = ("n1", "n2", "n3")


def instance(lab: LabCluster, kind: str, name: str, via: str) -> dict[str, Any]:
    return lab.cairn(via, "get", kind, name)  # type: ignore[no-any-return]


def node_phase(lab: LabCluster, node: str, via: str) -> str:
    return str(lab.cairn(via, "get", "node", node)["status"]["phase"])


@pytest.fixture(scope="module")
def ha_lab(lab_cluster: LabCluster) -> Iterator[LabCluster]:
    lab = lab_cluster
    lab.wait_healthy(timeout=300)
    lab.cairn("n1", "image", "import-test-guest", timeout=600)
    lab.cairn("n1", "network", "create", "hanet", "--cidr", "10.63.0.0/24")
    yield lab
    left = [("vm", v["name"]) for v in lab.cairn("n1", "get", "vms")]
    left += [("container", c["name"]) for c in lab.cairn("n1", "get", "containers")]
    for kind, name in left:
        lab.cairn_rc("n1", "delete", kind, name)
    wait_for("the network's ports to go", lambda: lab.cairn_rc("n1", "delete", "network", "hanet").returncode == 0, 120)


def victim_for(lab: LabCluster) -> tuple[str, str]:
    """A node to kill that is neither the database primary nor etcd's leader (their
    failovers are the cluster tests' subject; here they would only add their seconds)
    and a survivor to ask."""
    view = lab.view()
    busy = {view["database"]["primary"], view["etcd"]["leader"]}
    victim = next(n for n in reversed(NODES) if n not in busy)
    survivor = next(n for n in NODES if n != victim)
    return victim, survivor


def heal_and_check_unfenced(lab: LabCluster, victim: str, survivor: str) -> None:
    ops.heal(lab.dir)
    wait_for(f"{victim} Ready again", lambda: node_phase(lab, victim, survivor) == "Ready", 180)
    addr = lab.lab.node(victim).address
    r = lab.run(survivor, ["ceph", "osd", "blocklist", "ls"])
    assert addr not in r.stdout, f"{victim}'s blocklist was not lifted after its reboot: {r.stdout}"
    lab.wait_healthy(timeout=300)


# --- never two copies: an HA guest appends (boot id, counter) records to its disk ----------

def counter_records(raw: bytes) -> list[tuple[str, int]]:
    """The ``CTR <boot> <n>`` records of a counter guest's disk, in disk order."""
    out = []
    for n in range(1, len(raw) // 64):
        rec = raw[64 * n:64 * n + 64].rstrip(b"\0\n ").decode(errors="replace")
        if not rec:
            break
        parts = rec.split()
        assert len(parts) == 3 and parts[0] == "CTR" and int(parts[2]) == n, f"record {n} is torn: {rec!r}"
        out.append((parts[1], int(parts[2])))
    return out


def check_never_two_copies(records: list[tuple[str, int]]) -> tuple[int, int]:
    """Counters run 1, 2, 3… with no gap and no step back, and the boot ids form runs that
    never come back: once a new copy began, the old one never wrote again."""
    assert [n for _, n in records] == list(range(1, len(records) + 1))
    runs: list[str] = []
    for boot, _ in records:
        if not runs or runs[-1] != boot:
            assert boot not in runs, f"boot {boot} wrote again after {runs[-1]} had begun: two copies ran"
            runs.append(boot)
    assert len(runs) >= 2, f"the guest never restarted elsewhere: {runs}"
    return len(records), len(runs)


def read_volume(lab: LabCluster, node: str, volume: str) -> bytes:
    export = lab.cairn(node, "volume", "get", volume)["status"]["export"]
    out = f"/tmp/cairn-ctr-{volume}-{os.getpid()}.raw"
    try:
        r = lab.run(node, ["qemu-img", "convert", "-f", "raw", "-O", "raw", export, out], timeout=300)
        assert r.returncode == 0, r.stderr
        with open(out, "rb") as f:
            return f.read(1 << 20)
    finally:
        if os.path.exists(out):
            os.unlink(out)


def counting_vm(lab: LabCluster, via: str, name: str, node: str, *extra: str) -> str:
    """An HA VM on ``node`` counting on a Ceph volume of its own (the volume's name)."""
    vol = f"{name}-disk"
    lab.cairn(via, "volume", "create", vol, "--size", "64MiB", "--pool", "ceph", timeout=300)
    lab.cairn(via, "vm", "create", name, "--image", "tiny-guest", "--volume", vol, "--on", node, "--ha",
              "--kernel-args", "cairn.counter=vda", *extra, timeout=600)
    serial = lab.lab.node(node).data_dir / "instances"
    wait_for("the guest counting", lambda: any("CTR " in p.read_text(errors="replace")
                                               for p in serial.glob(f"cairn-{name}-*/serial.log")), 120)
    time.sleep(2)
    return vol


def check_one_copy_counted(lab: LabCluster, via: str, name: str, vol: str, target: str) -> None:
    """After a failover to ``target``: the new copy resumed the count the old one left on
    disk, and the disk shows the old copy never wrote once the new one had begun."""
    resumed = wait_for("the new copy resuming its count", lambda: [
        ln for p in (lab.lab.node(target).data_dir / "instances").glob(f"cairn-{name}-*/serial.log")
        # the serial shell's cursor query (ESC[6n) may share the line: find the record in it
        for ln in p.read_text(errors="replace").splitlines() if "CTR-RESUME" in ln], 120)
    resumed = [ln[ln.index("CTR-RESUME"):] for ln in resumed]
    assert int(resumed[-1].split()[1]) > 0, f"the new copy saw an empty disk: {resumed}"
    time.sleep(3)  # it counts on
    lab.cairn(via, "vm", "stop", name, timeout=300)
    records, runs = check_never_two_copies(counter_records(read_volume(lab, via, vol)))
    print(f"{name}: {records} records in {runs} boot runs, resumed at {resumed[-1]}")


def remove_counting_vm(lab: LabCluster, via: str, name: str) -> None:
    lab.cairn_rc(via, "delete", "vm", name)
    wait_for("the volume free", lambda: lab.cairn_rc(via, "delete", "volume", f"{name}-disk").returncode == 0, 120)


def test_ha_instances_of_a_killed_node_run_again_elsewhere_and_the_others_say_why(ha_lab: LabCluster) -> None:
    lab = ha_lab
    victim, survivor = victim_for(lab)
    vol = counting_vm(lab, survivor, "ha-vm", victim, "--memory", "256MiB", "--network", "hanet")
    vm = instance(lab, "vm", "ha-vm", survivor)
    assert vm["status"]["node"] == victim and vm["spec"]["ha"] is True
    ct = lab.cairn(survivor, "container", "create", "ha-ct", "--image", "busybox", "--network", "hanet",
                   "--on", victim, "--ha", "--", "sleep", "36000", timeout=300)
    assert ct["status"]["node"] == victim
    plain = lab.cairn(survivor, "vm", "create", "plain-vm", "--image", "tiny-guest", "--memory", "128MiB",
                      "--on", victim, timeout=600)
    assert plain["status"]["node"] == victim
    wait_for("the watchdog armed on the victim",
             lambda: daemon.call(lab.lab, {"op": "watchdogs"}).get(victim, {}).get("armed"), 60)
    killed = time.time()
    ops.kill(victim, lab.dir)
    for kind, name in (("vm", "ha-vm"), ("container", "ha-ct")):
        moved = wait_for(f"{kind} {name} running on a survivor", lambda k=kind, n=name: (
            (i := instance(lab, k, n, survivor))["status"].get("node") not in (victim, None)
            and i["status"].get("power_state") == "running" and i["status"].get("task_state") is None and i), 180)
        assert moved["status"]["failover"]["from"] == victim
    print(f"HA instances running again {time.time() - killed:.1f} s after the kill")
    lost = wait_for("plain-vm in error", lambda: (i := instance(lab, "vm", "plain-vm", survivor))["status"].get(
        "vm_state") == "error" and i, 60)
    assert victim in lost["status"]["error"] and "lost" in lost["status"]["error"]
    assert node_phase(lab, victim, survivor) == "Fenced"
    assert lab.lab.node(victim).address in lab.run(survivor, ["ceph", "osd", "blocklist", "ls"]).stdout
    r = lab.cairn_rc(survivor, "events", "--since", "0", "--seconds", "3", "-o", "json")
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert any(e["kind"] == "node" and e["verb"] == "fenced" and e["name"] == victim for e in events), \
        "no event says why the node's instances moved"
    check_one_copy_counted(lab, survivor, "ha-vm", vol, instance(lab, "vm", "ha-vm", survivor)["status"]["node"])
    heal_and_check_unfenced(lab, victim, survivor)
    lab.cairn_rc(survivor, "delete", "vm", "plain-vm")
    remove_counting_vm(lab, survivor, "ha-vm")


def test_a_partitioned_node_is_reset_by_its_own_watchdog_before_its_instance_starts_elsewhere(
        ha_lab: LabCluster) -> None:
    lab = ha_lab
    victim, survivor = victim_for(lab)
    name = "part-vm"
    vol = counting_vm(lab, survivor, name, victim, "--memory", "128MiB")
    wait_for("the watchdog armed", lambda: daemon.call(lab.lab, {"op": "watchdogs"})[victim]["armed"], 60)
    log = lab.dir / "watchdog.log"
    before = log.read_text() if log.exists() else ""
    ops.partition(victim, lab.dir)
    moved = wait_for("the VM running on a survivor", lambda: (i := instance(lab, "vm", name, survivor))["status"].get(
        "node") != victim and i["status"].get("power_state") == "running" and i, 180)
    fired = [ln for ln in log.read_text()[len(before):].splitlines() if f" {victim} fired" in ln]
    assert fired, "the cut-off node was not reset by its watchdog"
    fenced_at = lab.cairn(survivor, "get", "node", victim)["status"]["ha"]["fenced_at"]
    from datetime import datetime

    assert float(fired[0].split()[0]) < datetime.fromisoformat(fenced_at).timestamp(), \
        "the node was fenced by the others before its own watchdog had reset it"
    assert moved["status"]["failover"]["from"] == victim
    check_one_copy_counted(lab, survivor, name, vol, moved["status"]["node"])
    heal_and_check_unfenced(lab, victim, survivor)
    remove_counting_vm(lab, survivor, name)


def test_a_hung_agent_stops_feeding_the_watchdog_and_the_node_is_reset(ha_lab: LabCluster) -> None:
    lab = ha_lab
    victim, survivor = victim_for(lab)
    name = "hung-vm"
    vol = counting_vm(lab, survivor, name, victim, "--memory", "128MiB")
    wait_for("the watchdog armed", lambda: daemon.call(lab.lab, {"op": "watchdogs"})[victim]["armed"], 60)
    state = json.loads((lab.lab.node(victim).data_dir / "run" / "supervisor.json").read_text())
    os.kill(int(state["programs"]["agent"]["pid"]), signal.SIGSTOP)
    wait_for("the hung node reset by its watchdog", lambda: not ops.boot_pid(lab.lab, victim), 60)
    moved = wait_for("the VM running on a survivor", lambda: (i := instance(lab, "vm", name, survivor))[
        "status"].get("node") != victim and i["status"].get("power_state") == "running" and i, 180)
    check_one_copy_counted(lab, survivor, name, vol, moved["status"]["node"])
    heal_and_check_unfenced(lab, victim, survivor)
    remove_counting_vm(lab, survivor, name)


def test_drain_refuses_without_room_and_a_rolling_upgrade_drains_reboots_and_undrains_every_node(
        ha_lab: LabCluster) -> None:
    """Drain without room elsewhere: refused, nothing changed. Then `cairn lab upgrade`
    drains (VMs migrate live, containers restart elsewhere; the node is Maintenance),
    reboots onto the current code and undrains n1, n2, n3 in turn, while a guest on the
    overlay pings another one: the heartbeat never stops longer than a migration. Each
    guest also moves to a node that carried none of its network before (its bridge must
    be there before the guest arrives)."""
    lab = ha_lab
    target = lab.cairn("n1", "vm", "create", "hb-target", "--image", "tiny-guest", "--memory", "128MiB",
                       "--network", "hanet", "--on", "n2", timeout=600)
    ip = target["status"]["ports"][0]["ips"][0]["address"]
    pinger = lab.cairn("n1", "vm", "create", "hb-pinger", "--image", "tiny-guest", "--memory", "128MiB",
                       "--network", "hanet", "--on", "n1", "--kernel-args", f"cairn.pingloop={ip}", timeout=600)
    lab.cairn("n1", "container", "create", "drain-ct", "--image", "busybox", "--network", "hanet", "--on", "n2",
              "--", "sleep", "36000", timeout=300)
    domains = {"hb-target": target["status"]["domain"], "hb-pinger": pinger["status"]["domain"]}
    # no room elsewhere: refused, nothing changed
    others = ("n1", "n3")
    for other in others:
        lab.cairn("n1", "node", "cordon", other)
    try:
        r = lab.cairn_rc("n1", "node", "drain", "n2")
        assert r.returncode != 0 and "fits on no other node" in r.stderr and "nothing was changed" in r.stderr
        assert node_phase(lab, "n2", "n1") == "Ready"
        assert instance(lab, "vm", "hb-target", "n1")["status"]["node"] == "n2"
    finally:
        for other in others:
            lab.cairn("n1", "node", "uncordon", other)
    domain = domains["hb-pinger"]
    wait_for("the pinger reaching its target", lambda: any(ok for _, ok in _pingloop(lab, domain)), 180)
    started = max(t for t, _ in _pingloop(lab, domain))
    report = ops.upgrade(lab.dir)
    assert [s["node"] for s in report["nodes"]] == list(NODES)
    assert all(s["phase_drained"] == "Maintenance" for s in report["nodes"]), report
    for node in NODES:  # undrained
        assert node_phase(lab, node, "n1") == "Ready"
    for name in ("hb-target", "hb-pinger"):
        vm = instance(lab, "vm", name, "n1")
        assert vm["status"]["power_state"] == "running" and vm["status"]["vm_state"] == "active"
        assert vm["status"]["domain"] == domains[name]  # the same guest, migrated live, never recreated
        assert vm["status"]["migration"]["mode"] == "live"
    ct = instance(lab, "container", "drain-ct", "n1")
    assert ct["status"]["power_state"] == "running"
    wait_for("a heartbeat after the upgrade", lambda: max(t for t, _ in _pingloop(lab, domain)) > started + 1, 60)
    beats = [t for t, ok in _pingloop(lab, domain) if ok and t >= started]
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert beats and max(gaps) < 10, f"the guests' heartbeat stopped for {max(gaps):.1f} s during the upgrade"
    print(f"rolling upgrade: {report}; longest heartbeat gap {max(gaps):.2f} s over {len(beats)} beats")
    lab.cairn_rc("n1", "delete", "container", "drain-ct")
    for name in ("hb-pinger", "hb-target"):
        lab.cairn_rc("n1", "delete", "vm", name)


def _pingloop(lab: LabCluster, domain: str) -> list[tuple[float, bool]]:
    """The ``PL <uptime> ok|fail`` lines a pinging guest wrote to its serial log, on every
    node it ran on (a live migration keeps the guest's uptime), in order. A line may start
    with the serial shell's terminal queries (ESC[6n), so the record is found inside it."""
    seen: dict[float, bool] = {}
    for node in lab.lab.nodes:
        log = node.data_dir / "instances" / domain / "serial.log"
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                parts = line[line.find("PL "):].split() if "PL " in line else []
                if len(parts) == 3 and parts[0] == "PL" and parts[2] in ("ok", "fail"):
                    try:
                        seen[float(parts[1])] = parts[2] == "ok"
                    except ValueError:
                        pass
    return sorted(seen.items())
