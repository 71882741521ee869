"""Garbage collection, scrub and the consistency check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage.engine import open_pool
from storage.maintenance import check_consistency, collect_garbage, scrub

MiB = 1 << 20


@pytest.mark.contract
def test_deleting_volumes_and_snapshots_frees_space_after_gc(backend_url: str) -> None:
    pool = open_pool(backend_url)
    pool.create_volume("keep", 2 * MiB)
    keep_data = os.urandom(2 * MiB)
    pool.open_volume("keep").write(0, keep_data)
    pool.create_volume("gone", 12 * MiB)
    gone = pool.open_volume("gone")
    gone.write(0, os.urandom(12 * MiB))
    pool.snapshot("gone", "s")
    gone.write(0, os.urandom(4 * MiB))
    gone.flush()
    used = pool.stats()["backend_bytes"]
    assert used > 16 * MiB
    pool.delete_snapshot("gone", "s")
    pool.delete_volume("gone")
    report = collect_garbage(pool, grace_seconds=0)
    after = pool.stats()["backend_bytes"]
    assert report.deleted_segments >= 1
    assert after < 6 * MiB, (used, after, report)
    assert pool.open_volume("keep").read(0, 2 * MiB) == keep_data
    assert check_consistency(pool) == []
    pool.close()
    pool = open_pool(backend_url)
    assert pool.open_volume("keep").read(0, 2 * MiB) == keep_data
    pool.close()


@pytest.mark.unit
def test_gc_grace_period_keeps_recent_segments(tmp_path: Path) -> None:
    pool = open_pool(f"local://{tmp_path}")
    pool.create_volume("v", 8 * MiB)
    pool.open_volume("v").write(0, os.urandom(8 * MiB))
    pool.delete_volume("v")
    report = collect_garbage(pool, grace_seconds=3600)
    assert report.deleted_segments == 0
    assert report.bytes_after == report.bytes_before
    pool.close()


@pytest.mark.unit
def test_writes_and_snapshots_during_a_sweep_lose_nothing(tmp_path: Path) -> None:
    pool = open_pool(f"local://{tmp_path}")
    dead_block = os.urandom(65536)
    pool.create_volume("old", 8 * MiB)
    old = pool.open_volume("old")
    old.write(0, dead_block + os.urandom(8 * MiB - 65536))
    pool.delete_volume("old")
    pool.create_volume("live", 2 * MiB)
    live = pool.open_volume("live")
    live.write(0, os.urandom(2 * MiB))
    expected = {}
    real_segments = pool.log.segments

    def segments_while_writing() -> dict[str, float]:
        # Runs after the mark phase, before the sweep decides anything: a write that
        # dedups against a chunk the mark found dead, a new chunk, and a snapshot.
        live.write(MiB, dead_block)
        fresh = os.urandom(65536)
        live.write(0, fresh)
        live.flush()
        pool.snapshot("live", "during")
        expected["data"] = live.read(0, 2 * MiB)
        return real_segments()

    pool.log.segments = segments_while_writing  # type: ignore[method-assign]
    collect_garbage(pool, grace_seconds=0)
    pool.log.segments = real_segments  # type: ignore[method-assign]
    pool.close()
    pool = open_pool(f"local://{tmp_path}")
    assert pool.open_volume("live").read(0, 2 * MiB) == expected["data"]
    pool.clone("live", "during", "c")
    assert pool.open_volume("c").read(MiB, 65536) == dead_block
    assert check_consistency(pool) == []
    pool.close()


@pytest.mark.unit
def test_scrub_finds_a_flipped_byte_and_names_the_volumes_and_offsets(tmp_path: Path) -> None:
    pool = open_pool(f"local://{tmp_path}")
    pool.create_volume("a", 4 * MiB)
    a = pool.open_volume("a")
    victim = os.urandom(65536)
    a.write(0, os.urandom(4 * MiB))
    a.write(3 * 65536, victim)
    pool.snapshot("a", "s")
    pool.clone("a", "s", "b")
    pool.open_volume("b").write(10 * 65536, victim)
    pool.flush()
    assert scrub(pool).bad == []
    h = pool.open_volume("a").map.get(3)
    loc = pool.log.index[h]
    seg = tmp_path / "obj" / loc.segment
    raw = bytearray(seg.read_bytes())
    raw[loc.offset + 100] ^= 0x40
    seg.write_bytes(raw)
    report = scrub(pool)
    assert [b.hash for b in report.bad] == [h.hex()]
    affected = {(x["volume"], x["snapshot"], x["offset"]) for x in report.bad[0].affected}
    assert affected == {("a", None, 3 * 65536), ("a", "s", 3 * 65536), ("b", None, 3 * 65536),
                        ("b", None, 10 * 65536)}
    assert report.chunks_checked >= 64
    pool.close()


@pytest.mark.unit
def test_journal_replays_unsynced_map_updates_after_a_crash(tmp_path: Path) -> None:
    pool = open_pool(f"local://{tmp_path}")
    pool.create_volume("j", 4 * MiB)
    vol = pool.open_volume("j")
    data = os.urandom(3 * MiB + 17)
    vol.write(5, data)
    vol.flush()
    # No checkpoint and no close: the pointer still has the empty root.
    pool.log.backend.close()
    pool2 = open_pool(f"local://{tmp_path}")
    assert pool2.open_volume("j").read(5, len(data)) == data
    assert check_consistency(pool2) == []
    pool2.close()
