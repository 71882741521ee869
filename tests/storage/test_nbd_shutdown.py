"""Shutting the NBD server down while a cluster duty's backend call runs."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from storage.engine import open_pool
from storage.nbd import server as nbd_server
from storage.nbd.server import NbdServer


@pytest.mark.unit
def test_close_waits_for_a_cluster_duty_still_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM came while the duties were listing the cluster's index objects. The pool's
    connection must outlive that call: librados never returns a call whose client was
    shut down under it, and the process then hung in its exit for good (seen in a bench)."""
    monkeypatch.setattr(nbd_server, "MAINTAIN_EVERY", 0.01)
    monkeypatch.setattr(nbd_server, "REFRESH_EVERY", 0.0)
    pool = open_pool(f"local://{tmp_path / 'pool'}")
    events: list[str] = []
    inside = threading.Event()
    real_fetch, real_close = pool.log.fetch_indexes, pool.close

    def slow_fetch() -> Any:
        inside.set()
        time.sleep(0.5)
        events.append("duty returned")
        return real_fetch()

    def close(*args: Any, **kwargs: Any) -> None:
        events.append("pool closed")
        real_close(*args, **kwargs)

    monkeypatch.setattr(pool.log, "fetch_indexes", slow_fetch)
    monkeypatch.setattr(pool, "close", close)

    async def serve_then_stop() -> None:
        server = NbdServer(pool)
        await server.listen_unix(str(tmp_path / "nbd.sock"))
        while not inside.is_set():
            await asyncio.sleep(0.01)
        await server.close()

    asyncio.run(asyncio.wait_for(serve_then_stop(), 30))
    assert events == ["duty returned", "pool closed"]


@pytest.mark.unit
def test_the_storage_daemon_closes_a_pool_only_after_its_control_calls_return(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A control request (here ``stats``) still running on a thread when the daemon
    stops: its pool is closed after the call returned, not under it (as above)."""
    from storage.daemon import StorageDaemon

    events: list[str] = []
    inside = threading.Event()

    async def stats_then_stop() -> None:
        daemon = StorageDaemon(tmp_path / "run")
        (tmp_path / "run").mkdir()
        await daemon.attach("p", f"local://{tmp_path / 'pool'}")
        pool = daemon.pools["p"].pool
        real_stats, real_close = pool.stats, pool.close

        def slow_stats(*args: Any) -> Any:
            inside.set()
            time.sleep(0.5)
            events.append("stats returned")
            return real_stats(*args)

        def close(*args: Any, **kwargs: Any) -> None:
            events.append("pool closed")
            real_close(*args, **kwargs)

        monkeypatch.setattr(pool, "stats", slow_stats)
        monkeypatch.setattr(pool, "close", close)
        request = asyncio.create_task(daemon.handle({"op": "stats", "pool": "p"}))
        while not inside.is_set():
            await asyncio.sleep(0.01)
        await daemon.close()
        await request

    asyncio.run(asyncio.wait_for(stats_then_stop(), 30))
    assert events[:2] == ["stats returned", "pool closed"]
