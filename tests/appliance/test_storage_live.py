"""Storage through the appliance as users drive it: `cairn volume|snapshot|image|pool`
against `cairn up`'s real processes (the supervised storage daemon writes the pool),
checked with QEMU's own tools on the volumes' NBD exports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from . import test_live_stack as live
from .test_live_stack import CAIRN, Stack, wait_for

pytestmark = pytest.mark.functional
stack = live.stack  # this module gets its own appliance (module-scoped fixture)


def fails(s: Stack, *args: str) -> str:
    """Run a cairn command that must fail; returns what it printed on stderr."""
    r = subprocess.run([*CAIRN, *args, "--output", "json"], env=s.env, capture_output=True, text=True, timeout=180)
    assert r.returncode != 0, f"cairn {' '.join(args)} should have failed: {r.stdout}"
    return " ".join(r.stderr.split())


def qemu_io(uri: str, command: str) -> str:
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", command, uri], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.lower()


def holds(uri: str, pattern: int, length: str = "1M") -> bool:
    return "verification failed" not in qemu_io(uri, f"read -P {pattern:#x} 0 {length}")


def test_volume_snapshot_clone_rollback_resize_delete(stack: Stack) -> None:
    vol = stack.cairn("volume", "create", "data", "--size", "64MiB")
    assert vol["status"]["phase"] == "Available" and vol["status"]["size_bytes"] == 64 << 20
    uri = vol["status"]["export"]
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", uri], capture_output=True, text=True,
                                     check=True).stdout)
    assert info["virtual-size"] == 64 << 20
    qemu_io(uri, "write -P 0x11 0 1M")
    snap = stack.cairn("snapshot", "create", "data", "s1")
    assert snap["name"] == "s1" and snap["volume"] == "data"
    qemu_io(uri, "write -P 0x22 0 1M")
    assert [s["name"] for s in stack.cairn("snapshot", "list", "data")] == ["s1"]

    copy = stack.cairn("volume", "clone", "data@s1", "data-copy")
    assert holds(copy["status"]["export"], 0x11) and holds(uri, 0x22)
    qemu_io(copy["status"]["export"], "write -P 0x33 0 1M")  # clones diverge independently
    assert holds(uri, 0x22)

    stack.cairn("volume", "rollback", "data", "s1")
    assert holds(uri, 0x11)

    grown = stack.cairn("volume", "resize", "data", "128MiB")
    assert grown["status"]["size_bytes"] == 128 << 20
    assert "force" in fails(stack, "volume", "resize", "data", "32MiB")
    assert stack.cairn("volume", "get", "data")["status"]["size_bytes"] == 128 << 20  # unchanged

    stack.cairn("volume", "delete", "data-copy")
    assert "no volume 'data-copy'" in fails(stack, "volume", "get", "data-copy")
    stack.cairn("volume", "delete", "data")


def test_bad_storage_input_is_a_clear_4xx_that_changes_nothing(stack: Stack) -> None:
    with stack.http() as http:
        before = http.get("/api/v1/tasks", params={"limit": 1000}).json()["items"]
        r = http.post("/api/v1/volumes/ghost/snapshots", json={"name": "s"})
        assert r.status_code == 404 and "ghost" in r.json()["detail"]
        assert r.headers["content-type"].startswith("application/problem+json")
        r = http.post("/api/v1/volumes", json={"name": "fast", "size": "1GiB", "class": "rbd"})
        assert r.status_code == 422 and "Ceph" in r.json()["detail"]
        r = http.post("/api/v1/volumes", json={"name": "huge", "size": "100TiB"})
        assert r.status_code == 422
        r = http.post("/api/v1/volumes", json={"name": "nosize"})
        assert r.status_code == 422 and "size" in r.json()["detail"]
        r = http.post("/api/v1/volumes", json={"name": "x", "size": "1GiB", "source": {"image": "nope"}})
        assert r.status_code == 404
        assert http.get("/api/v1/tasks", params={"limit": 1000}).json()["items"] == before
        assert http.get("/api/v1/volumes").json()["items"] == []


def test_image_upload_is_checked_and_new_volumes_clone_it(stack: Stack, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(4 << 20) + bytes(4 << 20))
    qcow = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True)
    corrupt = tmp_path / "corrupt.qcow2"
    corrupt.write_bytes(qcow.read_bytes()[: 256 << 10])

    assert "nothing was stored" in fails(stack, "image", "upload", str(corrupt), "broken")
    with stack.http() as http:
        assert http.get("/api/v1/images/broken").status_code == 404
    uploads = Path(stack.env["CAIRN_DATA_DIR"]) / "uploads"
    assert not any(uploads.iterdir()), "a refused upload leaves nothing behind"

    image = stack.cairn("image", "upload", str(qcow), "disk1")
    assert image["status"]["phase"] == "Available" and image["spec"]["virtual_size"] == 8 << 20
    assert "already exists" in fails(stack, "image", "upload", str(qcow), "disk1")
    vol = stack.cairn("volume", "create", "root1", "--image", "disk1")
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), vol["status"]["export"]],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert "holds image" in fails(stack, "volume", "delete", image["spec"]["volume"])
    stack.cairn("volume", "delete", "root1")
    stack.cairn("delete", "image", "disk1")


def test_pool_reports_its_space_and_survives_a_kill_9_of_the_storage_daemon(stack: Stack, tmp_path: Path) -> None:
    pool = stack.cairn("pool", "get", "default")
    assert pool["spec"]["backend"] == "local" and pool["status"]["phase"] == "Ready"
    assert {"logical_bytes", "stored_bytes", "dedup_ratio", "compression_ratio"} <= set(pool["status"]["stats"])

    vol = stack.cairn("volume", "create", "durable", "--size", "16MiB")
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(5 << 20))
    # qemu-img flushes before it exits: everything it wrote was acknowledged as durable.
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(data), vol["status"]["export"]],
                   check=True, timeout=120)
    old = stack.services()["storage"]["pid"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: stack.services()["storage"]["pid"] not in (None, old), 30, "the storage daemon's restart")
    out = tmp_path / "out.bin"
    wait_for(lambda: subprocess.run(["nbdcopy", vol["status"]["export"], str(out)], capture_output=True).returncode
             == 0, 30, "the export to come back")
    assert out.read_bytes()[: 5 << 20] == data.read_bytes()
    stack.cairn("volume", "delete", "durable")
