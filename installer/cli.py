"""``cairn-installer``: build the ISO, check answer files, and (on the live system and
the installed node) install and first boot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from installer.answer import read_answer
from installer.errors import InstallerError
from installer.hardware import Hardware, collect, to_json

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Cairn installer: build the ISO, validate answer files, install nodes.")
err = Console(stderr=True)


def _fail(exc: InstallerError, code: int = 1) -> NoReturn:
    typer.echo(exc.detail, err=True)
    raise typer.Exit(code)


@app.command("build-iso")
def build_iso(
    output: Annotated[Path, typer.Option("--output", "-o", help="where to write the ISO")],
    cache_dir: Annotated[Path | None, typer.Option(help="build cache (default /var/cache/cairn-installer "
                                                         "or $CAIRN_INSTALLER_CACHE)")] = None,
    compression_level: Annotated[int, typer.Option(min=1, max=22, help="zstd level of the squashfs layers")] = 9,
    json_output: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Build the hybrid BIOS/UEFI installer ISO (Debian 12 + Cairn, installs offline)."""
    from installer.build import DEFAULT_CACHE, Builder

    with err.status("building") as status:
        def progress(message: str) -> None:
            status.update(message)
            err.print(f"[dim]·[/dim] {message}", highlight=False)

        try:
            result = Builder(cache_dir=cache_dir or DEFAULT_CACHE, compression_level=compression_level,
                             progress=progress).build(output)
        except InstallerError as exc:
            _fail(exc)
    if json_output:
        print(json.dumps(result.to_json(), indent=1))
        return
    how = "from the cache" if result.cached else "built"
    typer.echo(f"{result.iso}: {result.size / 2**20:.1f} MiB ({how}, {result.seconds['total']:.1f} s)")


@app.command()
def validate(
    answer: Annotated[Path, typer.Argument(help="answer file (TOML)")],
    hardware: Annotated[Path | None, typer.Option(help="device-info JSON of the machine to check it against")] = None,
) -> None:
    """Check an answer file offline (exit 0), or list every problem, each naming its key (exit 1)."""
    from installer.matching import plan_install

    try:
        parsed = read_answer(answer)
        if hardware is None:
            nodes = ", ".join(e.label if e.match else e.answer.hostname for e in parsed.nodes)
            typer.echo(f"{answer}: valid ({len(parsed.nodes)} node{'s' if len(parsed.nodes) > 1 else ''}: {nodes})")
            return
        try:
            hw = Hardware.model_validate_json(hardware.read_text())
        except (OSError, ValueError) as exc:
            raise InstallerError(f"{hardware}: not a device-info JSON file ({exc})")
        plan = plan_install(parsed, hw)
    except InstallerError as exc:
        _fail(exc)
    typer.echo(f"{answer}: valid, and fits {hardware} as {plan.entry.label}:")
    typer.echo(json.dumps(plan.summary(), indent=1))


@app.command("device-info")
def device_info() -> None:
    """This machine's disks, NICs and SMBIOS serial, as JSON (for validate --hardware)."""
    sys.stdout.write(to_json(collect()))


@app.command("prepare-iso")
def prepare_iso(
    answer: Annotated[Path, typer.Option("--answer", help="answer file to bake in")],
    source: Annotated[Path, typer.Argument(help="installer ISO")],
    dest: Annotated[Path, typer.Argument(help="new ISO with the answer inside")],
) -> None:
    """Copy an ISO with an answer file baked in: it then installs unattended with nothing else attached."""
    from installer.media import prepare_iso as prepare

    try:
        prepare(answer, source, dest)
    except InstallerError as exc:
        _fail(exc)
    typer.echo(f"{dest}: {source.name} with {answer.name} baked in")


@app.command(hidden=True)
def install() -> None:
    """Run the installer (the live system's cairn-install.service)."""
    from installer.session import main_install

    raise typer.Exit(main_install())


@app.command(hidden=True)
def firstboot() -> None:
    """First boot of an installed node (cairn-firstboot.service): start it as its answer says."""
    from installer.firstboot import main_firstboot

    raise typer.Exit(main_firstboot())


if __name__ == "__main__":
    app()
