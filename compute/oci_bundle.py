"""Pure builder: a :class:`~compute.spec.ContainerSpec` to an OCI runtime ``config.json``.

QoS classes map to cgroup limits the same way for containers as for VMs:
``guaranteed`` gets a hard CPU quota and high shares, ``burstable`` shares
proportional to its vCPUs and no quota, ``best-effort`` minimal shares. All
classes get a memory limit (a node never lets a workload take all its memory).
"""

from __future__ import annotations

import os
from typing import Any

from compute.oci_image import ImageConfig
from compute.spec import ContainerSpec, QosClass

CPU_PERIOD_US = 100_000
# podman's default set plus CAP_NET_RAW (ping in the images we ship opens raw sockets;
# they only reach the container's own network namespace, and port security drops any
# frame not from the port's own addresses). No MKNOD, AUDIT_WRITE, SYS_ADMIN, NET_ADMIN.
DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW",
    "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_CHROOT",
]
MASKED = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
          "/sys/kernel/security"]
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
ID_RANGE = 65536


def cgroup_resources(spec: ContainerSpec, device_numbers: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Return the OCI ``linux.resources`` for the spec's QoS class.

    ``device_numbers`` maps each I/O-limited device path to (major, minor); the
    driver resolves them with ``os.stat`` so this function stays pure.
    """
    memory = spec.memory_mib * 1024 * 1024
    res: dict[str, Any] = {"memory": {"limit": memory}, "pids": {"limit": 4096}}
    if spec.qos_class is QosClass.GUARANTEED:
        res["cpu"] = {"shares": max(2, int(spec.vcpus * 1024)), "quota": int(spec.vcpus * CPU_PERIOD_US),
                      "period": CPU_PERIOD_US}
        res["memory"]["reservation"] = memory
    elif spec.qos_class is QosClass.BURSTABLE:
        res["cpu"] = {"shares": max(2, int(spec.vcpus * 1024))}
    else:
        res["cpu"] = {"shares": 2}
    if spec.io_limits:
        numbers = device_numbers or {}
        blkio: dict[str, list[dict[str, int]]] = {}
        for lim in spec.io_limits:
            major, minor = numbers[lim.device]
            for key, oci_key in (("read_bps", "throttleReadBpsDevice"), ("write_bps", "throttleWriteBpsDevice"),
                                 ("read_iops", "throttleReadIOPSDevice"), ("write_iops", "throttleWriteIOPSDevice")):
                value = getattr(lim, key)
                if value is not None:
                    blkio.setdefault(oci_key, []).append({"major": major, "minor": minor, "rate": value})
        res["blockIO"] = blkio
    return res


def process_env(spec: ContainerSpec, image: ImageConfig) -> dict[str, str]:
    """The environment of the container's processes: the image's, then the spec's."""
    env = dict(image.env)
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["HOSTNAME"] = spec.hostname or spec.name
    if spec.tty:
        env["TERM"] = "xterm"
    env.update(dict(spec.env))
    return env


def process_cwd(spec: ContainerSpec, image: ImageConfig) -> str:
    """The working directory: the spec's, else the image's."""
    return spec.workdir if spec.workdir != "/" else image.workdir


def build_runtime_config(
    spec: ContainerSpec,
    *,
    rootfs: str,
    image: ImageConfig,
    netns_path: str | None,
    cgroups_path: str,
    device_numbers: dict[str, tuple[int, int]] | None = None,
    id_base: int | None = None,
    seccomp: dict[str, Any] | None = None,
    hooks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the OCI runtime config (``config.json`` content) for ``spec``.

    ``id_base`` puts the container in its own user namespace (its ids 0..65535 are host
    ids ``id_base``..; the network namespace is then the container's own too, created
    inside it), ``seccomp`` is its ``linux.seccomp``, ``hooks`` OCI hooks (e.g. the one
    that moves its NICs in)."""
    env = process_env(spec, image)
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")]
    if id_base is not None:
        namespaces.insert(0, {"type": "user"})
    namespaces.append({"type": "network", "path": netns_path} if netns_path else {"type": "network"})
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
    ]
    for vol in spec.volumes:
        mounts.append({"destination": vol.target, "type": "bind", "source": vol.source,
                       "options": ["rbind", "ro" if vol.readonly else "rw"]})
    caps = list(DEFAULT_CAPS)
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "cgroupsPath": cgroups_path,
        "resources": {"devices": [{"allow": False, "access": "rwm"}], **cgroup_resources(spec, device_numbers)},
        "maskedPaths": MASKED,
        "readonlyPaths": READONLY,
    }
    if id_base is not None:
        linux["uidMappings"] = [{"containerID": 0, "hostID": id_base, "size": ID_RANGE}]
        linux["gidMappings"] = [{"containerID": 0, "hostID": id_base, "size": ID_RANGE}]
    if seccomp is not None:
        linux["seccomp"] = seccomp
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": spec.tty,
            "user": {"uid": 0, "gid": 0},
            "args": list(spec.command),
            "env": [f"{k}={v}" for k, v in sorted(env.items())],
            "cwd": process_cwd(spec, image),
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},  # none inheritable, none ambient
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": spec.hostname or spec.name,
        "mounts": mounts,
        "linux": linux,
    }
    if hooks:
        config["hooks"] = hooks
    return config


def device_numbers_of(spec: ContainerSpec) -> dict[str, tuple[int, int]]:
    """Resolve the (major, minor) of each device named in ``spec.io_limits`` (impure helper)."""
    out = {}
    for lim in spec.io_limits:
        st = os.stat(lim.device)
        out[lim.device] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return out
