"""Storage through the appliance as users drive it: `cairn volume|snapshot|image|pool`
against `cairn up`'s real processes (the supervised storage daemon writes the pool),
checked with QEMU's own tools on the volumes' NBD exports."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.storage.test_imageio import MARKER, with_backing, with_data_file
from tests.wsclient import connect

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


def test_uploads_that_refer_to_host_files_are_refused_and_copy_nothing(stack: Stack, tmp_path: Path) -> None:
    """The attack: a qcow2 whose header makes the root-run qemu-img read a host file
    (an external data file, a backing file, a json: backing) would copy that file into
    the tenant's volume. Each is a 422 now, and no volume holds a byte of the file."""
    secret = tmp_path / "host" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(MARKER * 4096)
    json_backing = f'json:{{"driver": "raw", "file": {{"driver": "file", "filename": "{secret}"}}}}'
    for sub in "abc":
        (tmp_path / sub).mkdir()
    attacks = {"datafile": with_data_file(tmp_path / "a", secret),
               "backing": with_backing(tmp_path / "b", str(secret)),
               "jsonbacking": with_backing(tmp_path / "c", json_backing)}
    with stack.http() as http:
        for name, image in attacks.items():
            with image.open("rb") as body:
                r = http.put(f"/api/v1/images/{name}/upload", content=body.read())
            assert r.status_code == 422, (name, r.status_code, r.text)
            assert "other files" in r.json()["detail"] and "nothing was stored" in r.json()["detail"]
            assert http.get(f"/api/v1/images/{name}").status_code == 404
    assert not any((Path(stack.env["CAIRN_DATA_DIR"]) / "uploads").iterdir())
    for vol in stack.cairn("get", "volumes"):
        out = tmp_path / f"{vol['name']}.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", vol["status"]["export"], str(out)], check=True, timeout=120)
        assert MARKER not in out.read_bytes(), f"volume {vol['name']} holds the host file"


def test_pool_reports_its_space_and_survives_a_kill_9_of_the_storage_daemon(stack: Stack, tmp_path: Path) -> None:
    pool = stack.cairn("pool", "get", "default")
    assert pool["spec"]["backend"] == "local" and pool["status"]["phase"] == "Ready"
    assert {"logical_bytes", "stored_bytes", "dedup_ratio", "compression_ratio"} <= set(pool["status"]["stats"])
    assert pool["status"]["dedup_ratio"] == pool["status"]["stats"]["dedup_ratio"]

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


def serial(s: Stack, vm: str, command: str, expect: str, seconds: float = 60) -> str:
    """Type a command on the VM's serial console (the API's websocket) and wait for ``expect``."""
    with connect(f"wss://127.0.0.1:{s.port}/api/v1/vms/{vm}/console/serial", ssl=s.tls, open_timeout=10,
                 additional_headers={"Authorization": f"Bearer {s.cli['token']}"}) as ws:
        ws.send(f"\n{command}\n".encode())
        seen = ws.read_until(expect.encode(), seconds)
    assert expect.encode() in seen, f"no {expect!r} on {vm}'s console: {seen[-500:]!r}"
    return seen.decode(errors="replace")


def booted(s: Stack, vm: str, times: int = 1) -> None:
    wait_for(lambda: s.cairn("vm", "console", vm)["console"].count("CAIRN-GUEST-UP") >= times, 90,
             f"{vm}'s marker on the serial console")


def test_a_vm_writes_its_dedup_volume_and_a_rollback_brings_the_old_data_back(stack: Stack) -> None:
    stack.cairn("image", "import-test-guest")
    stack.cairn("volume", "create", "vdata", "--size", "16MiB")
    vm = stack.cairn("vm", "create", "d1", "--image", "tiny-guest", "--cpu", "1", "--memory", "256MiB",
                     "--volume", "vdata")
    assert [d["volume"] for d in vm["status"]["volumes"]] == ["vdata"]
    booted(stack, "d1")
    node = vm["status"]["node"]
    # The node's storage daemon holds the volume's lock while the VM uses it.
    wait_for(lambda: stack.cairn("volume", "get", "vdata")["status"].get("owner") == node, 30,
             f"status.owner of vdata to name {node}")
    write = "printf {} | dd of=/dev/vda bs=1 seek=1048576 conv=notrunc,fsync 2>/dev/null; echo wrote-$((40+2))"
    serial(stack, "d1", write.format("FIRST-WRITE"), "wrote-42")
    stack.cairn("snapshot", "create", "vdata", "s1")  # crash-consistent: the guest synced
    serial(stack, "d1", write.format("LATER-WRITE"), "wrote-42")
    assert "stop it before rolling back" in fails(stack, "volume", "rollback", "vdata", "s1")
    assert "attached to vm 'd1'" in fails(stack, "vm", "create", "d2", "--image", "tiny-guest", "--volume", "vdata")

    stack.cairn("vm", "stop", "d1")
    wait_for(lambda: stack.cairn("volume", "get", "vdata")["status"].get("owner") is None, 30,
             "the stopped VM's node to let go of vdata")
    stack.cairn("volume", "rollback", "vdata", "s1")
    stack.cairn("vm", "start", "d1")
    booted(stack, "d1", times=2)
    out = serial(stack, "d1", "dd if=/dev/vda bs=1 skip=1048576 count=11 2>/dev/null; echo; echo read-$((40+2))",
                 "read-42")
    assert "FIRST-WRITE" in out and "LATER-WRITE" not in out
    stack.cairn("vm", "delete", "d1")
    assert stack.cairn("volume", "get", "vdata")["status"]["phase"] == "Available"  # attached volumes stay
    stack.cairn("volume", "delete", "vdata")


def test_vms_from_a_disk_image_get_an_o1_clone_as_root_volume(stack: Stack, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(6 << 20))
    stack.cairn("image", "upload", str(raw), "appdisk")
    before = stack.cairn("pool", "get", "default")
    vms = []
    for name in ("img1", "img2"):
        vm = stack.cairn("vm", "create", name, "--image", "appdisk", "--cpu", "1", "--memory", "128MiB",
                         "--root-size", "32MiB")
        root = stack.cairn("volume", "get", f"{name}-root")
        assert vm["status"]["volumes"][0]["volume"] == f"{name}-root" and root["status"]["size_bytes"] == 32 << 20
        assert root["spec"]["source"]["snapshot"] == "base"
        vms.append(root)
    # both roots hold the image: cloned, not copied
    for root in vms:
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), root["status"]["export"]],
                             capture_output=True, text=True)
        assert cmp.returncode in (0, 1) and "Content mismatch" not in cmp.stdout, cmp.stdout  # 1: size differs
    assert "smaller than image" in fails(stack, "vm", "create", "img3", "--image", "appdisk", "--root-size", "1MiB")
    for name in ("img1", "img2"):
        stack.cairn("vm", "delete", name)
        wait_for(lambda n=name: "no volume" in fails(stack, "volume", "get", f"{n}-root"), 60,
                 "the VM's root volume to go with it")
    assert before["spec"]["backend"] == "local"
    stack.cairn("delete", "image", "appdisk")


def test_a_burst_of_disk_image_vms_larger_than_the_worker_pool_does_not_deadlock(stack: Stack) -> None:
    """Each create waits for its root-volume task on the node queue: with more creates
    than worker threads, those tasks still need threads of their own."""
    stack.cairn("image", "upload", str(_small_disk(stack.root)), "burstdisk")
    names = [f"burst{i}" for i in range(8)]  # twice the worker's 4 threads (and all 2 CPUs overcommit to)
    with stack.http() as api:
        assert api.get("/api/v1/vms").json()["items"] == [], "an earlier test left a VM (eight need every CPU)"
        tasks = [api.post("/api/v1/vms", json={"name": n, "project": "default", "spec": {
            "image": "burstdisk", "cpu": 1, "memory": "64MiB", "power": "stopped"}}).json() for n in names]

        def states() -> list[str]:
            return [api.get(f"/api/v1/tasks/{t['id']}").json()["state"] for t in tasks]

        final = wait_for(lambda: (st := states()) and all(x in ("succeeded", "failed") for x in st) and st,
                         120, "eight disk-image VM creates to finish")
    assert final == ["succeeded"] * 8
    for n in names:
        stack.cairn("vm", "delete", n)
    stack.cairn("delete", "image", "burstdisk")


def _small_disk(root: Path) -> Path:
    raw = root / "burst.raw"
    raw.write_bytes(os.urandom(1 << 20))
    return raw


def test_vm_snapshot_restore_and_clone(stack: Stack) -> None:
    stack.cairn("image", "import-test-guest")
    stack.cairn("volume", "create", "sdata", "--size", "8MiB")
    stack.cairn("vm", "create", "s1", "--image", "tiny-guest", "--cpu", "1", "--memory", "256MiB", "--volume", "sdata")
    booted(stack, "s1")
    write = "printf {} | dd of=/dev/vda bs=1 seek=4096 conv=notrunc,fsync 2>/dev/null; echo wrote-$((40+2))"
    serial(stack, "s1", write.format("BEFORE-SNAP"), "wrote-42")
    taken = stack.cairn("vm", "snapshot", "create", "s1", "good")  # running: paused for the moment it takes
    assert taken["volumes"] == ["sdata"]
    assert stack.cairn("vm", "get", "s1")["status"]["power_state"] == "running"
    serial(stack, "s1", write.format("AFTER--SNAP"), "wrote-42")
    assert "stop it before" in fails(stack, "vm", "restore", "s1", "good")  # a running VM is not restored

    clone = stack.cairn("vm", "clone", "s1@good", "s2")
    assert [d["volume"] for d in clone["status"]["volumes"]] == ["s2-sdata"]
    booted(stack, "s2")
    read = "dd if=/dev/vda bs=1 skip=4096 count=11 2>/dev/null; echo; echo read-$((40+2))"
    assert "BEFORE-SNAP" in serial(stack, "s2", read, "read-42")

    stack.cairn("vm", "stop", "s1")
    stack.cairn("vm", "restore", "s1", "good")
    stack.cairn("vm", "start", "s1")
    booted(stack, "s1", times=2)
    out = serial(stack, "s1", read, "read-42")
    assert "BEFORE-SNAP" in out and "AFTER--SNAP" not in out
    assert [s["name"] for s in stack.cairn("vm", "snapshot", "list", "s1")] == ["good"]
    stack.cairn("vm", "snapshot", "delete", "s1", "good")
    assert stack.cairn("snapshot", "list", "sdata") == []
    for vm in ("s1", "s2"):
        stack.cairn("vm", "delete", vm)
    stack.cairn("volume", "delete", "s2-sdata")
    stack.cairn("volume", "delete", "sdata")


def _heartbeats(console: str) -> list[tuple[int, float]]:
    """The tiny guest's ``HB n UPTIME`` lines."""
    return [(int(n), float(t)) for n, t in re.findall(r"HB (\d+) ([0-9.]+)", console)]


def test_a_containers_volume_rolls_back_moves_to_a_vm_and_the_vm_resumes_from_a_memory_snapshot(
        stack: Stack) -> None:
    stack.cairn("image", "import-test-guest")
    stack.cairn("volume", "create", "cdata", "--size", "64MiB")
    ct = live.create_container(stack, "cv", "--volume", "cdata:/var/lib/data")
    assert ct["spec"]["mounts"] == [{"volume": "cdata", "path": "/var/lib/data", "fs": "ext4", "readonly": False}]
    node = ct["status"]["node"]
    code, out = live.in_container(stack, "cv", "grep /var/lib/data /proc/mounts; echo first > /var/lib/data/f; sync")
    assert code == 0 and " ext4 " in out, out  # formatted on first use
    wait_for(lambda: stack.cairn("volume", "get", "cdata")["status"].get("owner") == node, 30,
             "the container's node to own cdata")
    assert "attached to container 'cv'" in fails(stack, "vm", "create", "cvm", "--image", "tiny-guest",
                                                 "--volume", "cdata")
    stack.cairn("snapshot", "create", "cdata", "s1")
    assert live.in_container(stack, "cv", "echo second > /var/lib/data/f; sync; cat /var/lib/data/f") == (0, "second\n")
    assert "stop it before rolling back" in fails(stack, "volume", "rollback", "cdata", "s1")
    stack.cairn("container", "stop", "cv", "--timeout", "1")
    stack.cairn("volume", "rollback", "cdata", "s1")
    stack.cairn("container", "start", "cv")
    assert live.in_container(stack, "cv", "cat /var/lib/data/f") == (0, "first\n")

    # the volume moves to a VM, which reads the container's file
    stack.cairn("container", "delete", "cv")
    wait_for(lambda: stack.cairn("volume", "get", "cdata")["status"].get("owner") is None, 30,
             "the deleted container's node to let go of cdata")
    stack.cairn("vm", "create", "cvm", "--image", "tiny-guest", "--cpu", "1", "--memory", "256MiB",
                "--volume", "cdata")
    booted(stack, "cvm")
    out = serial(stack, "cvm", "mkdir -p /mnt/v && mount /dev/vda /mnt/v && cat /mnt/v/f; echo read-$((40+2))",
                 "read-42")
    assert "first" in out and "second" not in out

    # a snapshot with its memory: a restore resumes the VM where it was
    wait_for(lambda: len(_heartbeats(stack.cairn("vm", "console", "cvm")["console"])) >= 4, 60, "heartbeats")
    taken = stack.cairn("vm", "snapshot", "create", "cvm", "live", "--memory-state")
    assert taken["memory"]["bytes"] > 0 and taken["volumes"] == ["cdata"]
    at = _heartbeats(stack.cairn("vm", "console", "cvm")["console"])[-1][0]  # it ran on since
    wait_for(lambda: _heartbeats(stack.cairn("vm", "console", "cvm")["console"])[-1][0] >= at + 4, 60,
             "the VM to run on past the snapshot")
    stack.cairn("vm", "stop", "cvm", "--timeout", "1")
    before = stack.cairn("vm", "console", "cvm")["console"]
    last = _heartbeats(before)[-1][0]
    assert stack.cairn("vm", "restore", "cvm", "live")["status"]["power_state"] == "running"
    after = wait_for(lambda: _heartbeats(stack.cairn("vm", "console", "cvm")["console"][len(before):]), 60,
                     "a heartbeat after the restore")
    (first, uptime), snap_hb = after[0], [u for n, u in _heartbeats(before) if n == after[0][0] - 1]
    assert 4 <= first <= at + 1 < last, f"resumed at HB {first}: snapshot at or before HB {at}, stopped at {last}"
    assert snap_hb and uptime > snap_hb[0], "its uptime went on from the snapshot"
    assert stack.cairn("vm", "console", "cvm")["console"].count("CAIRN-GUEST-UP") == 1, "resumed, not rebooted"
    stack.cairn("vm", "snapshot", "delete", "cvm", "live")
    stack.cairn("vm", "delete", "cvm")
    stack.cairn("volume", "delete", "cdata")


def test_nbd_over_tcp_is_tls_only_and_a_vm_uses_it(stack: Stack) -> None:
    """The attack: a plaintext NBD client on the storage network opens the node's TCP
    export (the storage daemon serves it when CAIRN_STORAGE_NBD_PORT is set): refused,
    TLS required. A VM whose pool has no unix socket on its node (another node's pool)
    gets the ``nbds://`` export: its unprivileged QEMU upgrades to TLS with the node's
    NBD client certificate, and the guest reads and writes the volume."""
    port = int(stack.env["CAIRN_STORAGE_NBD_PORT"])
    vol = stack.cairn("volume", "create", "tdata", "--size", "8MiB")
    tcp = vol["status"]["exports"]["tcp"]
    assert tcp == f"nbds://127.0.0.1:{port}/{vol['id']}", tcp
    r = subprocess.run(["qemu-img", "info", tcp.replace("nbds://", "nbd://")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "TLS" in r.stderr, f"plaintext NBD was served: {r.stdout}{r.stderr}"
    qemu_io(vol["status"]["export"], "write -P 0x54 0 16")  # 'T' x 16, what the guest prints first
    sock = Path(stack.env["CAIRN_DATA_DIR"]) / "run" / "storage" / "nbd-default.sock"
    hidden = sock.with_name("nbd-default.sock.hidden")
    sock.rename(hidden)  # as on a node that does not serve this pool
    try:
        stack.cairn("image", "import-test-guest")
        stack.cairn("vm", "create", "t1", "--image", "tiny-guest", "--cpu", "1", "--memory", "256MiB",
                    "--volume", "tdata")
        booted(stack, "t1")
    finally:
        hidden.rename(sock)
    domain = stack.cairn("vm", "get", "t1")["status"]["domain"]
    argv = next(Path(f"/proc/{pid}/cmdline").read_bytes() for pid in os.listdir("/proc") if pid.isdigit()
                and f"guest={domain}".encode() in _cmdline(pid))
    assert b"tls-creds-x509" in argv and f'"port":"{port}"'.encode() in argv and b"nbd-default.sock" not in argv
    assert "TTTTTTTTTTTTTTTT" in serial(stack, "t1", "dd if=/dev/vda bs=16 count=1 2>/dev/null; echo; echo x-$((4+2))",
                                         "x-6")
    serial(stack, "t1", "printf OVER-TLS | dd of=/dev/vda bs=1 seek=4096 conv=notrunc,fsync 2>/dev/null; "
                        "echo wrote-$((40+2))", "wrote-42")
    stack.cairn("vm", "delete", "t1")
    assert "4f 56 45 52 2d 54 4c 53" in qemu_io(vol["status"]["export"], "read -v 4096 8")  # OVER-TLS
    stack.cairn("volume", "delete", "tdata")


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_up_with_ceph_serves_a_replicated_pool_for_dedup_and_rbd_volumes(stack: Stack) -> None:
    """Last in this module: from here on the appliance also runs Ceph (1 mon, 1 mgr, 3 OSDs)."""
    stack.cairn("up", "--ceph")  # on a running appliance: the supervisor adds the ceph program

    def ceph_pool() -> Any:
        with stack.http() as http:
            r = http.get("/api/v1/pools/ceph")
            return r.json() if r.status_code == 200 and r.json()["status"].get("phase") == "Ready" else None

    pool = wait_for(ceph_pool, 120, "the ceph pool to be Ready")
    assert pool["spec"]["backend"] == "rados" and pool["spec"]["replication"] == 3
    assert stack.services()["ceph"]["pid"]

    dedup = stack.cairn("volume", "create", "cv", "--size", "64MiB", "--pool", "ceph")
    qemu_io(dedup["status"]["export"], "write -P 0x5a 0 2M")
    assert holds(dedup["status"]["export"], 0x5a, "2M")

    rbd = stack.cairn("volume", "create", "rv", "--size", "64MiB", "--pool", "ceph", "--class", "rbd")
    uri = rbd["status"]["export"]
    assert uri.startswith("rbd:") and rbd["status"]["class"] == "rbd"
    qemu_io(uri, "write -P 0x61 0 1M")
    stack.cairn("snapshot", "create", "rv", "s1")
    qemu_io(uri, "write -P 0x62 0 1M")
    stack.cairn("volume", "rollback", "rv", "s1")
    assert holds(uri, 0x61)
    for name in ("rv", "cv"):
        stack.cairn("volume", "delete", name)


def test_vms_boot_from_and_attach_rbd_volumes_through_qemus_rbd_driver(stack: Stack, tmp_path: Path) -> None:
    """After the Ceph test: ``rbd`` volumes reach QEMU through librbd (no NBD hop), with
    snapshots, VM snapshots and clones as for ``dedup``."""
    stack.cairn("image", "import-test-guest")
    raw = tmp_path / "rbd-root.raw"
    raw.write_bytes(b"RBD-ROOT-IMAGE" + os.urandom(2 << 20))
    img = stack.cairn("image", "upload", str(raw), "rbdroot", "--pool", "ceph", "--class", "rbd")
    assert img["status"]["phase"] == "Available"
    vm = stack.cairn("vm", "create", "r0", "--image", "rbdroot", "--cpu", "1", "--memory", "128MiB")
    root = stack.cairn("volume", "get", "r0-root")
    assert root["status"]["class"] == "rbd" and root["status"]["export"].startswith("rbd:")
    assert vm["status"]["power_state"] == "running"  # QEMU opened its rbd root (an O(1) RBD clone)
    stack.cairn("vm", "delete", "r0")

    data = stack.cairn("volume", "create", "rdata", "--size", "8MiB", "--pool", "ceph", "--class", "rbd")
    qemu_io(data["status"]["export"], "write -P 0x52 0 16")  # 'R' x 16, what the guest prints first
    stack.cairn("vm", "create", "r1", "--image", "tiny-guest", "--cpu", "1", "--memory", "256MiB",
                "--volume", "rdata")
    booted(stack, "r1")
    read = "dd if=/dev/vda bs=1 skip=4096 count=11 2>/dev/null; echo; echo read-$((40+2))"
    write = "printf {} | dd of=/dev/vda bs=1 seek=4096 conv=notrunc,fsync 2>/dev/null; echo wrote-$((40+2))"
    assert "RRRRRRRRRRRRRRRR" in serial(stack, "r1", "dd if=/dev/vda bs=16 count=1 2>/dev/null; echo; echo x-$((4+2))",
                                         "x-6")
    serial(stack, "r1", write.format("BEFORE-SNAP"), "wrote-42")
    wait_for(lambda: stack.cairn("volume", "get", "rdata")["status"].get("owner") is not None, 30,
             "status.owner of the rbd volume in use")
    stack.cairn("vm", "snapshot", "create", "r1", "good")
    serial(stack, "r1", write.format("AFTER--SNAP"), "wrote-42")
    clone = stack.cairn("vm", "clone", "r1@good", "r2")
    assert [d["volume"] for d in clone["status"]["volumes"]] == ["r2-rdata"]
    booted(stack, "r2")
    assert "BEFORE-SNAP" in serial(stack, "r2", read, "read-42")
    stack.cairn("vm", "stop", "r1")
    stack.cairn("vm", "restore", "r1", "good")
    stack.cairn("vm", "start", "r1")
    booted(stack, "r1", times=2)
    out = serial(stack, "r1", read, "read-42")
    assert "BEFORE-SNAP" in out and "AFTER--SNAP" not in out
    for name in ("r1", "r2"):
        stack.cairn("vm", "delete", name)
    stack.cairn("volume", "delete", "r2-rdata")
    stack.cairn("snapshot", "delete", "rdata", "good")
    stack.cairn("volume", "delete", "rdata")
    stack.cairn("delete", "image", "rbdroot")

    # a container mounts an rbd volume too (qemu-storage-daemon's FUSE export reads it through librbd)
    stack.cairn("volume", "create", "rct", "--size", "64MiB", "--pool", "ceph", "--class", "rbd")
    live.create_container(stack, "rc", "--volume", "rct:/srv/data")
    assert live.in_container(stack, "rc", "grep -c ' /srv/data ext4 ' /proc/mounts; echo on-rbd > /srv/data/f; "
                                          "sync") == (0, "1\n")
    stack.cairn("container", "stop", "rc", "--timeout", "1")
    stack.cairn("container", "start", "rc")
    assert live.in_container(stack, "rc", "cat /srv/data/f") == (0, "on-rbd\n")
    stack.cairn("container", "delete", "rc")
    wait_for(lambda: stack.cairn("volume", "get", "rct")["status"].get("owner") is None, 30,
             "the deleted container's node to let go of rct")
    stack.cairn("volume", "delete", "rct")

