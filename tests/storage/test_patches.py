"""Sub-block writes: patches over a base block instead of read-modify-write of 64 KiB."""

from __future__ import annotations

import itertools
import os
import random

import pytest

from storage.chunks import decode_patch, encode_patch, merge_extents
from storage.engine import open_pool
from storage.maintenance import check_consistency, collect_garbage, scrub

pytestmark = pytest.mark.contract
MiB = 1 << 20
BS = 65536


def test_merged_extents_keep_the_last_write_of_every_byte() -> None:
    rng = random.Random(3)
    model = bytearray(BS)
    written = bytearray(BS)
    extents: list[tuple[int, bytes]] = []
    for _ in range(200):
        off = rng.randrange(0, BS - 1)
        data = rng.randbytes(rng.randrange(1, min(5000, BS - off)))
        extents = merge_extents(extents, off, data)
        model[off : off + len(data)] = data
        written[off : off + len(data)] = b"\1" * len(data)
    assert all(a[0] + len(a[1]) < b[0] for a, b in itertools.pairwise(extents))
    for off, data in extents:
        assert model[off : off + len(data)] == data
        assert all(written[off : off + len(data)])
    assert sum(len(d) for _o, d in extents) == sum(written)
    blob = encode_patch(b"\7" * 32, extents, BS)
    assert len(blob) != BS
    assert decode_patch(blob) == (b"\7" * 32, extents)


def test_small_writes_store_patches_and_read_back_exactly(backend_url: str) -> None:
    pool = open_pool(backend_url)
    pool.create_volume("p", 4 * MiB)
    vol = pool.open_volume("p")
    base = os.urandom(4 * MiB)
    vol.write(0, base)
    vol.flush()
    model = bytearray(base)
    before = sum(pool.backend.size(s) for s in pool.backend.list("seg/"))
    rng = random.Random(7)
    for _ in range(64):
        off = rng.randrange(0, 4 * MiB // 4096) * 4096
        data = os.urandom(4096)
        vol.write(off, data)
        model[off : off + 4096] = data
    vol.flush()
    grown = sum(pool.backend.size(s) for s in pool.backend.list("seg/")) - before
    assert grown < 64 * 4096 * 4, f"4 KiB writes grew the log by {grown} bytes: still read-modify-write?"
    patched = [b for b in range(64) if pool.chunks.is_patch(vol.map.get(b))]
    assert patched, "no block became a patch"
    assert vol.read(0, 4 * MiB) == bytes(model)
    pool.snapshot("p", "s")
    for _ in range(200):
        off = rng.randrange(0, 4 * MiB - 1)
        n = rng.choice((1, 512, 4096, 5000, 40000, rng.randrange(1, 70000)))
        n = min(n, 4 * MiB - off)
        data = os.urandom(n) if rng.random() < 0.8 else bytes(n)
        if rng.random() < 0.1:
            vol.write_zeroes(off, n)
            data = bytes(n)
        else:
            vol.write(off, data)
        model[off : off + n] = data
        if rng.random() < 0.2:
            vol.flush()
    vol.flush()
    assert vol.read(0, 4 * MiB) == bytes(model)
    pool.clone("p", "s", "c")
    pool.close()

    pool = open_pool(backend_url)
    assert pool.open_volume("p").read(0, 4 * MiB) == bytes(model)
    assert check_consistency(pool) == []
    collect_garbage(pool, grace_seconds=0)  # patches keep their bases alive
    assert pool.open_volume("p").read(0, 4 * MiB) == bytes(model)
    clone = pool.open_volume("c").read(0, 4 * MiB)
    pool.chunks.forget()
    assert pool.open_volume("c").read(0, 4 * MiB) == clone
    assert scrub(pool).bad == []
    pool.close()


def test_a_journal_of_patches_replays_after_a_crash(tmp_path: object) -> None:
    url = f"local://{tmp_path}"
    pool = open_pool(url)
    pool.create_volume("j", MiB)
    vol = pool.open_volume("j")
    model = bytearray(os.urandom(MiB))
    vol.write(0, model)
    vol.checkpoint()
    rng = random.Random(5)
    for _ in range(100):
        off = rng.randrange(0, MiB - 4096)
        data = os.urandom(rng.randrange(1, 4096))
        vol.write(off, data)
        model[off : off + len(data)] = data
    vol.flush()
    pool.log.backend.close()  # no checkpoint, no close: the records must replay
    pool2 = open_pool(url)
    assert pool2.open_volume("j").read(0, MiB) == bytes(model)
    assert check_consistency(pool2) == []
    pool2.close()
