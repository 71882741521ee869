"""The appliance image carries every Debian package Cairn needs at run time: a package
added to tools/packages.txt must be put in the image (installer/image/packages.txt) or
named here as needed on build/test hosts only."""

from __future__ import annotations

from pathlib import Path

import pytest

from installer.build import read_package_list

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]

# tools/packages.txt entries a node never needs, and why
HOST_ONLY = {
    "python3-dev": "building wheels (the image gets built wheels)",
    "build-essential": "building wheels",
    "fio": "benchmarks",
    "iperf3": "benchmarks",
    "tcpdump": "debugging on dev hosts",
    "docker-compose": "the development compose stack",
    "chromium": "console e2e tests",
    "chromium-driver": "console e2e tests",
    "vncsnapshot": "console e2e tests (a VNC client for the .vv file test)",
    "nodejs": "building the console (the image gets the built assets)",
    "xorriso": "building ISOs",
    "mmdebstrap": "building the image",
    "grub-common": "grub-mkrescue on the build host (the image has grub2-common, which needs it)",
    "busybox-static": "the test guest (cairn image import-test-guest)",
    "linux-image-cloud-amd64": "the test guest's kernel",
    "cpio": "the test guest's initramfs",
    "udhcpc": "the test guest's DHCP client",
    "nbdkit": "storage tests",
    "libvirt-daemon": "the embedded mode's own libvirtd (the image has libvirt-daemon-system, which depends on it)",
}


def test_every_runtime_package_is_in_the_image() -> None:
    host = read_package_list(ROOT / "tools" / "packages.txt")
    image = set(read_package_list())
    missing = [p for p in host if p not in image and p not in HOST_ONLY]
    assert missing == [], (f"add {missing} to installer/image/packages.txt (the appliance image), or to HOST_ONLY "
                           "in this test with the reason a node never needs it")
    assert "linux-image-amd64" in image and "live-boot" in image
