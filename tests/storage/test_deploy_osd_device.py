"""A node's OSD on a block device (what an installed node's data disk becomes: ``cairn
cluster init/join --osd /dev/disk/by-id/…``): a real one-monitor Ceph on a loopback
address and a loop device; the OSD comes up on the device, a restart makes no second
OSD (nor for a file OSD next to it, as lab nodes have), a path that is not a block
device is refused before any OSD id is taken."""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.backends.rados_deploy import (
    Admin,
    CephNode,
    NodeDaemons,
    bootstrap_first_mon,
    new_fsid,
    wait_quorum,
    write_conf,
)
from storage.errors import ClusterError

pytestmark = pytest.mark.functional


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    image = tmp_path / "data-disk.img"
    with open(image, "wb") as f:
        f.truncate(4 << 30)  # sparse; bluestore writes a few MiB of it
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                          check=True).stdout.strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "--detach", loop], capture_output=True)


def _osds_up(admin: Admin, want: int, timeout: float = 90) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        stat = admin.mon("osd stat")
        if stat["num_up_osds"] >= want or time.monotonic() > deadline:
            return {"osds": stat["num_osds"], "up": stat["num_up_osds"]}
        time.sleep(1)


@pytest.mark.timeout(300)
def test_an_osd_on_a_block_device_comes_up_and_a_restart_makes_no_second(tmp_path: Path, loop_device: str) -> None:
    address = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
    node = CephNode(fsid=new_fsid(), name="n1", address=address, mons=(("n1", address),),
                    conf=tmp_path / "etc" / "ceph.conf", data=tmp_path / "ceph", osd_size=1 << 30)
    write_conf(node)
    bootstrap_first_mon(node)
    daemons = NodeDaemons(node)
    try:
        daemons.start_mon()
        with wait_quorum(node.conf, timeout=60) as admin:
            with pytest.raises(ClusterError, match="not a block device"):
                daemons.ensure_osds(admin, [str(tmp_path / "etc" / "ceph.conf")])
            assert admin.mon("osd stat")["num_osds"] == 0  # refused before `osd new`

            ids = daemons.ensure_osds(admin, [loop_device])
            assert len(ids) == 1
            block = node.data / "osd" / f"ceph-{ids[0]}" / "block"
            assert block.is_symlink() and str(block.readlink()) == loop_device
            assert _osds_up(admin, 1) == {"osds": 1, "up": 1}
            # bluestore wrote its label on the device itself
            label = subprocess.run(["ceph-bluestore-tool", "show-label", "--dev", loop_device],
                                   capture_output=True, text=True)
            assert label.returncode == 0 and '"osd_uuid"' in label.stdout, label.stderr

            # the daemons restart (as the supervisor restarts the set): the same OSD again
            osd_proc = daemons.procs.pop(f"osd.{ids[0]}")
            osd_proc.terminate()
            osd_proc.wait(30)
            assert daemons.ensure_osds(admin, [loop_device]) == ids
            assert _osds_up(admin, 1) == {"osds": 1, "up": 1}

            # a file OSD next to it (what lab nodes have: file:<bytes>), once only
            both = daemons.ensure_osds(admin, [loop_device, "file:1073741824"])
            assert both[0] == ids[0] and len(both) == 2
            assert not (node.data / "osd" / f"ceph-{both[1]}" / "block").is_symlink()
            assert _osds_up(admin, 2) == {"osds": 2, "up": 2}
            for osd in both:
                proc = daemons.procs.pop(f"osd.{osd}")
                proc.terminate()
                proc.wait(30)
            assert sorted(daemons.ensure_osds(admin, ["file:1073741824", loop_device])) == sorted(both)
            assert _osds_up(admin, 2) == {"osds": 2, "up": 2}
            # a running OSD is not started twice (the second would be nobody's to stop)
            pids = {k: p.pid for k, p in daemons.procs.items()}
            daemons.ensure_osds(admin, [loop_device, "file:1073741824"])
            assert {k: p.pid for k, p in daemons.procs.items()} == pids
    finally:
        daemons.stop()
    left = subprocess.run(["pgrep", "-f", str(node.conf)], capture_output=True, text=True).stdout.split()
    assert not left, f"ceph daemons of this test still run: {left}"
