"""Embedded-mode process supervisor (there is no systemd as PID 1 on these
machines). Starts redis-server, cairn-api, cairn-worker and cairn-agent, restarts
any that dies (with backoff), logs each to its own file, and stops them cleanly on
SIGTERM. In appliance mode systemd units in ``appliance/systemd`` do this job.

Run as ``python -m appliance.supervisor``; ``cairn up`` / ``cairn down`` drive it."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import DEVNULL, Popen

from appliance import logs
from appliance.settings import Settings, get_settings

log = logging.getLogger("cairn.supervisor")
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Children get SIGTERM if the supervisor itself is killed (even with -9)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    os.setpgrp()


@dataclass
class Program:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    backoff: float = 0.5
    next_start: float = 0.0


def redis_config(settings: Settings) -> Path:
    """A redis.conf for the embedded broker: unix socket only, AOF for durability."""
    rdir = settings.data_dir / "redis"
    rdir.mkdir(parents=True, exist_ok=True)
    conf = rdir / "redis.conf"
    conf.write_text(
        f"port 0\nunixsocket {settings.redis_socket}\nunixsocketperm 700\ndir {rdir}\n"
        "appendonly yes\nappendfsync everysec\nsave 60 1\ndaemonize no\nloglevel notice\n"
        "protected-mode yes\n"
    )
    return conf


def embedded_libvirt_uri(settings: Settings) -> str:
    return f"qemu+unix:///system?socket={settings.data_dir / 'libvirt' / settings.node_name}/run/libvirt-sock"


CLUSTER_ENGINES = ("etcd", "redis", "sentinel", "patroni", "ceph")


def programs(settings: Settings) -> list[Program]:
    py = sys.executable
    env = {"CAIRN_DATA_DIR": str(settings.data_dir)}
    cluster = settings.cluster is not None
    if cluster:
        # A cluster node: the replicated engines first (each waits for what it needs).
        progs = [Program(name, [py, "-m", "appliance.processes", name], env) for name in CLUSTER_ENGINES]
    else:
        progs = [Program("redis", ["redis-server", str(redis_config(settings))])]
    if settings.vm_driver == "libvirt" and settings.libvirt_uri == "qemu:///system":
        # No system libvirtd here: run the node's own, and point the agent at it.
        progs.append(Program("libvirt", [py, "-m", "appliance.processes", "libvirt"], env))
        env = {**env, "CAIRN_LIBVIRT_URI": embedded_libvirt_uri(settings)}
    if settings.ceph_enabled and not cluster:
        progs.append(Program("ceph", [py, "-m", "appliance.processes", "ceph"], env))
    progs.append(Program("storage", [py, "-m", "appliance.processes", "storage"], env))
    for name in ("api", "worker", "agent"):
        progs.append(Program(name, [py, "-m", "appliance.processes", name], env))
    if settings.metrics_store == "prometheus":
        progs.append(Program("prometheus", [py, "-m", "appliance.processes", "prometheus"], env))
    return progs


class Supervisor:
    def __init__(self, settings: Settings, progs: list[Program]) -> None:
        self.settings = settings
        self.progs = progs
        self.stopping = False
        self.pending: list[Program] = []
        self.state_file = settings.run_dir / "supervisor.json"

    def start(self, prog: Program) -> None:
        out = open(self.settings.log_dir / f"{prog.name}.log", "ab")  # noqa: SIM115 (child owns it)
        env = {**os.environ, **prog.env}
        prog.proc = Popen(prog.argv, stdin=DEVNULL, stdout=out, stderr=out, env=env,
                          preexec_fn=_die_with_parent, close_fds=True)
        out.close()
        prog.started_at = time.monotonic()
        log.info("started", extra={"program": prog.name, "pid": prog.proc.pid})

    def write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "programs": {
                p.name: {"pid": p.proc.pid if p.proc and p.proc.poll() is None else None,
                         "restarts": p.restarts, "argv": p.argv}
                for p in self.progs
            },
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_file)

    def loop(self) -> None:
        for prog in self.progs:
            self.start(prog)
            if prog.name == "redis" and self.settings.cluster is None:
                self._wait_socket(self.settings.redis_socket, 10)
        self.write_state()
        while not self.stopping:
            changed = False
            if self.pending:
                self._merge_pending()
            now = time.monotonic()
            for prog in self.progs:
                if prog.proc is not None and prog.proc.poll() is not None:
                    code = prog.proc.returncode
                    uptime = now - prog.started_at
                    prog.backoff = 0.5 if uptime > 30 else min(prog.backoff * 2, 10.0)
                    prog.next_start = now + (0.2 if uptime > 30 else prog.backoff)
                    log.warning("exited; restarting", extra={"program": prog.name, "code": code,
                                                             "uptime": round(uptime, 1)})
                    prog.proc = None
                    changed = True
                if prog.proc is None and now >= prog.next_start and not self.stopping:
                    prog.restarts += 1
                    self.start(prog)
                    changed = True
            if changed:
                self.write_state()
            time.sleep(0.2)

    @staticmethod
    def _wait_socket(path: Path, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def add_new(self, progs: list[Program]) -> None:
        """SIGHUP: start programs the settings now ask for (``cairn up --ceph`` on a running
        appliance); running ones are left alone. The loop merges them on its next pass."""
        self.pending = progs

    def _merge_pending(self) -> None:
        progs, self.pending = self.pending, []
        known = {p.name for p in self.progs}
        for i, prog in enumerate(progs):
            if prog.name not in known:
                prog.restarts = -1  # its first start is not a restart
                self.progs.insert(min(i, len(self.progs)), prog)

    def shutdown(self, *_: object) -> None:
        self.stopping = True

    def stop_all(self, grace: float = 10.0) -> None:
        # Stop in reverse order: agent, worker, api, then the broker.
        for prog in reversed(self.progs):
            if prog.proc and prog.proc.poll() is None:
                prog.proc.terminate()
                try:
                    prog.proc.wait(grace)
                except Exception:
                    prog.proc.kill()
                    prog.proc.wait()
            log.info("stopped", extra={"program": prog.name})


def pid_file(settings: Settings) -> Path:
    return settings.run_dir / "supervisor.pid"


def running_pid(settings: Settings) -> int | None:
    """The supervisor's pid if one is alive for this data dir."""
    try:
        pid = int(pid_file(settings).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"appliance.supervisor" in cmdline else None


STACKS_DIR = Path("/run/cairn/stacks")


def _claim_file(settings: Settings) -> Path:
    return STACKS_DIR / f"{settings.stack_tag or 'default'}.json"


def stack_conflict(settings: Settings) -> str | None:
    """Why this stack must not start: another live stack on the host uses its tag (the
    names of bridges, nftables tables, container netns and cgroups), or None."""
    try:
        claim = json.loads(_claim_file(settings).read_text())
    except (OSError, ValueError):
        return None
    other = Path(claim.get("data_dir", ""))
    if other == settings.data_dir.resolve():
        return None
    pid = int(claim.get("pid", 0))
    try:
        alive = pid > 0 and b"appliance.supervisor" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        alive = False
    if not alive:
        return None
    return (f"the Cairn stack of {other} (supervisor {pid}) already runs on this host with the tag "
            f"{settings.stack_tag or '(none)'!r} in its host object names; set CAIRN_STACK_ID to 1-4 other "
            "lower-case letters for this one")


def _claim_stack(settings: Settings) -> None:
    STACKS_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = _claim_file(settings).with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"data_dir": str(settings.data_dir.resolve()), "pid": os.getpid()}))
    os.replace(tmp, _claim_file(settings))


def _release_stack(settings: Settings) -> None:
    try:
        if json.loads(_claim_file(settings).read_text()).get("pid") == os.getpid():
            _claim_file(settings).unlink()
    except (OSError, ValueError):
        pass


def main() -> None:
    os.umask(0o077)  # its programs inherit it: what Cairn writes is root's alone
    settings = get_settings()
    logs.setup("cairn-supervisor", settings.log_level)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    if running_pid(settings):
        sys.exit("a supervisor is already running for this data dir")
    conflict = stack_conflict(settings)
    if conflict:
        sys.exit(conflict)
    _claim_stack(settings)
    pid_file(settings).write_text(str(os.getpid()))
    sup = Supervisor(settings, programs(settings))
    signal.signal(signal.SIGTERM, sup.shutdown)
    signal.signal(signal.SIGINT, sup.shutdown)
    signal.signal(signal.SIGHUP, lambda *_: sup.add_new(programs(settings)))
    try:
        sup.loop()
    finally:
        sup.stop_all()
        _release_stack(settings)
        pid_file(settings).unlink(missing_ok=True)
        sup.state_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
