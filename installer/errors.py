"""The installer's exception hierarchy. Each message tells a person what to fix."""

from __future__ import annotations


class InstallerError(Exception):
    """Base of every installer error; ``str()`` is the message for the console."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class AnswerError(InstallerError):
    """The answer file is not valid on its own: every problem, each naming its key."""

    def __init__(self, problems: list[str], source: str = "answer file") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


class HardwareMismatch(InstallerError):
    """The answer is valid but does not fit this machine (disk or NIC filters, node selection)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("the answer does not fit this machine:\n" + "\n".join(f"  - {p}" for p in problems))


class AnswerNotFound(InstallerError):
    """No answer baked in, on a CAIRN-ANS volume or at a URL."""


class AnswerFetchError(InstallerError):
    """The answer URL could not be fetched or its TLS certificate did not match the fingerprint."""


class InstallFailed(InstallerError):
    """A step of the install itself failed (partitioning, copying, bootloader)."""


class BuildError(InstallerError):
    """Building the ISO failed (a tool failed, an input is missing)."""
