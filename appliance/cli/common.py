"""What every command group shares: the API client, error exit, task following."""

from __future__ import annotations

import sys
from typing import Annotated, Any, NoReturn

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from appliance.cli.client import ApiError, Client
from appliance.cli.output import Format, emit, err_console

ProjectArg = Annotated[str, typer.Option("--project", "-p", help="project")]
NoWait = Annotated[bool, typer.Option("--no-wait", help="return at once with the task")]


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def client() -> Client:
    return Client()


def run(fn: Any) -> Any:
    try:
        return fn()
    except ApiError as exc:
        fail(exc.detail)


def wait(c: Client, task: dict[str, Any], output: Format) -> dict[str, Any]:
    """Wait for a task with a progress bar (quiet for --output json); exit 1 with the
    task's error if it failed. Prints nothing else."""
    if output == Format.json or not sys.stderr.isatty():
        final = c.wait_task(task["id"])
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TextColumn("{task.fields[msg]}"), TimeElapsedColumn(), console=err_console) as bar:
            row = bar.add_task(task["name"], total=100, msg="")

            def show(t: dict[str, Any]) -> None:
                bar.update(row, completed=t["progress"]["percent"], msg=t["progress"]["message"])

            final = c.wait_task(task["id"], show)
    if final["state"] != "succeeded":
        fail(f"{final['name']} {final['state']}: {final.get('error') or final['progress']['message']}")
    return final


def follow(c: Client, task: dict[str, Any], output: Format) -> dict[str, Any]:
    """Wait for a task (see ``wait``) and print it."""
    final = c.wait_task(task["id"]) if output == Format.json or not sys.stderr.isatty() else wait(c, task, output)
    emit(final, output)
    if final["state"] != "succeeded":
        raise typer.Exit(1)
    return final
