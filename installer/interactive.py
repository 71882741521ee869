"""The console fallback: when no answer file is found, ask for one, question by question.

The questions produce the same TOML an answer file holds, and it goes through the same
validation and hardware fitting as any other answer; what the person typed is shown
back before a disk is touched.
"""

from __future__ import annotations

import os
import subprocess
import termios
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from installer.answer import load_answer
from installer.errors import AnswerError, InstallerError
from installer.hardware import Hardware
from installer.matching import candidate_problem


def hash_password(password: str) -> str:
    r = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password + "\n", capture_output=True, text=True)
    if r.returncode != 0:
        raise InstallerError(f"openssl passwd failed: {r.stderr.strip()}")
    return r.stdout.strip()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(data: dict[str, Any]) -> str:
    """A flat TOML rendering of an answer made here (values and inline tables only)."""
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in data.items())


class Console:
    """Questions on a text stream pair (the machine's console, or a test's)."""

    def __init__(self, inp: TextIO, out: TextIO, secret_off: Any = None) -> None:
        self.inp = inp
        self.out = out
        self.secret_off = secret_off

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def ask(self, question: str, default: str = "", secret: bool = False) -> str:
        prompt = f"{question}{f' [{default}]' if default else ''}: "
        if secret and self.secret_off is not None:
            with self.secret_off():  # echo off before the prompt: nothing typed after it shows
                self.write(prompt)
                line = self.inp.readline()
            self.write("\n")
        else:
            self.write(prompt)
            line = self.inp.readline()
        if not line:
            raise InstallerError("the console closed while asking for the answer")
        return line.strip() or default

    def choose(self, question: str, options: list[str], default: int = 1) -> int:
        for i, option in enumerate(options, 1):
            self.write(f"  {i}) {option}\n")
        while True:
            text = self.ask(question, str(default))
            if text.isdigit() and 1 <= int(text) <= len(options):
                return int(text) - 1
            self.write(f"  answer a number from 1 to {len(options)}\n")


def ask_answer(hw: Hardware, con: Console) -> str:
    """Ask until the answer validates; returns it as TOML text."""
    con.write("\nNo answer file found: answer a few questions to install Cairn on this machine.\n\n")
    while True:
        data = _questions(hw, con)
        text = to_toml(data)
        try:
            load_answer(data, "your answers")
        except AnswerError as exc:
            con.write(f"\n{exc.detail}\n\nLet's try again.\n\n")
            continue
        shown = text.replace(data["root_password_hash"], "(hashed)")
        con.write(f"\nThis machine will be installed with:\n{shown}\n")
        if con.ask("Type 'install' to erase the install disk and go on, anything else to start over") == "install":
            return text


def _questions(hw: Hardware, con: Console) -> dict[str, Any]:
    data: dict[str, Any] = {"hostname": con.ask("Host name", "cairn1")}
    while True:
        pw = con.ask("root password", secret=True)
        if pw and pw == con.ask("root password again", secret=True):
            break
        con.write("  the passwords are empty or differ\n")
    data["root_password_hash"] = hash_password(pw)
    key = con.ask("SSH public key for root (empty: none)")
    if key:
        data["ssh_keys"] = [key]
    disks = [d for d in hw.disks if candidate_problem(d) is None]
    if not disks:
        raise InstallerError("no disk to install to: " + "; ".join(d.describe() for d in hw.disks))
    disk = disks[con.choose("Install disk", [d.describe() for d in disks])]
    install: dict[str, Any] = {"serial": disk.serial} if disk.serial else {"size_min": disk.size,
                                                                              "size_max": disk.size}
    if not disk.blank:
        install["wipe"] = con.ask(f"{disk.path} is not blank; type 'erase' to erase it") == "erase"
    data["disks"] = {"install": install}
    if not hw.nics:
        raise InstallerError("no NIC found for the management network")
    nic = hw.nics[con.choose("Management NIC", [n.describe() for n in hw.nics])]
    network: dict[str, Any] = {"mac": nic.mac}
    if con.choose("Address", ["DHCP", "static"]) == 1:
        network.update(mode="static", address=con.ask("Address/prefix (e.g. 10.0.0.11/24)"))
        gateway = con.ask("Gateway (empty: none)")
        if gateway:
            network["gateway"] = gateway
        dns = con.ask("DNS servers, space separated (empty: none)").split()
        if dns:
            network["dns"] = dns
    data["network"] = network
    mode = con.choose("Cluster", ["stand-alone node", "first node of a new cluster (init)",
                                  "join an existing cluster"])
    if mode == 1:
        data["cluster"] = {"mode": "init"}
    elif mode == 2:
        data["cluster"] = {"mode": "join", "address": con.ask("Address of a cluster member"),
                           "token": con.ask("Join token (cairn cluster token create)")}
    return data


@contextmanager
def _no_echo(fd: int) -> Iterator[None]:
    old = termios.tcgetattr(fd)
    new = list(old)
    new[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSADRAIN, new)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def ask_on_console(hw: Hardware, device: Path = Path("/dev/console")) -> str:
    """Ask on the machine's primary console (the screen, or ``cairn.console=`` from
    the kernel command line)."""
    opts = Path("/proc/cmdline").read_text().split()
    for opt in opts:
        if opt.startswith("cairn.console="):
            device = Path(opt.partition("=")[2])
    fd = os.open(device, os.O_RDWR | os.O_NOCTTY)
    # a terminal cannot seek: one text stream to read it, another to write it
    with os.fdopen(fd, "r", buffering=1) as inp, os.fdopen(os.dup(fd), "w", buffering=1) as out:
        return ask_answer(hw, Console(inp, out, secret_off=lambda: _no_echo(fd)))
