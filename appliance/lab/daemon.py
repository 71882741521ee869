"""The lab daemon: the one process of a lab that lives outside its nodes.

It starts each node's boot process (so the boot is its child and is reaped when the
node dies: PID 1 on these machines reaps late), is the subreaper of anything a node
leaves behind, and answers a small JSON-lines control socket (``start``, ``nodes``,
``ping``, ``shutdown``). Started by ``cairn lab up``; ``cairn lab down`` kills it with
the rest of the lab's cgroup."""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from appliance.lab.host import cg_kill, in_cgroup
from appliance.lab.layout import Lab, watchdog_fifo

log = logging.getLogger("cairn.lab")
PR_SET_CHILD_SUBREAPER = 36


class WatchdogEmulator(threading.Thread):
    """A lab node's watchdog (this kernel has no softdog): the node's agent writes to a FIFO
    as it would to /dev/watchdog; opening + writing arms it, ``V`` before closing disarms
    it, and if it goes unfed for ``timeout`` seconds the node's cgroup is killed, as a
    reset would. It lives here, outside the node, so a hung or dead node cannot stop it."""

    def __init__(self, daemon: LabDaemon, name: str, fifo: Path, timeout: float) -> None:
        super().__init__(name=f"watchdog-{name}", daemon=True)
        self.lab_daemon, self.node, self.fifo, self.timeout = daemon, name, fifo, timeout
        self.armed = False
        self.last = 0.0
        self.last_byte = b""
        self.fired = 0

    def reset(self) -> None:
        """The node (re)boots: a new machine starts with its watchdog off."""
        self.armed, self.last_byte = False, b""

    def run(self) -> None:
        import select

        self.fifo.parent.mkdir(parents=True, exist_ok=True)
        if not self.fifo.exists():
            os.mkfifo(self.fifo, 0o600)
        fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        while not self.lab_daemon.stopping.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            data = b""
            if ready:
                try:
                    data = os.read(fd, 4096)
                except BlockingIOError:
                    data = b""
                if data:
                    self.armed, self.last, self.last_byte = True, time.monotonic(), data[-1:]
                else:  # no writer (closed): a magic close disarms, any other close does not
                    if self.armed and self.last_byte == b"V":
                        self.armed = False
                    time.sleep(0.2)
            if self.armed and time.monotonic() - self.last > self.timeout:
                self.armed = False
                self.fired += 1
                log.warning("watchdog fired: resetting the node", extra={"node": self.node})
                with open(self.lab_daemon.lab.path / "watchdog.log", "a") as f:
                    f.write(f"{time.time():.3f} {self.node} fired after {self.timeout:g} s unfed\n")
                try:
                    cg_kill(self.lab_daemon.lab.node_cgroup(self.node))
                except Exception:
                    log.exception("watchdog could not kill the node", extra={"node": self.node})


class LabDaemon:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.boots: dict[str, subprocess.Popen[bytes]] = {}
        self.started: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.watchdogs: dict[str, WatchdogEmulator] = {}

    def watchdog(self, name: str) -> WatchdogEmulator:
        if name not in self.watchdogs:
            node = self.lab.node(name)
            dog = WatchdogEmulator(self, name, watchdog_fifo(node.path), self.lab.watchdog_timeout)
            dog.start()
            self.watchdogs[name] = dog
        return self.watchdogs[name]

    # -- nodes
    def start(self, name: str, mode: str = "up", member: str | None = None, token: str | None = None,
              osds: list[str] | None = None) -> dict[str, Any]:
        self.lab = Lab.load(self.lab.path)  # `cairn lab add` may have cabled a node since
        node = self.lab.node(name)
        with self.lock:
            running = self.boots.get(name)
            if running is not None and running.poll() is None:
                return {"node": name, "pid": running.pid, "already": True, **self.started[name]}
            cg = self.lab.node_cgroup(name)
            cg.mkdir(parents=True, exist_ok=True)
            self.watchdog(name).reset()
            boot_id = str(uuid.uuid4())
            argv = ["nsenter", f"--net=/run/netns/{node.netns}", "unshare", "-m", "-u", "--propagation", "private",
                    "--", sys.executable, "-m", "appliance.lab.boot", "--node", name, "--node-dir", node.dir,
                    "--mode", mode]
            if member:
                argv += ["--member", member]
            if token:
                argv += ["--token", token]
            for osd in osds or []:
                argv += ["--osd", osd]
            env = {**os.environ, "CAIRN_BOOT_ID": boot_id, "CAIRN_NODE_NAME": name,
                   "CAIRN_UNDERLAY_INTERFACE": "eth0", "CAIRN_MIGRATION_HOST": node.address,
                   "CAIRN_STORAGE_HOST": node.address}
            for key in [k for k in env if k.startswith("CAIRN_") and k not in (
                    "CAIRN_BOOT_ID", "CAIRN_NODE_NAME", "CAIRN_UNDERLAY_INTERFACE", "CAIRN_MIGRATION_HOST",
                    "CAIRN_STORAGE_HOST")]:
                env.pop(key)  # the node has its own settings (/etc/cairn/cairn.env), not the host's
            node.path.mkdir(parents=True, exist_ok=True)
            out = open(node.path / "boot.log", "ab")  # noqa: SIM115 - the child owns it
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=in_cgroup(cg, new_session=True))
            out.close()
            self.boots[name] = proc
            self.started[name] = {"boot_id": boot_id, "started_at": time.time(), "mode": mode}
            log.info("node started", extra={"node": name, "pid": proc.pid, "mode": mode})
            return {"node": name, "pid": proc.pid, **self.started[name]}

    def stop(self, name: str, timeout: float = 90) -> dict[str, Any]:
        """Shut a node down cleanly (its boot passes SIGTERM to the supervisor, which stops
        every program); killed if it takes longer than ``timeout``."""
        with self.lock:
            proc = self.boots.get(name)
        if proc is None or proc.poll() is not None:
            return {"node": name, "stopped": False}
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
            forced = False
        except subprocess.TimeoutExpired:
            cg_kill(self.lab.node_cgroup(name))
            forced = True
        cg_kill(self.lab.node_cgroup(name))  # whatever the supervisor left behind
        return {"node": name, "stopped": True, "forced": forced}

    def nodes(self) -> dict[str, Any]:
        with self.lock:
            return {name: {"pid": p.pid, "running": p.poll() is None, "exit_code": p.returncode,
                           **self.started.get(name, {})} for name, p in self.boots.items()}

    # -- reaping
    def reap_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = None
            if info is None:
                time.sleep(0.2)
                continue
            with self.lock:
                ours = next((p for p in self.boots.values() if p.pid == info.si_pid), None)
            if ours is not None:
                ours.poll()
            else:
                try:
                    os.waitpid(info.si_pid, 0)
                except ChildProcessError:
                    pass

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "start":
            return self.start(request["node"], request.get("mode", "up"), request.get("member"),
                              request.get("token"), request.get("osds"))
        if op == "nodes":
            return self.nodes()
        if op == "stop":
            return self.stop(request["node"])
        if op == "watchdogs":
            return {n: {"armed": d.armed, "fired": d.fired, "timeout": d.timeout} for n, d in self.watchdogs.items()}
        if op == "shutdown":
            self.stopping.set()
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")


def serve(lab: Lab) -> None:
    daemon = LabDaemon(lab)
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
    path = lab.daemon_socket
    path.unlink(missing_ok=True)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                try:
                    reply = daemon.handle(json.loads(line))
                except Exception as exc:
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                self.wfile.write(json.dumps(reply).encode() + b"\n")
                self.wfile.flush()

    server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
    server.daemon_threads = True
    os.chmod(path, 0o600)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (lab.path / "daemon.pid").write_text(str(os.getpid()))
    try:
        daemon.reap_forever()
    finally:
        server.shutdown()
        path.unlink(missing_ok=True)


def call(lab: Lab, request: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """Send one request to the lab daemon."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(lab.daemon_socket))
        s.sendall(json.dumps(request).encode() + b"\n")
        reply = json.loads(s.makefile().readline())
    if "error" in reply:
        raise RuntimeError(f"lab daemon: {reply['error']}")
    return reply  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(prog="cairn-lab-daemon")
    parser.add_argument("lab_dir", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(Lab.load(args.lab_dir))


if __name__ == "__main__":
    main()
