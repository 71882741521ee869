"""Installer benchmark (issue 15), under QEMU/TCG on this machine:

1. the ISO: its size, and build times: from nothing (``--cold``: a fresh cache, every
   Debian package and wheel downloaded), after a code change (only the cairn layer is
   rebuilt), and with nothing changed (the cached ISO is copied); ratios against the
   cold build, or against the code-change build when not ``--cold``;
2. an unattended install per firmware (SeaBIOS and OVMF side by side): seconds from
   power-on to GRUB, to the installer's start, to ``CAIRN-INSTALL: OK``; then from the
   installed disk's power-on to ``cairn status`` answering inside the guest;
3. ``--cluster``: three VMs (SeaBIOS, 2 vCPUs, 3 GiB, an 8 GiB data disk each) installed
   from one answer file on one L2 segment (a bridge in a private network namespace,
   static addresses): node 1 with ``cluster.mode = "init"`` first (the file then has
   node 1 only); then two single-use tokens from ``cairn cluster token create`` on node 1
   (over SSH from the namespace) go into the same file as nodes 2 and 3
   (``mode = "join"``), which install side by side; timed from node 1's power-on until
   ``cairn cluster status`` on node 1 shows 3 Ready voting members in quorum. With
   ``--cluster-nodes 1``, once node 1 formed its cluster: the share of a host core its
   QEMU uses over a minute with nothing asked of it (what three such nodes need of the
   host before any join; TCG here).

    .venv/bin/python bench/installer_bench.py [--cold] [--cluster [--cluster-nodes 1]] [--iso ISO]
                                              [--skip-install] [--out FILE]

Prints a table and writes bench/results/installer_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from installer.build import DEFAULT_CACHE, Builder, BuildResult  # noqa: E402
from tests.installer.test_iso import check_status, side_by_side  # noqa: E402
from tests.installer.vm import Vm, blank_disk, cdrom, iso_seed, virtio_disk  # noqa: E402


def build_figures(cache: Path, out_dir: Path) -> dict[str, Any]:
    """Three builds in a row: as the cache is, after a code change, unchanged."""
    def build(name: str) -> BuildResult:
        t0 = time.monotonic()
        result = Builder(cache_dir=cache, progress=lambda m: print(f"  {name}: {m}", flush=True)).build(
            out_dir / f"{name}.iso")
        print(f"  {name}: {time.monotonic() - t0:.1f} s", flush=True)
        return result

    first = build("first")
    for entry in (cache / first.keys["layer"], cache / first.keys["iso"]):  # as if the code had changed
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    layer = build("code-change")
    cached = build("unchanged")
    assert cached.cached
    return {"iso_bytes": first.size, "first": first.to_json(), "code_change": layer.to_json(),
            "unchanged": cached.to_json()}


def firmware_figures(iso: Path, work: Path) -> dict[str, Any]:
    runs = side_by_side(iso, work)
    for fw, run in runs.items():  # what the suite checks for BIOS only
        check_status(run["status"], fw)
    return {fw: {"iso": runs[fw]["iso"], "disk": runs[fw]["disk"]} for fw in ("bios", "uefi")}


# --- three nodes, one answer file, one L2 -------------------------------------------------------

SUBNET = "10.77.0"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


class Segment:
    """A bridge with three taps in a private network namespace; the bench's own address
    10.77.0.1 is on the bridge. QEMU runs inside the namespace."""

    def __init__(self) -> None:
        self.ns = f"cib{secrets.token_hex(3)}"

    def __enter__(self) -> Segment:
        sh("ip", "netns", "add", self.ns)
        cmds = [["ip", "link", "add", "br0", "type", "bridge"], ["ip", "addr", "add", f"{SUBNET}.1/24", "dev", "br0"],
                ["ip", "link", "set", "br0", "up"], ["ip", "link", "set", "lo", "up"]]
        for i in range(1, 4):
            cmds += [["ip", "tuntap", "add", f"tap{i}", "mode", "tap"],
                     ["ip", "link", "set", f"tap{i}", "master", "br0"], ["ip", "link", "set", f"tap{i}", "up"]]
        for cmd in cmds:
            sh("ip", "netns", "exec", self.ns, *cmd)
        return self

    def __exit__(self, *exc: object) -> None:
        sh("ip", "netns", "del", self.ns, check=False)

    def wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]


def cluster_answer(password_hash: str, ssh_key: str, tokens: dict[int, str]) -> str:
    """The cluster's answer file: node 1 inits; nodes 2 and 3 join it, each with its own
    (single-use) token, once node 1 runs and made them: before that the file has node 1 only."""
    nodes = ""
    for i in (1, *sorted(tokens)):
        # relaxed timing: three emulated (TCG) nodes on two host cores stall for seconds at a
        # time, and the fast profile's 3 s etcd retry made node 1 demote its database while
        # the others installed
        cluster = ('{ mode = "init", timing = "relaxed" }' if i == 1 else
                   f'{{ mode = "join", address = "{SUBNET}.11", token = "{tokens[i]}" }}')
        nodes += f'''
[[node]]
match.mac = "52:54:00:c5:00:0{i}"
hostname = "node{i}"
network = {{ mac = "52:54:00:c5:00:0{i}", mode = "static", address = "{SUBNET}.1{i}/24", gateway = "{SUBNET}.1" }}
cluster = {cluster}
'''
    return (f'root_password_hash = "{password_hash}"\nssh_keys = ["{ssh_key}"]\n'
            f'disks.install = {{ serial = "CAIRN-DISK-*" }}\ndisks.data = [{{ serial = "CAIRN-DATA-*" }}]\n' + nodes)


def host_cores_used(pid: int, seconds: float = 60.0) -> float:
    """Host cores a process used over ``seconds`` (its utime + stime from /proc)."""
    def cpu_seconds() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    t0, c0 = time.monotonic(), cpu_seconds()
    time.sleep(seconds)
    return round((cpu_seconds() - c0) / (time.monotonic() - t0), 3)


def cluster_figures(iso: Path, work: Path, nodes: int = 3) -> dict[str, Any]:
    """``nodes`` = 1: node 1 alone (its cluster init from the ISO, one voting member)."""
    from installer.answer import parse_answer

    key = work / "id_ed25519"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
    password = sh("openssl", "passwd", "-6", "p" + secrets.token_urlsafe(12)).stdout.strip()  # no leading "-"
    ssh_key = key.with_suffix(".pub").read_text().strip()
    figures: dict[str, Any] = {}
    vms: list[Vm] = []
    t0 = time.monotonic()

    def at() -> float:
        return round(time.monotonic() - t0, 1)

    with Segment() as seg:
        def nic(i: int) -> dict[str, str]:
            return {"nic": f"tap,ifname=tap{i},script=no,downscript=no", "mac": f"52:54:00:c5:00:0{i}"}

        def node(i: int, answer: str) -> Vm:
            parse_answer(answer)  # what `cairn-installer validate` checks, before any machine boots
            d = work / f"node{i}"
            d.mkdir(exist_ok=True)
            disk, data = blank_disk(d / "disk.qcow2"), blank_disk(d / "data.qcow2", "8G")
            vm = Vm(f"node{i}", d, firmware="bios")
            vm.start(seg.wrap(vm.argv(*cdrom(iso, 2, boot=True), *virtio_disk(disk, "d0", f"CAIRN-DISK-{i}"),
                                      *virtio_disk(data, "d1", f"CAIRN-DATA-{i}"),
                                      *cdrom(iso_seed(d / "seed.iso", answer), 3), **nic(i))))
            vms.append(vm)
            return vm

        def installed_then_booted(vm: Vm, i: int) -> dict[str, float]:
            start = at()
            marks = vm.wait_for({"installed": "CAIRN-INSTALL: OK"}, 1800)
            vm.wait_exit(120)
            d = vm.workdir
            booted = Vm(f"node{i}-disk", d, firmware="bios")
            booted.start(seg.wrap(booted.argv(*virtio_disk(d / "disk.qcow2", "d0", f"CAIRN-DISK-{i}"),
                                              *virtio_disk(d / "data.qcow2", "d1", f"CAIRN-DATA-{i}"), **nic(i))))
            vms.append(booted)
            marks |= {f"disk_{k}": v for k, v in booted.wait_for({"firstboot": "CAIRN-FIRSTBOOT: OK"}, 3600).items()}
            return {"started_at": start, **marks, "done_at": at()}

        def cairn(*args: str, timeout: float = 120) -> Any:
            argv = seg.wrap(["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o",
                             "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
                             f"root@{SUBNET}.11",
                             "cairn", *args, "--output", "json"])
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            if r.returncode != 0:
                raise RuntimeError(f"cairn {' '.join(args)} on node1: {r.stderr.strip()[-1000:]}")
            return json.loads(r.stdout)

        try:
            print(f"  node1: installing (cluster init) [{at()} s]", flush=True)
            figures["node1"] = installed_then_booted(node(1, cluster_answer(password, ssh_key, {})), 1)
            if nodes == 1:  # not in the three-node run: it would add a minute to its end-to-end time
                qemu = vms[-1].proc
                assert qemu is not None
                figures["node1_idle_host_cores"] = host_cores_used(qemu.pid)
                figures["host_cores"] = os.cpu_count()
            joiners = range(2, nodes + 1)
            # one single-use token per joining node, long enough for their install under TCG
            tokens = {i: cairn("cluster", "token", "create", "--ttl", "14400")["token"] for i in joiners}
            answer = cluster_answer(password, ssh_key, tokens)  # the same file, now with the joiners
            if tokens:
                print(f"  {', '.join(f'node{i}' for i in joiners)}: installing (cluster join) [{at()} s]", flush=True)
            with ThreadPoolExecutor(2) as pool:
                joins = {i: pool.submit(installed_then_booted, node(i, answer), i) for i in joiners}
                for i, f in joins.items():
                    figures[f"node{i}"] = f.result()
            print(f"  waiting for {nodes} members in quorum [{at()} s]", flush=True)
            deadline = time.monotonic() + 900
            while True:
                view = cairn("cluster", "status")
                members = view.get("members", [])
                voters = [m for m in members if "etcd" in m["roles"]]
                if view.get("quorum") and len(voters) == nodes and all(m["ready"] for m in members):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no {nodes} Ready voting members within 900 s: {json.dumps(view)[:3000]}")
                time.sleep(5)
            figures["quorum_at"] = at()
            figures["cluster_status"] = view
            figures["members"] = len(members)
            figures["quorum"] = view["quorum"]
            figures["database_primary"] = view.get("database", {}).get("primary")
            figures["ceph"] = {k: view.get("ceph", {}).get(k) for k in ("health", "quorum", "osds", "osd_hosts")}
            figures["total_s"] = at()
        finally:
            for vm in vms:
                vm.stop()
    return figures


def build_report(result: dict[str, Any], cache: Path, work: Path, cold: bool) -> None:
    print("ISO builds", flush=True)
    result["build"] = b = build_figures(cache, work)
    base = b["first"]["seconds"]["total"]
    print(f"\nISO {b['iso_bytes'] / 2**20:.1f} MiB")
    print(f"{'build':<24}{'seconds':>10}{'ratio':>8}")
    for name in ("first", "code_change", "unchanged"):
        secs = b[name]["seconds"]["total"]
        print(f"{name + (' (cold)' if name == 'first' and cold else ''):<24}{secs:>10.1f}{secs / base:>8.3f}")


def install_report(result: dict[str, Any], iso: Path, work: Path) -> None:
    print("\ninstall + first boot under TCG (BIOS and UEFI side by side)", flush=True)
    result["install"] = inst = firmware_figures(iso, work)
    print(f"{'firmware':<10}{'grub':>7}{'installer':>11}{'installed':>11}{'disk grub':>11}{'status':>8}")
    for fw, r in inst.items():
        print(f"{fw:<10}{r['iso']['grub']:>7.1f}{r['iso']['installer']:>11.1f}{r['iso']['installed']:>11.1f}"
              f"{r['disk']['grub']:>11.1f}{r['disk']['status']:>8.1f}")


def cluster_report(result: dict[str, Any], iso: Path, work: Path, nodes: int) -> None:
    print(f"\n{nodes}-node cluster from one answer file", flush=True)
    result["cluster"] = c = cluster_figures(iso, work, nodes)
    print(f"members {c['members']}, quorum {c['quorum']}, database primary {c['database_primary']}, "
          f"ceph {c['ceph']}")
    for i in range(1, nodes + 1):
        n = c[f"node{i}"]
        print(f"  node{i}: started {n['started_at']:.0f} s, installed +{n['installed']:.0f} s, "
              f"first boot OK at {n['done_at']:.0f} s")
    print(f"{nodes} members in quorum {c['quorum_at']:.0f} s after node 1 was powered on (end to end)")
    if "node1_idle_host_cores" in c:
        print(f"node 1's QEMU with its cluster formed and idle: {c['node1_idle_host_cores']:.2f} of "
              f"{c['host_cores']} host cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", action="store_true", help="build from an empty cache (downloads everything)")
    parser.add_argument("--cluster", action="store_true", help="also install three nodes that form a cluster")
    parser.add_argument("--cluster-nodes", type=int, choices=(1, 3), default=3,
                        help="1: only node 1's cluster init from the ISO (a shorter run)")
    parser.add_argument("--skip-install", action="store_true", help="no BIOS/UEFI install figures")
    parser.add_argument("--iso", type=Path, help="install this ISO: no build figures")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "installer_bench.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cairn-installer-bench.", dir="/var/tmp"))
    cache = work / "cache" if args.cold else DEFAULT_CACHE
    result: dict[str, Any] = {"host_load": os.getloadavg(), "cold_cache": args.cold}
    try:
        iso = args.iso or work / "first.iso"
        if args.iso is None:
            build_report(result, cache, work, args.cold)
        if not args.skip_install:
            install_report(result, iso, work)
        if args.cluster:
            cluster_report(result, iso, work, args.cluster_nodes)
        result["host_load_after"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
