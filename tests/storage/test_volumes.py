"""Volumes on both backends: any-offset I/O, sparseness, snapshots, clones, rollback, stats."""

from __future__ import annotations

import os
import random
import time

import pytest

from storage.engine import open_pool
from storage.errors import AlreadyExists, InvalidArgument, NotFound
from storage.maintenance import check_consistency

pytestmark = pytest.mark.contract
MiB = 1 << 20


def test_unaligned_writes_read_back_exactly_and_holes_read_as_zeros(backend_url: str) -> None:
    pool = open_pool(backend_url)
    pool.create_volume("v", 8 * MiB + 1000)
    vol = pool.open_volume("v")
    model = bytearray(vol.size)
    rng = random.Random(1)
    for _ in range(60):
        off = rng.randrange(0, vol.size - 1)
        n = rng.randrange(1, min(300_000, vol.size - off))
        data = rng.randbytes(n)
        vol.write(off, data)
        model[off : off + n] = data
        if rng.random() < 0.3:
            vol.commit()
    vol.flush()
    assert vol.read(0, vol.size) == bytes(model)
    pool.close()
    pool = open_pool(backend_url)
    assert pool.open_volume("v").read(0, len(model)) == bytes(model)
    assert check_consistency(pool) == []
    pool.close()


def test_never_written_volume_stores_nothing(backend_url: str) -> None:
    pool = open_pool(backend_url)
    pool.create_volume("sparse", 1 << 40)
    vol = pool.open_volume("sparse")
    assert vol.read((1 << 40) - 4096, 4096) == bytes(4096)
    vol.write_zeroes(0, 10 * MiB)
    vol.flush()
    assert pool.stats()["stored_bytes"] == 0
    pool.close()


def test_identical_blocks_are_stored_once_and_stats_show_the_dedup(backend_url: str) -> None:
    pool = open_pool(backend_url)
    block = os.urandom(65536)
    for name in ("a", "b"):
        pool.create_volume(name, 4 * MiB)
        vol = pool.open_volume(name)
        for i in range(64):
            vol.write(i * 65536, block)
        vol.flush()
    stats = pool.stats()
    assert stats["logical_bytes"] == 8 * MiB
    assert stats["chunks"] == 1
    assert stats["dedup_ratio"] == pytest.approx(128)
    text = pool.volume_stats("a")
    assert text.logical_bytes == 4 * MiB and text.unique_bytes == 65536
    pool.create_volume("text", MiB)
    pool.open_volume("text").write(0, b"hello cairn " * 87381)
    assert pool.volume_stats("text").compression_ratio > 10
    pool.close()


def test_discard_and_write_zeroes_turn_blocks_into_holes(backend_url: str) -> None:
    pool = open_pool(backend_url)
    pool.create_volume("z", 2 * MiB)
    vol = pool.open_volume("z")
    vol.write(0, b"\xff" * (2 * MiB))
    vol.discard(100, 65536 * 2)
    vol.write_zeroes(MiB, MiB)
    expect = b"\xff" * 100 + bytes(131072) + b"\xff" * (MiB - 131172) + bytes(MiB)
    assert vol.read(0, 2 * MiB) == expect
    assert pool.volume_stats("z").logical_bytes == 14 * 65536 + 65536
    pool.close()


def test_snapshot_is_unchanged_by_later_writes_and_clones_diverge(backend_url: str) -> None:
    pool = open_pool(backend_url)
    pool.create_volume("base", 4 * MiB)
    vol = pool.open_volume("base")
    v1 = os.urandom(4 * MiB)
    vol.write(0, v1)
    pool.snapshot("base", "s1")
    vol.write(1000, b"after" * 1000)
    pool.clone("base", "s1", "c1")
    pool.clone("base", "s1", "c2")
    c1, c2 = pool.open_volume("c1"), pool.open_volume("c2")
    assert c1.read(0, 4 * MiB) == v1
    c1.write(0, b"one" * 100)
    c2.write(0, b"two" * 100)
    assert c1.read(0, 3) == b"one" and c2.read(0, 3) == b"two"
    assert pool.open_volume("base").read(1000, 5) == b"after"
    pool.rollback("base", "s1")
    assert pool.open_volume("base").read(0, 4 * MiB) == v1
    assert [s["name"] for s in pool.list_snapshots("base")] == ["s1"]
    with pytest.raises(AlreadyExists):
        pool.snapshot("base", "s1")
    pool.delete_snapshot("base", "s1")
    assert pool.list_snapshots("base") == []
    with pytest.raises(NotFound):
        pool.rollback("base", "s1")
    pool.close()
    pool = open_pool(backend_url)
    assert pool.open_volume("c1").read(0, 3) == b"one"
    assert pool.open_volume("c2").read(300, 4 * MiB - 300) == v1[300:]
    pool.close()


def test_snapshot_time_does_not_depend_on_volume_size(backend_url: str) -> None:
    pool = open_pool(backend_url)
    times = []
    for name, size in (("small", MiB), ("huge", 100 << 30)):
        pool.create_volume(name, size)
        vol = pool.open_volume(name)
        vol.write(size - 65536, os.urandom(65536))
        vol.checkpoint()
        t = time.perf_counter()
        pool.snapshot(name, "s")
        pool.clone(name, "s", name + "-clone")
        times.append(time.perf_counter() - t)
    assert times[1] < times[0] * 5 + 0.05
    pool.close()


def test_resize_grows_with_zeros_and_shrinks_only_with_force(backend_url: str) -> None:
    pool = open_pool(backend_url)
    pool.create_volume("r", MiB)
    vol = pool.open_volume("r")
    vol.write(0, b"\x01" * MiB)
    pool.resize("r", 3 * MiB)
    assert vol.read(MiB - 1, 2) == b"\x01\x00"
    with pytest.raises(InvalidArgument):
        pool.resize("r", 1000)
    pool.resize("r", 1000, force=True)
    pool.resize("r", MiB)
    assert vol.read(0, MiB) == b"\x01" * 1000 + bytes(MiB - 1000)
    with pytest.raises(InvalidArgument):
        vol.write(MiB - 1, b"ab")
    pool.close()


def test_bad_input_is_rejected_and_changes_nothing(backend_url: str) -> None:
    pool = open_pool(backend_url)
    pool.create_volume("x", MiB)
    with pytest.raises(AlreadyExists):
        pool.create_volume("x", MiB)
    with pytest.raises(InvalidArgument):
        pool.create_volume("bad/name", MiB)
    with pytest.raises(NotFound):
        pool.snapshot("missing", "s")
    pool.delete_volume("x")
    assert pool.list_volumes() == []
    pool.close()
