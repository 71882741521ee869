"""Uploads are hostile: images that would make the root-run qemu-img read anything but
the upload itself are refused before qemu-img opens them, and qemu-img runs under limits."""

from __future__ import annotations

import socket
import struct
import subprocess
from pathlib import Path

import pytest

from storage import imageio
from storage.errors import BackendError, InvalidArgument

pytestmark = pytest.mark.unit
MARKER = b"HOST-FILE-THE-TENANT-MUST-NOT-SEE"


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def host_file(tmp_path: Path) -> Path:
    secret = tmp_path / "host" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(MARKER * 1024)
    return secret


def with_data_file(tmp_path: Path, target: Path, keep_feature_bit: bool = True) -> Path:
    """A qcow2 whose header names ``target`` as its raw external data file. ``qemu-img
    create -o data_file=P`` truncates P, so it is made against a scratch path of the same
    length and the header is patched."""
    scratch = target.with_name("x" * len(target.name))
    img = tmp_path / "data-file.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={scratch},data_file_raw=on", str(img), "1M")
    raw = img.read_bytes().replace(str(scratch).encode(), str(target).encode())
    if not keep_feature_bit:  # only the header extension still names the file
        raw = raw[:72] + struct.pack(">Q", struct.unpack_from(">Q", raw, 72)[0] & ~4) + raw[80:]
    img.write_bytes(raw)
    return img


def with_backing(tmp_path: Path, backing: str, fmt: str = "raw") -> Path:
    img = tmp_path / "backed.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, str(img), "1M")
    return img


def test_a_qcow2_with_an_external_data_file_is_refused(tmp_path: Path, host_file: Path) -> None:
    for keep_bit in (True, False):
        img = with_data_file(tmp_path, host_file, keep_bit)
        with pytest.raises(InvalidArgument, match="external data file"):
            imageio.probe(img)
        with pytest.raises(InvalidArgument, match="external data file"):
            imageio.probe(img, "qcow2")
        with pytest.raises(InvalidArgument, match="external data file"):  # checked again before copying
            imageio.copy_into(img, "qcow2", str(tmp_path / "never.raw"))
    assert not (tmp_path / "never.raw").exists()


@pytest.mark.parametrize("backing", [
    "{host}",
    'json:{{"driver": "raw", "file": {{"driver": "file", "filename": "{host}"}}}}',
    "nbd://127.0.0.1:1/export",
    "http://127.0.0.1:1/disk.img",
])
def test_a_qcow2_with_any_backing_file_is_refused(tmp_path: Path, host_file: Path, backing: str) -> None:
    img = with_backing(tmp_path, backing.format(host=host_file))
    with pytest.raises(InvalidArgument, match="backing file"):
        imageio.probe(img)


def test_other_formats_are_never_probed_by_qemu_img_unless_declared_raw(tmp_path: Path, host_file: Path) -> None:
    vmdk = tmp_path / "desc.vmdk"  # a VMDK descriptor whose extent is a host file
    vmdk.write_text(f'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
                    f'RW 2048 FLAT "{host_file}" 0\n')
    with pytest.raises(InvalidArgument, match="'vmdk' is not supported"):
        imageio.probe(vmdk)
    assert imageio.probe(vmdk, "raw")["format"] == "raw"  # its bytes, stored as they are
    with pytest.raises(InvalidArgument, match="not a qcow2 image"):
        imageio.probe(vmdk, "qcow2")


def test_a_sound_qcow2_is_probed_and_copied(tmp_path: Path) -> None:
    img = tmp_path / "ok.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 1M", str(img)], check=True, capture_output=True)
    assert imageio.probe(img) == {"format": "qcow2", "virtual_size": 4 << 20}
    out = tmp_path / "out.raw"
    qemu_img("create", "-q", "-f", "raw", str(out), "4M")
    seen: list[float] = []
    imageio.copy_into(img, "qcow2", str(out), seen.append, virtual_size=4 << 20)
    assert out.read_bytes()[: 1 << 20] == b"\x5a" * (1 << 20) and seen and seen[-1] == 100.0


def test_qemu_img_runs_under_a_memory_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "ok.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    monkeypatch.setattr(imageio, "ADDRESS_SPACE_BYTES", 24 << 20)  # too little for qemu-img to start its threads
    with pytest.raises(InvalidArgument, match="exceeded its memory or CPU limit"):
        imageio.probe(img)


def test_a_copy_that_hangs_is_stopped_at_its_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "ok.raw"
    img.write_bytes(bytes(1 << 20))
    silent = socket.socket(socket.AF_UNIX)  # accepts, never speaks NBD: qemu-img would wait forever
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(1)
    monkeypatch.setattr(imageio, "INSPECT_WALL_SECONDS", 1)
    monkeypatch.setattr(imageio, "COPY_WALL_SECONDS_PER_GIB", 0)
    try:
        with pytest.raises(BackendError, match="longer than 1 s"):
            imageio.copy_into(img, "raw", f"nbd+unix:///x?socket={tmp_path / 'silent.sock'}")
    finally:
        silent.close()
