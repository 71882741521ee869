"""The tiny test guest: Debian's cloud kernel + a busybox initramfs, and a busybox OCI image.

Built once and cached (keyed by kernel version and the init script), so a new
user with no internet access can boot a VM and a container right away.

The guest's init understands kernel command line options:
``cairn.ip=A.B.C.D/NN`` (static address on eth0, else DHCP with udhcpc),
``cairn.ping=A.B.C.D`` (ping it and print ``PING-OK`` / ``PING-FAIL``),
``cairn.counter=DEV`` (append ``CTR <boot id> <n>`` records of 64 bytes to /dev/DEV
about five times a second, each one flushed, continuing after the last record found on
the disk: the proof that two copies of a guest never write at once),
``cairn.pingloop=A.B.C.D`` (ping it forever, printing ``PL <uptime> ok|fail`` about
twice a second: a heartbeat over the network that survives a live migration),
``cairn.disktest=1`` (print the first bytes of /dev/vda, then write
``CAIRN-GUEST-WROTE`` at offset 1 MiB), ``cairn.peek=DEV:OFFSET:LEN`` (print
those bytes of /dev/DEV), ``cairn.gw=A.B.C.D`` (default route). It prints
:data:`MARKER` on the serial console first thing, then a heartbeat ``HB n UPTIME``
line every second, and runs a shell on the serial console. It loads the virtio balloon
driver, so it reports the memory it uses to the host (the history graphs' "guest used"). Ctrl-Alt-Del on its keyboard
(a VNC viewer's) reboots it at once (``kernel.ctrl-alt-del=1``: init is a plain shell
that would ignore the signal).

With ``cairn.virtiofs=TAG`` the guest is an ``isolation: vm`` container's microVM
instead: init mounts that virtiofs share as the container's root (with /proc, /sys,
/dev, /dev/pts and a cgroup2 hierarchy) and hands over to the guest agent
(``compute/guest_agent.c``, built here with the host's gcc), which becomes PID 1 and
runs the container's processes for the host (``compute/guest_agent.py``).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from compute.errors import ImageNotFound

MARKER = "CAIRN-GUEST-UP"
MODULES = [
    "drivers/virtio/virtio_ring", "drivers/virtio/virtio", "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev", "drivers/virtio/virtio_pci", "drivers/virtio/virtio_balloon",
    "drivers/block/virtio_blk",
    "net/core/failover", "drivers/net/net_failover", "drivers/net/virtio_net", "fs/fuse/fuse", "fs/fuse/virtiofs",
    "drivers/char/virtio_console",
]
ON_DEMAND_MODULES = ["lib/libcrc32c", "fs/xfs/xfs"]  # the guest agent loads them to mount an xfs volume
AGENT_SOURCE = Path(__file__).with_name("guest_agent.c")
DEFAULT_CACHE = Path(os.environ.get("CAIRN_TESTGUEST_CACHE", "/var/cache/cairn/testguest"))

UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev $interface
    ip addr add $ip/${mask:-24} dev $interface
    [ -n "$router" ] && ip route add default via ${router%% *} dev $interface
    echo "IP: $interface $ip/${mask}" > /dev/ttyS0 ;;
  deconfig) ip addr flush dev $interface; ip link set $interface up ;;
esac
exit 0
"""

INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo 1 > /proc/sys/kernel/ctrl-alt-del
say() { echo "$*" > /dev/ttyS0; }
say "@MARKER@ $(cut -d' ' -f1 /proc/uptime)s"
for m in @MODULES@; do insmod /lib/modules/$m.ko 2>/dev/null; done
arg() { for w in $(cat /proc/cmdline); do case "$w" in $1=*) echo "${w#*=}";; esac; done; }
sleep 0.3
if [ "$(arg cairn.disktest)" = 1 ] && [ -b /dev/vda ]; then
  say "VDA: $(dd if=/dev/vda bs=16 count=1 2>/dev/null | tr -c 'A-Za-z0-9-' '.')"
  printf 'CAIRN-GUEST-WROTE' | dd of=/dev/vda bs=1 seek=1048576 conv=notrunc,fsync 2>/dev/null && sync
  say "VDA-WRITTEN"
fi
CT=$(arg cairn.counter)  # DEV: append "CTR <boot> <n>" records, 64 bytes each, from offset 64
if [ -n "$CT" ] && [ -b "/dev/$CT" ]; then
  ( B=$(cut -c1-8 /proc/sys/kernel/random/boot_id); n=0; last=""
    while r=$(dd if=/dev/$CT bs=64 skip=$((n+1)) count=1 2>/dev/null | tr -d '\\000\\n'); [ -n "$r" ]; do
      n=$((n+1)); last="$r"; done
    say "CTR-RESUME $n $last"
    while true; do n=$((n+1))
      if printf '%-63s\\n' "CTR $B $n" | dd of=/dev/$CT bs=64 seek=$n conv=notrunc,fsync 2>/dev/null; then
        [ $((n % 10)) = 0 ] && say "CTR $B $n"
      else say "CTR-WRITE-FAIL $n"; fi
      sleep 0.2; done ) &
fi
PEEK=$(arg cairn.peek)  # DEV:OFFSET:LEN
if [ -n "$PEEK" ]; then
  IFS=: read pdev poff plen <<EOP
$PEEK
EOP
  say "PEEK: $(dd if=/dev/$pdev bs=1 skip=$poff count=$plen 2>/dev/null | tr -c 'A-Za-z0-9-' '.')"
fi
ip link set lo up
if ip link set eth0 up 2>/dev/null; then
  say "ETH0: $(cat /sys/class/net/eth0/address)"
  IP=$(arg cairn.ip)
  if [ -n "$IP" ]; then ip addr add "$IP" dev eth0 && say "IP: eth0 $IP"
  else  # as a real guest: keep asking in the background when the first tries go unanswered
    udhcpc -i eth0 -t 6 -T 1 -A 2 -b -s /usr/share/udhcpc/default.script >/dev/null 2>&1
    ip -4 addr show dev eth0 | grep -q inet || say "IP: no lease yet (still asking)"; fi
  P=$(arg cairn.ping)
  if [ -n "$P" ]; then
    ( ok=0; for i in $(seq 60); do ping -c 1 -W 1 "$P" >/dev/null 2>&1 && { ok=1; break; }; sleep 0.5; done
      [ $ok = 1 ] && say "PING-OK $P" || say "PING-FAIL $P" ) &
  fi
  PL=$(arg cairn.pingloop)
  if [ -n "$PL" ]; then
    ( while true; do if ping -c 1 -W 1 "$PL" >/dev/null 2>&1; then r=ok; else r=fail; fi
        say "PL $(cut -d' ' -f1 /proc/uptime) $r"; sleep 0.5; done ) &
  fi
fi
GW=$(arg cairn.gw)
[ -n "$GW" ] && ip route add default via "$GW" 2>/dev/null
FS=$(arg cairn.virtiofs)
if [ -n "$FS" ]; then
  # an isolation: vm container: its root over virtiofs, then the agent becomes PID 1
  mkdir -p /mnt/root /dev/pts
  mount -t devpts devpts /dev/pts
  if mount -t virtiofs "$FS" /mnt/root; then
    for d in proc sys dev; do mkdir -p /mnt/root/$d; done
    mount -t proc proc /mnt/root/proc; mount -t sysfs sysfs /mnt/root/sys; mount -t devtmpfs devtmpfs /mnt/root/dev
    mkdir -p /mnt/root/dev/pts && mount --bind /dev/pts /mnt/root/dev/pts
    mount -t cgroup2 cgroup2 /sys/fs/cgroup && mount -t cgroup2 -o ro cgroup2 /mnt/root/sys/fs/cgroup
    exec /bin/cairn-agent /mnt/root
  fi
  say "VIRTIOFS-FAILED $FS"
  poweroff -f
fi
( i=0; while true; do i=$((i+1)); say "HB $i $(cut -d' ' -f1 /proc/uptime)"; sleep 1; done ) &
# a shell on the serial console (what `cairn vm console` attaches to)
( while true; do setsid -c sh </dev/ttyS0 >/dev/ttyS0 2>&1; sleep 0.2; done ) &
exec sh -c 'while true; do sleep 3600; done'
"""


@dataclass(frozen=True)
class TestGuest:
    """Paths of the built test artefacts."""

    __test__ = False  # not a pytest test class

    kernel: str
    initrd: str
    kernel_version: str
    oci_archive: str  # busybox image as an oci-layout tarball
    marker: str = MARKER


def cloud_kernel() -> tuple[str, str]:
    """Return (kernel path, version) of the newest installed Debian cloud kernel."""
    kernels = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not kernels:
        raise ImageNotFound("no /boot/vmlinuz-*-cloud-amd64: apt-get install linux-image-cloud-amd64")
    path = kernels[-1]
    return path, Path(path).name.removeprefix("vmlinuz-")


def _busybox() -> str:
    path = shutil.which("busybox") or "/bin/busybox"
    if not Path(path).exists():
        raise ImageNotFound("busybox not found: apt-get install busybox-static")
    return path


def _applets(busybox: str) -> list[str]:
    out = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout
    return [a for a in out.split() if a != "busybox"]


def _build_initramfs(kver: str, out: Path) -> None:
    busybox = _busybox()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "sbin", "proc", "sys", "dev", "run", "tmp", "etc", "lib/modules", "usr/share/udhcpc"):
            (root / d).mkdir(parents=True)
        shutil.copy(busybox, root / "bin/busybox")
        for applet in _applets(busybox):
            (root / "bin" / applet).symlink_to("busybox")
        for mod in MODULES + ON_DEMAND_MODULES:
            src = Path(f"/lib/modules/{kver}/kernel/{mod}.ko")
            if not src.exists():
                raise ImageNotFound(f"kernel module {src} missing (is linux-image-{kver} complete?)")
            shutil.copy(src, root / "lib/modules")
        script = root / "usr/share/udhcpc/default.script"
        script.write_text(UDHCPC_SCRIPT)
        script.chmod(0o755)
        _build_agent(root / "bin/cairn-agent")
        init = root / "init"
        init.write_text(_init_text())
        init.chmod(0o755)
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files,
                              capture_output=True, check=True).stdout
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_bytes(gzip.compress(cpio, compresslevel=1))
        tmp_out.rename(out)


def _build_agent(out: Path) -> None:
    """Compile the guest agent, static (the initramfs has no C library)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ImageNotFound("gcc not found (it builds the microVM guest agent): apt-get install build-essential")
    r = subprocess.run([gcc, "-static", "-Os", "-s", "-Wall", "-Wno-format-truncation", "-o", str(out),
                        str(AGENT_SOURCE)], capture_output=True, text=True)
    if r.returncode != 0:
        raise ImageNotFound(f"building the guest agent failed: {r.stderr.strip()[-500:]}")


def _init_text() -> str:
    return INIT.replace("@MARKER@", MARKER).replace("@MODULES@", " ".join(m.rsplit("/", 1)[1] for m in MODULES))


def _blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def build_busybox_oci_archive(out: Path) -> None:
    """Write a single-layer busybox image as an oci-layout tarball to ``out``."""
    busybox = _busybox()
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as tar:
        for d in ("bin", "proc", "sys", "dev", "etc", "tmp", "root", "usr/share/udhcpc"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, "bin/busybox")
        for applet in _applets(busybox):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        for name, text, mode in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644),
                                 ("etc/group", "root:x:0:\n", 0o644),
                                 ("usr/share/udhcpc/default.script", UDHCPC_SCRIPT.replace(" > /dev/ttyS0", ""),
                                  0o755)):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    layer_tar = layer_buf.getvalue()
    layer_gz = gzip.compress(layer_tar, compresslevel=6, mtime=0)
    with tempfile.TemporaryDirectory() as tmp:
        layout = Path(tmp)
        (layout / "blobs/sha256").mkdir(parents=True)
        layer = _blob(layout, layer_gz)
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer_tar).hexdigest()}"]},
        }).encode()
        config_d = _blob(layout, config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d,
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer,
                        "size": len(layer_gz)}],
        }).encode()
        manifest_d = _blob(layout, manifest)
        (layout / "index.json").write_text(json.dumps({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_d,
                           "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "busybox"}}],
        }))
        (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        tmp_out = out.with_suffix(".tmp")
        with tarfile.open(tmp_out, "w") as tar:
            tar.add(layout, ".")
        tmp_out.rename(out)


def ensure_test_guest(cache: Path | None = None) -> TestGuest:
    """Build (once) and return the tiny guest's kernel/initrd and the busybox OCI archive."""
    kernel, kver = cloud_kernel()
    key = hashlib.sha256((kver + _init_text() + UDHCPC_SCRIPT).encode() + AGENT_SOURCE.read_bytes()).hexdigest()[:12]
    d = (cache or DEFAULT_CACHE) / f"{kver}-{key}"
    d.mkdir(parents=True, exist_ok=True)
    initrd = d / "initramfs.cpio.gz"
    if not initrd.exists():
        _build_initramfs(kver, initrd)
    oci = d / "busybox-oci.tar"
    if not oci.exists():
        build_busybox_oci_archive(oci)
    return TestGuest(kernel=kernel, initrd=str(initrd), kernel_version=kver, oci_archive=str(oci))
