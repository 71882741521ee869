"""NoCloud seed ISO: documents round-trip, invalid documents are refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from compute.cloudinit import CloudInitSeed, build_seed_iso, read_seed_iso, write_seed_iso
from compute.errors import InvalidCloudInit

pytestmark = pytest.mark.unit

NETCFG = "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"


def test_seed_iso_carries_user_meta_and_network_documents() -> None:
    seed = CloudInitSeed("i-1", "vm1", "#cloud-config\npackages: [htop]\n", NETCFG)
    iso = build_seed_iso(seed)
    assert b"CIDATA" in iso.upper()[32768:34816]  # volume label in the primary volume descriptor
    files = read_seed_iso(iso)
    assert files["user-data"] == seed.user_data
    assert "instance-id: i-1" in files["meta-data"] and "local-hostname: vm1" in files["meta-data"]
    assert files["network-config"] == NETCFG


def test_the_seed_iso_is_written_through_no_link_left_in_its_place(tmp_path: Path) -> None:
    """The seed lies in the directory its VM's QEMU owns: links it left at the file's or the
    temporary file's name do not make the writer (root) write to the files they name."""
    host_file = tmp_path / "host-file"
    host_file.write_text("root's own\n")
    seed = tmp_path / "vm" / "seed.iso"
    seed.parent.mkdir()
    for name in ("seed.iso", "seed.iso.tmp"):
        (seed.parent / name).symlink_to(host_file)
    assert write_seed_iso(CloudInitSeed("i-3", "vm3"), str(seed)) == str(seed)
    assert host_file.read_bytes() == b"root's own\n" and not seed.is_symlink()
    assert set(read_seed_iso(seed.read_bytes())) == {"user-data", "meta-data"}


def test_seed_iso_without_network_config_has_two_files() -> None:
    assert set(read_seed_iso(build_seed_iso(CloudInitSeed("i-2", "vm2")))) == {"user-data", "meta-data"}


def test_shell_script_user_data_is_accepted() -> None:
    # not YAML at all (an unclosed flow sequence): a script must be passed through, never parsed
    script = "#!/bin/sh\necho 'key: [unclosed' > /tmp/x\n"
    files = read_seed_iso(build_seed_iso(CloudInitSeed("i-3", "vm3", script)))
    assert files["user-data"] == script
    assert "instance-id: i-3" in files["meta-data"]


@pytest.mark.parametrize(
    ("user_data", "needle"),
    [
        ("packages: [htop]\n", "must start with"),
        ("#cloud-config\npackages: [htop\n", "not valid YAML"),
        ("#cloud-config\n- a\n- b\n", "must be a YAML mapping"),
    ],
)
def test_invalid_user_data_raises_invalid_cloud_init(user_data: str, needle: str) -> None:
    with pytest.raises(InvalidCloudInit, match=needle):
        build_seed_iso(CloudInitSeed("i", "h", user_data))


def test_network_config_without_version_is_refused() -> None:
    with pytest.raises(InvalidCloudInit, match="version"):
        build_seed_iso(CloudInitSeed("i", "h", network_config="ethernets: {}\n"))
