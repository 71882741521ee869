"""First boot of an installed node, in two steps (each a systemd unit, until it succeeded).

1. ``cairn-form.service``, on nodes whose answer has a cluster section (the installer
   writes /etc/cairn/form-cluster), before any of the node's services starts (a cluster
   starts on fresh nodes): runs ``cairn cluster init`` or ``cairn cluster join <address> <token>``
   as the answer asks (nothing for a stand-alone node) and records the outcome in
   /var/lib/cairn/firstboot.form.json; once it succeeded it is not run again.
2. ``cairn-firstboot.service``, after the node's services: waits for the API and the
   node agent, logs root's CLI in, and shows the result on the consoles:

       CAIRN-FIRSTBOOT: OK
       CAIRN-STATUS: {"nodes": {...}, ...}                 (cairn status -o json)
       CAIRN-CLUSTER: {"members": [...], "quorum": true}   (cairn cluster status, cluster nodes)

   or ``CAIRN-FIRSTBOOT: FAIL <reason>`` with the state and last log lines of the
   node's units. Only success marks the first boot done.
"""

from __future__ import annotations

import json
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
FORM_RESULT = "firstboot.form.json"  # in the data dir
MARKER = "CAIRN-FIRSTBOOT"
CAIRN = str(Path(sys.executable).parent / "cairn")
Runner = Callable[..., subprocess.CompletedProcess[str]]


def cluster_command(answer: NodeAnswer) -> list[str] | None:
    """The CLI command that forms (or joins) the cluster, exactly as an operator types it."""
    if answer.cluster is None:
        return None
    if answer.cluster.mode == "init":
        return [CAIRN, "cluster", "init"]
    assert answer.cluster.address and answer.cluster.token
    return [CAIRN, "cluster", "join", answer.cluster.address, answer.cluster.token]


def _shown(argv: list[str]) -> str:
    """The command as a person types it, without the join token."""
    words = [Path(argv[0]).name, *argv[1:]]
    if len(words) >= 5 and words[1:3] == ["cluster", "join"]:
        words[4] = "<token>"
    return " ".join(words)


class FirstBoot:
    def __init__(self, reporter: Reporter, node_json: Path = NODE_JSON, run: Runner = subprocess.run,
                 timeout: float = 1800.0) -> None:
        self.report = reporter
        self.node_json = node_json
        self.run_cmd = run
        self.timeout = timeout

    def _answer(self) -> NodeAnswer:
        try:
            doc = json.loads(self.node_json.read_text())
            return NodeAnswer.model_validate(doc["answer"])
        except (OSError, ValueError, KeyError) as exc:
            raise InstallerError(f"{self.node_json}: {exc} (written by the installer; was this node installed "
                                 "from the ISO?)")

    def _fail(self, exc: Exception, diagnostics: bool) -> int:
        reason = exc.detail if isinstance(exc, InstallerError) else f"{type(exc).__name__}: {exc}"
        self.report.say("FAIL " + " / ".join(reason.splitlines())[:2000])
        for line in self._diagnostics() if diagnostics else []:
            self.report.raw(f"{MARKER}:   {line}")
        return 1

    def form(self) -> int:
        """Step 1: the cluster command, on a node whose services have not started yet."""
        from appliance.settings import get_settings

        result = get_settings().data_dir / FORM_RESULT
        try:
            previous = json.loads(result.read_text())
        except (OSError, ValueError):
            previous = {}
        if previous.get("ok"):
            return 0
        result.parent.mkdir(parents=True, exist_ok=True)
        try:
            command = cluster_command(self._answer())
            if command:
                self.report.say(f"running `{_shown(command)}`")
                r = self.run_cmd(command, capture_output=True, text=True, timeout=self.timeout)
                if r.returncode != 0:
                    words = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()[-5:]
                    raise InstallerError(f"`{_shown(command)}` failed: {' / '.join(words)}")
        except Exception as exc:
            reason = exc.detail if isinstance(exc, InstallerError) else f"{type(exc).__name__}: {exc}"
            result.write_text(json.dumps({"ok": False, "reason": reason}) + "\n")
            return self._fail(exc, diagnostics=False)
        result.write_text(json.dumps({"ok": True, "command": _shown(command) if command else None}) + "\n")
        return 0

    def run(self) -> int:
        """Step 2: the node answers; show it."""
        from appliance.settings import get_settings

        settings = get_settings()
        try:
            status = self._report(settings)
        except Exception as exc:
            return self._fail(exc, diagnostics=True)
        (settings.data_dir / "firstboot.done").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
        self.report.say("OK")
        for key, doc in status.items():
            self.report.raw(f"CAIRN-{key.upper()}: " + json.dumps(doc, separators=(",", ":"), sort_keys=True))
        return 0

    def _report(self, settings: Any) -> dict[str, Any]:
        answer = self._answer()
        if answer.cluster is not None:
            try:
                formed = json.loads((settings.data_dir / FORM_RESULT).read_text())
            except (OSError, ValueError):
                formed = {"ok": False, "reason": "cairn-form.service did not run"}
            if not formed.get("ok"):
                raise InstallerError(f"forming the cluster failed: {formed.get('reason')}")
        self.report.say(f"node {answer.node_name}: waiting for the API")
        self._wait_api(settings)
        # imported only now: the control plane's modules take a while to load, and the
        # node's own services are starting on the same CPUs
        from appliance.cli import local

        local.ensure_cli_token(settings)
        self.report.say("waiting for the node agent (node Ready)")
        try:
            local.wait_ready(settings, self.timeout, quiet=True)
        except SystemExit as exc:
            raise InstallerError(str(exc))
        shown = {"status": self._json([CAIRN, "status", "--output", "json"])}
        if answer.cluster is not None:
            shown["cluster"] = self._json([CAIRN, "cluster", "status", "--output", "json"])
        return shown

    def _json(self, argv: list[str]) -> Any:
        r = self.run_cmd(argv, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise InstallerError(f"`{_shown(argv)}` failed: {r.stderr.strip()[-500:]}")
        return json.loads(r.stdout)

    def _diagnostics(self) -> list[str]:
        """The state and last log lines of the node's units, for whoever reads the console."""
        from appliance.cli.local import APPLIANCE_UNITS

        lines = []
        for unit in APPLIANCE_UNITS.values():
            state = self.run_cmd(["systemctl", "is-active", unit], capture_output=True, text=True).stdout.strip()
            lines.append(f"{unit}: {state}")
            if state != "active":
                log = self.run_cmd(["journalctl", "--no-pager", "-o", "cat", "-n", "8", "-u", unit],
                                   capture_output=True, text=True).stdout
                lines += [f"  {line}" for line in log.splitlines()]
        return lines

    def _wait_api(self, settings: Any) -> None:
        from appliance.cli.client import ApiError, Client

        deadline = time.monotonic() + self.timeout
        last = ""
        while time.monotonic() < deadline:
            try:  # a new client each time: the API makes the CA it must trust when it first starts
                Client(url=settings.resolved_api_url, ca=str(settings.pki_dir / "ca.crt")).get("/health")
                return
            except ApiError as exc:
                last = exc.detail
            time.sleep(1)
        raise InstallerError(f"the API did not answer within {self.timeout:g} s: {last}")


def main_firstboot(step: str) -> int:
    boot = FirstBoot(Reporter(MARKER, log=Path("/var/log/cairn-firstboot.log")))
    return boot.form() if step == "form" else boot.run()
