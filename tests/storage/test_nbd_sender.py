"""The NBD server's scatter-gather sender on a real socket pair: whole messages in order,
however little the reader takes at a time; flow control; closing after what waits."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from storage.nbd.sender import MAX_PARTS, Sender

pytestmark = pytest.mark.unit


def _pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    for s in (ours, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    return ours, theirs


async def _read_all(sock: socket.socket, n: int, chunk: int = 7919) -> bytes:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    got = bytearray()
    while len(got) < n:
        got += await loop.sock_recv(sock, min(chunk, n - len(got)))
        await asyncio.sleep(0)  # a slow reader: the sender's socket fills up
    return bytes(got)


def test_messages_of_many_parts_arrive_whole_and_in_order_through_a_slow_reader() -> None:
    async def main() -> None:
        ours, theirs = _pair()
        events: list[str] = []
        sender = Sender(asyncio.get_running_loop(), ours, lambda: events.append("pause"),
                        lambda: events.append("resume"), lambda: events.append("fail"))
        sender.HIGH, sender.LOW = 1 << 20, 256 << 10
        expected = bytearray()
        blob = os.urandom(1 << 20)
        view = memoryview(blob)
        for i in range(12):  # 12 "replies" of a header and 16 views each, some queued behind others
            header = i.to_bytes(16, "big")
            parts = [header, *(view[k * 65536 : (k + 1) * 65536] for k in range(16))]
            sender.send(parts)
            expected += b"".join(parts)
        sender.send([bytes(range(256))] * (MAX_PARTS + 10))  # more parts than one sendmsg takes
        expected += bytes(range(256)) * (MAX_PARTS + 10)
        assert sender.queue, "the socket should not take 12 MiB at once"
        got = await _read_all(theirs, len(expected))
        assert got == bytes(expected)
        await asyncio.sleep(0.05)
        assert not sender.queue and sender.queued == 0
        assert events[:2] == ["pause", "resume"] and "fail" not in events
        sender.close()
        ours.close()
        theirs.close()

    asyncio.run(main())


def test_then_runs_once_everything_waiting_went_out_and_a_closed_peer_fails_the_sender() -> None:
    async def main() -> None:
        ours, theirs = _pair()
        failed: list[bool] = []
        sender = Sender(asyncio.get_running_loop(), ours, lambda: None, lambda: None, lambda: failed.append(True))
        sender.send([os.urandom(4 << 20)])
        drained = asyncio.get_running_loop().create_future()
        sender.then(lambda: drained.set_result(True))
        assert not drained.done()
        await _read_all(theirs, 4 << 20, chunk=1 << 20)
        assert await asyncio.wait_for(drained, 5)
        ran: list[bool] = []
        sender.then(lambda: ran.append(True))  # nothing waits: at once
        assert ran == [True]
        theirs.close()
        for _ in range(4):
            sender.send([os.urandom(1 << 20)])
            await asyncio.sleep(0.01)
        assert failed == [True] and sender.closed and not sender.queue
        ours.close()

    asyncio.run(main())
