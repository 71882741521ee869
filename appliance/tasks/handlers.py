"""Task handlers shipped with the control plane. Each is registered by name and
runs inside a worker with a TaskContext (progress, cancel)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from typing import Any

from appliance.agent import inventory
from appliance.db.engine import session_scope
from appliance.services import nodes
from appliance.settings import get_settings
from appliance.tasks import instances as _instances  # noqa: F401  (registers instance.* handlers)
from appliance.tasks import maintenance as _maintenance  # noqa: F401  (registers node.drain)
from appliance.tasks import storage as _storage  # noqa: F401  (registers volume.* and image.import)
from appliance.tasks import vm_snapshots as _vm_snapshots  # noqa: F401  (registers vm.snapshot etc.)
from appliance.tasks.runner import TaskContext, handler


@handler("node.inventory")
def refresh_inventory(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    """Re-read this node's hardware and store it (e.g. after adding a disk)."""
    ctx.progress(10, "reading CPU, memory, disks and NICs")
    inv = inventory.collect()
    ctx.progress(80, "saving inventory")
    with session_scope(ctx.db_url) as session:
        nodes.update_status(session, params["node"], inventory=inv, allocatable=inventory.allocatable(inv))
    return {"inventory": inv}


@handler("node.benchmark")
def benchmark(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    """A pveperf-style node benchmark: CPU hashing rate, fsyncs per second and
    buffered write rate on the data directory, each for a third of ``seconds``."""
    seconds = float(params.get("seconds", 6))
    phase = seconds / 3
    result: dict[str, Any] = {}

    def timed(label: str, start_pct: float, step: Any) -> tuple[int, float]:
        count, t0, last = 0, time.monotonic(), 0.0
        while (elapsed := time.monotonic() - t0) < phase:
            count += step()
            if elapsed - last >= 0.25:
                last = elapsed
                ctx.progress(start_pct + 33.3 * elapsed / phase, f"{label}: {elapsed:.1f}/{phase:.1f} s")
        return count, time.monotonic() - t0

    block = os.urandom(1 << 20)

    def cpu_step() -> int:
        hashlib.sha256(block).digest()
        return 1

    n, dt = timed("CPU (SHA-256)", 0, cpu_step)
    result["cpu_sha256_mib_s"] = round(n / dt, 1)
    data_dir = get_settings().data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".bench-") as f:
        small = b"x" * 4096

        def fsync_step() -> int:
            f.write(small)
            f.flush()
            os.fsync(f.fileno())
            return 1

        n, dt = timed("fsyncs/second", 33.3, fsync_step)
        result["fsyncs_per_second"] = round(n / dt, 1)
        f.seek(0)
        f.truncate()

        def write_step() -> int:
            f.write(block)
            return 1

        n, dt = timed("buffered write", 66.6, write_step)
        f.flush()
        os.fsync(f.fileno())
        result["write_mib_s"] = round(n / dt, 1)
    with session_scope(ctx.db_url) as session:
        nodes.update_status(session, params["node"], benchmark=result)
    return result
