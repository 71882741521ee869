"""House rules as tests: ruff, mypy, import-linter layer contracts, which modules
may import the system bindings, and the development compose file."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PACKAGES = ["appliance", "storage", "network", "compute", "installer"]
# binding -> the only modules allowed to import it (DESIGN.md, Names and layout)
OWNERS = {
    "libvirt": ("compute/libvirt",),
    "pyroute2": ("network/netlink",),
    "rados": ("storage/backends/rados",),
    "rbd": ("storage/backends/rados",),
}


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    r = run(str(BIN / "ruff"), "check", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_is_clean() -> None:
    r = run(str(BIN / "mypy"), *[p for p in PACKAGES if (ROOT / p).is_dir()])
    assert r.returncode == 0, r.stdout + r.stderr


def test_import_linter_contracts_are_kept() -> None:
    r = run(str(BIN / "lint-imports"))
    assert r.returncode == 0, r.stdout + r.stderr


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_the_owning_modules_import_system_bindings() -> None:
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            for binding in imported_roots(path) & set(OWNERS):
                if not rel.startswith(OWNERS[binding]):
                    offenders.append(f"{rel} imports {binding}")
    assert offenders == []


def test_docker_compose_file_is_valid() -> None:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed (apt package 'docker-compose'): run ./bootstrap.sh test"
    r = run(exe, "-f", "docker-compose.yml", "config", "-q")
    assert r.returncode == 0, r.stderr
    services = run(exe, "-f", "docker-compose.yml", "config", "--services").stdout.split()
    assert set(services) == {"api", "worker", "agent", "redis", "postgres"}
