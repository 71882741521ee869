"""QEMU runs as an unprivileged id of its own: libvirt's DAC label ``+uid:+gid`` per
domain (``VmSpec.run_as``).

Each VM gets a uid of its own (the first id of a range from the host-wide registry of
``compute.oci_idmap``, so it is no container's or other VM's), and all VMs of this stack
share one gid, the VM group. libvirt relabels nothing (``relabel="no"``: it would chown a
kernel that several VMs boot to one of them); what QEMU must reach is granted here before
each start:

* the VM's own directory (seed ISO, serial and VNC sockets, serial log): owned by its
  uid, mode 0700, so no other VM enters it;
* read on its seed ISO, kernel and initrd, read and write on the storage daemon's NBD
  sockets of its disks (recreated when the daemon restarts: granted again at every
  start), read on an RBD disk's ceph.conf and keyring, read on the node's NBD client
  certificate when a disk is ``nbds://`` (NBD over TCP with TLS): a POSIX ACL entry for
  the VM group, so nothing else about a file changes and several stacks can each add theirs;
* search (``x``) on every directory on the way that others may not search (the data
  directory is 0700; test data dirs sit under 0700 directories): an ACL entry
  ``g:<vm gid>:x`` (``lock_down`` keeps that ACL's mask when it makes the directory
  private again).

The microVMs of ``isolation: vm`` containers get the same (``compute.vm_isolation``
takes this as its ``GuestAccess``); their own directory holds only the label.

The label file (``dac.json``) lies in the VM's own directory, which its QEMU may rewrite
(e.g. to another VM's uid): it is believed only when the registry's slot for that uid
names this VM's directory.

The storage daemon serves a non-root client of its unix sockets only the exports granted
to its uid (SO_PEERCRED; ``grant`` here before each start, revoked on delete): a QEMU
opens its own VM's volumes and no other.

What a compromised QEMU can still do: connect with the node's NBD client certificate
(once a VM with an ``nbds://`` disk ran here) to the TCP exports of the cluster (TCP
exports are not limited per VM; that certificate is of an NBD-only CA, no use against
etcd, Patroni or the API), read a Ceph pool through an RBD disk's keyring, read the
kernels and initrds of other kernel-boot images (group-readable). It cannot signal,
trace or read another VM's process, files or volumes on this node's unix sockets, nor
the node's secrets, database or keys.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
from pathlib import Path
from urllib.parse import unquote

from appliance.settings import Settings
from compute.errors import HypervisorError
from compute.oci_idmap import IdRanges
from compute.spec import FileSource, NbdSource, RbdSource, VmSpec
from storage.control import StorageClient
from storage.errors import StorageError
from storage.nbd.tls import CLIENT_FILES

log = logging.getLogger("cairn.agent.vm_access")
LABEL_FILE = "dac.json"


class VmAccess:
    def __init__(self, settings: Settings, ranges: IdRanges | None = None) -> None:
        self.settings = settings
        self.ranges = ranges or IdRanges()
        self._gid: int | None = None

    @property
    def gid(self) -> int:
        """This stack's VM group (claimed once for its instances directory)."""
        if self._gid is None:
            self.settings.instances_dir.mkdir(parents=True, exist_ok=True)
            self._gid = self.ranges.claim(self.settings.instances_dir)
        return self._gid

    def _recorded(self, workdir: Path) -> int | None:
        """The uid the label file names, if the host's registry says it is this VM's (the
        file lies in the VM's own directory: its QEMU may rewrite it, e.g. to another VM's uid)."""
        try:
            uid = int(json.loads((workdir / LABEL_FILE).read_text())["uid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return uid if self.ranges.holds(workdir, uid) else None

    def label(self, workdir: Path) -> tuple[int, int]:
        """The VM's uid and the VM group, its directory made its own."""
        workdir.mkdir(parents=True, exist_ok=True)
        uid = self._recorded(workdir)
        if uid is None:
            uid = self.ranges.claim(workdir)
            (workdir / LABEL_FILE).unlink(missing_ok=True)
            # QEMU's own directory: a new file, never through a link its QEMU may have put there
            fd = os.open(workdir / LABEL_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"uid": uid, "gid": self.gid}))
        os.chown(workdir, uid, self.gid)
        workdir.chmod(0o700)
        return uid, self.gid

    def release(self, workdir: Path) -> None:
        """Give a deleted VM's uid back (and its NBD exports: it opens none any more).
        Once only: the label goes with it, so a later call (the document lists a deleted
        instance for a while) cannot revoke what a new VM given the same uid was granted."""
        label = workdir / LABEL_FILE
        uid = self._recorded(workdir)
        if uid is None:
            return
        try:
            StorageClient(self.settings.storage_socket, timeout=30).call("grant", uid=uid, exports={})
        except StorageError as exc:
            log.warning("could not revoke a deleted VM's NBD exports", extra={"uid": uid, "error": str(exc)})
        label.unlink(missing_ok=True)
        self.ranges.release(workdir, uid)

    def grant(self, spec: VmSpec) -> None:
        """Let the VM group reach what ``spec`` names (see the module docstring)."""
        gid = self.gid
        fresh_log(Path(spec.consoles.serial_log))
        paths: dict[Path, str] = {}
        exports: dict[str, list[str]] = {}  # pool -> volumes this VM's uid may open on the unix sockets
        if spec.kernel_boot is not None:
            paths[Path(spec.kernel_boot.kernel)] = "r"
            if spec.kernel_boot.initrd:
                paths[Path(spec.kernel_boot.initrd)] = "r"
        for disk in spec.disks:
            src = disk.source
            if isinstance(src, FileSource):
                paths[Path(src.path)] = "r"
            elif isinstance(src, NbdSource) and src.parts()[0] == "unix":
                sock = Path(src.parts()[1])
                paths[sock] = "rw"
                if sock.parent == self.settings.storage_run_dir and sock.name.startswith("nbd-"):
                    exports.setdefault(sock.name[4:].removesuffix(".sock"), []).append(unquote(src.parts()[4]))
            elif isinstance(src, NbdSource) and src.tls:  # the node's NBD client certificate (libvirt's)
                paths.update({self.settings.nbd_client_dir / f: "r" for f in CLIENT_FILES})
            elif isinstance(src, RbdSource) and src.config:
                paths[Path(src.config)] = "r"
                for keyring in _keyrings(Path(src.config)):
                    paths[keyring] = "r"
        if spec.run_as is not None:
            self._grant_exports(spec.run_as[0], exports)
        # the VM's own directory (consoles' sockets, serial log): only the way to it
        # (not the serial log nor a channel's socket: virtlogd and libvirt, root, open them and
        # hand QEMU a descriptor; a microVM's are in its container's directory, root's only)
        consoles = spec.consoles
        ways = [Path(p) for p in (consoles.serial_socket, consoles.vnc_socket) if p]
        for path in [*paths, *ways]:
            if path in paths and path.exists():
                _acl(path, gid, paths[path])
            for parent in path.parents:
                try:
                    st = parent.stat()
                except FileNotFoundError:  # not there (yet): nothing to open a way into
                    continue
                # a VM's own directory stays its own: the group gets no way into it
                if not st.st_mode & stat.S_IXOTH and (spec.run_as is None or st.st_uid != spec.run_as[0]):
                    _acl(parent, gid, "x")


    def _grant_exports(self, uid: int, exports: dict[str, list[str]]) -> None:
        """The storage daemon serves this uid only its VM's volumes (SO_PEERCRED)."""
        try:
            StorageClient(self.settings.storage_socket, timeout=30).call("grant", uid=uid, exports=exports)
        except StorageError as exc:
            if exports:  # without the grant QEMU cannot open its disks
                raise HypervisorError(f"the storage daemon did not grant the VM its volumes: {exc}") from exc


def fresh_log(path: Path) -> None:
    """A VM's serial log lies in the directory its QEMU owns, and virtlogd (root) opens it by
    that path at the next start: whatever is there that is not root's own plain file (a link
    to a host file QEMU left, a hard link) goes first (no QEMU of the VM runs meanwhile:
    libvirt ended it, and its sandbox lets it spawn nothing)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_nlink != 1:
        log.warning("removing what a VM's QEMU left in place of its serial log", extra={"path": str(path)})
        path.unlink()


def _acl(path: Path, gid: int, perms: str) -> None:
    r = subprocess.run(["setfacl", "-m", f"g:{gid}:{perms}", str(path)], capture_output=True, text=True)
    if r.returncode:
        log.warning("could not grant the VM group access", extra={"path": str(path), "error": r.stderr.strip()})


def _keyrings(conf: Path) -> list[Path]:
    """The keyrings a Ceph *client* reads: ``keyring`` of [global], [client] and
    [client.*] sections, without metavariables ($id, $cluster: the daemons' own)."""
    try:
        lines = conf.read_text().splitlines()
    except OSError:
        return []
    out, section = [], "global"
    for line in lines:
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if (key.strip() == "keyring" and value.startswith("/") and "$" not in value
                and (section in ("global", "client") or section.startswith("client."))):
            out.append(Path(value))
    return out
