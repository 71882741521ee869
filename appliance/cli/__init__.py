"""The ``cairn`` command line (typer + rich) over the REST API."""
