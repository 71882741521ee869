"""A libvirt "node": libvirtd + virtlogd in their own mount namespace.

Several nodes run side by side on one machine (tests, the lab cluster): each
gets private ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/log/libvirt``,
``/var/cache/libvirt`` and ``/etc/libvirt`` (bind mounts visible only inside
its namespace), its own ``host_uuid``, and is reached at
``qemu+unix:///system?socket=<dir>/run/libvirt-sock``. The host's own libvirt
is never touched.

Both daemons stay children of a small shell supervisor that waits on them (PID 1
on some hosts reaps late, so daemonized processes would linger as zombies).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import libvirt

from compute.errors import HypervisorError

log = logging.getLogger(__name__)

MOUNTS = {"run": "/run/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt",
          "cache": "/var/cache/libvirt", "etc": "/etc/libvirt"}

SUPERVISOR = r"""
set -e
{mounts}
virtlogd -p /run/libvirt/virtlogd.pid & V=$!
libvirtd {listen}-p /run/libvirt/libvirtd.pid & L=$!
trap 'kill -TERM $L $V 2>/dev/null; wait $L; wait $V; exit 0' TERM INT
set +e
wait $L
kill -TERM $V 2>/dev/null; wait $V
"""

CGROUP_CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio")


def qemu_conf(cgroups: bool = False, nbd_tls_dir: Path | None = None) -> str:
    """The node's whole qemu.conf (pure). Domains carry their own DAC label (an
    unprivileged uid:gid, ``VmSpec.run_as``); root stays the default for those that do
    not. No MAC driver (no MAC LSM on the hosts this runs on; an installed node runs
    Debian's system libvirtd instead, see compute/README.md). cgroups: off by default,
    because libvirt's cgroupfs backend moves QEMU to ``/machine/qemu-ID-NAME`` at the root
    of every hierarchy, out of the cgroup the node runs in (a lab node's, which it is killed and frozen by; a test's);
    ``cgroups=True`` is for a node that owns its host: cpu, memory and blkio per domain.
    ``nbd_tls_dir``: the client certificate QEMU shows to ``nbds://`` disks' servers
    (``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``)."""
    controllers = ", ".join(f'"{c}"' for c in CGROUP_CONTROLLERS) if cgroups else ""
    tls = f'nbd_tls_x509_cert_dir = "{nbd_tls_dir}"\n' if nbd_tls_dir else ""
    return ("# cairn (written at every start of the node)\n"
            f"cgroup_controllers = [ {controllers} ]\n"
            'user = "root"\ngroup = "root"\ndynamic_ownership = 1\nremember_owner = 0\nsecurity_driver = "none"\n'
            + tls)


def _silence_libvirt_stderr() -> None:
    # libvirt prints every error to stderr by default; errors reach callers as exceptions
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


@dataclass(frozen=True)
class TlsListen:
    """libvirtd listening for peers (live migration) with TLS: its address, and a folder
    holding ``cacert.pem``, ``servercert.pem``/``serverkey.pem`` (this node) and
    ``clientcert.pem``/``clientkey.pem`` (used when it connects to a peer: the URI's
    ``pkipath``)."""

    address: str
    pki: Path

    def uri(self) -> str:
        """How peers reach this libvirtd."""
        return f"qemu+tls://{self.address}/system?pkipath={self.pki}"


class LibvirtNode:
    """One libvirtd "node" whose state lives under ``base / name``."""

    def __init__(self, base: Path, name: str, tls: TlsListen | None = None, cgroups: bool = False,
                 nbd_tls_dir: Path | None = None) -> None:
        self.name = name
        self.cgroups = cgroups
        self.nbd_tls_dir = nbd_tls_dir
        self.dir = Path(base) / name
        self.tls = tls
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """The libvirt URI of this node."""
        return f"qemu+unix:///system?socket={self.dir}/run/libvirt-sock"

    def _prepare(self) -> None:
        for sub in ("run", "lib", "log", "cache"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        # QEMU running as a domain's own uid opens its files in /var/lib/libvirt/qemu/domain-*
        # (made its own by libvirt): search, not read, on the way there, as Debian ships it
        for sub in ("lib", "lib/qemu"):
            (self.dir / sub).mkdir(exist_ok=True)
            (self.dir / sub).chmod(0o711)
        etc = self.dir / "etc"
        if not etc.exists():
            shutil.copytree("/etc/libvirt", etc, symlinks=True)
            for autostart in etc.glob("qemu/networks/autostart/*"):
                autostart.unlink()  # never start the 'default' NAT network
            with (etc / "libvirtd.conf").open("a") as f:
                f.write(f'\nhost_uuid = "{uuid.uuid4()}"\nlog_level = 3\n'
                        'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n')
                if self.tls is not None:
                    p = self.tls.pki
                    f.write(f'listen_tls = 1\nlisten_tcp = 0\nlisten_addr = "{self.tls.address}"\n'
                            f'key_file = "{p}/serverkey.pem"\ncert_file = "{p}/servercert.pem"\n'
                            f'ca_file = "{p}/cacert.pem"\n')
        (etc / "qemu.conf").write_text(qemu_conf(self.cgroups, self.nbd_tls_dir))
        if self.nbd_tls_dir is not None:  # libvirtd refuses to start without it; the certificates come later
            self.nbd_tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # libvirtd resolves its build-time default user 'libvirt-qemu' before reading qemu.conf;
        # give the namespace its own passwd/group that have it, leaving the host's files alone
        for db, line in (("passwd", "libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n"),
                         ("group", "libvirt-qemu:x:64055:\nkvm:x:64056:\nlibvirt:x:64057:\n")):
            text = Path(f"/etc/{db}").read_text()
            names = {ln.split(":", 1)[0] for ln in text.splitlines()}
            extra = "".join(ln + "\n" for ln in line.splitlines() if ln.split(":", 1)[0] not in names)
            (self.dir / db).write_text(text + extra)
        for target in MOUNTS.values():
            Path(target).mkdir(parents=True, exist_ok=True)  # empty mount points

    def start(self, timeout: float = 15.0) -> None:
        """Start virtlogd + libvirtd and wait until the socket answers."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._prepare()
        mounts = "\n".join(f"mount --bind {self.dir / sub} {target}" for sub, target in MOUNTS.items())
        mounts += "".join(f"\nmount --bind {self.dir / db} /etc/{db}" for db in ("passwd", "group"))
        out = (self.dir / "daemons.out").open("wb")
        self._proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "--", "/bin/sh", "-c",
             SUPERVISOR.format(mounts=mounts, listen="--listen " if self.tls is not None else "")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        out.close()
        _silence_libvirt_stderr()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if (self.dir / "run" / "libvirt-sock").exists():
                try:
                    libvirt.open(self.uri).close()
                    log.info("libvirt node %s up at %s", self.name, self.uri)
                    return
                except libvirt.libvirtError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise HypervisorError(f"libvirt node {self.name} did not start: {self.daemon_output()[-2000:]}")

    def daemon_output(self) -> str:
        """Return the daemons' stdout/stderr and libvirtd log tail (for error messages)."""
        text = ""
        for p in (self.dir / "daemons.out", self.dir / "log" / "libvirtd.log"):
            if p.exists():
                text += p.read_text(errors="replace")[-4000:]
        return text

    def stop(self, timeout: float = 15.0) -> None:
        """Destroy every domain of this node, then stop its daemons and wait for them."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                conn = libvirt.open(self.uri)
                try:
                    for dom in conn.listAllDomains():
                        try:
                            if dom.isActive():
                                dom.destroy()
                            dom.undefine()
                        except libvirt.libvirtError as e:
                            log.warning("node %s: cleaning %s: %s", self.name, dom.name(), e)
                finally:
                    conn.close()
            except libvirt.libvirtError as e:
                log.warning("node %s: cannot connect for cleanup: %s", self.name, e)
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: the supervisor and its daemons
            proc.wait(5)

    def __enter__(self) -> LibvirtNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
