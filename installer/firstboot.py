"""First boot of an installed node (``cairn-firstboot.service``, until it succeeded).

The node's services (``cairn.target``) are not enabled by the installer: first boot
starts the node with exactly the command an operator would type, as the answer says,

- no cluster section: ``cairn up``;
- ``mode = "init"``: ``cairn cluster init [--address <static address>] [--osd <data disk>]… [--timing …]``;
- ``mode = "join"``: ``cairn cluster join <member> <token> [--address …] [--osd …]``, tried
  again while the member cannot be reached or is busy (nodes installed from one answer
  file boot in any order; the init node may still be installing), never after a
  refusal (a wrong, used or expired token, another cluster's CA);

(each enables and starts ``cairn.target``, waits for the node to be Ready and logs root's
CLI in), then shows the result on the consoles::

    CAIRN-FIRSTBOOT: OK
    CAIRN-STATUS: {"nodes": {...}, ...}                 (cairn status -o json)
    CAIRN-CLUSTER: {"members": [...], "quorum": true}   (cairn cluster status -o json, cluster nodes)

or ``CAIRN-FIRSTBOOT: FAIL <reason>`` with the state and last log lines of the node's
units; it tries again at the next boot (a node that already formed or joined runs
``cairn up`` then). Only success marks the first boot done.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from installer.answer import NodeAnswer
from installer.console import Reporter
from installer.errors import InstallerError

NODE_JSON = Path("/etc/cairn/node.json")
MARKER = "CAIRN-FIRSTBOOT"
CAIRN = str(Path(sys.executable).parent / "cairn")
Runner = Callable[..., subprocess.CompletedProcess[str]]
# A join the member refused (4xx) or a member that is not the token's cluster: trying
# again cannot help. Anything else (unreachable, 5xx, a timeout) is tried again.
REFUSED = re.compile(r"refused the join \(4\d\d\)|is not the one the token names|token is malformed")


def node_command(answer: NodeAnswer, data_disks: list[str], formed: bool, timeout: float) -> list[str]:
    """The command that starts this node, as an operator types it (``--output json`` and a
    timeout added). ``formed``: this node already inited or joined (an earlier try)."""
    common = ["--output", "json", "--timeout", f"{timeout:g}"]
    if answer.cluster is None or formed:
        return [CAIRN, "up", *common]
    extra = ["--address", str(answer.network.address.ip)] if answer.network.address else []
    for disk in data_disks:
        extra += ["--osd", disk]
    if answer.cluster.mode == "init":
        timing = ["--timing", answer.cluster.timing] if answer.cluster.timing else []
        return [CAIRN, "cluster", "init", *extra, *timing, *common]
    assert answer.cluster.address and answer.cluster.token
    return [CAIRN, "cluster", "join", *extra, *common, answer.cluster.address, answer.cluster.token]


def shown(argv: list[str]) -> str:
    """The command as a person types it, without the join token or the added options."""
    words = [Path(argv[0]).name, *argv[1:]]
    if words[1:3] == ["cluster", "join"]:
        words[-1] = "<token>"
    cut = words.index("--output") if "--output" in words else len(words)
    return " ".join(words[:cut] + words[cut + 4:])


class FirstBoot:
    def __init__(self, reporter: Reporter, node_json: Path = NODE_JSON, run: Runner = subprocess.run,
                 timeout: float = 3600.0, retry_every: float = 20.0, sleep: Callable[[float], None] = time.sleep,
                 formed: Callable[[], bool] | None = None, diagnostics: Callable[[], list[str]] | None = None,
                 ) -> None:
        self.report = reporter
        self.node_json = node_json
        self.run_cmd = run
        self.timeout = timeout
        self.retry_every = retry_every
        self.sleep = sleep
        self.formed = formed or _formed
        self.diagnostics = diagnostics or _diagnostics

    def _node(self) -> tuple[NodeAnswer, list[str]]:
        try:
            doc = json.loads(self.node_json.read_text())
            return NodeAnswer.model_validate(doc["answer"]), list(doc.get("data_disks", []))
        except (OSError, ValueError, KeyError) as exc:
            raise InstallerError(f"{self.node_json}: {exc} (written by the installer; was this node installed "
                                 "from the ISO?)")

    def run(self) -> int:
        try:
            answer, data_disks = self._node()
            deadline = time.monotonic() + self.timeout
            self._start(answer, data_disks, deadline)
            shown_status = {"status": self._json([CAIRN, "status", "--output", "json"], deadline)}
            if answer.cluster is not None:
                shown_status["cluster"] = self._json([CAIRN, "cluster", "status", "--output", "json"], deadline)
        except Exception as exc:
            reason = exc.detail if isinstance(exc, InstallerError) else f"{type(exc).__name__}: {exc}"
            self.report.say("FAIL " + " / ".join(reason.splitlines())[:2000])
            for line in self.diagnostics():
                self.report.raw(f"{MARKER}:   {line}")
            return 1
        _done()
        self.report.say("OK")
        for key, doc in shown_status.items():
            self.report.raw(f"CAIRN-{key.upper()}: " + json.dumps(doc, separators=(",", ":"), sort_keys=True))
        return 0

    def _start(self, answer: NodeAnswer, data_disks: list[str], deadline: float) -> None:
        tries = 0
        while True:
            tries += 1
            argv = node_command(answer, data_disks, self.formed(), max(60.0, deadline - time.monotonic()))
            self.report.say(f"node {answer.node_name}: running `{shown(argv)}`" + (f" (try {tries})" if tries > 1
                                                                                   else ""))
            r = self.run_cmd(argv, capture_output=True, text=True, timeout=self.timeout + 60)
            if r.returncode == 0:
                return
            words = " / ".join((r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()[-5:])
            failed = f"`{shown(argv)}` failed: {words}"
            joining = argv[1:3] == ["cluster", "join"]
            if not joining or REFUSED.search(words) or time.monotonic() + self.retry_every > deadline:
                raise InstallerError(failed)
            self.report.say(f"{failed}; trying again in {self.retry_every:g} s")
            self.sleep(self.retry_every)

    def _json(self, argv: list[str], deadline: float) -> Any:
        """A read of the started node, tried again until the first boot's deadline: a node
        that just joined a busy cluster may take minutes to answer its first status."""
        while True:
            try:
                r = self.run_cmd(argv, capture_output=True, text=True, timeout=120)
                if r.returncode == 0:
                    return json.loads(r.stdout)
                failed = f"`{shown(argv)}` failed: {r.stderr.strip()[-500:]}"
            except subprocess.TimeoutExpired:
                failed = f"`{shown(argv)}` did not answer within 120 s"
            if time.monotonic() + self.retry_every > deadline:
                raise InstallerError(failed)
            self.report.say(f"{failed}; trying again in {self.retry_every:g} s")
            self.sleep(self.retry_every)


def _formed() -> bool:
    from appliance.settings import get_settings

    return get_settings().cluster is not None


def _done() -> None:
    from appliance.settings import get_settings

    done = get_settings().data_dir / "firstboot.done"
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))


def _diagnostics() -> list[str]:
    from appliance import units

    return units.diagnostics()


def main_firstboot() -> int:
    return FirstBoot(Reporter(MARKER, log=Path("/var/log/cairn-firstboot.log"))).run()
