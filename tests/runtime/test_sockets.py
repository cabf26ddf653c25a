"""runtime.sockets.receive_some: one wait and one read on a plain socket, trio's errors."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from carapace.runtime.sockets import receive_some


async def tcp_pair() -> tuple[trio.SocketStream, socket.socket]:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    peer = socket.create_connection(listener.getsockname())
    ours, _ = await listener.accept()
    listener.close()
    return trio.SocketStream(ours), peer


async def test_waits_for_data_then_returns_what_arrived() -> None:
    stream, peer = await tcp_pair()
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _collect(stream, got))
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # nothing sent yet: still waiting
        peer.sendall(b"hello")
    assert got == [b"hello"]
    peer.close()
    assert await receive_some(stream, 100) == b""  # EOF
    await stream.aclose()


async def _collect(stream: trio.SocketStream, got: list[bytes]) -> None:
    got.append(await receive_some(stream, 100))


async def test_is_cancellable_while_waiting() -> None:
    stream, peer = await tcp_pair()
    with trio.move_on_after(0.05) as scope:
        await receive_some(stream, 100)
    assert scope.cancelled_caught
    peer.sendall(b"x")  # nothing was lost by the cancelled wait
    assert await receive_some(stream, 100) == b"x"
    peer.close()
    await stream.aclose()


async def test_a_reset_is_a_broken_resource() -> None:
    stream, peer = await tcp_pair()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # RST
    with pytest.raises(trio.BrokenResourceError):
        await receive_some(stream, 100)
    await stream.aclose()


async def test_a_socket_closed_under_the_reader_is_a_closed_resource() -> None:
    stream, peer = await tcp_pair()
    async with trio.open_nursery() as nursery:
        errors: list[BaseException] = []

        async def reader() -> None:
            try:
                await receive_some(stream, 100)
            except trio.ClosedResourceError as exc:
                errors.append(exc)

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()
    assert len(errors) == 1
    with pytest.raises(trio.ClosedResourceError):
        await receive_some(stream, 100)
    peer.close()


async def test_other_streams_use_their_own_receive_some() -> None:
    send, recv = trio.testing.memory_stream_pair()
    await send.send_all(b"abc")
    assert await receive_some(recv, 100) == b"abc"
