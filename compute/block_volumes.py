"""Network volumes as filesystems on this host, without the kernel's nbd or rbd modules.

A volume (an NBD export of the storage daemon, or an RBD image) becomes a regular
file through ``qemu-storage-daemon``'s FUSE export: QEMU's own NBD and librbd clients
do the I/O, so one tool serves both volume classes, and flushes travel end to end
(a FLUSH on the file is a flush of the block node, an NBD FLUSH / an RBD flush). A
blank volume gets a filesystem on that file (``mkfs`` works on files); a plain
container then mounts it through a loop device over the file, while a microVM gets
the volume as a virtio disk of its own (QEMU opens the export itself) and its agent
mounts it.

Why not ``nbdfuse``: it speaks NBD only (no RBD volumes), and
``qemu-storage-daemon`` is already installed with QEMU.

Each export runs in its own session (it outlives a restart of the process that
started it) and writes its pid to a file beside its mount point, so whoever stops
the container later can stop it too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from compute.errors import HypervisorError
from compute.host_mounts import detach_loops, is_mountpoint, unmount, unmount_under
from compute.spec import BlockVolume, NbdSource, RbdSource

log = logging.getLogger(__name__)
QSD = "qemu-storage-daemon"
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"],
        "xfs": ["mkfs.xfs", "-q", "-f", "-K"]}


def blockdev(source: NbdSource | RbdSource, readonly: bool = False) -> dict[str, object]:
    """The QEMU ``--blockdev`` of a volume (pure)."""
    node: dict[str, object]
    if isinstance(source, NbdSource):
        transport, sock, host, port, export = source.parts()
        server = {"type": "unix", "path": sock} if transport == "unix" else \
            {"type": "inet", "host": host, "port": str(port)}
        node = {"driver": "nbd", "server": server, "export": export}
        if source.tls:  # the --object of tls_object()
            node["tls-creds"] = "tls0"
    else:
        node = {"driver": "rbd", "pool": source.pool, "image": source.image}
        if source.config:
            node["conf"] = source.config
        if source.user:
            node["user"] = source.user
    return {**node, "node-name": "vol", "read-only": readonly, "cache": {"direct": False, "no-flush": False}}


def tls_object(source: NbdSource | RbdSource) -> list[str]:
    """qemu-storage-daemon's ``--object`` for an ``nbds://`` export's client certificate."""
    if not isinstance(source, NbdSource) or not source.tls:
        return []
    if not source.tls_certificates:
        raise HypervisorError(f"NBD export {source.uri}: TLS needs ?tls-certificates=<client directory>")
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={source.tls_certificates}"]


class FileExport:
    """``qemu-storage-daemon`` serving one volume as the regular file ``path`` (FUSE)."""

    def __init__(self, source: NbdSource | RbdSource | None, path: Path, readonly: bool = False) -> None:
        """``source`` None: only to stop an export found on disk (:func:`release_under`)."""
        self.source, self.path, self.readonly = source, Path(path), readonly
        self.pidfile = self.path.with_name(self.path.name + ".pid")
        self.errfile = self.path.with_name(self.path.name + ".err")
        self._proc: subprocess.Popen[bytes] | None = None  # when we started it (else only its pid file)

    def start(self, timeout: float = 30.0) -> None:
        """Start the daemon (stopping a stale one first); returns once the file serves the volume."""
        if self.source is None:
            raise ValueError("an export without a source cannot start")
        self.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        export = {"type": "fuse", "id": "exp", "node-name": "vol", "mountpoint": str(self.path),
                  "writable": not self.readonly, "growable": False}
        with open(self.errfile, "wb") as err:
            proc = subprocess.Popen(
                [QSD, *tls_object(self.source), "--blockdev", json.dumps(blockdev(self.source, self.readonly)),
                 "--export", json.dumps(export), "--pidfile", str(self.pidfile)],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not is_mountpoint(self.path):
            if proc.poll() is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
                reason = self.errfile.read_text(errors="replace").strip()[-500:]
                raise HypervisorError(f"exporting volume {self.source} as a file failed: {reason or 'timeout'}")
            time.sleep(0.01)
        self._proc = proc

    def pid(self) -> int | None:
        """The daemon's pid while it runs (from its pid file: also after a restart of ours)."""
        try:
            pid = int(self.pidfile.read_text())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        # a pid file that outlived its daemon may name a reused pid: only ours is ours
        return pid if argv and argv[0].endswith(QSD.encode()) and str(self.pidfile).encode() in argv else None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the daemon (it flushes and closes the volume, giving its lock back). Idempotent."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                if self._proc is not None:
                    self._proc.poll()
                time.sleep(0.01)
            if _alive(pid):
                log.warning("qemu-storage-daemon %d ignored SIGTERM: killing it", pid)
                os.kill(pid, signal.SIGKILL)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            self._proc = None
        if is_mountpoint(self.path):  # a daemon that died without unmounting (ENOTCONN)
            detach_loops(self.path)
            unmount(self.path)
        self.pidfile.unlink(missing_ok=True)

    def __enter__(self) -> FileExport:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def filesystem_of(path: Path) -> str | None:
    """The filesystem type found on ``path`` (a file or a device), None when blank."""
    r = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(path)], capture_output=True, text=True)
    return r.stdout.strip() or None


def ensure_filesystem(path: Path, fs: str) -> str:
    """Format ``path`` with ``fs`` if it holds no filesystem yet; return the type it holds."""
    found = filesystem_of(path)
    if found:
        return found
    r = subprocess.run([*MKFS[fs], str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        hint = " (xfs needs a volume of at least 300 MiB)" if fs == "xfs" else ""
        raise HypervisorError(f"formatting the volume as {fs} failed{hint}: {r.stderr.strip()[:300]}")
    return fs


def prepare(volume: BlockVolume, workdir: Path) -> str:
    """Give a blank volume its filesystem (once: later calls find it); returns its type."""
    with FileExport(volume.source, workdir / f"{volume.serial}.img") as exp:
        return ensure_filesystem(exp.path, volume.fs) if not volume.readonly else (filesystem_of(exp.path) or "")


class MountedVolume:
    """One volume of a plain container: file export → loop device → filesystem at ``mountpoint``."""

    def __init__(self, volume: BlockVolume, workdir: Path) -> None:
        self.volume = volume
        self.export = FileExport(volume.source, workdir / f"{volume.serial}.img", volume.readonly)
        self.mountpoint = workdir / volume.serial

    def mount(self) -> None:
        """Export, format if blank, attach a loop device and mount; undone if any step fails."""
        self.unmount()
        self.export.start()
        try:
            fs = ensure_filesystem(self.export.path, self.volume.fs) if not self.volume.readonly \
                else filesystem_of(self.export.path)
            if not fs:
                raise HypervisorError(f"read-only volume {self.volume.serial} holds no filesystem")
            flags = ["--read-only"] if self.volume.readonly else []
            detach_loops(self.export.path)  # of a run that crashed after attaching one
            r = subprocess.run(["losetup", "--find", "--show", *flags, str(self.export.path)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise HypervisorError(f"no loop device for volume {self.volume.serial}: {r.stderr.strip()}")
            dev = r.stdout.strip()
            self.mountpoint.mkdir(parents=True, exist_ok=True)
            opts = ["-o", "ro"] if self.volume.readonly else []
            r = subprocess.run(["mount", "-t", fs, *opts, dev, str(self.mountpoint)], capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
                raise HypervisorError(f"mounting volume {self.volume.serial} ({fs}): {r.stderr.strip()}")
        except BaseException:
            self.export.stop()
            raise

    def unmount(self) -> None:
        """Unmount, detach the loop device and stop the export (flushing it). Idempotent,
        and also takes down what a crashed run left (a dead export, a stray loop device)."""
        unmount(self.mountpoint)
        detach_loops(self.export.path)
        self.export.stop()


def release_under(root: Path) -> None:
    """Take down every volume mount below ``root`` (a container's directory, or a test
    run's): the filesystems, their loop devices and the file exports, also those of a
    run that crashed (a dead export's mount, a daemon still running for no one)."""
    unmount_under(root)  # the volumes' filesystems first: they hold the loop devices
    detach_loops(root)
    for pidfile in sorted(Path(root).rglob("*.img.pid")) if Path(root).is_dir() else []:
        FileExport(None, pidfile.with_name(pidfile.name.removesuffix(".pid"))).stop()
    unmount_under(root)  # exports whose daemon was already gone


@contextlib.contextmanager
def mounted(volumes: tuple[BlockVolume, ...], workdir: Path) -> Iterator[list[MountedVolume]]:
    """Mount ``volumes`` (all or none); unmount them on leaving only if the body failed."""
    done: list[MountedVolume] = []
    try:
        for v in volumes:
            m = MountedVolume(v, workdir)
            m.mount()
            done.append(m)
        yield done
    except BaseException:
        for m in reversed(done):
            m.unmount()
        raise
