"""One run of the installer on the live system, from finding the answer to rebooting.

Order matters and is the installer's promise: the answer is found, parsed, validated
and fitted to this machine's disks and NICs *before* anything writes to a disk; every
outcome ends in one line on the serial console and the screen,
``CAIRN-INSTALL: OK`` or ``CAIRN-INSTALL: FAIL <reason>`` (and in the optional webhook).
"""

from __future__ import annotations

import json
import subprocess
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from installer import interactive
from installer.answer import AnswerFile, NodeAnswer, parse_answer
from installer.console import Reporter
from installer.discovery import find_answer, https_request, kernel_options
from installer.errors import AnswerNotFound, InstallerError
from installer.hardware import Hardware, collect, to_json
from installer.install import install
from installer.matching import InstallPlan, plan_install
from installer.media import Medium
from installer.target import networkd_files

RUN_DIR = Path("/run/cairn-installer")
MARKER = "CAIRN-INSTALL"


class Session:
    def __init__(self, medium: Medium, cmdline: str, reporter: Reporter,
                 collect_hw: Callable[[], Hardware] = collect, power: Callable[[str], None] | None = None,
                 find: Callable[..., Any] = find_answer, ask: Callable[[Hardware], str] | None = None,
                 run_dir: Path = RUN_DIR, network_up: Callable[[NodeAnswer], None] | None = None) -> None:
        self.medium = medium
        self.cmdline = cmdline
        self.opts = kernel_options(cmdline)
        self.report = reporter
        self.collect_hw = collect_hw
        self.power = power or _power
        self.find = find
        self.ask = ask or interactive.ask_on_console
        self.run_dir = run_dir
        self.network_up = network_up or _live_network
        self.plan: InstallPlan | None = None
        self.answer: AnswerFile | None = None
        self.hw: Hardware | None = None

    def say(self, message: str) -> None:
        self.report.say(message)

    def run(self) -> int:
        try:
            self._run()
        except Exception as exc:  # every outcome ends in a marker line, bugs included
            reason = exc.detail if isinstance(exc, InstallerError) else f"{type(exc).__name__}: {exc}"
            first, *details = reason.splitlines() or ["unknown error"]
            self.say(f"FAIL {first}")
            for line in details:
                self.report.raw(f"{MARKER}:   {line}")
            if not isinstance(exc, InstallerError):
                self.report.raw("".join(traceback.format_exception(exc))[-3000:])
            self._webhook("fail", first)
            return 1
        self.say("OK")
        self._webhook("ok", "")
        after = self.plan.answer.install.after if self.plan else "reboot"
        self.say(f"done; {after} in 3 s")
        self.power(after)
        return 0

    def _run(self) -> None:
        self.say("looking for the answer file")
        self.hw = self.collect_hw()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "device-info.json").write_text(to_json(self.hw))
        if "interactive" in self.opts:
            text, source = self.ask(self.hw), "the console"
        else:
            try:
                found = self.find(self.medium, self.cmdline)
                text, source = found.text, found.source
            except AnswerNotFound as exc:
                self.say(f"{exc.detail}; asking on the console")
                text, source = self.ask(self.hw), "the console"
        self.say(f"answer from {source}")
        self.answer = parse_answer(text, f"answer from {source}")
        self.plan = plan_install(self.answer, self.hw)
        self.say("plan " + json.dumps(self.plan.summary(), separators=(",", ":")))
        install(self.plan, self.medium, self.say, keep=(self.run_dir / "device-info.json",
                                                                self.run_dir / "install.log"))

    def _webhook(self, status: str, reason: str) -> None:
        answer = self._node_answer()
        hook = answer.install.webhook if answer else None
        if answer is None or hook is None:
            return
        try:
            self.network_up(answer)
            body = json.dumps({
                "status": status, "reason": reason, "hostname": answer.hostname,
                "serial": self.hw.system.serial if self.hw else "",
                "macs": [n.mac for n in self.hw.nics] if self.hw else [],
                "install_disk": self.plan.install_disk.path if self.plan else None,
            }).encode()
            code, _ = https_request(hook.url, hook.fingerprint, "POST", body, {"Content-Type": "application/json"})
            self.say(f"webhook {hook.url}: HTTP {code}")
        except InstallerError as exc:
            self.say(f"webhook {hook.url} failed: {exc.detail}")

    def _node_answer(self) -> NodeAnswer | None:
        if self.plan:
            return self.plan.answer
        if self.answer and self.answer.single:
            return self.answer.nodes[0].answer
        return None


def _live_network(answer: NodeAnswer) -> None:
    """The answer's management network, on the live system (to reach the webhook)."""
    netdir = Path("/run/systemd/network")
    netdir.mkdir(parents=True, exist_ok=True)
    for name, text in networkd_files(answer.network).items():
        (netdir / name).write_text(text)
    subprocess.run(["systemctl", "restart", "systemd-networkd.service"], capture_output=True)
    subprocess.run(["/lib/systemd/systemd-networkd-wait-online", "--any", "--timeout=60"], capture_output=True)


def _power(after: str) -> None:
    """Eject the CD (so the next boot is the disk's), then reboot or power off."""
    import time

    time.sleep(3)
    src = subprocess.run(["findmnt", "-no", "SOURCE", str(Medium().root)], capture_output=True, text=True)
    if src.stdout.strip().startswith("/dev/sr"):
        subprocess.run(["eject", src.stdout.strip()], capture_output=True)
    subprocess.run(["systemctl", "--no-block", after], capture_output=True)


def main_install() -> int:
    cmdline = Path("/proc/cmdline").read_text()
    reporter = Reporter(MARKER, log=RUN_DIR / "install.log")
    return Session(Medium(), cmdline, reporter).run()
