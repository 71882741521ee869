"""One owner per volume, takeover, fencing and the cluster-wide GC protocol, with
several writers (pool objects, each with its own backend client) in one process."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from storage import cluster
from storage.backends import open_backend
from storage.engine import open_pool
from storage.errors import BackendError, CorruptionError, LockLost, OwnedElsewhere
from storage.maintenance import check_consistency, collect_garbage

MiB = 1 << 20


@pytest.mark.contract
def test_pointer_locks_hold_one_owner_assert_on_swaps_and_break_only_as_recorded(backend_url: str) -> None:
    a, b = open_backend(backend_url), open_backend(backend_url)
    try:
        assert a.cas_pointer("vol/x", None, b"v1")
        assert a.lock_pointer("vol/x", "ca", b'{"node": "n1"}', b"v1") is None
        assert a.lock_pointer("vol/x", "ca", b'{"node": "n1"}', b"v1") is None  # ours already: renewed
        assert b.lock_pointer("vol/x", "cb", b'{"node": "n2"}', b"v1") == b'{"node": "n1"}'
        assert b.pointer_owner("vol/x") == b'{"node": "n1"}'
        assert a.cas_pointer("vol/x", b"v1", b"v2", cookie="ca")
        with pytest.raises(LockLost):
            b.cas_pointer("vol/x", b"v2", b"v3", cookie="cb")
        client_a = a.client_identity()[0]
        assert not b.break_pointer_lock("vol/x", b'{"node": "other"}', client_a, "ca")  # not what is recorded
        assert b.break_pointer_lock("vol/x", b'{"node": "n1"}', client_a, "ca")
        assert b.pointer_owner("vol/x") is None
        with pytest.raises(LockLost):
            a.cas_pointer("vol/x", b"v2", b"v3", cookie="ca")  # broken: the old owner cannot move it
        assert b.lock_pointer("vol/x", "cb", b'{"node": "n2"}', b"v2") is None
        b.unlock_pointer("vol/x", "cb")
        assert a.pointer_owner("vol/x") is None
        assert a.get_pointer("vol/x") == b"v2"
    finally:
        a.close()
        b.close()


@pytest.mark.contract
def test_a_lease_has_one_holder_until_released(backend_url: str) -> None:
    a, b = open_backend(backend_url), open_backend(backend_url)
    try:
        assert a.lease("lease/t", "ca", 30, "gc")
        assert a.lease("lease/t", "ca", 30, "gc")  # renewal
        assert not b.lease("lease/t", "cb", 30, "gc")
        a.release_lease("lease/t", "ca")
        assert b.lease("lease/t", "cb", 30, "gc")
    finally:
        a.close()
        b.close()


def _pools(tmp_path: Path, nodes: int = 2) -> list:  # type: ignore[type-arg]
    url = f"local://{tmp_path / 'pool'}"
    return [open_pool(url, node=f"n{i + 1}") for i in range(nodes)]


@pytest.mark.unit
def test_a_volume_has_one_owner_and_the_other_writer_gets_a_conflict_naming_it(tmp_path: Path) -> None:
    p1, p2 = _pools(tmp_path)
    p1.create_volume("v", 4 * MiB)
    data = os.urandom(MiB)
    p1.open_volume("v").write(0, data)
    with pytest.raises(OwnedElsewhere, match="owned by node 'n1'") as err:
        p2.open_volume("v")
    assert err.value.owner["node"] == "n1"
    with pytest.raises(OwnedElsewhere):
        p2.snapshot("v", "s")  # needs the head: only its owner may
    owner = p2.owner("v")
    assert owner is not None and owner["node"] == "n1" and owner["alive"] == "alive"
    p1.release("v")  # checkpointed and unlocked: a migration's source does this
    assert p2.owner("v") is None
    assert p2.open_volume("v").read(0, MiB) == data
    assert p1.owner("v")["node"] == "n2"  # type: ignore[index]
    p1.close()
    p2.close()


@pytest.mark.unit
def test_a_crashed_owner_is_taken_over_and_its_journal_replayed(tmp_path: Path) -> None:
    p1, p2 = _pools(tmp_path)
    p1.create_volume("v", 8 * MiB)
    vol = p1.open_volume("v")
    data = os.urandom(5 * MiB + 123)
    vol.write(4096, data)
    vol.write(7 * MiB, b"tail" * 100)  # small: rides on the journal as a patch
    vol.flush()  # acknowledged, not checkpointed
    p1.log.backend.close()  # the writer dies (its process lives on: it is known dead here)
    v2 = p2.open_volume("v")
    assert v2.read(4096, len(data)) == data
    assert v2.read(7 * MiB, 400) == b"tail" * 100
    assert p2.owner("v")["node"] == "n2"  # type: ignore[index]
    assert check_consistency(p2) == []
    p2.close()


@pytest.mark.unit
def test_a_fenced_writer_cannot_move_the_head_any_more(tmp_path: Path) -> None:
    p1, p2 = _pools(tmp_path)
    p1.create_volume("v", MiB)
    v1 = p1.open_volume("v")
    v1.write(0, b"a" * 65536)
    v1.flush()
    report = p2.fence_node("n1")
    assert report.volumes == ["v"] and report.writers == [p1.me.writer]  # type: ignore[union-attr]
    with pytest.raises(LockLost):
        v1.checkpoint()
    with pytest.raises(LockLost):
        v1.write(0, b"b" * 65536)
    with pytest.raises(BackendError, match="fenced"):
        p1.acknowledge()
    assert p2.open_volume("v").read(0, 65536) == b"a" * 65536
    with pytest.raises(Exception, match="this node"):
        p2.fence_node("n2")
    p2.close()


@pytest.mark.unit
def test_gc_waits_for_every_writer_and_keeps_a_dead_chunk_another_writer_reused(tmp_path: Path) -> None:
    """The race the acknowledgements exist for: writer 2 deduplicates against a chunk
    nobody references while writer 1's collection is deciding to delete it."""
    p1, p2 = _pools(tmp_path)
    dead = [os.urandom(65536) for _ in range(64)]
    p1.create_volume("old", 4 * MiB)
    p1.open_volume("old").write(0, b"".join(dead))
    p1.delete_volume("old")
    p1.log.rotate()
    p2.create_volume("live", 4 * MiB)
    live = p2.open_volume("live")
    live.write(0, os.urandom(MiB))
    live.flush()
    p2.sync()  # p2 knows p1's sealed segments: it can deduplicate against them
    result: dict[str, object] = {}
    gc = threading.Thread(target=lambda: result.update(report=collect_garbage(p1, grace_seconds=0, ack_timeout=20)))
    gc.start()
    deadline = time.monotonic() + 20
    while not cluster.read_gc_state(p2.backend)[0].condemned:
        assert time.monotonic() < deadline, "GC never condemned anything"
        time.sleep(0.01)
    assert gc.is_alive()  # waiting for p2's acknowledgement
    live.write(MiB, dead[3])  # dedup hit on a condemned chunk: p2 has not seen the list yet
    before = p2.log.index[p2.chunks.put(dead[3])]
    assert before.segment.startswith(f"seg/{p1.log.writer}")
    p2.sync()  # applies the list, lands the write, acknowledges
    live.write(2 * MiB, dead[5])  # after acknowledging: stored again, not deduplicated
    assert p2.log.index[p2.chunks.put(dead[5])].segment.startswith(f"seg/{p2.log.writer}")
    live.flush()
    gc.join(30)
    report = result["report"]
    assert report.deleted_segments >= 1 and report.waiting_for == [], report  # type: ignore[attr-defined]
    p2.sync()  # learns what was deleted and where the reused chunk went
    assert live.read(MiB, 65536) == dead[3]
    assert live.read(2 * MiB, 65536) == dead[5]
    p2.close()
    p1.close()
    fresh = open_pool(f"local://{tmp_path / 'pool'}", readonly=True)
    assert fresh.open_volume("live").read(MiB, 65536) == dead[3]
    assert check_consistency(fresh) == []
    fresh.close()


@pytest.mark.unit
def test_gc_stops_before_deleting_when_a_writer_does_not_acknowledge(tmp_path: Path) -> None:
    p1, p2 = _pools(tmp_path)
    p1.create_volume("old", MiB)
    p1.open_volume("old").write(0, os.urandom(MiB))
    p1.delete_volume("old")
    report = collect_garbage(p1, grace_seconds=0, ack_timeout=0.5)
    assert report.deleted_segments == 0 and report.condemned >= 1
    assert [w.split()[0] for w in report.waiting_for] == [p2.me.writer]  # type: ignore[union-attr]
    p2.close()  # deregistered: the next run carries the condemned segments on and deletes them
    report = collect_garbage(p1, grace_seconds=0, ack_timeout=5)
    assert report.deleted_segments >= 1 and report.waiting_for == []
    assert cluster.read_gc_state(p1.backend)[0].condemned == []
    p1.close()


@pytest.mark.unit
def test_gc_and_check_resolve_a_head_another_writer_moved_after_their_last_look(tmp_path: Path) -> None:
    """Found on the lab cluster: a node checkpoints a volume (new map shards in its open
    segment, then the head) between the collector's scan of other writers' segments and
    its read of the heads; the collector must not take that for a missing chunk."""
    p1, p2 = _pools(tmp_path)
    p1.create_volume("v", 4 * MiB)
    p2.log.refresh(tails=True)  # p2's last look at p1's segments
    vol = p1.open_volume("v")
    vol.write(0, os.urandom(2 * MiB))
    vol.checkpoint()  # the head names shards p2 has not seen
    with pytest.raises(CorruptionError, match="not in the index"):
        p2.live_hashes(list(p2.walk(checkpoint=False)))
    assert p2.live_hashes(list(p2.walk(checkpoint=False, refresh=True)))
    vol.write(2 * MiB, os.urandom(MiB))
    vol.checkpoint()
    assert collect_garbage(p2, grace_seconds=0, ack_timeout=5).waiting_for == []
    assert check_consistency(p2) == []
    p1.close()
    p2.close()


@pytest.mark.unit
def test_a_heartbeat_that_landed_after_its_client_timed_out_is_not_taken_for_a_fence(tmp_path: Path) -> None:
    """Found on the lab cluster: a heartbeat write timed out on the client but landed, so
    the next one's compare-and-swap found a newer value of the writer's own: it closed
    every connection as if fenced."""
    (p1,) = _pools(tmp_path, 1)
    assert p1.me is not None
    late = cluster.WriterInfo.decode(p1._registration)
    late.beat += 1
    p1.backend.cas_pointer(cluster.WRITERS + p1.me.writer, p1._registration, late.encode())  # the timed-out one
    p1.acknowledge()  # still registered: no BackendError
    cluster.deregister(p1.backend, p1.me.writer)  # a fence or reap removes it
    with pytest.raises(BackendError, match="fenced"):
        p1.acknowledge()
    p1.close()


@pytest.mark.unit
def test_a_lock_request_stands_for_its_writer_until_granted_and_replaces_only_the_holders(tmp_path: Path) -> None:
    """The cooperative lock's requests (storage/nbd/handover.py): one per volume, the
    first live requester's stands, the holder's own is replaced, a drop removes only the
    value it saw."""
    p1, p2, p3 = _pools(tmp_path, 3)
    assert p1.me and p2.me and p3.me
    mine = cluster.request_lock(p2.backend, "v", p2.me, None, holder=p1.me.writer)
    req, raw = cluster.lock_request(p1.backend, "v")
    assert raw == mine and req is not None and req.who.node == "n2" and req.who.writer == p2.me.writer
    assert cluster.request_lock(p3.backend, "v", p3.me, None, holder=p1.me.writer) is None  # n2's stands
    time.sleep(0.01)
    again = cluster.request_lock(p2.backend, "v", p2.me, mine, holder=p1.me.writer)  # the refresh
    assert again is not None and again != mine and cluster.lock_request(p1.backend, "v")[1] == again
    cluster.drop_lock_request(p1.backend, "v", mine)  # a stale look: the refreshed request stays
    assert cluster.lock_request(p1.backend, "v")[1] == again
    cluster.drop_lock_request(p2.backend, "v", again)  # granted: its writer removes it
    assert cluster.lock_request(p1.backend, "v") == (None, None)
    held = cluster.request_lock(p1.backend, "v", p1.me, None)  # a request of the writer now holding it...
    assert held is not None
    assert cluster.request_lock(p3.backend, "v", p3.me, None, holder=p1.me.writer) is not None  # ...is replaced
    assert cluster.lock_request(p1.backend, "v")[0].who.node == "n3"  # type: ignore[union-attr]
    for p in (p1, p2, p3):
        p.close()


@pytest.mark.unit
@pytest.mark.parametrize(("addr", "ranges", "covered"), [
    ("172.29.0.13:0/3912345", ["172.29.0.13/32"], True),
    ("172.29.0.13:6801/12", ["172.29.0.0/24"], True),
    ("172.29.0.14:0/3912345", ["172.29.0.13/32"], False),
    ("172.29.0.13:0/1", [], False),
    ("[fd00::5]:0/77", ["fd00::5/128"], True),
    ("not-an-address", ["172.29.0.13/32"], False),
])
def test_a_writer_whose_host_range_is_blocklisted_needs_no_entry_of_its_own(
        addr: str, ranges: list[str], covered: bool) -> None:
    from storage.cluster import covered_by

    assert covered_by(addr, ranges) is covered
