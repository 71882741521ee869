"""What the compute drivers report for the history graphs: libvirt's domain stats
record (QEMU's resident set, and the guest's own used memory from its balloon driver's
statistics), cgroup counters (v1 controllers as crun uses them on hybrid hosts, v2
otherwise) and /proc/net/dev; the cgroup reader against this machine's real hierarchy.
The numbers of a running VM and container end to end are in tests/e2e/test_instances.py."""

from __future__ import annotations

from pathlib import Path

from compute.libvirt_driver import BALLOON_STATS_STALE_S, stats_from_record
from compute.oci_driver import CGROUP_ROOT, cgroup_stats, net_dev_counters


def test_a_domain_stats_record_sums_its_devices() -> None:
    record = {"cpu.time": 2_500_000_000, "balloon.rss": 1024, "net.count": 2, "net.0.rx.bytes": 10,
              "net.1.rx.bytes": 5, "net.0.tx.bytes": 7, "block.count": 1, "block.0.rd.bytes": 4096,
              "block.0.wr.bytes": 8192, "block.0.rd.reqs": 1, "block.0.wr.reqs": 2}
    s = stats_from_record(record)
    assert (s.cpu_seconds, s.memory_bytes, s.net_rx_bytes, s.net_tx_bytes) == (2.5, 1 << 20, 15, 7)
    assert (s.disk_read_bytes, s.disk_write_bytes, s.disk_read_ops, s.disk_write_ops) == (4096, 8192, 1, 2)
    assert stats_from_record({}).cpu_seconds == 0  # a domain that reports nothing yet


NOW = 1_700_000_000.0
# a 256 MiB TCG guest as libvirt reports it (KiB): QEMU's resident set exceeds the guest's
# memory (QEMU's own memory, the TCG code cache); the guest itself uses a fraction of it
BALLOON = {"balloon.current": 262144, "balloon.maximum": 262144, "balloon.rss": 358400,
           "balloon.available": 237000, "balloon.unused": 150000, "balloon.usable": 180000,
           "balloon.disk_caches": 20000, "balloon.last-update": int(NOW) - 4}


def test_a_guest_with_a_balloon_driver_reports_its_own_used_memory() -> None:
    s = stats_from_record(BALLOON, NOW)
    assert s.memory_bytes == 358400 * 1024  # resident on the host, as before
    assert s.memory_used_bytes == (237000 - 180000) * 1024  # MemTotal less MemAvailable, as free(1)
    older_kernel = {k: v for k, v in BALLOON.items() if k != "balloon.usable"}  # no MemAvailable (Linux < 4.6)
    assert stats_from_record(older_kernel, NOW).memory_used_bytes == (237000 - 150000 - 20000) * 1024
    bare = {k: v for k, v in older_kernel.items() if k != "balloon.disk_caches"}
    assert stats_from_record(bare, NOW).memory_used_bytes == (237000 - 150000) * 1024


def test_a_guest_without_balloon_stats_reports_no_used_memory() -> None:
    # no balloon driver: libvirt leaves out what QEMU has not received (current, maximum, rss only)
    silent = {k: BALLOON[k] for k in ("balloon.current", "balloon.maximum", "balloon.rss")}
    s = stats_from_record(silent, NOW)
    assert s.memory_used_bytes is None and s.memory_bytes == 358400 * 1024
    # the last report is old: the driver stopped (QEMU keeps the figures across a guest reboot)
    stale = {**BALLOON, "balloon.last-update": int(NOW - BALLOON_STATS_STALE_S - 1)}
    assert stats_from_record(stale, NOW).memory_used_bytes is None
    assert stats_from_record({**BALLOON, "balloon.last-update": int(NOW - BALLOON_STATS_STALE_S)},
                             NOW).memory_used_bytes is not None
    only_total = {k: v for k, v in BALLOON.items() if k not in ("balloon.usable", "balloon.unused")}
    assert stats_from_record(only_total, NOW).memory_used_bytes is None


def test_proc_net_dev_of_this_host() -> None:
    counters = net_dev_counters(Path("/proc/net/dev").read_text())
    assert "lo" in counters and counters["lo"][0] == counters["lo"][1]  # loopback sends what it receives
    text = "Inter-|Receive\n face |bytes\n  veth1: 100 2 0 0 0 0 0 0 300 4 0 0 0 0 0 0\n"
    assert net_dev_counters(text) == {"veth1": (100, 300)}


def test_cgroup_v1_counters(tmp_path: Path) -> None:
    for ctrl in ("cpuacct", "memory", "blkio"):
        (tmp_path / ctrl / "cairn" / "web").mkdir(parents=True)
    g = "cairn/web"
    (tmp_path / "cpuacct" / g / "cpuacct.usage").write_text("3000000000\n")
    (tmp_path / "memory" / g / "memory.usage_in_bytes").write_text("5000\n")
    (tmp_path / "memory" / g / "memory.stat").write_text("cache 10\ntotal_inactive_file 1000\n")
    (tmp_path / "blkio" / g / "blkio.throttle.io_service_bytes").write_text(
        "8:0 Read 100\n8:0 Write 200\n8:16 Read 1\n8:16 Write 2\nTotal 303\n")
    (tmp_path / "blkio" / g / "blkio.throttle.io_serviced").write_text("8:0 Read 3\n8:0 Write 4\n")
    s = cgroup_stats(tmp_path, "/cairn/web")
    assert s is not None
    assert (s.cpu_seconds, s.memory_bytes) == (3.0, 4000)  # inactive page cache is not counted as used
    assert s.memory_used_bytes == s.memory_bytes  # the container and the host see the same pages
    assert (s.disk_read_bytes, s.disk_write_bytes, s.disk_read_ops, s.disk_write_ops) == (101, 202, 3, 4)
    assert cgroup_stats(tmp_path, "/cairn/gone") is None  # the container does not run


def test_cgroup_v2_counters(tmp_path: Path) -> None:
    d = tmp_path / "cairn" / "web"
    d.mkdir(parents=True)
    (d / "cgroup.procs").write_text("1\n")
    (d / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1\n")
    (d / "memory.current").write_text("5096\n")
    (d / "memory.stat").write_text("anon 3000\nfile 2000\nactive_file 1000\ninactive_file 1000\n")
    (d / "io.stat").write_text("8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0\n8:16 rbytes=1 wbytes=2 rios=3 wios=4\n")
    s = cgroup_stats(tmp_path, "cairn/web")
    assert s is not None
    # the working set, as v1: inactive page cache is not counted as used
    assert (s.cpu_seconds, s.memory_bytes, s.disk_read_bytes, s.disk_write_bytes) == (1.5, 4096, 11, 22)
    assert s.memory_used_bytes == 4096
    assert (s.disk_read_ops, s.disk_write_ops) == (4, 6)


def test_the_real_hierarchy_of_this_host_is_read() -> None:
    """The root group of this machine's hierarchy (v1 controllers on a hybrid host, see
    PLATFORM.md): CPU time and memory in use are both there."""
    s = cgroup_stats(CGROUP_ROOT, "/")
    assert s is not None and s.cpu_seconds > 0 and s.memory_bytes > 0 and s.memory_used_bytes == s.memory_bytes
