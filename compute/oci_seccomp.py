"""Containers' seccomp filter: the containers ecosystem's default profile (the one podman,
buildah and CRI-O load: ``/usr/share/containers/seccomp.json`` from Debian's
golang-github-containers-common), turned into an OCI ``linux.seccomp`` for the
container's capabilities, plus Docker's rule that containers without CAP_SYS_ADMIN
create no namespaces and mount nothing.

That profile allows ``unshare``, ``clone`` with namespace flags and the mount family
to everyone and leaves the rest to capabilities; but a new user namespace hands its
creator every capability inside it, the door to most container-escape kernel bugs,
and user namespaces need no capability. So, as Docker's profile does: ``clone`` only
without namespace flags, ``clone3`` answers ENOSYS (its flags hide in a struct seccomp
cannot read; libc falls back to ``clone``), ``unshare``, ``setns`` and the mount
calls answer EPERM.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from compute.errors import HypervisorError

PROFILE = Path("/usr/share/containers/seccomp.json")
NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
NO_NAMESPACES = ("unshare", "setns")
NO_MOUNTS = ("mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick",
             "move_mount", "open_tree", "mount_setattr")
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}
_EPERM, _ENOSYS = 1, 38


@lru_cache(maxsize=4)
def load_profile(path: Path = PROFILE) -> dict[str, Any]:
    """The ecosystem's default profile (Docker's JSON format, with includes/excludes)."""
    try:
        profile: dict[str, Any] = json.loads(path.read_text())
    except OSError as e:
        raise HypervisorError(f"the default seccomp profile {path} is missing ({e.strerror}): install the Debian "
                              "package golang-github-containers-common") from None
    return profile


def _kernel() -> tuple[int, ...]:
    return tuple(int(p) for p in platform.release().split("-")[0].split(".")[:2])


def _applies(rule: dict[str, Any], caps: set[str], arch: str) -> bool:
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if inc.get("caps") and not set(inc["caps"]) <= caps:
        return False
    if inc.get("arches") and arch not in inc["arches"]:
        return False
    if inc.get("minKernel") and _kernel() < tuple(int(p) for p in inc["minKernel"].split(".")[:2]):
        return False
    if exc.get("caps") and set(exc["caps"]) & caps:
        return False
    return not (exc.get("arches") and arch in exc["arches"])


def oci_seccomp(profile: dict[str, Any], capabilities: Sequence[str], machine: str | None = None) -> dict[str, Any]:
    """``linux.seccomp`` for a container with ``capabilities`` (pure)."""
    caps = set(capabilities)
    machine = machine or platform.machine()
    arch = _GOARCH.get(machine, machine)
    native = "SCMP_ARCH_X86_64" if machine == "x86_64" else f"SCMP_ARCH_{machine.upper()}"
    subs = next((m.get("subArchitectures") or [] for m in profile.get("archMap") or []
                 if m["architecture"] == native), [])
    arches = [native, *subs]
    denied = set(NO_NAMESPACES + NO_MOUNTS + ("clone", "clone3")) if "CAP_SYS_ADMIN" not in caps else set()
    syscalls: list[dict[str, Any]] = []
    for rule in profile["syscalls"]:
        if not _applies(rule, caps, arch):
            continue
        names = [n for n in rule["names"] if n not in denied]
        if not names:
            continue
        entry: dict[str, Any] = {"names": names, "action": rule["action"]}
        if rule.get("args"):
            entry["args"] = [{k: a[k] for k in ("index", "value", "valueTwo", "op")} for a in rule["args"]]
        if rule.get("errnoRet") is not None:
            entry["errnoRet"] = rule["errnoRet"]
        syscalls.append(entry)
    if denied:
        syscalls += [
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": _ENOSYS},
            {"names": sorted(NO_NAMESPACES + NO_MOUNTS), "action": "SCMP_ACT_ERRNO", "errnoRet": _EPERM},
        ]
    out: dict[str, Any] = {"defaultAction": profile["defaultAction"], "architectures": arches,
                           "syscalls": syscalls}
    if profile.get("defaultErrnoRet") is not None:
        out["defaultErrnoRet"] = profile["defaultErrnoRet"]
    return out
