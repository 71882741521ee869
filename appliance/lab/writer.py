"""A write probe for failover tests and benchmarks, run inside a lab node: creates one
small object (a project ``<prefix>-<n>``) through the node's API every ``interval``
seconds and prints one JSON line per attempt (``n``, ``ok``, ``t`` since start, HTTP
status or error). Acknowledged writes (2xx) must all be there after any failover.

``python -m appliance.lab.writer --prefix w --interval 0.2 --seconds 60``
(stops early on SIGTERM, after printing a summary line)."""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import sys
import time

import httpx

from appliance.cli.client import load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cairn-lab-writer")
    parser.add_argument("--prefix", default="w")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    cfg = load_config()
    ctx = ssl.create_default_context(cafile=cfg["ca_file"])
    client = httpx.Client(base_url=cfg["url"], verify=ctx, timeout=args.timeout,
                          headers={"Authorization": f"Bearer {cfg['token']}"})
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    start = time.monotonic()
    n = acked = 0
    while not stop["now"] and time.monotonic() - start < args.seconds:
        began = time.monotonic()
        n += 1
        line: dict[str, object] = {"n": n, "t": round(began - start, 3), "wall": round(time.time(), 3),
                                   "name": f"{args.prefix}-{n}"}
        try:
            r = client.post("/api/v1/projects", json={"name": f"{args.prefix}-{n}"})
            line.update(ok=r.status_code < 300, status=r.status_code)
            acked += r.status_code < 300
        except httpx.HTTPError as exc:
            line.update(ok=False, error=type(exc).__name__)
        line["ms"] = round((time.monotonic() - began) * 1000, 1)
        print(json.dumps(line), flush=True)
        time.sleep(max(0.0, args.interval - (time.monotonic() - began)))
    print(json.dumps({"summary": True, "attempts": n, "acked": acked}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
