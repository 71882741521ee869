"""The journal: one append per group commit, replay after a crash that lost an earlier
group but not a later one, and replay positions that do not hold on to old segments."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from storage import log as segment_log
from storage.engine import open_pool
from storage.log import LogPosition, parse_segment
from storage.maintenance import _replayed, check_consistency

MiB = 1 << 20


@pytest.mark.functional
def test_a_group_commit_is_one_append_of_its_chunks_and_map_records(backend_url: str) -> None:
    pool = open_pool(backend_url)
    pool.create_volume("v", 16 * MiB)
    vol = pool.open_volume("v")
    appends: list[tuple[str, int]] = []
    real = pool.log.io.append

    def counting(name: str, data: bytes, cb: Callable[[BaseException | None], None]) -> None:
        appends.append((name, len(data)))
        real(name, data, cb)

    pool.log.io.append = counting  # type: ignore[method-assign]
    payloads = [os.urandom(MiB) for _ in range(6)]
    for i, data in enumerate(payloads):
        vol.write(i * MiB, data)
        pool.log.commit()
    assert len(appends) == 6, appends
    assert {parse_segment(name)[0] for name, _n in appends} == {pool.log.writer}  # the journal only
    assert all(n > MiB for _name, n in appends)  # the chunks and the records naming them
    pool.log.backend.close()  # a crash: no checkpoint since the volume was opened
    again = open_pool(backend_url)
    try:
        vol = again.open_volume("v", takeover=True)
        assert vol.read(0, 6 * MiB) == b"".join(payloads)
    finally:
        again.close()


@pytest.mark.unit
def test_a_later_group_that_landed_without_an_earlier_one_replays_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal moved to a new object between two groups in flight; the daemon died
    after the later append landed and before the earlier one did. Neither was
    acknowledged. Replay keeps the later group's own chunks and skips its entries that
    name chunks only the lost group carried (a deduplicated write)."""
    monkeypatch.setattr(segment_log, "SEGMENT_TARGET", MiB)
    url = f"local://{tmp_path}"
    pool = open_pool(url)
    pool.create_volume("v", 8 * MiB)
    vol = pool.open_volume("v")
    first = os.urandom(4096)
    vol.write(6 * MiB, first)
    vol.flush()  # acknowledged: it must survive
    lost, later = os.urandom(MiB), os.urandom(MiB)
    dropped: list[str] = []
    real = pool.log.io.append

    def lose_first(name: str, data: bytes, cb: Callable[[BaseException | None], None]) -> None:
        if not dropped:
            dropped.append(name)  # never lands, never completes
            return
        real(name, data, cb)

    pool.log.io.append = lose_first  # type: ignore[method-assign]
    vol.write(0, lost)
    pool.log.commit_async()  # fills the journal object past its target: the next group starts a new one
    vol.write(2 * MiB, later)
    vol.write(4 * MiB, lost)  # deduplicated against the lost group's chunks
    pending = pool.log.commit_async()
    landed = parse_segment(pool.log.segment)[1] - 1
    deadline = time.monotonic() + 30
    while segment_log.segment_name(pool.log.writer, landed) not in pool.backend.list("seg/") or \
            pool.backend.size(segment_log.segment_name(pool.log.writer, landed)) < MiB:
        assert time.monotonic() < deadline, "the later group never landed"
        time.sleep(0.01)
    assert dropped and parse_segment(dropped[0])[1] == landed - 1
    assert not pending.done()  # not acknowledged: the earlier group never landed
    pool.log.backend.close()  # the daemon dies

    again = open_pool(url)
    try:
        vol = again.open_volume("v", takeover=True)
        assert vol.read(6 * MiB, 4096) == first
        assert vol.read(2 * MiB, MiB) == later
        assert vol.read(0, MiB) == bytes(MiB)  # the lost group
        assert vol.read(4 * MiB, MiB) == bytes(MiB)  # named chunks that never landed: skipped
        assert check_consistency(again) == []
    finally:
        again.close()


@pytest.mark.unit
def test_replay_positions_follow_the_journal_and_let_go_of_old_segments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An open volume nobody writes does not pin what other volumes wrote since (GC may
    collect it, a takeover does not read it), and a volume given back replays nothing."""
    monkeypatch.setattr(segment_log, "SEGMENT_TARGET", MiB)
    url = f"local://{tmp_path}"
    pool = open_pool(url)
    pool.create_volume("idle", 4 * MiB)
    pool.create_volume("busy", 32 * MiB)
    idle = pool.open_volume("idle")
    idle.write(0, os.urandom(MiB))
    idle.flush()
    idle.checkpoint()
    start = LogPosition.from_json(idle.record.log)
    assert start is not None and not start.settled
    busy = pool.open_volume("busy")
    for i in range(12):
        busy.write(i * MiB, os.urandom(MiB))
        busy.flush()
    busy.checkpoint()
    segments = pool.log.segments()
    old = {s for s in segments if parse_segment(s)[1] < start.seq + 8}
    assert old & _replayed(pool, segments)  # the idle volume's position still holds them

    idle.follow()
    moved = LogPosition.from_json(idle.record.log)
    assert moved is not None and moved.seq >= start.seq + 12
    stored = json.loads(pool.backend.get_pointer("vol/idle") or b"{}")
    assert LogPosition.from_json(stored["log"]) == moved
    assert not old & _replayed(pool, segments)
    idle.follow()  # not far enough behind: the pointer stays
    assert LogPosition.from_json(idle.record.log) == moved

    pool.release("idle")
    released = LogPosition.from_json(json.loads(pool.backend.get_pointer("vol/idle") or b"{}")["log"])
    assert released is not None and released.settled
    for i in range(4):
        busy.write(i * MiB, os.urandom(MiB))
        busy.flush()
    busy.checkpoint()
    now = LogPosition.from_json(busy.record.log)
    assert now is not None and now.seq >= released.seq + 4
    kept = _replayed(pool, pool.log.segments())
    assert kept and all(parse_segment(s)[1] >= now.seq for s in kept)  # the settled position holds nothing
    pool.close()

    again = open_pool(url)
    try:
        replayed: list[bytes] = []
        real = again.log.replay

        def spy(vol_id: bytes, start: LogPosition):  # type: ignore[no-untyped-def]
            replayed.append(vol_id)
            return real(vol_id, start)

        again.log.replay = spy  # type: ignore[method-assign]
        again.open_volume("idle")
        assert replayed == []
        assert check_consistency(again) == []
    finally:
        again.close()


@pytest.mark.unit
def test_index_objects_carry_the_map_records_so_replay_reads_no_sealed_segment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A takeover replays the map records of sealed segments from their index objects
    (chunks are in the journal: reading the segments would read the data); an older
    index object without them still replays, from its segment."""
    monkeypatch.setattr(segment_log, "SEGMENT_TARGET", MiB)
    url = f"local://{tmp_path}"
    pool = open_pool(url)
    pool.create_volume("v", 16 * MiB)
    vol = pool.open_volume("v")
    payload = os.urandom(10 * MiB)
    for at in range(0, len(payload), MiB // 2):
        vol.write(at, payload[at : at + MiB // 2])
        pool.log.commit()
    vol.flush()
    vol.write(12 * MiB + 100, b"patched")  # a patch record in the unsealed tail
    vol.flush()
    pool.log.drain()  # the sealed segments' index objects are stored
    indexed = {"seg/" + i[4:] for i in pool.backend.list("idx/")}
    sealed = sorted(s for s in pool.backend.list("seg/") if s in indexed)
    tails = [s for s in pool.backend.list("seg/") if s not in indexed]
    assert len(sealed) >= 8 and len(tails) == 1, (sealed, tails)
    tail = tails[0]
    for seg in sealed:
        idx = segment_log.index_object(pool.backend.get(segment_log.index_name(seg)))
        assert idx.maps is not None and idx.maps  # every sealed segment of this writer has map records
        assert [(r.body_offset, bytes(r.body)) for r in idx.maps] == [
            (r.body_offset, bytes(r.body)) for r in segment_log.scan(pool.backend.get(seg))
            if r.rtype in segment_log.MAP_RECORDS]
    pool.log.backend.close()  # kill -9: nothing checkpointed since the volume was opened

    again = open_pool(url)
    try:
        read: list[str] = []
        real_get = again.log.backend.get

        def counting(name: str, offset: int = 0, length: int | None = None) -> bytes:
            data = real_get(name, offset, length)
            if name.startswith("seg/") and length is None:
                read.append(name)
            return data

        again.log.backend.get = counting  # type: ignore[method-assign]
        vol = again.open_volume("v", takeover=True)
        assert vol.read(0, len(payload)) == payload
        assert vol.read(12 * MiB + 100, 7) == b"patched"
        assert not set(read) & set(sealed), read  # no sealed segment was read whole
        # The dead writer's open segment was sealed by the takeover (after a scan): its
        # index object has the map records too.
        assert tail in again.log.sealed
        idx = segment_log.index_object(again.log.backend.get(segment_log.index_name(tail)))
        assert idx.maps is not None and any(r.rtype in segment_log.MAP_RECORDS for r in idx.maps)
        assert check_consistency(again) == []
    finally:
        again.close()

    # An index object of an older version (entries only): replay reads its segment.
    old = sealed[len(sealed) // 2]
    idx = segment_log.index_object(pool.backend.get(segment_log.index_name(old)))
    entries = [segment_log.IDX_ENTRY.pack(*e) for e in idx.entries]
    pool.backend.put(segment_log.index_name(old), segment_log.IDX_HEAD.pack(idx.covered) + b"".join(entries))
    assert segment_log.index_object(pool.backend.get(segment_log.index_name(old))).maps is None
    third = open_pool(url)
    try:
        vol = third.open_volume("v")
        assert vol.read(0, len(payload)) == payload
    finally:
        third.close()


@pytest.mark.functional
def test_large_appends_end_on_an_allocation_unit_and_the_padding_reads_as_nothing(backend_url: str) -> None:
    """A group of 64 KiB or more is padded to the next 4 KiB of its segment (BlueStore
    then writes whole allocation units, not a shared one twice); a small group is not.
    Replay, the index and the consistency check see only the data."""
    pool = open_pool(backend_url)
    pool.create_volume("v", 16 * MiB)
    vol = pool.open_volume("v")
    lengths: list[int] = []  # of the appends
    real = pool.log.io.append

    def recording(name: str, data: bytes, cb: Callable[[BaseException | None], None]) -> None:
        lengths.append(len(data))
        real(name, data, cb)

    pool.log.io.append = recording  # type: ignore[method-assign]
    small = os.urandom(4096)
    vol.write(15 * MiB, small)
    pool.log.commit()
    payloads = [os.urandom(MiB + 512) for _ in range(3)]  # odd sizes: chunk records end anywhere
    at = [0, 3 * MiB, 7 * MiB + 4096]
    for off, data in zip(at, payloads, strict=True):
        vol.write(off, data)
        pool.log.commit()
    assert lengths[0] % segment_log.ALIGN, "a small group is not padded"
    assert all(n >= segment_log.PAD_FROM for n in lengths[1:])
    sizes = [pool.backend.size(s) for s in pool.log.segments() if parse_segment(s)[0] == pool.log.writer]
    assert sum(sizes) == sum(lengths)
    assert all(size % segment_log.ALIGN == 0 for size in sizes), sizes  # every large append ended aligned
    pads = [rec for s in pool.log.segments() for rec in segment_log.scan(pool.backend.get(s))
            if rec.rtype == segment_log.REC_PAD]
    assert len(pads) == 3 and all(not any(rec.body) for rec in pads)  # one per large group
    pool.log.backend.close()  # a crash: the data replays from the journal, pads skipped
    again = open_pool(backend_url)
    try:
        vol = again.open_volume("v", takeover=True)
        assert vol.read(15 * MiB, 4096) == small
        for off, data in zip(at, payloads, strict=True):
            assert vol.read(off, len(data)) == data
        assert check_consistency(again) == []
    finally:
        again.close()
