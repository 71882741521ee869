"""The lab cluster as a test fixture: three namespaced nodes (``cairn lab up``), started
once per test session for every test that asks for ``lab_cluster`` and removed at the
end (also after failures), with a check that nothing of it is left on the host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.lab import host, ops
from appliance.lab.layout import Lab
from network.netlink import netns_list

LAB_NODES = 3
OSD_SIZE = 4 << 30


@dataclass
class LabCluster:
    dir: Path

    @property
    def lab(self) -> Lab:
        return Lab.load(self.dir)

    def cairn(self, node: str, *args: str, timeout: float = 180) -> Any:
        """``cairn <args> -o json`` inside a node; the parsed output."""
        return ops.cairn_in_node(self.lab, node, *args, timeout=timeout)

    def cairn_rc(self, node: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """``cairn <args>`` inside a node, without raising on a non-zero exit."""
        return ops.run_in_node(self.lab, node, [sys.executable, "-m", "appliance.cli.main", *args],
                               timeout=timeout, check=False)

    def run(self, node: str, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return ops.run_in_node(self.lab, node, argv, timeout=timeout, check=False)

    def view(self, via: str | None = None) -> dict[str, Any]:
        return ops.cluster_view(self.lab, via)

    def wait_healthy(self, timeout: float = 300) -> dict[str, Any]:
        return ops.wait_healthy(self.lab, timeout)

    def database_trouble(self, via: str | None = None, *members: str) -> str:
        """Why a member's database is not up (or ``members``' databases are not as they should
        be), from its node's files (for a failure message)."""
        try:
            return ops.database_trouble(self.lab, self.view(via), members=members)
        except Exception as exc:  # the message it adds to must not be lost
            return f"\n(no database report: {exc})"

    def popen(self, node: str, argv: list[str], stderr: int | None = None) -> subprocess.Popen[str]:
        """A program started inside ``node`` (its namespaces and cgroup), its stdout piped
        (``stderr=subprocess.STDOUT``: its stderr too)."""
        pid = ops.boot_pid(self.lab, node)
        assert pid is not None, f"{node} is not running"
        cg = self.lab.node_cgroup(node)
        return subprocess.Popen(["nsenter", f"--target={pid}", "--net", "--mount", "--uts", "--", *argv],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=ops.node_env(),
                                preexec_fn=host.in_cgroup(cg))

    def writer(self, node: str, prefix: str, interval: float = 0.2, seconds: float = 60) -> subprocess.Popen[str]:
        """The write probe (appliance.lab.writer) running inside ``node``."""
        return self.popen(node, [sys.executable, "-m", "appliance.lab.writer", "--prefix", prefix,
                                 "--interval", str(interval), "--seconds", str(seconds)])

    @staticmethod
    def writes(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
        """Every attempt the writer printed (it has ended)."""
        out, _ = proc.communicate(timeout=120)
        return [json.loads(line) for line in out.splitlines() if line.strip() and "summary" not in line]


def wait_for(what: str, fn: Any, seconds: float = 120, every: float = 1.0) -> Any:
    """``fn()``'s first true value, tried every ``every`` seconds (an exception counts as
    not yet: a node answers 503 while the database fails over)."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}; last: {last!r}")


def leftovers(lab: Lab) -> list[str]:
    """What the lab would have left on the host."""
    found = [f"netns {ns}" for ns in netns_list() if ns.startswith(lab.prefix)]
    if Path(lab.cgroup).exists():
        found.append(f"cgroup {lab.cgroup}")
    if lab.path.exists():
        found.append(f"folder {lab.path}")
    return found


@pytest.fixture(scope="session")
def lab_cluster() -> Iterator[LabCluster]:
    reuse = os.environ.get("CAIRN_TEST_LAB_DIR")
    if reuse:  # development: a lab you brought up (`cairn lab up --dir D`) and take down yourself
        yield LabCluster(Path(reuse))
        return
    d = Path(tempfile.mkdtemp(prefix="cairn-lab-"))
    lab: Lab | None = None
    try:
        ops.up(LAB_NODES, d, osd_size=OSD_SIZE, timeout=600)
        lab = Lab.load(d)
        yield LabCluster(d)
    finally:
        lab = lab or (Lab.load(d) if (d / "lab.json").exists() else None)
        if lab is not None:
            # `cairn lab down` must work after a crash of the lab tool: crash its daemon first
            try:
                os.kill(int((d / "daemon.pid").read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
            ops.down(d)
            left = leftovers(lab)
            assert not left, f"`cairn lab down` left things behind: {left}"
