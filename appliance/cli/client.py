"""The CLI's view of a Cairn API: URL + token + CA, from ``~/.config/cairn/config.json``."""

from __future__ import annotations

import json
import os
import ssl
import time
from pathlib import Path
from typing import Any

import httpx

from appliance.errors import CairnError


def config_path() -> Path:
    env = os.environ.get("CAIRN_CONFIG")
    return Path(env) if env else Path.home() / ".config" / "cairn" / "config.json"


def load_config() -> dict[str, Any]:
    try:
        return json.loads(config_path().read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def save_config(cfg: dict[str, Any]) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, indent=1)
    return path


class ApiError(CairnError):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("detail") or body.get("title") or f"HTTP {status}")
        self.status = status
        self.body = body


class Client:
    """A thin httpx wrapper: raises ApiError with the problem's detail on 4xx/5xx."""

    def __init__(self, url: str | None = None, token: str | None = None, ca: str | None = None) -> None:
        cfg = load_config()
        self.url = (url or os.environ.get("CAIRN_URL") or cfg.get("url") or "https://127.0.0.1:8443").rstrip("/")
        self.token = token or os.environ.get("CAIRN_TOKEN") or cfg.get("token")
        ca = ca or cfg.get("ca_file")
        verify: Any = ssl.create_default_context(cafile=ca) if ca and Path(ca).exists() else True
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, verify=verify, timeout=30.0)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self.http.request(method, "/api/v1" + path, **kw)
        except httpx.TransportError as exc:
            raise ApiError(0, {"detail": f"cannot reach the Cairn API at {self.url}: {exc}. "
                                         "Is it running? (`cairn up`)"})
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"detail": response.text[:300]}
            raise ApiError(response.status_code, body)
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, body: Any = None) -> Any:
        r = self.request("POST", path, json=body)
        return r.json() if r.content else None

    def patch(self, path: str, body: Any, if_match: int | None = None) -> Any:
        headers = {"If-Match": str(if_match)} if if_match is not None else {}
        return self.request("PATCH", path, json=body, headers=headers).json()

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def list_all(self, path: str, limit: int = 500, **params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self.get(path, limit=limit, cursor=cursor, **params)
            items.extend(page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                return items

    def wait_task(self, task_id: str, on_progress: Any = None, timeout: float = 3600) -> dict[str, Any]:
        """Poll a task until it ends; ``on_progress(task)`` after every poll."""
        deadline = time.monotonic() + timeout
        while True:
            task = self.get(f"/tasks/{task_id}")
            if on_progress:
                on_progress(task)
            if task["state"] in ("succeeded", "failed", "cancelled"):
                return task  # type: ignore[no-any-return]
            if time.monotonic() > deadline:
                raise ApiError(0, {"detail": f"task {task_id} still {task['state']} after {timeout:g} s"})
            time.sleep(0.3)
