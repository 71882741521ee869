"""Structured JSON logs for every Cairn process (one object per line)."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter


def setup(process: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                      rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                      static_fields={"process_name": process})
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access", "httpx", "httpcore", "urllib3", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
