"""The console fallback: questions → the same answer TOML, validated and fitted as any other."""

from __future__ import annotations

import io
import os
import select
import threading

import pytest

from installer.answer import parse_answer
from installer.interactive import Console, ask_answer, ask_on_console
from installer.matching import plan_install
from tests.installer.conftest import TOKEN, hardware

pytestmark = pytest.mark.unit


def converse(lines: list[str]) -> tuple[str, str]:
    out = io.StringIO()
    text = ask_answer(hardware("server-r640"), Console(io.StringIO("\n".join(lines) + "\n"), out))
    return text, out.getvalue()


def test_answers_typed_on_the_console_make_a_valid_answer_that_fits() -> None:
    text, shown = converse([
        "node7",            # host name
        "s3cret", "s3cret",  # root password twice
        "",                 # no SSH key
        "1",                # install disk: the first candidate (the NVMe SSD)
        "3",                # management NIC: ens1f0np0
        "2",                # static
        "10.0.0.17/24", "10.0.0.1", "10.0.0.1 10.0.0.2",
        "3",                # join
        "10.0.0.11", TOKEN,
        "install",
    ])
    answer = parse_answer(text)
    node = answer.nodes[0].answer
    assert node.hostname == "node7" and node.root_password_hash.startswith("$6$")
    assert node.cluster is not None and node.cluster.mode == "join" and node.cluster.address == "10.0.0.11"
    assert [str(d) for d in node.network.dns] == ["10.0.0.1", "10.0.0.2"]
    plan = plan_install(answer, hardware("server-r640"))
    assert plan.install_disk.path == "/dev/nvme0n1" and plan.nics[0].name == "ens1f0np0"
    assert "s3cret" not in shown and "(hashed)" in shown
    # the USB stick the installer runs from is not offered
    assert "/dev/sdg" not in shown.split("Management NIC")[0].split("Install disk")[0]


def test_a_used_disk_is_only_erased_when_the_person_types_erase_and_mistakes_are_asked_again() -> None:
    text, shown = converse([
        "node8", "pw", "other", "pw", "pw", "",   # passwords differ once
        "3", "erase",        # /dev/sdb holds partitions
        "9", "1", "1", "1",  # 9 is not a choice; NIC 1, DHCP, stand-alone
        "no",                # not confirmed: start over
        "node8", "pw", "pw", "", "1", "1", "1", "1", "install",
    ])
    assert "the passwords are empty or differ" in shown
    assert "answer a number from 1 to 4" in shown
    assert "/dev/sdb is not blank; type 'erase' to erase it" in shown
    node = parse_answer(text).nodes[0].answer
    assert node.cluster is None and node.network.mode == "dhcp"
    assert node.disks.install.serial == "S4GLNA0N123456"


def test_the_questions_run_on_a_real_terminal_with_the_password_not_echoed() -> None:
    """The console glue: a terminal (here a pty) cannot seek, and echo is off for passwords."""
    master, slave = os.openpty()
    result: dict[str, str] = {}

    def ask() -> None:
        result["text"] = ask_on_console(hardware("server-r640"), device=os.ttyname(slave))

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    seen = b""
    answers = iter([b"node9", b"pw", b"pw", b"", b"1", b"1", b"1", b"1", b"install"])
    try:
        while thread.is_alive():
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                chunk = os.read(master, 4096)
                seen += chunk
                if chunk.rstrip().endswith((b":", b"]:")):
                    os.write(master, next(answers) + b"\n")
        thread.join(5)
    finally:
        os.close(master)
        os.close(slave)
    assert parse_answer(result["text"]).nodes[0].answer.hostname == "node9"
    assert b"root password: \r\n" in seen  # what was typed for it was not echoed
    assert b"node9" in seen  # ordinary answers are
