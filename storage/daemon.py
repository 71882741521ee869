"""``cairn-storaged``: a node's writer of its dedup pools.

It serves every attached pool's volumes over NBD (a unix socket per pool, optionally a
TCP port) and answers a small control protocol on ``<run-dir>/storage.sock`` so that
snapshot, rollback, clone, resize, delete and stats run *in this node's writer*, which
holds the lock of every volume it serves (other nodes' daemons write the same Ceph pool:
see storage/README.md, "Several nodes"). Garbage collection and scrub run in a pool
handle of their own (a second writer of this node), cluster-wide under a lease.

Control protocol: one JSON object per line each way. Request
``{"op": "snapshot", "pool": "default", "volume": "...", "snapshot": "..."}``; reply
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "NotFound", "message": "..."}``.
Attached pools are remembered in ``<run-dir>/pools.json`` and re-attached on start, so a
daemon killed with -9 is back with the same exports as soon as it restarts (the journal
replay on open makes every acknowledged write visible again).

``grant`` ``{"uid": U, "exports": {"pool": ["volume", ...]}}``: a client of the unix
sockets whose uid is not root (a VM's unprivileged QEMU) opens only the exports granted to
its uid (SO_PEERCRED), remembered in ``<run-dir>/grants.json``; ``{"uid": U}`` revokes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from storage.engine import Pool, open_pool
from storage.errors import InvalidArgument, NotFound, StorageError
from storage.maintenance import check_consistency, collect_garbage, scrub
from storage.nbd import export_uri
from storage.nbd.server import NbdServer
from storage.nbd.tls import server_context

log = logging.getLogger("cairn.storaged")


@dataclass
class PoolConfig:
    name: str
    backend: str
    chunk_size: int = 65536
    port: int | None = None  # TCP port of its NBD exports (None: unix socket only)


class Attached:
    def __init__(self, config: PoolConfig, pool: Pool, server: NbdServer, socket: str) -> None:
        self.config, self.pool, self.server, self.socket = config, pool, server, socket
        self.busy = asyncio.Lock()  # GC / scrub run in a thread: one at a time per pool
        self._rbd: Any = None

    def rbd(self) -> Any:
        """The pool's ``rbd`` storage class: native RBD images in the same Ceph pool."""
        if self._rbd is None:
            url = urlsplit(self.config.backend)
            conf = parse_qs(url.query).get("conf", [""])[0]
            if url.scheme != "rados" or not conf:
                raise InvalidArgument(f"pool {self.config.name!r} is not on Ceph: class 'rbd' needs a rados pool")
            from storage.backends.rados_rbd import RbdVolumes

            self._rbd = RbdVolumes(conf, url.netloc)
        return self._rbd

    def close(self) -> None:
        self.pool.close()
        if self._rbd is not None:
            self._rbd.close()


class StorageDaemon:
    def __init__(self, run_dir: Path, host: str = "127.0.0.1", node: str | None = None,
                 tls_dir: Path | None = None) -> None:
        self.run_dir = run_dir
        self.host = host
        self.tls_dir = tls_dir  # server certificate of the TCP exports (storage/nbd/tls.py)
        self.node = node
        self.pools: dict[str, Attached] = {}
        self._state = run_dir / "pools.json"
        self._grants = run_dir / "grants.json"  # pool -> uid -> exports (see NbdServer.grants)

    # ------------------------------------------------------------------ pools
    async def attach(self, name: str, backend: str, chunk_size: int = 65536, port: int | None = None) -> dict[str, Any]:
        cfg = PoolConfig(name, backend, int(chunk_size), int(port) if port else None)
        current = self.pools.get(name)
        if current is not None:
            if (current.config.backend, current.config.port) != (cfg.backend, cfg.port):
                raise InvalidArgument(f"pool {name!r} is attached with another backend or port: detach it first")
            return self._describe(current)
        if cfg.port and self.tls_dir is None:
            raise InvalidArgument(f"pool {name!r}: NBD over TCP (port {cfg.port}) is served with TLS only, and this "
                                  "storage daemon has no --tls-dir")
        tls = server_context(self.tls_dir) if cfg.port and self.tls_dir is not None else None
        pool = await asyncio.to_thread(open_pool, backend, cfg.chunk_size, False, self.node)
        server = NbdServer(pool)
        sock = str(self.run_dir / f"nbd-{name}.sock")
        try:
            await server.listen_unix(sock)
            if tls is not None:
                await server.listen_tcp(self.host, cfg.port or 0, tls)
        except OSError:
            await server.close()
            pool.close()
            raise
        with contextlib.suppress(FileNotFoundError, ValueError):  # a restarted daemon's grants
            saved = json.loads(self._grants.read_text()).get(name, {})
            server.grants = {int(uid): set(names) for uid, names in saved.items()}
        self.pools[name] = Attached(cfg, pool, server, sock)
        self._save()
        log.info("attached pool %s (%s)", name, backend)
        return self._describe(self.pools[name])

    async def detach(self, name: str) -> None:
        att = self.pools.pop(self._pool(name).config.name)
        self._save()
        async with att.busy:
            await att.server.close()
            att.close()

    def _describe(self, att: Attached) -> dict[str, Any]:
        me = att.pool.me
        return {**asdict(att.config), "socket": att.socket, "host": self.host if att.config.port else None,
                "node": me.node if me else None, "client": me.addr if me else None,
                "fenced": att.server.fenced or None}

    async def reattach_fenced(self) -> None:
        """A pool whose writer the cluster fenced comes back with a new client (its
        volumes belong to whoever took them over; this node may take them again)."""
        for name, att in list(self.pools.items()):
            if att.server.fenced:
                log.warning("pool %s: writer fenced (%s); attaching again", name, att.server.fenced)
                try:
                    await self.detach(name)
                except StorageError as exc:
                    log.warning("pool %s: closing the fenced writer: %s", name, exc)
                try:
                    await self.attach(**asdict(att.config))
                except (StorageError, OSError) as exc:
                    log.error("cannot re-attach pool %s: %s", name, exc)

    def _pool(self, name: str) -> Attached:
        try:
            return self.pools[name]
        except KeyError:
            raise NotFound(f"pool {name!r} is not attached to this storage daemon") from None

    def _save(self) -> None:
        tmp = self._state.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(a.config) for a in self.pools.values()]))
        os.replace(tmp, self._state)

    async def restore(self) -> None:
        try:
            saved = json.loads(self._state.read_text())
        except FileNotFoundError:
            return
        for cfg in saved:
            try:
                await self.attach(**cfg)
            except (StorageError, OSError) as exc:
                log.error("cannot re-attach pool %s: %s", cfg.get("name"), exc)

    def _grant(self, uid: int, exports: dict[str, list[str]]) -> dict[str, list[str]]:
        """The exports of each pool a non-root client uid (a VM's unprivileged QEMU) may
        open on the unix sockets, replacing what it had; none: revoke."""
        if uid <= 0:
            raise InvalidArgument("grants are for unprivileged uids (root opens every export)")
        for pool in exports:
            self._pool(pool)
        for name, att in self.pools.items():
            names = set(exports.get(name, ()))
            if names:
                att.server.grants[uid] = names
            else:
                att.server.grants.pop(uid, None)
        tmp = self._grants.with_suffix(".tmp")
        tmp.write_text(json.dumps({name: {str(u): sorted(n) for u, n in att.server.grants.items()}
                                   for name, att in self.pools.items()}))
        os.replace(tmp, self._grants)
        return {name: sorted(att.server.grants.get(uid, ())) for name, att in self.pools.items()}

    # ---------------------------------------------------------------- control
    async def handle(self, req: dict[str, Any]) -> Any:
        op = req.pop("op", None)
        if op == "attach":
            return await self.attach(**req)
        if op == "pools":
            return [self._describe(a) for a in self.pools.values()]
        if op == "fence":
            return await self._fence(str(req["node"]), req.get("pool"), [str(r) for r in req.get("blocklisted") or ()])
        if op == "grant":
            return self._grant(int(req["uid"]), {str(k): list(v) for k, v in dict(req.get("exports") or {}).items()})
        att = self._pool(req.pop("pool", "") or "")
        if op == "detach":
            return await self.detach(att.config.name)
        pool = att.pool
        if op in ("gc", "scrub", "check"):
            async with att.busy:
                return await asyncio.to_thread(self._maintenance, att, op, req)
        if op == "stats":
            pool.checkpoint_all()
            heads = list(pool.walk(journals=False, checkpoint=False, refresh=True))  # index updates: this thread
            return await att.server.offload(pool.stats, True, heads)
        vol = req.get("volume", "")
        if req.get("class") == "rbd":
            return await att.server.offload(self._rbd_op, att, op, vol, req)
        simple: dict[str, Callable[[], Any]] = {
            "volumes": lambda: pool.list_volumes(),
            "create": lambda: pool.create_volume(vol, int(req["size"])),
            "info": lambda: pool.volume_info(vol),
            "resize": lambda: pool.resize(vol, int(req["size"]), bool(req.get("force"))),
            "delete": lambda: pool.delete_volume(vol),
            "snapshot": lambda: pool.snapshot(vol, req["snapshot"]),
            "snapshots": lambda: pool.list_snapshots(vol),
            "delete_snapshot": lambda: pool.delete_snapshot(vol, req["snapshot"]),
            "rollback": lambda: pool.rollback(vol, req["snapshot"]),
            "clone": lambda: pool.clone(vol, req["snapshot"], req["new"]),
            "volume_stats": lambda: pool.volume_stats(vol).as_dict(),
            "export": lambda: self._export(att, vol),
            "take": lambda: self._take(att, vol, bool(req.get("takeover"))),
            "release": lambda: {"closed_connections": att.server.release(vol, bool(req.get("force")))},
            "owner": lambda: pool.owner(vol),
            "owned": lambda: sorted(v.name for v in pool.open_volumes()),
            "seal": lambda: att.server.seal(),
        }
        if op not in simple:
            raise InvalidArgument(f"unknown operation {op!r}")
        # On the event loop, like the NBD writes: the pool has exactly one thread of writers.
        return simple[op]()

    @staticmethod
    def _rbd_op(att: Attached, op: str, vol: str, req: dict[str, Any]) -> Any:
        rbd = att.rbd()
        ops: dict[str, Callable[[], Any]] = {
            "create": lambda: rbd.create(vol, int(req["size"])),
            "info": lambda: rbd.info(vol),
            "resize": lambda: rbd.resize(vol, int(req["size"]), bool(req.get("force"))),
            "delete": lambda: rbd.delete(vol),
            "snapshot": lambda: rbd.snapshot(vol, req["snapshot"]),
            "snapshots": lambda: rbd.list_snapshots(vol),
            "delete_snapshot": lambda: rbd.delete_snapshot(vol, req["snapshot"]),
            "rollback": lambda: rbd.rollback(vol, req["snapshot"]),
            "clone": lambda: rbd.clone(vol, req["snapshot"], req["new"]),
            "export": lambda: (rbd.info(vol), {"rbd": rbd.qemu_uri(vol)})[1],
        }
        if op not in ops:
            raise InvalidArgument(f"operation {op!r} does not apply to class 'rbd' volumes")
        return ops[op]()

    def _maintenance(self, att: Attached, op: str, req: dict[str, Any]) -> Any:
        """GC, scrub and check run in a pool handle of their own (another writer of this
        node, with its own backend client), so they never share the serving pool's
        state with the event loop; the serving pool acknowledges GC epochs like any
        other writer."""
        cfg = att.config
        pool = open_pool(cfg.backend, cfg.chunk_size, readonly=op == "check", node=self.node)
        try:
            if op == "gc":
                report = collect_garbage(pool, float(req.get("grace_seconds", 3600)),
                                         ack_timeout=float(req.get("ack_timeout", 60)))
                return asdict(report)
            if op == "scrub":
                return asdict(scrub(pool))
            return check_consistency(pool)
        finally:
            pool.close()

    async def _fence(self, node: str, pool: str | None, blocklisted: list[str]) -> dict[str, Any]:
        """Fence ``node`` in every attached Ceph pool (or one): see storage/cluster.py.
        ``blocklisted``: address ranges the caller blocklisted already."""
        if node == self.node:
            raise InvalidArgument(f"node {node!r} is this node: a node does not fence itself")
        out: dict[str, Any] = {}
        for att in [self._pool(pool)] if pool else list(self.pools.values()):
            report = await att.server.offload(att.pool.fence_node, node, blocklisted)
            out[att.config.name] = asdict(report)
        return out

    def _take(self, att: Attached, vol: str, takeover: bool) -> dict[str, Any]:
        """Hold a volume's lock here (fencing a dead owner; with ``takeover`` also one
        whose heartbeat stopped) and return its exports."""
        att.server.take(vol, takeover)
        return self._export(att, vol)

    def _export(self, att: Attached, vol: str) -> dict[str, Any]:
        att.pool.volume_info(vol)  # NotFound if missing
        out = {"unix": export_uri(vol, socket=att.socket)}
        if att.config.port:
            out["tcp"] = export_uri(vol, host=self.host, port=att.config.port)
        return out

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise InvalidArgument("a request is a JSON object")
                    reply = {"ok": True, "result": await self.handle(req)}
                except StorageError as exc:
                    reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
                except (KeyError, TypeError, ValueError) as exc:
                    reply = {"ok": False, "error": "InvalidArgument", "message": f"bad request: {exc!r}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        for name in list(self.pools):
            att = self.pools.pop(name)
            await att.server.close()
            att.close()


async def serve(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    daemon = StorageDaemon(run_dir, args.host, args.node, Path(args.tls_dir) if args.tls_dir else None)
    await daemon.restore()
    control = run_dir / "storage.sock"
    with contextlib.suppress(FileNotFoundError):
        control.unlink()
    server = await asyncio.start_unix_server(daemon.client, path=str(control))
    os.chmod(control, 0o600)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("storage daemon ready on %s (%d pools)", control, len(daemon.pools))
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 2.0)
        await daemon.reattach_fenced()
    server.close()
    await daemon.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``cairn-storaged``."""
    ap = argparse.ArgumentParser(prog="cairn-storaged", description="Serve and manage Cairn dedup pools.")
    ap.add_argument("--run-dir", required=True, help="control socket, NBD sockets and pools.json live here")
    ap.add_argument("--host", default="127.0.0.1", help="address of the TCP NBD exports")
    ap.add_argument("--node", help="this node's name in writer registrations and volume locks (default: host name)")
    ap.add_argument("--tls-dir", help="the TCP exports' TLS: ca-cert.pem (of the clients' certificates), "
                                      "server-cert.pem, server-key.pem; without it no pool gets a TCP port")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
