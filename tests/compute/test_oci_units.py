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
