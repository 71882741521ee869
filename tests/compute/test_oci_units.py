"""Pure parts of the container driver: QoS -> cgroup resources, runtime config, image unpacking."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from compute.errors import ImageNotFound, InvalidSpec
from compute.oci_bundle import build_runtime_config, cgroup_resources
from compute.oci_image import ImageConfig, ImageStore
from compute.spec import (
    ContainerSpec,
    DeviceIoLimit,
    QosClass,
    VolumeMount,
    container_spec_from_dict,
    container_spec_to_dict,
)

pytestmark = pytest.mark.unit


def ct(**kw: object) -> ContainerSpec:
    base: dict[str, object] = dict(name="c1", image="/img.tar", command=("/bin/sh",))
    base.update(kw)
    return ContainerSpec(**base)  # type: ignore[arg-type]


def test_guaranteed_class_gets_quota_shares_and_memory_reservation() -> None:
    res = cgroup_resources(ct(vcpus=1.5, memory_mib=128, qos_class=QosClass.GUARANTEED))
    assert res["cpu"] == {"shares": 1536, "quota": 150000, "period": 100000}
    assert res["memory"] == {"limit": 128 << 20, "reservation": 128 << 20}


def test_burstable_class_gets_shares_without_quota() -> None:
    res = cgroup_resources(ct(vcpus=2, qos_class=QosClass.BURSTABLE))
    assert res["cpu"] == {"shares": 2048}


def test_best_effort_class_gets_minimal_shares_but_still_a_memory_limit() -> None:
    res = cgroup_resources(ct(memory_mib=32))
    assert res["cpu"] == {"shares": 2}
    assert res["memory"]["limit"] == 32 << 20


def test_io_limits_map_to_per_device_throttles() -> None:
    spec = ct(io_limits=(DeviceIoLimit("/dev/vda", read_bps=100, write_iops=7),))
    res = cgroup_resources(spec, {"/dev/vda": (254, 0)})
    assert res["blockIO"] == {"throttleReadBpsDevice": [{"major": 254, "minor": 0, "rate": 100}],
                              "throttleWriteIOPSDevice": [{"major": 254, "minor": 0, "rate": 7}]}


def test_runtime_config_joins_the_netns_and_bind_mounts_volumes() -> None:
    spec = ct(env=(("A", "1"),), volumes=(VolumeMount("/srv/v", "/data", readonly=True),), hostname="web")
    cfg = build_runtime_config(spec, rootfs="/b/rootfs", image=ImageConfig(env=(("PATH", "/bin"),)),
                               netns_path="/run/netns/cairn-c1", cgroups_path="/cairn/c1")
    assert {"type": "network", "path": "/run/netns/cairn-c1"} in cfg["linux"]["namespaces"]
    assert {"destination": "/data", "type": "bind", "source": "/srv/v", "options": ["rbind", "ro"]} in cfg["mounts"]
    assert "A=1" in cfg["process"]["env"] and "PATH=/bin" in cfg["process"]["env"]
    assert cfg["hostname"] == "web" and cfg["linux"]["cgroupsPath"] == "/cairn/c1"
    assert "CAP_NET_RAW" in cfg["process"]["capabilities"]["bounding"]


def test_container_spec_round_trips_through_a_dict() -> None:
    spec = ct(env=(("A", "1"),), volumes=(VolumeMount("/a", "/b"),), qos_class=QosClass.BURSTABLE,
              io_limits=(DeviceIoLimit("/dev/vda", read_bps=1),))
    assert container_spec_from_dict(json.loads(json.dumps(container_spec_to_dict(spec)))) == spec


def test_invalid_container_specs_are_refused() -> None:
    with pytest.raises(InvalidSpec, match="command"):
        ct(command=())
    with pytest.raises(InvalidSpec, match="isolation"):
        ct(isolation="xen")
    with pytest.raises(InvalidSpec, match="/dev"):
        DeviceIoLimit("vda", read_bps=1)


def _layout_tar(path: Path, layers: list[list[tuple[str, bytes | None]]]) -> None:
    """Write an oci-layout tarball; a layer entry with None content is a directory."""
    blobs: dict[str, bytes] = {}
    descs = []
    for files in layers:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for name, data in files:
                info = tarfile.TarInfo(name)
                if data is None:
                    info.type = tarfile.DIRTYPE
                    t.addfile(info)
                else:
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
        gz = gzip.compress(buf.getvalue())
        d = "sha256:" + hashlib.sha256(gz).hexdigest()
        blobs[d] = gz
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": len(gz)})
    config = json.dumps({"config": {"Env": ["X=y"], "Cmd": ["/bin/true"]}}).encode()
    cd = "sha256:" + hashlib.sha256(config).hexdigest()
    blobs[cd] = config
    manifest = json.dumps({"config": {"digest": cd}, "layers": descs}).encode()
    md = "sha256:" + hashlib.sha256(manifest).hexdigest()
    blobs[md] = manifest
    with tarfile.open(path, "w") as t:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        add("index.json", json.dumps({"manifests": [{"digest": md}]}).encode())
        for d, data in blobs.items():
            add(f"blobs/sha256/{d.split(':')[1]}", data)


def test_layers_are_unpacked_once_with_whiteouts_as_overlay_char_devices(tmp_path: Path) -> None:
    archive = tmp_path / "img.tar"
    _layout_tar(archive, [[("etc", None), ("etc/a", b"1"), ("etc/b", b"2")], [("etc", None), ("etc/.wh.a", b"")]])
    store = ImageStore(tmp_path / "store")
    image = store.resolve(str(archive))
    assert len(image.layers) == 2 and image.config.env == (("X", "y"),) and image.config.cmd == ("/bin/true",)
    whiteout = image.layers[1] / "etc" / "a"
    assert stat.S_ISCHR(os.lstat(whiteout).st_mode) and os.lstat(whiteout).st_rdev == 0
    again = store.resolve(str(archive))
    assert again.layers == image.layers
    assert len(list((tmp_path / "store" / "layers").iterdir())) == 2


def test_a_layer_escaping_its_root_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    _layout_tar(archive, [[("../escape", b"x")]])
    with pytest.raises(InvalidSpec, match="escapes"):
        ImageStore(tmp_path / "store").resolve(str(archive))
    assert not (tmp_path / "store" / "escape").exists()


def test_a_file_that_is_not_an_oci_layout_is_image_not_found(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar")
    with pytest.raises(ImageNotFound, match="not a readable oci-layout"):
        ImageStore(tmp_path / "store").resolve(str(junk))


def test_runtime_config_with_an_id_range_has_a_user_namespace_seccomp_and_few_capabilities() -> None:
    from compute.oci_bundle import DEFAULT_CAPS
    from compute.oci_seccomp import load_profile, oci_seccomp

    seccomp = oci_seccomp(load_profile(), DEFAULT_CAPS, "x86_64")
    cfg = build_runtime_config(ct(), rootfs="/r", image=ImageConfig(), netns_path=None, cgroups_path="/cairn/c1",
                               id_base=1 << 24, seccomp=seccomp, hooks={"createRuntime": [{"path": "/h"}]})
    linux = cfg["linux"]
    assert linux["namespaces"][0] == {"type": "user"} and {"type": "network"} in linux["namespaces"]
    assert linux["uidMappings"] == linux["gidMappings"] == [{"containerID": 0, "hostID": 1 << 24, "size": 65536}]
    caps = set(cfg["process"]["capabilities"]["bounding"])
    assert not caps & {"CAP_SYS_ADMIN", "CAP_MKNOD", "CAP_NET_ADMIN", "CAP_AUDIT_WRITE", "CAP_SYS_PTRACE"}
    assert cfg["process"]["noNewPrivileges"] and "/proc/kcore" in linux["maskedPaths"]
    assert all(m["destination"] != "/sys/fs/cgroup" for m in cfg["mounts"])  # no cgroupfs, no release_agent
    assert next(m for m in cfg["mounts"] if m["destination"] == "/sys")["options"][-1] == "ro"
    assert cfg["hooks"] == {"createRuntime": [{"path": "/h"}]} and linux["seccomp"] is seccomp


def test_seccomp_is_the_ecosystem_default_plus_no_namespaces_and_no_mounts() -> None:
    from compute.oci_seccomp import NAMESPACE_FLAGS, load_profile, oci_seccomp

    profile = load_profile()
    plain = oci_seccomp(profile, ["CAP_CHOWN", "CAP_SYS_CHROOT"], "x86_64")
    assert plain["defaultAction"] == "SCMP_ACT_ERRNO" and plain["architectures"][0] == "SCMP_ARCH_X86_64"

    def rules(seccomp: dict[str, Any], name: str) -> list[dict[str, Any]]:
        return [r for r in seccomp["syscalls"] if name in r["names"]]

    assert [r["action"] for r in rules(plain, "read")] == ["SCMP_ACT_ALLOW"]
    for name in ("unshare", "setns", "mount", "umount2", "open_tree", "fsopen"):
        assert [(r["action"], r["errnoRet"]) for r in rules(plain, name)] == [("SCMP_ACT_ERRNO", 1)], name
    assert rules(plain, "clone") == [{"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [
        {"index": 0, "value": NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}]
    assert [(r["action"], r["errnoRet"]) for r in rules(plain, "clone3")] == [("SCMP_ACT_ERRNO", 38)]
    assert [r["action"] for r in rules(plain, "chroot")] == ["SCMP_ACT_ALLOW"]  # the profile's caps rules apply
    assert [r["action"] for r in rules(plain, "bpf")] == ["SCMP_ACT_ERRNO"]
    admin = oci_seccomp(profile, ["CAP_SYS_ADMIN"], "x86_64")
    assert [r["action"] for r in rules(admin, "unshare")] == ["SCMP_ACT_ALLOW"]


def test_each_container_gets_its_own_id_range_and_stale_claims_are_taken_again(tmp_path: Path) -> None:
    from compute.oci_idmap import ID_BASE, ID_SIZE, IdRanges

    ranges = IdRanges(tmp_path / "registry")
    owners = [tmp_path / f"c{i}" for i in range(50)]
    for o in owners:
        o.mkdir()
    bases = [ranges.claim(o) for o in owners]
    assert len(set(bases)) == 50 and all(b >= ID_BASE and (b - ID_BASE) % ID_SIZE == 0 for b in bases)
    assert ranges.claim(owners[0]) == bases[0]  # claiming again keeps the range
    newcomer = tmp_path / "new"
    newcomer.mkdir()
    wanted = ranges.first_slot(newcomer)
    (tmp_path / "registry" / f"slot-{wanted}").write_text(f"{ranges.scope}:{tmp_path / 'gone'}\n")  # container gone
    assert ranges.claim(newcomer) == ID_BASE + wanted * ID_SIZE
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "registry" / f"slot-{ranges.first_slot(other)}").write_text(f"{ranges.scope}:{owners[5]}\n")  # live
    assert ranges.claim(other) != ID_BASE + ranges.first_slot(other) * ID_SIZE
    # a lab node's claim names a path of its own mount namespace: never stale from here
    third = tmp_path / "third"
    third.mkdir()
    (tmp_path / "registry" / f"slot-{ranges.first_slot(third)}").write_text(f"n1:{tmp_path / 'gone'}\n")
    assert ranges.claim(third) != ID_BASE + ranges.first_slot(third) * ID_SIZE
    # the same container directory on two nodes (lab nodes: /var/lib/cairn in each) gets two ranges
    n2 = IdRanges(tmp_path / "registry", scope="n2")
    assert n2.claim(owners[7]) != bases[7] and n2.claim(owners[7]) == n2.claim(owners[7])
    taken = IdRanges(tmp_path / "registry")
    taken.release(owners[2], bases[2])
    assert not (tmp_path / "registry" / f"slot-{(bases[2] - ID_BASE) // ID_SIZE}").exists()
    taken.release(owners[3], bases[4])  # not its range: nothing happens
    assert (tmp_path / "registry" / f"slot-{(bases[4] - ID_BASE) // ID_SIZE}").exists()
