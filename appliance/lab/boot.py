"""A lab node's "boot": the first process inside the node's namespaces.

Started by the lab daemon as ``nsenter --net=<node netns> unshare -m -u --propagation
private -- python -m appliance.lab.boot …`` inside the node's cgroup. It gives the node
its own hostname and its own folders where a real node keeps them (``/var/lib/cairn``,
``/etc/ceph``, ``/etc/cairn``, PostgreSQL's folder, private ``/run`` folders), forms or
joins the cluster if asked, then runs the node's supervisor as its child and reaps every
orphan of the node (a real node's init does that) until the supervisor ends."""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from appliance.lab.layout import NODE_MOUNTS

PR_SET_CHILD_SUBREAPER = 36


def _mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True)


def enter_node_filesystem(node_dir: Path, hostname: str) -> None:
    """Hostname and bind mounts, in the (already private) mount and UTS namespaces."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    name = hostname.encode()
    if libc.sethostname(name, len(name)) != 0:
        raise OSError(ctypes.get_errno(), "sethostname")
    for sub, target in NODE_MOUNTS.items():
        src = node_dir / sub
        src.mkdir(parents=True, exist_ok=True)
        Path(target).mkdir(parents=True, exist_ok=True)
        _mount("--bind", str(src), target)
    # The node's own /run/netns (namespaces it makes stay inside it), /run/cairn (the
    # stack registry: the node is a machine of its own, not a stack of the host's) and
    # /run/cairn-containers (its containers' root filesystems, named like any node's).
    for run in ("/run/netns", "/run/cairn", "/run/cairn-containers"):
        Path(run).mkdir(parents=True, exist_ok=True)
        _mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", run)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cairn-lab-boot")
    parser.add_argument("--node", required=True)
    parser.add_argument("--node-dir", required=True, type=Path)
    parser.add_argument("--mode", choices=("init", "join", "up"), default="up")
    parser.add_argument("--member", help="join: a member's address")
    parser.add_argument("--token", help="join: a join token")
    parser.add_argument("--osd", action="append", default=[], help="OSD backing store (file:<bytes>)")
    args = parser.parse_args(argv)

    booted = args.node_dir / "booted"
    booted.unlink(missing_ok=True)
    enter_node_filesystem(args.node_dir, args.node)
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
    os.environ["CAIRN_CONFIG"] = f"{NODE_MOUNTS['data']}/cli.json"

    from appliance.cluster import formation
    from appliance.errors import CairnError
    from appliance.settings import get_settings

    settings = get_settings()
    try:
        if args.mode == "init" and settings.cluster is None:
            formation.init(settings, osds=args.osd or None)
        elif args.mode == "join" and settings.cluster is None:
            formation.join(settings, args.member, args.token, osds=args.osd or None)
    except CairnError as exc:
        sys.exit(f"cairn-lab-boot: {args.node}: {args.mode} failed: {exc.detail}")
    for d in (settings.log_dir, settings.run_dir):
        d.mkdir(parents=True, exist_ok=True)

    log = open(settings.log_dir / "supervisor.log", "ab")  # noqa: SIM115 - the child owns it
    sup = subprocess.Popen([sys.executable, "-m", "appliance.supervisor"], stdin=subprocess.DEVNULL,
                           stdout=log, stderr=log)
    log.close()
    tmp = booted.with_suffix(".tmp")  # whole or absent: the lab reads it while it waits
    tmp.write_text(f"{os.getpid()} {settings.boot_id}\n")
    os.replace(tmp, booted)  # the lab waits for this (or for our exit)

    def forward(signum: int, _frame: object) -> None:
        if sup.poll() is None:
            sup.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == sup.pid:
            sup.returncode = os.waitstatus_to_exitcode(status)
            code = sup.returncode
            break
    sys.exit(code)


if __name__ == "__main__":
    main()
