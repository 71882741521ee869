"""Compute benchmarks, in one run, on private libvirt nodes (TCG here) and crun:

1. VM create -> guest marker on serial through Cairn's LibvirtDriver.spawn(), vs
   plain libvirt ``createXML`` of the same domain XML -> marker (ratio, target <= 1.2);
2. container create -> process running (OciDriver.spawn() returns once crun reports
   it running) and -> first output line (target < 300 ms);
   (one untimed define first: libvirtd's one-off QEMU capability probe is not either side's cost);
3. ``isolation: vm`` container create -> running (its microVM booted, its agent up and
   the command started) and -> first output line, vs a plain container (target < 300 ms
   on KVM; under TCG the guest's kernel boot dominates);
4. live-migration downtime: an observer container on the VM's bridge pings the VM
   every 10 ms during a migration between two libvirt nodes; the longest run of
   lost replies is the downtime a client sees; libvirt's own figure is printed too.
   With Cairn's switchover target (50 ms) and with QEMU's default (300 ms).
   (Measuring inside the guest does not work under TCG: the guest's clocks stop
   while it is paused, so the guest cannot see its own downtime.)

    .venv/bin/python bench/compute_bench.py [--runs 5] [--only isolation]

Prints a table and writes bench/results/compute_bench.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from compute.libvirt_driver import LibvirtDriver  # noqa: E402
from compute.libvirt_node import LibvirtNode  # noqa: E402
from compute.libvirt_xml import build_domain_xml  # noqa: E402
from compute.oci_driver import OciDriver  # noqa: E402
from compute.spec import Consoles, ContainerNic, ContainerSpec, KernelBoot, NicSpec, VmSpec  # noqa: E402
from compute.testguest import MARKER, ensure_test_guest  # noqa: E402
from compute.vm_isolation import VmIsolatedContainerDriver  # noqa: E402

PREFIX = "czb" + secrets.token_hex(2)


def wait_for(read: Callable[[], bytes], needle: bytes, t0: float, timeout: float = 90.0) -> float:
    while time.monotonic() - t0 < timeout:
        if needle in read():
            return time.monotonic() - t0
        time.sleep(0.005)
    raise RuntimeError(f"{needle!r} not seen within {timeout}s: {read()[-300:]!r}")


def read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def vm_spec(work: Path, name: str, cmdline: str = "", nics: tuple[NicSpec, ...] = ()) -> VmSpec:
    g = ensure_test_guest()
    d = work / name
    return VmSpec(name=name, vcpus=1, memory_mib=192, nics=nics,
                  kernel_boot=KernelBoot(g.kernel, g.initrd, f"console=ttyS0 panic=-1 quiet {cmdline}".strip()),
                  consoles=Consoles(serial_log=str(d / "serial.log"), serial_socket=str(d / "serial.sock"), vnc=False))


def bench_vm_boot(node: LibvirtNode, work: Path, runs: int) -> dict[str, Any]:
    driver = LibvirtDriver(node.uri)
    conn = libvirt.open(node.uri)
    cairn, plain = [], []
    # warm-up, not timed: libvirtd probes QEMU's capabilities on first use (~3.5 s here), whoever goes first
    warm = vm_spec(work, f"{PREFIX}-warm")
    driver.define(warm)
    driver.delete(warm.name)
    def run_cairn(i: int) -> None:
        spec = vm_spec(work, f"{PREFIX}-boot-{i}")
        t0 = time.monotonic()
        driver.spawn(spec)
        cairn.append(wait_for(lambda: read(Path(spec.consoles.serial_log)), MARKER.encode(), t0))
        driver.delete(spec.name)

    def run_plain(i: int) -> None:
        base = dataclasses.replace(vm_spec(work, f"{PREFIX}-plain-{i}"), virt_type=driver.virt_type)
        Path(base.consoles.serial_log).parent.mkdir(parents=True, exist_ok=True)
        xml = build_domain_xml(base)
        t0 = time.monotonic()
        dom = conn.createXML(xml, 0)
        plain.append(wait_for(lambda: read(Path(base.consoles.serial_log)), MARKER.encode(), t0))
        dom.destroy()

    for i in range(runs):  # alternate who goes first, so neither side always follows the other's teardown
        for run in ((run_cairn, run_plain) if i % 2 == 0 else (run_plain, run_cairn)):
            run(i)
    conn.close()
    driver.close()
    c, p = statistics.median(cairn), statistics.median(plain)
    return {"cairn_median_s": c, "plain_createXML_median_s": p, "ratio": c / p, "target_ratio": 1.2,
            "ratio_of_minimums": min(cairn) / min(plain), "load_average_1min": os.getloadavg()[0],
            "cairn_runs_s": cairn, "plain_runs_s": plain, "virt_type": driver.virt_type.value}


def time_start(driver: Any, name: str, marker: bytes, timeout: float, **spec: Any) -> tuple[float, float]:
    """Create -> running (``spawn`` returned) and -> the command's first output line, in seconds."""
    ct = ContainerSpec(name=name, memory_mib=64, command=("/bin/sh", "-c", f"echo {marker.decode()}; exec sleep 60"),
                       **spec)
    t0 = time.monotonic()
    driver.spawn(ct)
    running = time.monotonic() - t0
    first_output = wait_for(lambda: driver.console_log(ct.name), marker, t0, timeout)
    driver.delete(ct.name)
    return running, first_output


def medians(times: list[tuple[float, float]]) -> dict[str, Any]:
    return {"create_to_running_median_ms": statistics.median(t[0] for t in times) * 1000,
            "create_to_first_output_median_ms": statistics.median(t[1] for t in times) * 1000,
            "runs_ms": [t[0] * 1000 for t in times]}


def time_starts(driver: Any, runs: int, prefix: str, marker: bytes, timeout: float,
                **spec: Any) -> dict[str, Any]:
    """:func:`time_start`, ``runs`` times."""
    return medians([time_start(driver, f"{PREFIX}-{prefix}-{i}", marker, timeout, **spec) for i in range(runs)])


def bench_container(oci: OciDriver, image: str, runs: int) -> dict[str, Any]:
    return {**time_starts(oci, runs, "ct", b"CT-UP", 10, image=image), "target_ms": 300}


def bench_vm_isolation(node: LibvirtNode, work: Path, image: str, runs: int) -> dict[str, Any]:
    """The microVM's QEMU as root and as an unprivileged uid of its own (the appliance's
    ``VmAccess``: label, grants before each start, release on delete), runs interleaved."""
    from appliance.agent.vm_access import VmAccess
    from appliance.settings import Settings

    logging.getLogger("cairn.agent.vm_access").setLevel(logging.ERROR)  # no storage daemon here to revoke in
    g = ensure_test_guest()
    guest = work / "guest"  # a copy: the grants' ACLs stay off the shared cache and /boot
    guest.mkdir()
    kernel, initrd = str(shutil.copy(g.kernel, guest / "vmlinuz")), str(shutil.copy(g.initrd, guest / "initrd"))
    vms = LibvirtDriver(node.uri)
    drivers = {"root": VmIsolatedContainerDriver(vms, work / "microvms", kernel, initrd),
               "unprivileged": VmIsolatedContainerDriver(vms, work / "microvms-dac", kernel, initrd,
                                                         access=VmAccess(Settings(data_dir=work / "appliance")))}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in drivers}
    try:
        for i in range(runs):  # alternate who goes first
            for who in (list(drivers) if i % 2 == 0 else list(drivers)[::-1]):
                times[who].append(time_start(drivers[who], f"{PREFIX}-iso-{who[:4]}-{i}", b"ISO-UP", 60,
                                             image=image, isolation="vm"))
    finally:
        for iso in drivers.values():
            for name in iso.list_instances():
                iso.delete(name)
        vms.close()
    result, dac = medians(times["root"]), medians(times["unprivileged"])
    return {**result, "unprivileged_qemu": dac,
            "unprivileged_to_root_ratio": dac["create_to_first_output_median_ms"]
            / result["create_to_first_output_median_ms"],
            "target_ms_on_kvm": 300, "virt_type": vms.virt_type.value, "load_average_1min": os.getloadavg()[0]}


def bench_migration(a: LibvirtNode, b: LibvirtNode, oci: OciDriver, image: str, work: Path,
                    max_downtime_ms: int | None, tag: str) -> dict[str, Any]:
    br = f"{PREFIX}br{tag}"
    subprocess.run(["ip", "link", "add", br, "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", br, "up"], check=True)
    src = (LibvirtDriver(a.uri, migration_host="127.0.0.1", migration_max_downtime_ms=max_downtime_ms)
           if max_downtime_ms else LibvirtDriver(a.uri, migration_host="127.0.0.1"))
    dst = LibvirtDriver(b.uri, migration_host="127.0.0.1")
    vm = vm_spec(work, f"{PREFIX}-mig{tag}", cmdline="cairn.ip=10.78.0.2/24",
                 nics=(NicSpec(mac="52:54:00:bb:00:02", bridge=br),))
    ct = ContainerSpec(name=f"{PREFIX}-obs{tag}", image=image, memory_mib=64,
                       command=("/bin/sh", "-c", "exec ping -i 0.01 10.78.0.2"),
                       nics=(ContainerNic(mac="52:54:00:bb:00:03", bridge=br, host_dev=f"{PREFIX}o{tag}",
                                          address="10.78.0.3/24"),))
    try:
        src.spawn(vm)
        wait_for(lambda: read(Path(vm.consoles.serial_log)), b"IP: eth0", time.monotonic())
        oci.spawn(ct)
        wait_for(lambda: oci.console_log(ct.name), b"seq=50 ", time.monotonic(), 30)
        result = src.migrate(vm.name, b.uri)
        time.sleep(2)
        oci.stop(ct.name, timeout=1)
        seqs = sorted({int(s) for s in re.findall(rb"seq=(\d+) ", oci.console_log(ct.name))})
        gaps = [y - x for x, y in itertools.pairwise(seqs)]
        lost = max(gaps) - 1 if gaps else -1
        hb = read(Path(vm.consoles.serial_log))
        return {"max_downtime_setting_ms": max_downtime_ms, "migration_duration_s": result.duration_s,
                "libvirt_downtime_ms": result.downtime_ms,
                "ping_interval_ms": 10, "longest_reply_gap_ms": (max(gaps) if gaps else 0) * 10,
                "lost_replies_in_a_row": lost, "replies": len(seqs), "target_ms": 100,
                "guest_booted_once": hb.count(MARKER.encode()) == 1,
                "guest_running_on_destination": dst.power_state(vm.name).value}
    finally:
        oci.delete(ct.name)
        for d in (src, dst):
            d.delete(vm.name)
            d.close()
        subprocess.run(["ip", "link", "del", br], check=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", choices=["isolation"], help="run one part only (its result file is separate)")
    args = ap.parse_args()
    g = ensure_test_guest()
    work = Path(tempfile.mkdtemp(prefix=f"cairn-bench-{PREFIX}-"))
    a, b = LibvirtNode(work / "nodes", "a"), LibvirtNode(work / "nodes", "b")
    oci = OciDriver(work / "oci")
    results: dict[str, Any] = {}
    try:
        a.start()
        results["container_create"] = bench_container(oci, g.oci_archive, args.runs)
        results["vm_isolated_container_create"] = bench_vm_isolation(a, work, g.oci_archive, args.runs)
        if args.only != "isolation":
            b.start()
            results["vm_create_to_marker"] = bench_vm_boot(a, work / "vms", args.runs)
            # Cairn's driver default (50 ms switchover target) vs QEMU's own default (300 ms)
            results["live_migration"] = bench_migration(a, b, oci, g.oci_archive, work / "vms", None, "d")
            results["live_migration_qemu_default_300ms"] = bench_migration(a, b, oci, g.oci_archive,
                                                                           work / "vms", 300, "q")
    finally:
        for name in oci.list_instances():
            oci.delete(name)
        a.stop()
        b.stop()
        shutil.rmtree(work, ignore_errors=True)
    c, iso = results["container_create"], results["vm_isolated_container_create"]
    iso["ratio_to_plain_container"] = iso["create_to_first_output_median_ms"] / c["create_to_first_output_median_ms"]
    print(f"container create->running {c['create_to_running_median_ms']:.0f} ms, ->first output "
          f"{c['create_to_first_output_median_ms']:.0f} ms (target < 300 ms)")
    print(f"isolation: vm container create->running {iso['create_to_running_median_ms']:.0f} ms, ->first output "
          f"{iso['create_to_first_output_median_ms']:.0f} ms, {iso['ratio_to_plain_container']:.1f}x a plain "
          f"container ({iso['virt_type']}; target < 300 ms on KVM; "
          f"host load {iso['load_average_1min']:.1f})")
    dac = iso["unprivileged_qemu"]
    print(f"  its QEMU as an unprivileged uid of its own: ->running {dac['create_to_running_median_ms']:.0f} ms, "
          f"->first output {dac['create_to_first_output_median_ms']:.0f} ms, "
          f"{iso['unprivileged_to_root_ratio']:.2f}x root's")
    name = "compute_bench_isolation.json" if args.only else "compute_bench.json"
    if args.only != "isolation":
        _print_vm_and_migration(results)
    out = ROOT / "bench" / "results" / name
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def _print_vm_and_migration(results: dict[str, Any]) -> None:
    v = results["vm_create_to_marker"]
    print(f"VM create->marker ({v['virt_type']}): cairn {v['cairn_median_s'] * 1000:.0f} ms, plain createXML "
          f"{v['plain_createXML_median_s'] * 1000:.0f} ms, ratio {v['ratio']:.2f} (of minimums "
          f"{v['ratio_of_minimums']:.2f}; target <= 1.2; host load {v['load_average_1min']:.1f} "
          f"on {os.cpu_count()} CPUs)")
    for key in ("live_migration", "live_migration_qemu_default_300ms"):
        m = results[key]
        print(f"{key}: {m['migration_duration_s'] * 1000:.0f} ms total, libvirt downtime "
              f"{m['libvirt_downtime_ms']} ms, longest ping-reply gap {m['longest_reply_gap_ms']} ms "
              f"({m['lost_replies_in_a_row']} replies lost in a row at 10 ms; target < 100 ms), "
              f"guest booted once: {m['guest_booted_once']}")


if __name__ == "__main__":
    main()
