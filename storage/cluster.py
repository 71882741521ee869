"""Several writers on one pool: who they are, who owns which volume, and fencing.

Every process that opens a pool for writing is a *writer* (one segment log, one backend
client: a RADOS client with its own address). It registers itself in the pool
(pointer ``writers/<id>``: node, client name and address, host, pid, heartbeat, the
garbage-collection epoch it acknowledged) and deregisters when it closes.

A volume is written by one writer at a time, its *owner*: the holder of the exclusive
lock on the volume's head pointer (RBD's exclusive-lock model; the owner record stored
with the lock names the node and the RADOS client address). Every head update asserts
the lock, so a writer whose lock was broken cannot move the head any more.

Taking a volume whose owner is dead = fence the owner (blocklist its RADOS client, so a
half-alive node cannot land another write), break its lock, replay its journal. A
writer is known dead when it ran on this host and its process is gone, or when it was
deregistered; a writer on another host whose heartbeat is older than ``DEAD_AFTER`` is
only *suspect*: the caller (the HA manager, an operator) decides, with ``takeover``.

A writer that needs a volume a live writer holds asks for it (:class:`LockRequest`,
pointer ``lockreq/<volume>``): the holder gives it up once it is idle there (live
migration's handover, storage/nbd/handover.py).

:func:`fence_node` is what the HA manager calls for a node it declared dead.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from storage.backends.base import ObjectBackend
from storage.errors import BackendError, ConflictError, InvalidArgument

WRITERS = "writers/"
GC_STATE = "gc"
LOCK_REQUESTS = "lockreq/"
REQUEST_REFRESH = 1.0  # seconds between rewrites of a waiting writer's lock request
REQUEST_STALE = 5.0  # seconds a lock request may stay unchanged before its holder drops it
DEAD_AFTER = 30.0  # seconds without a heartbeat before a remote writer is suspect
HEARTBEAT = 5.0  # seconds between heartbeats (Pool.sync)
BLOCKLIST_SECONDS = 24 * 3600.0
# Writers of this process and their backends: a writer whose backend was closed is dead
# even though its process lives on (tests simulate crashes that way).
_LIVE: dict[str, ObjectBackend] = {}


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _ns(kind: str) -> str:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return ""


def host_id() -> str:
    """Processes with the same host id share process ids and a network: boot id + pid
    and network namespaces. (The nodes of a lab cluster share a kernel but each has its
    network namespace: each is a host of its own, whose writers are judged by their
    heartbeats and fenced by blocklist, as on separate machines.)"""
    return f"{_read('/proc/sys/kernel/random/boot_id') or socket.gethostname()}/{_ns('pid')}/{_ns('net')}"


def process_start(pid: int) -> int:
    """Start time of a process in clock ticks since boot (0 if it does not exist), so a
    recycled pid is not mistaken for the writer that had it."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return 0
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return 0


@dataclass
class WriterInfo:
    """A writer's registration; also the owner record of the volume locks it holds."""

    writer: str
    node: str
    client: str
    addr: str
    host: str
    pid: int
    start: int
    since: float
    beat: float = 0.0
    acked: int = 0  # garbage-collection epoch whose condemned segments it stopped deduplicating against

    def owner_record(self) -> bytes:
        """What a volume lock stores (the registration without its changing fields)."""
        rec = asdict(self)
        rec.pop("beat")
        rec.pop("acked")
        return json.dumps(rec, sort_keys=True).encode()

    def encode(self) -> bytes:
        """The registration pointer's value."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> WriterInfo:
        """A registration or an owner record."""
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def public(self) -> dict[str, Any]:
        """What errors and ``owner`` queries show: node, client address, since when."""
        return {"node": self.node, "client": self.client, "addr": self.addr, "writer": self.writer,
                "pid": self.pid, "since": self.since}


def new_writer(backend: ObjectBackend, writer: str, node: str | None) -> WriterInfo:
    """The identity of a new writer of this process on ``backend``."""
    client, addr = backend.client_identity()
    pid = os.getpid()
    now = time.time()
    return WriterInfo(writer, node or socket.gethostname(), client, addr, host_id(), pid, process_start(pid), now,
                      beat=now)


@dataclass
class Liveness:
    """How sure we are about a writer: ``alive``, ``dead`` (proven) or ``suspect``."""

    state: str
    reason: str


def liveness(backend: ObjectBackend, who: WriterInfo, me: WriterInfo | None = None) -> Liveness:
    """Whether the writer ``who`` may still write (see the module docstring)."""
    here = host_id()
    if who.host == here:
        if who.pid == os.getpid():
            b = _LIVE.get(who.writer)
            if b is not None and not getattr(b, "closed", False):
                return Liveness("alive", "a live writer of this process")
            return Liveness("dead", "a closed writer of this process")
        if process_start(who.pid) != who.start:
            return Liveness("dead", f"process {who.pid} on this host is gone")
        return Liveness("alive", f"process {who.pid} on this host is running")
    raw = backend.get_pointer(WRITERS + who.writer)
    if raw is None:
        return Liveness("dead", "deregistered (closed or fenced)")
    age = time.time() - WriterInfo.decode(raw).beat
    if age > DEAD_AFTER:
        return Liveness("suspect", f"no heartbeat for {age:.0f} s")
    return Liveness("alive", f"heartbeat {age:.0f} s ago")


# ------------------------------------------------------------------ registry
def register(backend: ObjectBackend, info: WriterInfo) -> bytes:
    """Add a writer's registration; returns the stored value (for the next update)."""
    raw = info.encode()
    if not backend.cas_pointer(WRITERS + info.writer, None, raw):
        raise ConflictError(f"writer id {info.writer} is already registered")
    _LIVE[info.writer] = backend
    return raw


def update_registration(backend: ObjectBackend, info: WriterInfo, current: bytes) -> bytes:
    """Store a new heartbeat / acknowledged epoch. A missing registration means this
    writer was fenced (or reaped): ``BackendError``, stop writing. Only this writer ever
    stores its registration (others only remove it), so a different value there is an
    update of ours that landed after its client timed out (seen on the lab cluster while
    a node was cut off and its OSD not yet marked down): it is still ours."""
    raw = info.encode()
    if backend.cas_pointer(WRITERS + info.writer, current, raw):
        return raw
    found = backend.get_pointer(WRITERS + info.writer)
    if found is None or not backend.cas_pointer(WRITERS + info.writer, found, raw):
        raise BackendError(f"writer {info.writer} of node {info.node} was fenced: its registration is gone")
    return raw


def deregister(backend: ObjectBackend, writer: str) -> None:
    """Remove a writer's registration (clean close, fence, reap)."""
    _LIVE.pop(writer, None)
    raw = backend.get_pointer(WRITERS + writer)
    if raw is not None:
        backend.cas_pointer(WRITERS + writer, raw, None)


def writers(backend: ObjectBackend) -> list[tuple[WriterInfo, bytes]]:
    """Every registered writer with its raw registration."""
    out = []
    for name in backend.list_pointers(WRITERS):
        raw = backend.get_pointer(name)
        if raw is not None:
            out.append((WriterInfo.decode(raw), raw))
    return out


def forget_process_writer(writer: str) -> None:
    """This process's writer stopped (closed without deregistering, e.g. fenced)."""
    _LIVE.pop(writer, None)


# ------------------------------------------------------------------ volume locks
def volume_owner(backend: ObjectBackend, volume: str) -> WriterInfo | None:
    """The writer holding a volume's lock, or None."""
    raw = backend.pointer_owner(f"vol/{volume}")
    if not raw:
        return None
    return WriterInfo.decode(raw)


def fence_writer(backend: ObjectBackend, who: WriterInfo, seconds: float = BLOCKLIST_SECONDS) -> bool:
    """Blocklist a writer's client (remote ones; a dead process of this host needs none)
    and drop its registration. Returns whether the backend blocklisted it."""
    blocked = False
    if who.host != host_id() or process_start(who.pid) == who.start:
        blocked = backend.blocklist(who.addr, seconds)
    deregister(backend, who.writer)
    return blocked


def break_volume_lock(backend: ObjectBackend, volume: str, who: WriterInfo) -> bool:
    """Break a (fenced) writer's lock on a volume."""
    return backend.break_pointer_lock(f"vol/{volume}", who.owner_record(), who.client, who.writer)


@dataclass
class FenceReport:
    """What :func:`fence_node` did."""

    node: str
    blocklisted: list[str] = field(default_factory=list)  # client addresses
    writers: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)  # whose locks were broken: take them elsewhere


def covered_by(addr: str, ranges: Sequence[str]) -> bool:
    """Whether a RADOS client address (``ip:port/nonce``) lies in one of the CIDR ``ranges``."""
    try:
        ip = ipaddress.ip_address(addr.rsplit(":", 1)[0].strip("[]"))
        return any(ip in ipaddress.ip_network(r, strict=False) for r in ranges)
    except ValueError:
        return False


def fence_node(backend: ObjectBackend, node: str, me: WriterInfo | None = None,
               seconds: float = BLOCKLIST_SECONDS, blocklisted: Sequence[str] = ()) -> FenceReport:
    """Fence every writer of ``node`` on this pool and free the volumes it owned.

    1. every registered writer of the node and every volume-lock holder naming the node:
       blocklist its RADOS client (its later writes are refused by the OSDs), unless an
       address range the caller already blocklisted (``blocklisted``, the HA manager's
       ``<ip>/32`` of the node) covers it: one monitor round trip less per writer;
    2. break the node's volume locks (the next owner replays the node's journal);
    3. drop its registrations (garbage collection stops waiting for it).

    Idempotent. Refuses to fence the caller's own node (``me``).
    """
    if me is not None and me.node == node:
        raise InvalidArgument(f"node {node!r} is this node: a node does not fence itself")
    report = FenceReport(node)
    victims: dict[str, WriterInfo] = {w.writer: w for w, _raw in writers(backend) if w.node == node}
    locked: list[tuple[str, WriterInfo]] = []
    for name in backend.list_pointers("vol/"):
        owner = volume_owner(backend, name[4:])
        if owner is not None and owner.node == node:
            locked.append((name[4:], owner))
            victims.setdefault(owner.writer, owner)
    for who in victims.values():
        done = covered_by(who.addr, blocklisted) or backend.blocklist(who.addr, seconds)
        if done and who.addr not in report.blocklisted:
            report.blocklisted.append(who.addr)
    for volume, who in locked:
        if break_volume_lock(backend, volume, who):
            report.volumes.append(volume)
    for who in victims.values():
        deregister(backend, who.writer)
        report.writers.append(who.writer)
    return report


# ------------------------------------------------------------------ lock requests
def lock_request_name(volume: str) -> str:
    """The pointer where writers ask for a volume's lock."""
    return LOCK_REQUESTS + volume


@dataclass
class LockRequest:
    """A writer asking for a volume another writer holds (pointer ``lockreq/<volume>``,
    beside the head): RBD's cooperative exclusive lock. The holder's NBD server lets the
    volume go (checkpoint + unlock) once its connections to it are idle; the requester
    rewrites its request every ``REQUEST_REFRESH`` seconds while it waits and removes it
    once it holds the lock. A holder drops a request whose writer is dead or that did not
    change for ``REQUEST_STALE`` seconds, and lets go at most once per request value."""

    who: WriterInfo
    at: float

    def encode(self) -> bytes:
        """The pointer's value: the requester's owner record and when it asked."""
        return json.dumps({**json.loads(self.who.owner_record()), "at": self.at}, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> LockRequest:
        """Inverse of :meth:`encode`."""
        return cls(WriterInfo.decode(raw), float(json.loads(raw).get("at", 0.0)))


def lock_request(backend: ObjectBackend, volume: str) -> tuple[LockRequest | None, bytes | None]:
    """The pending request for a volume's lock (None) and its raw value."""
    raw = backend.get_pointer(lock_request_name(volume))
    if raw is None:
        return None, None
    try:
        return LockRequest.decode(raw), raw
    except (ValueError, TypeError, KeyError):
        return None, raw  # not ours to read: dropped like a stale one


def request_lock(backend: ObjectBackend, volume: str, me: WriterInfo, mine: bytes | None,
                 holder: str | None = None) -> bytes | None:
    """Post (or refresh) this writer's request for a volume's lock. Another live-looking
    writer's request stands (the holder lets go for it as well; whoever locks first
    wins and the other asks again); a request of the holder itself is replaced. Returns
    the request now in place if it is this writer's, else ``mine`` unchanged."""
    name = lock_request_name(volume)
    found = backend.get_pointer(name)
    if found is not None and found != mine:
        try:
            other = LockRequest.decode(found).who.writer
        except (ValueError, TypeError, KeyError):
            other = ""
        if other and other not in (me.writer, holder):
            return mine
    raw = LockRequest(me, time.time()).encode()
    return raw if backend.cas_pointer(name, found, raw) else mine


def drop_lock_request(backend: ObjectBackend, volume: str, raw: bytes) -> None:
    """Remove a request if it is still ``raw`` (granted, withdrawn, or stale)."""
    backend.cas_pointer(lock_request_name(volume), raw, None)


# ------------------------------------------------------------------ GC state
@dataclass
class GcState:
    """The cluster's garbage-collection state (pointer ``gc``).

    ``condemned`` segments are being collected: no writer deduplicates against their
    chunks once it acknowledged ``epoch``. A segment leaving the list is deleted (its
    live chunks were copied first); ``reload`` names the segments whose indexes hold
    their new locations.
    """

    epoch: int = 0
    condemned: list[str] = field(default_factory=list)
    reload: list[str] = field(default_factory=list)
    holder: str = ""

    def encode(self) -> bytes:
        """The pointer's value."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> GcState:
        """The state (empty if never written)."""
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def read_gc_state(backend: ObjectBackend) -> tuple[GcState, bytes | None]:
    """The current state and its raw value (for a compare-and-swap)."""
    raw = backend.get_pointer(GC_STATE)
    return GcState.decode(raw), raw


def write_gc_state(backend: ObjectBackend, state: GcState, current: bytes | None) -> bytes:
    """Publish a new state (only the lease holder does)."""
    raw = state.encode()
    if not backend.cas_pointer(GC_STATE, current, raw):
        raise ConflictError("the garbage-collection state changed under the lease holder")
    return raw
