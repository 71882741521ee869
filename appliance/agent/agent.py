"""The node agent. cephadm-style ``serve()``: a loop woken by a timer or an
event, each pass = this node's desired-state document + every registered reconciler.
``run_once()`` is one pass (heartbeat included), callable from tests; storage /
network / compute reconcilers plug in with ``register_reconciler`` and read
``agent.document``.

Under ``serve()`` the heartbeat has a thread of its own (the kubelet's node lease,
apart from its sync loop): a pass may legitimately take longer than the node grace
(a guest given 30 s to shut down, an image pulled), and the node must not turn
NotReady, and lose its scheduling, meanwhile.

The database may be away (a PostgreSQL failover): the heartbeat fails, the document
comes from the local cache (``agent.document_fresh`` False, see
:mod:`appliance.agent.document`), and the reconcilers keep guests running from it."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.agent import inventory as inv
from appliance.agent.document import DesiredState
from appliance.db.engine import session_scope
from appliance.services import events, nodes
from appliance.services.desired_state import NodeDocument
from appliance.settings import Settings

log = logging.getLogger("cairn.agent")


@dataclass
class PassReport:
    """What one reconcile pass did; reconcilers add their own lines."""

    registered: bool = False
    actions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


Reconciler = Callable[["Agent", PassReport], None]
EVENT_POLL_SECONDS = 0.25
EVENT_RETRY_MAX = 5.0  # back-off of the event watcher while the database is away


class Agent:
    def __init__(self, settings: Settings, collect: Callable[[], dict[str, Any]] = inv.collect) -> None:
        self.settings = settings
        self.node = settings.node_name
        self.collect = collect
        self.reconcilers: list[tuple[str, Reconciler]] = []
        self.watched_kinds: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._registered = False
        self.desired = DesiredState(settings)

    @property
    def document(self) -> NodeDocument | None:
        """This pass's desired-state document (None: never seen one)."""
        return self.desired.document

    @property
    def document_fresh(self) -> bool:
        """True when this pass's document came from the database (not the cache)."""
        return self.desired.fresh

    def refresh_document(self, report: PassReport) -> None:
        _, why = self.desired.refresh()
        if why:
            report.errors.append(why)

    def register_reconciler(self, name: str, fn: Reconciler, kinds: tuple[str, ...] = ()) -> None:
        """Add a reconciler; a change to any of ``kinds`` (an event) wakes the loop at once."""
        self.reconcilers.append((name, fn))
        self.watched_kinds.update(kinds)

    def wake_on_events(self, after: int) -> int:
        """Wake the loop if an event of a watched kind arrived after seq ``after``;
        returns the last seq seen. The watcher thread calls it in a loop."""
        if not self.watched_kinds:
            return after
        with session_scope(self.settings.resolved_database_url, readonly=True) as session:
            kinds, last = events.kinds_since(session, after)
        if kinds & self.watched_kinds:
            self.wake()
        return last

    def _watch(self) -> None:
        seq: int | None = None
        delay = 0.0  # the starting point at once: later events are the news
        while not self._stop.wait(delay):
            delay = max(delay, EVENT_POLL_SECONDS)
            try:
                if seq is None:
                    with session_scope(self.settings.resolved_database_url, readonly=True) as session:
                        seq = events.latest_seq(session)
                seq = self.wake_on_events(seq)
                if delay > EVENT_POLL_SECONDS:
                    log.info("event watch resumed")
                    self.wake()  # changes made while we could not see them
                delay = EVENT_POLL_SECONDS
            except Exception as exc:
                if delay == EVENT_POLL_SECONDS:
                    log.warning("event watch failed; retrying", extra={"error": str(exc)[:300]})
                delay = min(EVENT_RETRY_MAX, delay * 2)

    def wake(self) -> None:
        """Ask for a pass now (e.g. on a desired-state event)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def register(self) -> None:
        inventory = self.collect()
        # How peers reach this node's hypervisor (live migration targets).
        inventory["libvirt_uri"] = self.settings.libvirt_uri
        inventory["migration_host"] = self.settings.migration_host
        cluster = self.settings.cluster
        if cluster is not None:  # peers reach its libvirtd over TLS on the cluster network
            inventory["migration_uri"] = (f"qemu+tls://{cluster.address}/system"
                                          f"?pkipath={self.settings.pki_dir / 'libvirt'}")
            inventory["migration_host"] = cluster.address
        inventory["boot_id"] = self.settings.boot_id
        inventory["underlay"] = inv.underlay(self.settings.underlay_interface)
        # what tenant subnets must not overlap: every network of the host's own interfaces,
        # the external segment and the storage address
        nets = inv.host_networks(self.settings.underlay_interface, self.settings.external_interface)
        if self.settings.external_cidr:
            nets.append({"cidr": str(ipaddress.ip_network(self.settings.external_cidr, strict=False)),
                         "interface": self.settings.external_interface, "role": "external"})
        try:
            storage = ipaddress.ip_address(self.settings.storage_host)
        except ValueError:
            storage = None  # a host name: its address is on one of the interfaces above
        if storage is not None and not storage.is_loopback:
            nets.append({"cidr": str(ipaddress.ip_network(storage)), "interface": "", "role": "storage"})
        inventory["host_networks"] = nets
        with session_scope(self.settings.resolved_database_url) as session:
            nodes.register(session, self.node, inventory, inv.allocatable(inventory))
        self._registered = True
        log.info("node registered", extra={"node": self.node, "virt_type": inventory["virt_type"]})

    def beat(self, report: PassReport) -> None:
        """Heartbeat, or (re-)register when the node row is not there. Losing the
        database fails the heartbeat, not the caller."""
        try:
            if not self._registered:
                self.register()
                report.registered = True
            else:
                with session_scope(self.settings.resolved_database_url) as session:
                    known = nodes.heartbeat(session, self.node)
                if not known:
                    self.register()
                    report.registered = True
        except Exception as exc:  # the database is away: keep the guests running from the cache
            self._registered = False
            log.warning("heartbeat failed", extra={"error": str(exc)[:300]})
            report.errors.append(f"heartbeat: {exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}")

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval):
            self.beat(PassReport())

    def run_once(self, heartbeat: bool = True) -> PassReport:
        """One pass: heartbeat unless ``serve()``'s own thread does it, the document
        (from the database, else the cache), then reconcile."""
        report = PassReport()
        if heartbeat:
            self.beat(report)
        if not self.reconcilers:
            return report
        self.refresh_document(report)
        if self.document is None:
            return report  # nothing seen yet: nothing to keep running
        for name, fn in self.reconcilers:
            try:
                fn(self, report)
            except Exception as exc:  # one broken reconciler must not stop heartbeats
                log.exception("reconciler failed", extra={"reconciler": name})
                report.errors.append(f"{name}: {exc}")
        return report

    def serve(self) -> None:
        """Loop until stop(): a pass every heartbeat interval or when woken (by
        ``wake()`` or by an event of a kind a reconciler watches)."""
        threading.Thread(target=self._watch, name="cairn-agent-events", daemon=True).start()
        self.beat(PassReport())  # registered before the first pass
        threading.Thread(target=self._beat_loop, name="cairn-agent-heartbeat", daemon=True).start()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.run_once(heartbeat=False)
            except Exception:
                log.exception("agent pass failed; retrying")
                self._registered = False
            delay = max(0.05, self.settings.heartbeat_interval - (time.monotonic() - started))
            self._wake.wait(delay)
            self._wake.clear()
