"""FrameWriter: a frame sent while the writing task is idle goes out at once;
order, counts and a broken link are still the writing task's business."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from carapace.runtime.frames import FrameWriter
from carapace.runtime.sockets import send_all


def socket_streams() -> tuple[trio.SocketStream, socket.socket]:
    ours, theirs = trio.socket.socketpair()
    peer = socket.socket(fileno=os.dup(theirs.fileno()))
    theirs.close()
    peer.setblocking(False)
    return trio.SocketStream(ours), peer


def read_now(peer: socket.socket) -> bytes:
    """What has arrived at the peer, without waiting for more."""
    out = b""
    while True:
        try:
            data = peer.recv(1 << 20)
        except BlockingIOError:
            return out
        if not data:
            return out
        out += data


async def test_an_idle_writer_lets_the_sender_write_at_once() -> None:
    stream, peer = socket_streams()
    writer = FrameWriter(stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await trio.testing.wait_all_tasks_blocked()
        writer.send_bytes(b"one")
        # No checkpoint since: the bytes were written by send_bytes itself.
        assert read_now(peer) == b"one"
        writer.send_bytes(b"two+three", frames=2)
        assert read_now(peer) == b"two+three"
        assert (writer.bytes_sent, writer.frames_sent) == (12, 3)
        writer.close()
    peer.close()


async def test_before_the_writing_task_runs_frames_wait_in_order() -> None:
    stream, peer = socket_streams()
    writer = FrameWriter(stream)
    writer.send_bytes(b"a")  # e.g. frames replayed onto a new link
    writer.send_bytes(b"b")
    assert read_now(peer) == b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await trio.testing.wait_all_tasks_blocked()
        assert read_now(peer) == b"ab"
        writer.send_bytes(b"c")
        assert read_now(peer) == b"c"
        writer.close()
    assert writer.frames_sent == 3
    peer.close()


async def test_what_a_full_socket_cannot_take_follows_in_order() -> None:
    stream, peer = socket_streams()
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer = FrameWriter(stream)
    big = bytes(range(256)) * 4096  # 1 MiB: far more than the socket buffers
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await trio.testing.wait_all_tasks_blocked()
        writer.send_bytes(big)
        assert 0 < writer.bytes_sent < len(big)  # part went at once, the rest is queued
        writer.send_bytes(b"after")  # must not overtake the rest of big
        writer.close()
        while len(received) < len(big) + 5:
            await trio.lowlevel.wait_readable(peer)
            received += read_now(peer)
    assert bytes(received) == big + b"after"
    assert (writer.bytes_sent, writer.frames_sent) == (len(big) + 5, 2)
    peer.close()


async def test_a_closed_socket_is_reported_by_the_writing_task() -> None:
    stream, peer = socket_streams()
    writer = FrameWriter(stream)
    raised: list[BaseException] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await trio.testing.wait_all_tasks_blocked()
            await stream.aclose()
            writer.send_bytes(b"lost")  # no write to a closed (maybe reused) descriptor
    except* trio.ClosedResourceError as group:
        raised.extend(group.exceptions)
    assert raised and writer.bytes_sent == 0
    peer.close()


async def test_other_streams_always_go_through_the_writing_task() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    writer = FrameWriter(send)  # e.g. TLS: no socket to write to directly
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await trio.testing.wait_all_tasks_blocked()
        writer.send_bytes(b"x")
        assert writer.bytes_sent == 0
        await trio.testing.wait_all_tasks_blocked()
        assert await receive.receive_some() == b"x"
        writer.close()
    assert writer.bytes_sent == 1


async def test_send_all_writes_at_once_and_leaves_the_rest_to_trio() -> None:
    stream, peer = socket_streams()
    await send_all(stream, b"")
    await send_all(stream, b"hello")
    assert read_now(peer) == b"hello"
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * 4096
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_all, stream, big)
        while len(received) < len(big):
            await trio.lowlevel.wait_readable(peer)
            received += read_now(peer)
    assert bytes(received) == big
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await send_all(stream, b"late")  # trio's own error, not a write to a stale number
    peer.close()


async def test_send_all_is_still_a_cancellation_point() -> None:
    stream, peer = socket_streams()
    with trio.CancelScope() as scope:
        scope.cancel()
        await send_all(stream, b"never")
    assert scope.cancelled_caught and read_now(peer) == b""
    peer.close()
