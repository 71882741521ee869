"""Three nodes acting as one (issue: cluster): the lab cluster of the session (`cairn lab
up --nodes 3`: etcd, Patroni/PostgreSQL, Redis Sentinel and Ceph on namespaced nodes),
driven through the project's own commands run inside the nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from appliance.lab import daemon, ops
from tests.lab_cluster import LabCluster, wait_for

pytestmark = [pytest.mark.functional, pytest.mark.slow]
NODES = ("n1", "n2", "n3")


def roles(view: dict[str, Any], role: str) -> list[str]:
    return [m["name"] for m in view["members"] if role in m["roles"]]


def etcd_members(lab: LabCluster, via: str = "n1") -> list[str]:
    return sorted(m["name"] for m in lab.view(via)["members"])


def test_three_members_in_quorum_one_database_primary_and_ceph_health_ok(lab_cluster: LabCluster) -> None:
    view = lab_cluster.cairn("n2", "cluster", "status")
    assert view["quorum"] is True
    assert [(m["name"], m["ready"]) for m in view["members"]] == [(n, True) for n in NODES]
    assert all("etcd" in m["roles"] and "etcd-learner" not in m["roles"] for m in view["members"])
    assert len(roles(view, "database-primary")) == 1 and view["database"]["primary"] in NODES
    assert len(roles(view, "database-sync-standby")) == 1
    assert len(roles(view, "redis-master")) == 1 and view["redis"]["sentinels"] == 3
    assert roles(view, "ceph-mon") == list(NODES)
    assert view["ceph"]["health"] == "HEALTH_OK"
    assert view["ceph"]["osd_hosts"] == {n: 1 for n in NODES}
    # once three members exist, a committed write waits for the synchronous standby
    assert roles(view, "etcd-leader") != roles(view, "database-primary")


def test_the_cli_node_option_points_at_each_lab_node(lab_cluster: LabCluster) -> None:
    env = {**os.environ, "CAIRN_LAB_DIR": str(lab_cluster.dir)}
    for node in NODES:
        r = subprocess.run([sys.executable, "-m", "appliance.cli.main", "--node", node, "status", "-o", "json"],
                           env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["node"] == node and status["nodes"]["ready"] == 3
    r = subprocess.run([sys.executable, "-m", "appliance.cli.main", "--node", "n9", "status"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no node 'n9'" in r.stderr


def test_resources_made_through_one_node_are_visible_and_usable_through_the_others(lab_cluster: LabCluster) -> None:
    lab_cluster.cairn("n1", "network", "create", "shared", "--cidr", "10.61.0.0/24")
    try:
        for node in ("n2", "n3"):
            net = lab_cluster.cairn(node, "get", "network", "shared")
            assert net["spec"]["cidr"] == "10.61.0.0/24"
        lab_cluster.cairn("n2", "secgroup", "create", "web")
        lab_cluster.cairn("n3", "secgroup", "rule", "add", "web", "--proto", "tcp", "--port", "80")
        group = lab_cluster.cairn("n1", "get", "secgroup", "web")
        assert [r["port_min"] for r in group["spec"]["rules"]] == [80]
    finally:
        lab_cluster.cairn_rc("n3", "delete", "secgroup", "web")
        lab_cluster.cairn_rc("n2", "delete", "network", "shared")
    assert lab_cluster.cairn_rc("n1", "get", "network", "shared").returncode != 0


def test_a_vm_and_a_container_on_different_nodes_ping_each_other_over_the_overlay(lab_cluster: LabCluster) -> None:
    lab = lab_cluster
    lab.cairn("n1", "image", "import-test-guest", timeout=600)
    lab.cairn("n2", "network", "create", "ovl", "--cidr", "10.62.0.0/24")
    try:
        vm = lab.cairn("n3", "vm", "create", "pinger-vm", "--image", "tiny-guest", "--memory", "256MiB",
                       "--network", "ovl", "--on", "n1", timeout=600)
        assert vm["status"]["node"] == "n1" and vm["status"]["power_state"] == "running"
        ct = lab.cairn("n1", "container", "create", "pinger-ct", "--image", "busybox", "--network", "ovl",
                       "--on", "n2", "--", "sleep", "3600", timeout=300)
        assert ct["status"]["node"] == "n2"
        vm_ip = vm["status"]["ports"][0]["ips"][0]["address"]
        deadline = time.monotonic() + 120  # the guest takes its DHCP lease after booting under TCG
        while True:
            r = lab.cairn_rc("n3", "container", "exec", "pinger-ct", "--", "ping", "-c", "1", "-W", "2", vm_ip)
            if r.returncode == 0:
                break
            assert time.monotonic() < deadline, f"the container on n2 never reached the VM on n1: {r.stdout}{r.stderr}"
            time.sleep(2)
        # the VM's serial console through n3's API (the VM runs on n1: n3 relays to n1's API)
        seen = lab.run("n3", [sys.executable, "-c", CONSOLE_PEEK, "vms/pinger-vm/console/serial", "HB "], timeout=90)
        assert seen.returncode == 0 and "HB " in seen.stdout, f"no guest output through n3: {seen.stdout}{seen.stderr}"
    finally:
        lab.cairn_rc("n2", "delete", "container", "pinger-ct")
        lab.cairn_rc("n2", "delete", "vm", "pinger-vm")
        for _ in range(30):
            if lab.cairn_rc("n1", "delete", "network", "ovl").returncode == 0:
                break
            time.sleep(2)


CONSOLE_PEEK = r"""
import asyncio, json, ssl, sys
from websockets.asyncio.client import connect  # not the sync client: see tests/wsclient.py
cfg = json.load(open("/var/lib/cairn/cli.json"))
ctx = ssl.create_default_context(cafile=cfg["ca_file"])
url = cfg["url"].replace("https://", "wss://") + "/api/v1/" + sys.argv[1]
async def peek():
    got = b""
    async with connect(url, ssl=ctx, additional_headers={"Authorization": "Bearer " + cfg["token"]},
                       open_timeout=30, close_timeout=3) as ws:
        try:
            async with asyncio.timeout(60):
                while sys.argv[2].encode() not in got:
                    got += await ws.recv()
        except TimeoutError:
            pass
    return got
got = asyncio.run(peek())
print(got.decode(errors="replace")[-500:])
sys.exit(0 if sys.argv[2].encode() in got else 1)
"""


def _join_attempt(lab: LabCluster, node: str, token: str, timeout: float = 120) -> str:
    """Boot ``node`` with ``cluster join``; returns its boot log once it has joined or failed."""
    lab_ = lab.lab
    member = lab_.node("n1").address
    log = lab_.node(node).path / "boot.log"
    offset = log.stat().st_size if log.exists() else 0
    daemon.call(lab_, {"op": "start", "node": node, "mode": "join", "member": member, "token": token,
                       "osds": [f"file:{4 << 30}"]})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = daemon.call(lab_, {"op": "nodes"})[node]
        booted = lab_.node(node).path / "booted"
        if not info["running"] or (booted.exists() and booted.read_text().split()[0] == str(info["pid"])):
            return log.read_text()[offset:]
        time.sleep(0.5)
    raise AssertionError(f"{node} neither joined nor failed within {timeout} s: {log.read_text()[-2000:]}")


def _post_join(lab: LabCluster, token: str, name: str) -> tuple[int, str]:
    """POST /cluster/join from inside n1 (a candidate's request, with a fresh CSR)."""
    code = (
        "import json, ssl, sys, tempfile, httpx; from pathlib import Path; from appliance import pki;"
        "csr = pki.node_csr(Path(tempfile.mkdtemp())).decode();"
        "ctx = ssl.create_default_context(cafile='/var/lib/cairn/pki/ca.crt');"
        f"r = httpx.post('https://127.0.0.1:8443/api/v1/cluster/join', verify=ctx, timeout=60, json={{"
        f"'token': {token!r}, 'name': {name!r}, 'address': '172.29.0.99', 'csr': csr}});"
        "print(r.status_code); print(r.json().get('detail', ''))"
    )
    r = lab.run("n1", [sys.executable, "-c", code])
    status, _, detail = r.stdout.partition("\n")
    assert status.strip().isdigit(), r.stderr
    return int(status), detail.strip()


def test_joins_with_bad_tokens_are_refused_and_change_nothing_then_a_node_joins_and_is_removed(
        lab_cluster: LabCluster) -> None:
    lab = lab_cluster
    before = etcd_members(lab)
    ops.add_node(lab.dir, join=False)  # n4: cabled, never booted
    node = "n4"
    good = lab.cairn("n1", "cluster", "token", "create")["token"]
    wrong = good.rsplit(".", 1)[0] + ".not-the-secret"
    log = _join_attempt(lab, node, wrong)
    assert "refused the join (403)" in log and "not valid" in log
    assert etcd_members(lab) == before
    expiring = lab.cairn("n1", "cluster", "token", "create", "--ttl", "1")["token"]
    time.sleep(2)
    log = _join_attempt(lab, node, expiring)
    assert "expired" in log and etcd_members(lab) == before
    log = _join_attempt(lab, node, "CJ1.short")
    assert "malformed" in log and etcd_members(lab) == before
    # a member cannot join twice, and the refusal leaves the token unused
    status, detail = _post_join(lab, good, "n2")
    assert status == 409 and "already a member" in detail
    unused = {t["id"]: t for t in lab.cairn("n1", "cluster", "token", "list")}[good.split(".")[2]]
    assert unused["used_at"] is None
    r = lab.cairn_rc("n2", "cluster", "join", lab.lab.node("n1").address, good)
    assert r.returncode != 0 and "already a member" in r.stderr
    # the good token works once
    log = _join_attempt(lab, node, good, timeout=300)
    assert "failed" not in log and "Traceback" not in log, log[-2000:]
    ops.cairn_in_node(lab.lab, node, "up", "--timeout", "300", timeout=330)
    deadline = time.monotonic() + 120
    while etcd_members(lab) != [*before, node] or "etcd-learner" in str(lab.view()["members"]):
        assert time.monotonic() < deadline, lab.view()
        time.sleep(2)
    status, detail = _post_join(lab, good, "n7")
    assert status == 403 and "already used" in detail
    # removal: the node is powered off first, then taken out of every engine
    ops.kill(node, lab.dir)
    r = lab.cairn_rc("n1", "cluster", "remove", "n2")
    assert r.returncode != 0 and "is Ready" in r.stderr
    deadline = time.monotonic() + 60
    while lab.cairn("n1", "get", "node", node)["status"]["phase"] == "Ready":
        assert time.monotonic() < deadline
        time.sleep(1)
    done = lab.cairn("n1", "cluster", "remove", node)
    assert done["etcd"] == "removed" and done["ceph_osds"] == "purged"
    # its dedup writer is gone from the shared pool: garbage collection waits for it no more
    assert isinstance(done["storage"], dict) and "ceph" in done["storage"], done
    ops.remove_node(node, lab.dir)
    view = lab.wait_healthy(timeout=300)
    assert [m["name"] for m in view["members"]] == list(NODES)
    assert view["ceph"]["osd_hosts"] == {n: 1 for n in NODES}
    assert node not in [n["name"] for n in lab.cairn("n1", "get", "nodes")]


def test_a_partitioned_node_drops_out_and_comes_back_when_healed(lab_cluster: LabCluster) -> None:
    lab = lab_cluster
    view = lab.view()
    victim = next(n for n in NODES if n not in roles(view, "database-primary") + roles(view, "etcd-leader"))
    project = f"during-partition-{int(time.time())}"
    ops.partition(victim, lab.dir)
    try:
        other = next(n for n in NODES if n != victim)
        deadline = time.monotonic() + 60
        while True:
            members = {m["name"]: m for m in lab.view(other)["members"]}
            if not members[victim]["ready"]:
                break
            assert time.monotonic() < deadline, f"{victim} still Ready while cut off"
            time.sleep(2)
        # the others keep a quorum, a primary, and accept writes
        assert lab.view(other)["quorum"]
        lab.cairn(other, "project", "create", project)
    finally:
        ops.heal(lab.dir)
    lab.wait_healthy(timeout=300)
    assert lab.cairn(victim, "get", "project", project)["name"] == project


def test_losing_the_database_primary_node_keeps_the_api_writable_and_loses_no_acknowledged_write(
        lab_cluster: LabCluster) -> None:
    lab = lab_cluster
    view = lab.view()
    primary = view["database"]["primary"]
    survivor = next(n for n in NODES if n != primary)
    writer = lab.writer(survivor, f"fo{int(time.time())}", interval=0.25, seconds=40)
    time.sleep(6)
    ops.kill(primary, lab.dir)
    try:
        writes = lab.writes(writer)
        acked = [w["name"] for w in writes if w["ok"]]
        late = [w for w in writes if w["ok"] and w["t"] > 25]
        assert late, f"the API on {survivor} did not accept writes again after {primary} died: {writes[-5:]}"
        names = {p["name"] for p in lab.cairn(survivor, "get", "projects")}
        missing = [a for a in acked if a not in names]
        assert not missing, f"acknowledged writes lost in the failover: {missing}"
    finally:  # the node comes back also when the test failed: the next tests need three
        ops.heal(lab.dir)
    view = lab.wait_healthy(timeout=300)
    assert view["database"]["primary"] != primary
    assert primary in roles(view, "database-replica") + roles(view, "database-sync-standby")


PSQL = "/usr/lib/postgresql/15/bin/psql"


def _sql(lab: LabCluster, node: str, query: str, timeout: float = 30) -> str:
    """``query`` on the node's own PostgreSQL (local trust, as the superuser)."""
    r = lab.run(node, [PSQL, "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-Atc", query], timeout=timeout)
    return (r.stdout if r.returncode == 0 else f"ERROR {r.stderr}").strip()


def _apply_delay(lab: LabCluster, node: str, seconds: int) -> None:
    """``recovery_min_apply_delay`` on one replica, set in ``postgresql.base.conf`` (which
    Patroni leaves to the operator; it resets the setting anywhere else), reloaded."""
    base = _sql(lab, node, "show data_directory") + "/postgresql.base.conf"
    line = f"recovery_min_apply_delay = '{seconds}s'" if seconds else ""
    r = lab.run(node, ["sh", "-c", f"sed -i '/^recovery_min_apply_delay/d' {base} && echo \"{line}\" >> {base}"])
    assert r.returncode == 0, r.stderr
    assert _sql(lab, node, "select pg_reload_conf()") == "t"
    wait_for(f"{node}'s apply delay {seconds} s",
             lambda: _sql(lab, node, "select setting from pg_settings where name = 'recovery_min_apply_delay'")
             == str(seconds * 1000), 30)


def _cut_replication(lab: LabCluster, node: str, source: str, cut: bool) -> None:
    """Drop (or stop dropping) what ``node`` receives from ``source``'s PostgreSQL: a table of
    the test's own in the node's network namespace."""
    table = "inet cairn_test_diverge"
    script = (f"add table {table} {{ chain in {{ type filter hook input priority -10; policy accept; "
              f"ip saddr {source} tcp sport 5432 drop; }}; }}" if cut else f"delete table {table}")
    r = lab.run(node, ["nft", script])
    assert r.returncode == 0 or not cut, r.stderr


@pytest.mark.parametrize("how", ["kill", "partition", "late-replay"])
def test_a_replica_ahead_of_the_promoted_standby_is_rewound_and_commits_go_on(lab_cluster: LabCluster,
                                                                              how: str) -> None:
    """The asynchronous replica replays WAL the sync standby never got (a commit the
    primary still waited for, so never acknowledged), then the primary dies: the standby
    is promoted behind that replica, whose timeline has diverged (likewise when the
    primary is cut off, alive). It must be rewound and
    follow the new primary, and the cluster must take commits again (with strict
    synchronous replication a replica left down holds every commit once the other one
    goes: issue HA, bug 3).

    ``late-replay``: the replica has *received* the held commit but replays it only after
    Patroni checked its timeline against the new primary (a loaded machine's replay lag;
    made certain here by an apply delay on the replica, lifted once Patroni has checked).
    Patroni 3.0.2 compares the replayed position only, decides no rewind is needed, and
    the replica never streams again: the agent's replica watch must notice and have it
    rewound (a whole run in CI ended with both replicas stuck like this)."""
    lab = lab_cluster
    view = lab.wait_healthy(timeout=300)
    replica = next(n for n in NODES if n not in (view["database"]["primary"],
                                                  *roles(view, "database-sync-standby")))
    try:
        _diverge(lab, view, how)
    finally:
        ops.heal(lab.dir)  # also when the test failed half-way (a no-op when it healed already)
        if how == "late-replay":  # also when the test failed: the next test needs a replica that replays
            try:
                _apply_delay(lab, replica, 0)
            except AssertionError as exc:  # down or being rewound (pg_rewind copies the primary's file)
                print(f"apply delay on {replica} not lifted: {exc}")


def _diverge(lab: LabCluster, view: dict[str, Any], how: str) -> None:
    late = how == "late-replay"
    how = "kill" if late else how
    primary = view["database"]["primary"]
    standby = roles(view, "database-sync-standby")[0]
    replica = next(n for n in NODES if n not in (primary, standby))
    address = {m["name"]: m["address"] for m in view["members"]}
    table = f"diverge_{int(time.time())}"
    assert _sql(lab, primary, f"create table {table}(x int)") == "CREATE TABLE"
    wait_for(f"{standby} has the table", lambda: _sql(lab, standby, f"select count(*) from {table}") == "0", 30)
    if late:  # the replica receives from here on but replays nothing until the delay is lifted
        _apply_delay(lab, replica, 900)
        assert _sql(lab, primary, f"insert into {table} values (0)") == "INSERT 0 1"
        wait_for(f"{standby} has the row", lambda: _sql(lab, standby, f"select count(*) from {table}") == "1", 30)
        assert _sql(lab, primary, f"delete from {table}") == "DELETE 1"
        wait_for(f"{standby} has the row deleted",
                 lambda: _sql(lab, standby, f"select count(*) from {table}") == "0", 30)
    _cut_replication(lab, standby, address[primary], True)  # the next commit waits for the standby
    try:
        held = lab.popen(primary, [PSQL, "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-Atc",
                                   f"insert into {table} select generate_series(1, 1000)"])
        if late:
            wait_for(f"{replica} receiving the held commit without replaying it",
                     lambda: _sql(lab, replica, "select pg_last_wal_receive_lsn() - pg_last_wal_replay_lsn() > 8192")
                     == "t", 30)
            replayed = _sql(lab, replica, "select pg_last_wal_replay_lsn()")
        else:
            wait_for(f"{replica} replaying the held commit",
                     lambda: _sql(lab, replica, f"select count(*) from {table}") == "1000", 30)
        assert held.poll() is None, "the commit was not held for the cut-off sync standby"
        assert _sql(lab, standby, f"select count(*) from {table}") == "0"
        getattr(ops, how)(primary, lab.dir)
        # the cut stays until the standby is promoted: the dead primary's kernel keeps
        # retransmitting what its walsender had sent, which would reach the standby late
        new = wait_for("a new primary", lambda: (p := lab.view(standby)["database"]["primary"]) not in (None, primary)
                       and p, 120)
    finally:
        _cut_replication(lab, standby, address[primary], False)
    held.wait(timeout=60)
    assert new == standby, f"{new} was promoted, not the sync standby {standby}"
    if late:  # Patroni on the replica follows the new primary and checks its timeline, then replay goes on
        wait_for(f"{replica} following {new}",
                 lambda: address[new] in _sql(lab, replica, "show primary_conninfo"), 60)
        time.sleep(5)
        assert _sql(lab, replica, "select pg_last_wal_replay_lsn()") == replayed, "the apply delay did not hold"
        _apply_delay(lab, replica, 0)
    # the replica drops the commit nobody acknowledged and streams from the new primary
    kept = _sql(lab, new, f"select count(*) from {table}")
    assert kept == "0", f"the promoted standby has the commit it never received? {kept}"
    try:
        wait_for(f"{replica} rewound and streaming from {new}",
                 lambda: _sql(lab, replica, f"select count(*) from {table}") == kept
                 and _sql(lab, replica, "select status from pg_stat_wal_receiver") == "streaming",
                 300 if late else 180, every=3)
    except AssertionError as exc:
        raise AssertionError(f"{exc}{lab.database_trouble(new, replica)}") from None
    name = f"after-diverge-{int(time.time())}"
    done = lab.cairn_rc(standby, "project", "create", name, timeout=120)
    assert done.returncode == 0, f"no commit after the failover: {done.stderr or done.stdout}"
    ops.heal(lab.dir)
    view = lab.wait_healthy(timeout=300)  # every member's database up again, the old primary too
    assert view["database"]["primary"] == new
