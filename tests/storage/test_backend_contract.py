"""The same assertions against the local and the rados backend."""

from __future__ import annotations

import threading

import pytest

from storage.backends import ObjectBackend, open_backend
from storage.errors import InvalidArgument, ObjectNotFound

pytestmark = pytest.mark.contract


def test_put_then_get_returns_the_bytes_and_ranges(backend: ObjectBackend) -> None:
    backend.put("seg/a", b"0123456789")
    assert backend.get("seg/a") == b"0123456789"
    assert backend.get("seg/a", 3, 4) == b"3456"
    assert backend.size("seg/a") == 10
    assert backend.exists("seg/a")


def test_put_replaces_the_whole_object(backend: ObjectBackend) -> None:
    backend.put("x", b"long value here")
    backend.put("x", b"short")
    assert backend.get("x") == b"short"


def test_get_of_a_missing_object_raises_object_not_found(backend: ObjectBackend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.get("nope")
    assert not backend.exists("nope")


def test_delete_removes_and_is_idempotent(backend: ObjectBackend) -> None:
    backend.put("d", b"1")
    backend.delete("d")
    backend.delete("d")
    assert not backend.exists("d")


def test_list_filters_by_prefix(backend: ObjectBackend) -> None:
    for name in ("seg/w1/1", "seg/w1/2", "idx/w1/1"):
        backend.put(name, b"x")
    assert sorted(backend.list("seg/")) == ["seg/w1/1", "seg/w1/2"]
    assert sorted(backend.list()) == ["idx/w1/1", "seg/w1/1", "seg/w1/2"]


def test_append_extends_the_object_and_sync_keeps_it(backend: ObjectBackend) -> None:
    backend.append("log", b"abc")
    backend.append("log", b"def")
    backend.sync("log")
    assert backend.get("log") == b"abcdef"
    assert backend.size("log") == 6


def test_cas_pointer_swaps_only_from_the_expected_value(backend: ObjectBackend) -> None:
    assert backend.get_pointer("vol/a") is None
    assert backend.cas_pointer("vol/a", None, b"\x00v1")
    assert not backend.cas_pointer("vol/a", None, b"other")
    assert not backend.cas_pointer("vol/a", b"stale", b"v2")
    assert backend.get_pointer("vol/a") == b"\x00v1"
    assert backend.cas_pointer("vol/a", b"\x00v1", b"v2")
    assert sorted(backend.list_pointers("vol/")) == ["vol/a"]
    assert backend.cas_pointer("vol/a", b"v2", None)
    assert backend.get_pointer("vol/a") is None
    assert list(backend.list_pointers("vol/")) == []


def test_concurrent_cas_increments_lose_no_update(backend_url: str) -> None:
    backends = [open_backend(backend_url) for _ in range(4)]

    def bump(b: ObjectBackend) -> None:
        for _ in range(10):
            while True:
                cur = b.get_pointer("counter")
                nxt = str(int(cur or b"0") + 1).encode()
                if b.cas_pointer("counter", cur, nxt):
                    break

    threads = [threading.Thread(target=bump, args=(b,)) for b in backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert backends[0].get_pointer("counter") == b"40"
    for b in backends:
        b.close()


@pytest.mark.unit
def test_unknown_backend_scheme_is_rejected() -> None:
    with pytest.raises(InvalidArgument):
        open_backend("s3://bucket")
