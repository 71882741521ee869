"""cairn-nbd validated by clients we did not write: qemu-img, qemu-io, nbdinfo, nbdcopy, fio."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from storage.backends.rados_cluster import CephCluster
from storage.engine import open_pool
from storage.maintenance import check_consistency
from tests.storage.conftest import NbdDaemon, run_tool
from tests.storage.nbd_client import NbdClient, NbdClientError

pytestmark = pytest.mark.functional
MiB = 1 << 20


def test_qemu_img_info_and_nbdinfo_list_see_the_exports(nbd_daemons: Callable[..., NbdDaemon]) -> None:
    d = nbd_daemons(create=["disk1:3GiB", "disk2:1MiB"])
    info = json.loads(run_tool("qemu-img", "info", "--output=json", d.uri("disk1")))
    assert info["virtual-size"] == 3 << 30
    listing = run_tool("nbdinfo", "--list", "--json", d.uri(""))
    exports = {e["export-name"]: e for e in json.loads(listing)["exports"]}
    assert set(exports) == {"disk1", "disk2"}
    assert exports["disk2"]["export-size"] == MiB
    assert exports["disk1"]["can_multi_conn"] is True
    assert exports["disk1"]["block_size_preferred"] == 65536


def test_one_gib_random_image_round_trips_through_qemu_img_and_survives_restart(
    nbd_daemons: Callable[..., NbdDaemon], tmp_path: Path
) -> None:
    image = tmp_path / "random.img"
    with open(image, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(16 * MiB))
    d = nbd_daemons(create=["vm:1GiB"])
    run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), d.uri("vm"))
    run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), d.uri("vm"))
    assert d.rss_kib() < 512 * 1024, d.rss_kib()
    d.stop()
    d.start()
    out = run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), d.uri("vm"))
    assert "identical" in out


def test_qemu_io_unaligned_writes_zeroes_discard_flush_and_fua(nbd_daemons: Callable[..., NbdDaemon]) -> None:
    d = nbd_daemons(create=["q:16MiB"])
    cmds = [
        "write -P 0xab 1000 70000", "read -P 0xab 1000 70000", "read -P 0 0 1000",
        "write -z 2000 65536", "read -P 0 2000 65536", "read -P 0xab 67536 3464",
        "write -P 0x11 1048576 2097152", "discard 1114112 131072", "read -P 0 1114112 131072",
        "flush", "write -f -P 0xcd 5000000 4096", "read -P 0xcd 5000000 4096",
    ]
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    out = run_tool(*argv, d.uri("q"))
    assert "fail" not in out.lower(), out
    d.kill()  # everything above was flushed or FUA: it must survive a crash
    d.start()
    out = run_tool("qemu-io", "-f", "raw", "-c", "read -P 0xcd 5000000 4096", "-c", "read -P 0x11 1048576 65536",
                   d.uri("q"))
    assert "fail" not in out.lower(), out


def test_nbdcopy_copies_in_and_out_with_multiple_connections(
    nbd_daemons: Callable[..., NbdDaemon], tmp_path: Path
) -> None:
    src = tmp_path / "src.img"
    rng = random.Random(7)
    block = rng.randbytes(65536)
    src.write_bytes(b"".join(block if rng.random() < 0.5 else rng.randbytes(65536) for _ in range(256)))
    d = nbd_daemons(create=["c:16MiB"])
    run_tool("nbdcopy", "--connections=4", "--requests=8", str(src), d.uri("c"))
    out = tmp_path / "out.img"
    run_tool("nbdcopy", "--connections=2", d.uri("c"), str(out))
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


def test_fio_nbd_engine_verifies_random_writes_over_two_connections(nbd_daemons: Callable[..., NbdDaemon]) -> None:
    d = nbd_daemons(create=["f:64MiB"])
    out = run_tool("fio", "--name=verify", "--ioengine=nbd", f"--uri={d.uri('f')}", "--rw=randwrite", "--bs=4k",
                   "--size=32m", "--numjobs=2", "--offset_increment=32m", "--iodepth=16", "--verify=crc32c",
                   "--do_verify=1", "--output-format=json", timeout=300)
    result = json.loads(out[out.index("{"):])
    assert all(job["error"] == 0 for job in result["jobs"])
    assert sum(job["write"]["total_ios"] for job in result["jobs"]) == 2 * 8192


def test_serving_a_100_gib_volume_keeps_rss_bounded(nbd_daemons: Callable[..., NbdDaemon]) -> None:
    d = nbd_daemons(create=["big:100GiB"])
    argv = ["qemu-io", "-f", "raw"]
    for i in range(0, 100, 2):
        off = i * (1 << 30) + 12345
        argv += ["-c", f"write -P {i % 250 + 1} {off} 1048576", "-c", f"read -P {i % 250 + 1} {off} 1048576"]
    out = run_tool(*argv, d.uri("big"))
    assert "fail" not in out.lower()
    assert d.rss_kib() < 512 * 1024, d.rss_kib()


def test_rados_backed_export_round_trips_and_is_consistent(
    nbd_daemons: Callable[..., NbdDaemon], ceph: CephCluster, tmp_path: Path
) -> None:
    url = ceph.backend_url("nbd-roundtrip")
    image = tmp_path / "r.img"
    image.write_bytes(os.urandom(24 * MiB) + bytes(8 * MiB))
    d = nbd_daemons(backend=url, create=["r:32MiB"])
    run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), d.uri("r"))
    d.kill()
    d.start()
    run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), d.uri("r"))
    d.stop()
    pool = open_pool(url, readonly=True)
    try:
        assert check_consistency(pool) == []
    finally:
        pool.close()


def test_unknown_export_is_refused_and_out_of_range_requests_get_errors(
    nbd_daemons: Callable[..., NbdDaemon],
) -> None:
    d = nbd_daemons(create=["small:1MiB", "other:1MiB"])
    with pytest.raises(NbdClientError, match="refused"):
        NbdClient(d.socket, "nope")
    client = NbdClient(d.socket, "small")
    assert client.size == MiB
    with pytest.raises(NbdClientError, match="error 28"):
        client.write(MiB - 10, b"x" * 20)
    with pytest.raises(NbdClientError, match="error 22"):
        client.read(MiB - 10, 20)
    client.write(MiB - 10, b"y" * 10, fua=True)
    assert client.read(MiB - 10, 10) == b"y" * 10
    client.close()
