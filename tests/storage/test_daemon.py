"""cairn-storaged: the control socket runs pool operations in the pool's one writer,
while QEMU's own tools read and write the same volumes over its NBD exports."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from storage.backends.rados_cluster import CephCluster
from storage.control import StorageClient
from storage.errors import AlreadyExists, BackendError, InvalidArgument, NotFound

from .conftest import Daemon, run_tool


def qemu_io(uri: str, command: str) -> str:
    return run_tool("qemu-io", "-f", "raw", "-c", command, uri).lower()


def test_volume_lifecycle_through_the_control_socket_and_qemu(daemon: Daemon, tmp_path: Path) -> None:
    c = daemon.client
    c.call("attach", name="p1", backend=f"local://{tmp_path}/pool")
    c.call("create", pool="p1", volume="v1", size=64 << 20)
    uri = c.call("export", pool="p1", volume="v1")["unix"]
    assert "virtual size: 64 MiB" in run_tool("qemu-img", "info", uri)
    qemu_io(uri, "write -P 0x11 0 1M")
    c.call("snapshot", pool="p1", volume="v1", snapshot="s1")
    qemu_io(uri, "write -P 0x22 0 1M")
    c.call("clone", pool="p1", volume="v1", snapshot="s1", new="v2")
    clone = c.call("export", pool="p1", volume="v2")["unix"]
    assert "pattern verification failed" not in qemu_io(clone, "read -P 0x11 0 1M")
    assert "pattern verification failed" not in qemu_io(uri, "read -P 0x22 0 1M")
    c.call("rollback", pool="p1", volume="v1", snapshot="s1")
    assert "pattern verification failed" not in qemu_io(uri, "read -P 0x11 0 1M")
    assert [s["name"] for s in c.call("snapshots", pool="p1", volume="v1")] == ["s1"]
    c.call("resize", pool="p1", volume="v1", size=128 << 20)
    assert c.call("info", pool="p1", volume="v1")["size"] == 128 << 20
    stats = c.call("stats", pool="p1")
    assert stats["volumes"] == 2 and stats["logical_bytes"] >= 2 << 20
    assert c.call("check", pool="p1") == []


def test_errors_come_back_as_the_library_exceptions(daemon: Daemon, tmp_path: Path) -> None:
    c = daemon.client
    c.call("attach", name="p1", backend=f"local://{tmp_path}/pool")
    with pytest.raises(NotFound):
        c.call("snapshot", pool="p1", volume="missing", snapshot="s")
    with pytest.raises(NotFound):
        c.call("create", pool="nopool", volume="v", size=1 << 20)
    c.call("create", pool="p1", volume="v", size=1 << 20)
    with pytest.raises(AlreadyExists):
        c.call("create", pool="p1", volume="v", size=1 << 20)
    with pytest.raises(InvalidArgument):
        c.call("resize", pool="p1", volume="v", size=1 << 10)  # shrinking without force
    with pytest.raises(InvalidArgument):
        c.call("create", pool="p1", volume="w", size=1 << 20, **{"class": "rbd"})  # not a Ceph pool
    with pytest.raises(InvalidArgument):
        c.call("frobnicate", pool="p1")
    with pytest.raises(InvalidArgument, match="TLS only"):  # a daemon without --tls-dir opens no TCP port
        c.call("attach", name="p2", backend=f"local://{tmp_path}/pool2", port=10809)
    assert c.call("info", pool="p1", volume="v")["size"] == 1 << 20  # nothing changed


def test_a_killed_daemon_comes_back_with_its_pools_and_every_flushed_write(daemon: Daemon, tmp_path: Path) -> None:
    c = daemon.client
    c.call("attach", name="p1", backend=f"local://{tmp_path}/pool", port=0)
    c.call("create", pool="p1", volume="v1", size=32 << 20)
    uri = c.call("export", pool="p1", volume="v1")["unix"]
    data = os.urandom(3 << 20)
    src = tmp_path / "data.bin"
    src.write_bytes(data)
    # qemu-img convert flushes before it exits: every byte it wrote is acknowledged and durable.
    run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    daemon.kill()
    daemon.start()
    assert [p["name"] for p in c.call("pools")] == ["p1"]
    out = tmp_path / "out.bin"
    run_tool("nbdcopy", uri, str(out))
    assert out.read_bytes()[: len(data)] == data


def test_rbd_class_volumes_live_in_the_same_ceph_pool(daemon: Daemon, ceph: CephCluster) -> None:
    c = daemon.client
    ns = f"daemon{os.getpid()}"
    c.call("attach", name="ceph", backend=ceph.backend_url(ns))
    rbd = {"class": "rbd"}
    name = f"{ns}-img"
    c.call("create", pool="ceph", volume=name, size=16 << 20, **rbd)
    try:
        uri = c.call("export", pool="ceph", volume=name, **rbd)["rbd"]
        qemu_io(uri, "write -P 0x33 0 1M")
        c.call("snapshot", pool="ceph", volume=name, snapshot="s1", **rbd)
        qemu_io(uri, "write -P 0x44 0 1M")
        c.call("rollback", pool="ceph", volume=name, snapshot="s1", **rbd)
        assert "pattern verification failed" not in qemu_io(uri, "read -P 0x33 0 1M")
        assert [s["name"] for s in c.call("snapshots", pool="ceph", volume=name, **rbd)] == ["s1"]
    finally:
        for snap in c.call("snapshots", pool="ceph", volume=name, **rbd):
            c.call("delete_snapshot", pool="ceph", volume=name, snapshot=snap["name"], **rbd)
        c.call("delete", pool="ceph", volume=name, **rbd)


def test_a_client_without_a_daemon_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="not answering"):
        StorageClient(tmp_path / "nothing.sock").call("pools")


def test_an_unprivileged_client_opens_only_the_exports_granted_to_its_uid(daemon: Daemon, tmp_path: Path) -> None:
    """The attack: a VM's QEMU (an unprivileged uid that may connect to the pool's socket)
    opens another VM's volume. Only root and the exports granted to its uid are served."""
    c = daemon.client
    c.call("attach", name="p1", backend=f"local://{tmp_path}/pool")
    for vol in ("mine", "theirs"):
        c.call("create", pool="p1", volume=vol, size=1 << 20)
    os.chmod(daemon.socket("p1"), 0o666)  # what the agent's ACL gives the VM group
    uid = (1 << 31) + (1 << 24)  # above 2**31, as the registry hands out (SO_PEERCRED ids are unsigned)

    def info(volume: str) -> subprocess.CompletedProcess[str]:  # as the uid, from inside the run dir
        return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
                               "qemu-img", "info", f"nbd+unix:///{volume}?socket=nbd-p1.sock"],
                              cwd=daemon.run_dir, capture_output=True, text=True, timeout=60)

    assert info("mine").returncode != 0 and info("theirs").returncode != 0  # nothing granted yet
    assert c.call("grant", uid=uid, exports={"p1": ["mine"]}) == {"p1": ["mine"]}
    assert info("mine").returncode == 0, info("mine").stderr
    refused = info("theirs")
    assert refused.returncode != 0 and "theirs" in refused.stderr, refused
    assert "virtual size: 1 MiB" in run_tool("qemu-img", "info", c.call("export", pool="p1", volume="theirs")["unix"])
    daemon.kill()  # grants survive a restart of the daemon
    daemon.start()
    os.chmod(daemon.socket("p1"), 0o666)
    assert info("mine").returncode == 0 and info("theirs").returncode != 0
    c.call("grant", uid=uid, exports={})  # revoked (the VM was deleted)
    assert info("mine").returncode != 0
    with pytest.raises(InvalidArgument):
        c.call("grant", uid=0, exports={"p1": ["theirs"]})
