"""The OCI container driver: bundles run by crun, on the same bridges as VMs.

Layout under ``state_dir``: ``containers/<name>/`` holds ``spec.json``,
``config.json``, ``rootfs`` (an overlayfs of the image's shared layers plus a
private ``upper``), and ``console.log``. crun's own state lives in
``state_dir/crun``. What lives outside ``state_dir`` carries ``host_prefix``: the
container's cgroup ``/<prefix>/<name>``, so the containers of two stacks on one host
never meet.

Confinement (see compute/README.md): each container has its own user namespace (its
root is an unprivileged host id range, ``oci_idmap``; the image layers and volumes
are seen through idmapped mounts, ``lower/<i>`` and ``volumes/<i>``), its own network
namespace inside it (NICs moved in by a hook, ``oci_net``), the containers ecosystem's
default seccomp profile (``oci_seccomp``), a small capability set, no new privileges,
read-only ``/sys`` and masked ``/proc`` paths (``oci_bundle``).

On hosts with *hybrid* cgroups crun refuses to run; every crun call therefore
runs in a private mount namespace where ``/sys/fs/cgroup/unified`` is
unmounted, so crun sees plain cgroup v1 (host mounts are untouched).

``crun run`` stays in the foreground as our child (it waits on the container
and reaps it), so no container process is ever orphaned to PID 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from compute.block_volumes import MountedVolume, release_under
from compute.driver import ComputeDriver, ConsoleEndpoint, ExecResult, InstanceStats, NodeResources
from compute.errors import (
    HypervisorError,
    InstanceExists,
    InstanceNotFound,
    InsufficientResources,
    InvalidPowerState,
    InvalidSpec,
)
from compute.host_mounts import is_mountpoint, unmount_under
from compute.oci_bundle import DEFAULT_CAPS, ID_RANGE, build_runtime_config, device_numbers_of
from compute.oci_console import TtyRelay, receive_pty_master
from compute.oci_idmap import IdRanges, idmapped_bind
from compute.oci_image import ImageStore
from compute.oci_net import nic_hook, plug_nics, unplug_nics
from compute.oci_seccomp import PROFILE, load_profile, oci_seccomp
from compute.spec import ContainerSpec, PowerState, VolumeMount, container_spec_from_dict, container_spec_to_dict

log = logging.getLogger(__name__)
HYBRID_MARK = Path("/sys/fs/cgroup/unified")
MOUNT_ROOT = Path("/run/cairn-containers")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def net_dev_counters(text: str) -> dict[str, tuple[int, int]]:
    """``/proc/net/dev`` as {interface: (received bytes, sent bytes)}."""
    out: dict[str, tuple[int, int]] = {}
    for line in text.splitlines()[2:]:
        name, _, fields = line.partition(":")
        values = fields.split()
        if len(values) >= 9:
            out[name.strip()] = (int(values[0]), int(values[8]))
    return out


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _blkio_v1(path: Path) -> tuple[int, int]:
    """Read and Write totals of a cgroup v1 ``blkio.throttle.io_service*`` file."""
    read = write = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0, 0
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[1] == "Read":
            read += int(parts[2])
        elif len(parts) == 3 and parts[1] == "Write":
            write += int(parts[2])
    return read, write


def cgroup_stats(root: Path, group: str) -> InstanceStats | None:
    """CPU, memory and block I/O of cgroup ``group`` (e.g. ``/cairn/web``), from the v1
    controllers when they are mounted (hybrid hosts: crun uses those), else v2; None when
    the group does not exist (the container does not run). Memory is the working set
    (charged memory less inactive page cache, as ``docker stats`` and cAdvisor count it),
    both what the container uses and what it holds on the host."""
    group = group.strip("/")
    if (root / "cpuacct").is_dir():
        cpu = root / "cpuacct" / group
        if not cpu.is_dir():
            return None
        mem = root / "memory" / group
        stat = _keyed(mem / "memory.stat")
        used = max(0, _read_int(mem / "memory.usage_in_bytes") - int(stat.get("total_inactive_file", 0)))
        blk = root / "blkio" / group
        rbytes, wbytes = _blkio_v1(blk / "blkio.throttle.io_service_bytes")
        rops, wops = _blkio_v1(blk / "blkio.throttle.io_serviced")
        return InstanceStats(cpu_seconds=_read_int(cpu / "cpuacct.usage") / 1e9, memory_bytes=used,
                             memory_used_bytes=used, disk_read_bytes=rbytes, disk_write_bytes=wbytes,
                             disk_read_ops=rops, disk_write_ops=wops)
    d = root / group
    if not (d / "cgroup.procs").exists():
        return None
    cpu_stat = _keyed(d / "cpu.stat")
    used = max(0, _read_int(d / "memory.current") - int(_keyed(d / "memory.stat").get("inactive_file", 0)))
    io = {"rbytes": 0, "wbytes": 0, "rios": 0, "wios": 0}
    for line in _lines(d / "io.stat"):
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if key in io and value.isdigit():
                io[key] += int(value)
    return InstanceStats(cpu_seconds=int(cpu_stat.get("usage_usec", 0)) / 1e6, memory_bytes=used,
                         memory_used_bytes=used, disk_read_bytes=io["rbytes"], disk_write_bytes=io["wbytes"],
                         disk_read_ops=io["rios"], disk_write_ops=io["wios"])


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def _keyed(path: Path) -> dict[str, str]:
    """A cgroup file of ``key value`` lines (``memory.stat``, ``cpu.stat``) as a dict."""
    return dict(line.split() for line in _lines(path) if len(line.split()) == 2)



SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL


def socket_path(path: Path) -> Path:
    """``path`` when a unix socket can have that name, else a short stand-in under
    /tmp/cairn-sockets derived from it (deep data directories exceed sun_path)."""
    if len(str(path)) <= SUN_PATH_MAX:
        return path
    short = Path("/tmp/cairn-sockets")
    short.mkdir(mode=0o700, exist_ok=True)
    return short / (hashlib.sha256(str(path).encode()).hexdigest()[:24] + ".sock")

class OciDriver(ComputeDriver[ContainerSpec]):
    """Containers on this host, run by crun."""

    kind = "container"

    def __init__(self, state_dir: Path, images: ImageStore | None = None, crun: str = "crun",
                 host_prefix: str = "cairn", id_ranges: IdRanges | None = None,
                 seccomp_profile: Path = PROFILE, mount_root: Path = MOUNT_ROOT) -> None:
        self.state_dir = Path(state_dir)
        self.host_prefix = host_prefix
        self.id_ranges = id_ranges or IdRanges()
        self.mount_root = mount_root
        self.seccomp_profile = seccomp_profile
        self.images = images or ImageStore(self.state_dir / "images")
        self.crun_root = self.state_dir / "crun"
        self.crun = shutil.which(crun) or crun
        (self.state_dir / "containers").mkdir(parents=True, exist_ok=True)
        self.crun_root.mkdir(parents=True, exist_ok=True)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._relays: dict[str, TtyRelay] = {}
        self._hybrid = os.path.ismount(HYBRID_MARK)

    # -- crun plumbing -------------------------------------------------------------------------------------------
    def _crun_argv(self, *args: str) -> list[str]:
        argv = [self.crun, "--root", str(self.crun_root), *args]
        if not self._hybrid:
            return argv
        return ["unshare", "-m", "--propagation", "private", "/bin/sh", "-c",
                f'umount {HYBRID_MARK} && exec "$@"', "crun", *argv]

    def _crun(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
        r = subprocess.run(self._crun_argv(*args), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise HypervisorError(f"crun {' '.join(args[:2])}: {r.stderr.decode(errors='replace').strip()}")
        return r

    def _crun_status(self, name: str) -> str | None:
        r = self._crun("state", name, check=False)
        if r.returncode != 0:
            return None
        status: str = json.loads(r.stdout).get("status", "")
        return status

    # -- files ---------------------------------------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        return self.state_dir / "containers" / name

    def _spec(self, name: str) -> ContainerSpec:
        path = self._dir(name) / "spec.json"
        if not path.exists():
            raise InstanceNotFound(f"no container named {name!r} on this node")
        return container_spec_from_dict(json.loads(path.read_text()))

    def resources(self) -> NodeResources:
        """Host CPUs and memory."""
        with open("/proc/meminfo") as f:
            mem_kib = int(f.readline().split()[1])
        return NodeResources(cpus=os.cpu_count() or 1, memory_mib=mem_kib // 1024)

    def define(self, spec: ContainerSpec) -> None:
        """Unpack the image (once), prepare the bundle directory and record the spec."""
        d = self._dir(spec.name)
        if (d / "spec.json").exists():
            raise InstanceExists(f"container {spec.name!r} already exists")
        res = self.resources()
        if spec.vcpus > res.cpus:
            raise InsufficientResources(f"container {spec.name!r} asks for {spec.vcpus:g} vCPUs; "
                                        f"this node has {res.cpus}")
        if spec.memory_mib > res.memory_mib:
            raise InsufficientResources(f"container {spec.name!r} asks for {spec.memory_mib} MiB; "
                                        f"this node has {res.memory_mib} MiB")
        for vol in spec.volumes:
            if not os.path.exists(vol.source):
                raise InvalidSpec(f"container {spec.name!r}: volume source {vol.source} does not exist")
        for lim in spec.io_limits:
            if not os.path.exists(lim.device):
                raise InvalidSpec(f"container {spec.name!r}: I/O-limited device {lim.device} does not exist")
        self.images.resolve(spec.image)  # ImageNotFound before anything is written
        load_profile(self.seccomp_profile)  # a missing profile fails here, not at start
        for sub in ("upper", "work"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        self._id_base(spec.name)
        (d / "spec.json").write_text(json.dumps(container_spec_to_dict(spec)))

    def _id_base(self, name: str) -> int:
        """The first host id of the container's range (claimed once, kept in idmap.json;
        a container made before ranges existed gets one now and its files shift into it)."""
        d = self._dir(name)
        try:
            base = int(json.loads((d / "idmap.json").read_text())["base"])
        except (OSError, ValueError, KeyError):
            base = self.id_ranges.claim(d)
            _shift_ids(d / "upper", base)
            (d / "idmap.json").write_text(json.dumps({"base": base, "size": ID_RANGE}))
        os.chown(d / "upper", base, base)  # the overlay's root: the container's root owns /
        return base

    def _mounts(self, name: str) -> Path:
        """Where the container's rootfs and idmapped mounts live: a directory every id may
        traverse (the runtime opens the rootfs as the container's root, and the state
        directory is private to host root)."""
        path = self.mount_root / f"{self.host_prefix}-{name}"
        for p in (self.mount_root, path):
            p.mkdir(exist_ok=True)
            p.chmod(0o711)
        return path

    def _idmapped(self, sources: list[Path], where: Path, base: int) -> list[Path]:
        """``sources`` as the container's root sees them: idmapped binds under ``where``."""
        out = []
        for i, src in enumerate(sources):
            target = where / str(i)
            target.mkdir(parents=True, exist_ok=True)
            if not is_mountpoint(target):
                idmapped_bind(src, target, base)
            out.append(target)
        return out

    def _mount_rootfs(self, spec: ContainerSpec) -> tuple[Path, Any]:
        d = self._dir(spec.name)
        image = self.images.resolve(spec.image)
        rootfs = self._mounts(spec.name) / "rootfs"
        rootfs.mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(rootfs):
            layers = self._idmapped(list(image.layers), self._mounts(spec.name) / "lower", self._id_base(spec.name))
            lower = ":".join(str(p) for p in reversed(layers))  # overlayfs: leftmost is the top
            opts = f"lowerdir={lower},upperdir={d / 'upper'},workdir={d / 'work'}"
            r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(rootfs)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise HypervisorError(f"mounting the rootfs of {spec.name!r}: {r.stderr.strip()}")
        return rootfs, image.config

    def start(self, name: str) -> None:
        """Mount the rootfs, plug the NICs, and run the container; returns once its process runs."""
        spec = self._spec(name)
        state = self.power_state(name)
        if state is PowerState.PAUSED:
            raise InvalidPowerState(f"container {name!r} is paused: resume it instead")
        if state is PowerState.RUNNING:
            return
        d = self._dir(name)
        self._crun("delete", "-f", name, check=False)  # leftovers of an earlier run
        rootfs, image_config = self._mount_rootfs(spec)
        base = self._id_base(name)
        try:
            self._release_volumes(spec)  # of an earlier run that crashed
            blocks = self._volumes(spec)
            for v in blocks:
                v.mount()
            binds = spec.volumes + tuple(VolumeMount(str(v.mountpoint), v.volume.target, v.volume.readonly)
                                         for v in blocks)
            volumes = self._idmapped([Path(v.source) for v in binds], self._mounts(name) / "volumes", base)
            plug_nics(spec.nics)
            hooks = None
            if spec.nics:
                (d / "nics.sh").write_text(nic_hook(spec.nics))
                (d / "nics.sh").chmod(0o700)
                hooks = {"createRuntime": [{"path": str(d / "nics.sh"), "timeout": 30}]}
            config = build_runtime_config(dataclasses.replace(spec, volumes=binds, block_volumes=()),
                                          rootfs=str(rootfs), image=image_config, netns_path=None,
                                          cgroups_path=f"/{self.host_prefix}/{name}",
                                          device_numbers=device_numbers_of(spec), id_base=base,
                                          seccomp=oci_seccomp(load_profile(self.seccomp_profile), DEFAULT_CAPS),
                                          hooks=hooks)
            for mount, source in zip((m for m in config["mounts"] if m["type"] == "bind"), volumes, strict=True):
                mount["source"] = str(source)
            (d / "config.json").write_text(json.dumps(config, indent=1))
            listener = None
            extra: list[str] = []
            if spec.tty:
                console_sock = socket_path(d / "crun-console.sock")
                console_sock.unlink(missing_ok=True)
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(str(console_sock))
                listener.listen(1)
                extra = ["--console-socket", str(console_sock)]
            with open(d / "console.log", "ab") as out:
                proc = subprocess.Popen(self._crun_argv("run", *extra, "-b", str(d), name),
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
            self._procs[name] = proc
            if listener is not None:
                with listener:
                    master = self._receive_terminal(listener, proc, name)
                relay = TtyRelay(master, d / "console.log", socket_path(d / "tty.sock"))
                relay.start()
                self._relays[name] = relay
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = self._crun_status(name)
                if status in ("running", "paused", "stopped") or proc.poll() is not None:
                    break
                time.sleep(0.005)
            if proc.poll() is not None and proc.returncode != 0:
                tail = (d / "console.log").read_bytes()[-500:].decode(errors="replace")
                raise HypervisorError(f"container {name!r} failed to start (crun exit {proc.returncode}): {tail}")
        except BaseException:
            self._kill(name, force=True)
            self._wait_exit(name, 10)
            unplug_nics(spec.nics)
            self._release_volumes(spec)
            raise

    def _volumes(self, spec: ContainerSpec) -> list[MountedVolume]:
        return [MountedVolume(v, self._dir(spec.name) / "volumes") for v in spec.block_volumes]

    def _release_volumes(self, spec: ContainerSpec) -> None:
        """Take the volumes' idmapped binds down, then unmount the network volumes (their
        data is flushed, their locks given back). Idempotent; also undoes a crashed run's."""
        unmount_under(self._mounts(spec.name) / "volumes")  # a bind would keep the filesystem alive
        for v in reversed(self._volumes(spec)):
            v.unmount()

    def _receive_terminal(self, listener: socket.socket, proc: subprocess.Popen[bytes], name: str) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                return receive_pty_master(listener, timeout=0.2)
            except HypervisorError:
                continue
        raise HypervisorError(f"container {name!r}: crun did not hand over its terminal "
                              f"(exit {proc.poll()}): {self.console_log(name)[-300:]!r}")

    def _stop_relay(self, name: str) -> None:
        relay = self._relays.pop(name, None)
        if relay is not None:
            relay.stop()
            relay.join(5)

    def _kill(self, name: str, force: bool) -> None:
        self._crun("kill", name, "KILL" if force else "TERM", check=False)

    def _wait_exit(self, name: str, timeout: float) -> bool:
        proc = self._procs.get(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    return True
            elif self._crun_status(name) in (None, "stopped"):
                return True
            time.sleep(0.02)
        return False

    def stop(self, name: str, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; unplugs the NICs."""
        spec = self._spec(name)
        if self.power_state(name) is PowerState.PAUSED:
            self._crun("resume", name, check=False)  # a frozen process cannot act on SIGTERM
        if self.power_state(name) is not PowerState.SHUTDOWN:
            self._kill(name, force=False)
            if not self._wait_exit(name, timeout):
                self._kill(name, force=True)
                if not self._wait_exit(name, 10):
                    raise HypervisorError(f"container {name!r} survived SIGKILL")
        proc = self._procs.pop(name, None)
        if proc is not None:
            proc.wait()
        self._stop_relay(name)
        self._crun("delete", "-f", name, check=False)
        unplug_nics(spec.nics)
        self._release_volumes(spec)

    def reboot(self, name: str) -> None:
        """Restart the container's process (stop with a short grace period, start)."""
        if self.power_state(name) is not PowerState.RUNNING:
            raise InvalidPowerState(f"container {name!r} is {self.power_state(name)}: only a running one can reboot")
        self.stop(name, timeout=5)
        self.start(name)

    def pause(self, name: str) -> None:
        """Freeze the container's processes (cgroup freezer)."""
        if self.power_state(name) is not PowerState.RUNNING:
            raise InvalidPowerState(f"container {name!r} is {self.power_state(name)}: only a running one can pause")
        self._crun("pause", name)

    def resume(self, name: str) -> None:
        """Thaw a paused container."""
        if self.power_state(name) is not PowerState.PAUSED:
            raise InvalidPowerState(f"container {name!r} is {self.power_state(name)}: only a paused one can resume")
        self._crun("resume", name)

    def delete(self, name: str) -> None:
        """Kill, unplug, unmount and remove the container's directory. Idempotent."""
        d = self._dir(name)
        if not d.exists():
            return
        if (d / "spec.json").exists():
            spec = self._spec(name)
            if self.power_state(name) is not PowerState.SHUTDOWN:
                self._crun("resume", name, check=False)
                self._kill(name, force=True)
                self._wait_exit(name, 10)
            self._crun("delete", "-f", name, check=False)
            proc = self._procs.pop(name, None)
            if proc is not None:
                proc.wait(10)
            self._stop_relay(name)
            unplug_nics(spec.nics)
            self._release_volumes(spec)
        mounts = self._mounts(name)
        unmount_under(mounts)  # rootfs, idmapped layers and volumes, and anything a crash left there
        release_under(d / "volumes")  # and whatever a crashed run left of them
        shutil.rmtree(mounts, ignore_errors=True)  # empty mount points only: everything is unmounted
        try:
            self.id_ranges.release(d, int(json.loads((d / "idmap.json").read_text())["base"]))
        except (OSError, ValueError, KeyError):
            pass
        for sock in ("tty.sock", "crun-console.sock"):
            socket_path(d / sock).unlink(missing_ok=True)  # a stand-in may live outside d
        shutil.rmtree(d, ignore_errors=True)

    def power_state(self, name: str) -> PowerState:
        """running / paused from crun's state; shutdown when no process runs."""
        self._spec(name)
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            return PowerState.SHUTDOWN
        status = self._crun_status(name)
        if status in ("running", "created"):
            return PowerState.RUNNING
        if status == "paused":
            return PowerState.PAUSED
        return PowerState.SHUTDOWN

    def list_instances(self) -> list[str]:
        """Names of the defined containers."""
        return sorted(p.parent.name for p in (self.state_dir / "containers").glob("*/spec.json"))

    def console_log(self, name: str) -> bytes:
        """The container's stdout and stderr so far."""
        self._spec(name)
        path = self._dir(name) / "console.log"
        return path.read_bytes() if path.exists() else b""

    def consoles(self, name: str) -> list[ConsoleEndpoint]:
        """The log file (stdout/stderr), and for ``tty=True`` the interactive terminal as a unix socket."""
        self._spec(name)
        out = [ConsoleEndpoint(kind="log", path=str(self._dir(name) / "console.log"))]
        if name in self._relays and self._relays[name].is_alive():
            out.insert(0, ConsoleEndpoint(kind="serial-unix", path=str(socket_path(self._dir(name) / "tty.sock"))))
        return out

    def stats(self) -> dict[str, InstanceStats]:
        """Each running container's cgroup counters, and its veths' (read from the host end:
        what the host receives, the container sent)."""
        try:
            net = net_dev_counters(Path("/proc/net/dev").read_text())
        except OSError:
            net = {}
        out: dict[str, InstanceStats] = {}
        for name in self.list_instances():
            usage = cgroup_stats(CGROUP_ROOT, f"{self.host_prefix}/{name}")
            if usage is None:
                continue
            try:
                nics = self._spec(name).nics
            except (InstanceNotFound, OSError, ValueError):
                nics = ()
            host_rx = sum(net.get(n.host_dev, (0, 0))[0] for n in nics)
            host_tx = sum(net.get(n.host_dev, (0, 0))[1] for n in nics)
            out[name] = dataclasses.replace(usage, net_rx_bytes=host_tx, net_tx_bytes=host_rx)
        return out

    def exec(self, name: str, argv: list[str], timeout: float = 60.0, tty: bool = False) -> ExecResult:
        """Run ``argv`` inside the running container and return its status and output
        (with ``tty``, on a terminal of its own: stdout and stderr both arrive as stdout)."""
        if self.power_state(name) is not PowerState.RUNNING:
            raise InvalidPowerState(f"container {name!r} is {self.power_state(name)}: exec needs it running")
        if tty:
            return self._exec_tty(name, argv, timeout)
        try:
            r = subprocess.run(self._crun_argv("exec", name, *argv), capture_output=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise HypervisorError(f"exec in {name!r} timed out after {timeout}s: {argv}") from e
        return ExecResult(returncode=r.returncode, stdout=r.stdout, stderr=r.stderr)

    def _exec_tty(self, name: str, argv: list[str], timeout: float) -> ExecResult:
        """``crun exec --tty``: crun hands the terminal's master over a socket; read it to the end."""
        sock = socket_path(self._dir(name) / f"exec-{os.getpid()}-{time.monotonic_ns()}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(sock))
        listener.listen(1)
        deadline = time.monotonic() + timeout
        proc = subprocess.Popen(self._crun_argv("exec", "--tty", "--console-socket", str(sock),
                                                name, *argv),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        out = bytearray()
        try:
            with listener:
                master = self._receive_terminal(listener, proc, name)
            with os.fdopen(master, "rb", buffering=0) as term:
                while time.monotonic() < deadline:
                    ready, _, _ = select.select([term], [], [], max(0.0, deadline - time.monotonic()))
                    if not ready:
                        continue
                    try:
                        chunk = term.read(65536)
                    except OSError:  # EIO: the last process on the terminal is gone
                        chunk = b""
                    if not chunk:
                        break
                    out += chunk
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as e:
            raise HypervisorError(f"exec in {name!r} timed out after {timeout}s: {argv}") from e
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            sock.unlink(missing_ok=True)
        if time.monotonic() >= deadline and proc.returncode is None:
            raise HypervisorError(f"exec in {name!r} timed out after {timeout}s: {argv}")
        return ExecResult(returncode=proc.returncode, stdout=bytes(out), stderr=b"")

    def pid(self, name: str) -> int:
        """PID (host namespace) of the container's init process."""
        r = self._crun("state", name)
        pid: int = json.loads(r.stdout)["pid"]
        return pid


def _shift_ids(root: Path, base: int) -> None:
    """Move files written before the container had an id range into it (host id u of
    the old, unmapped container becomes base + u)."""
    if not root.exists():
        return
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if st.st_uid < ID_RANGE and st.st_gid < ID_RANGE:
            os.lchown(path, base + st.st_uid, base + st.st_gid)
