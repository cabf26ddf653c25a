"""Frames: a 4-byte big-endian length, then one msgpack map.

:class:`FrameDecoder` is fed bytes in any split and yields messages, like
h11's ``receive_data``/``next_event``; :func:`encode` turns a message back
into bytes. A length prefix over the cap is refused as soon as its four bytes
arrive, so a hostile peer cannot make us buffer a huge frame first.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import msgpack

from .errors import ProtocolError
from .messages import Data, Message, SseRaw, message_from_map, message_to_map

DEFAULT_MAX_FRAME = 16 * 1024 * 1024
"""Default cap on one frame's payload (16 MiB)."""

class FrameTooLarge(ValueError):
    """A message we were about to send would exceed the receiver's frame cap."""


class OversizedFrame(ProtocolError):
    """The peer announced a frame over our cap (refused from its length prefix alone)."""


_LENGTH = struct.Struct(">I")
HEADER_SIZE = _LENGTH.size

_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def encode(msg: Message) -> bytes:
    """The frame bytes (length prefix included) for one message."""
    kind = type(msg)
    if kind is Data or kind is SseRaw:
        return _encode_bulk(msg)  # type: ignore[arg-type]
    payload: bytes = _pack(message_to_map(msg))
    return _LENGTH.pack(len(payload)) + payload


_BULK_HEADS = {Data: b"\x83\xa1t\xa4data\xa2id", SseRaw: b"\x84\xa1t\xa7sse_raw\xa2id"}
"""The msgpack bytes before the request id of a data and an sse_raw map."""
_BIN8, _BIN16, _BIN32 = struct.Struct(">BB"), struct.Struct(">BH"), struct.Struct(">BI")


def _encode_bulk(msg: Data | SseRaw) -> bytes:
    """``data`` and ``sse_raw`` written out by hand, the same bytes as msgpack's in one copy
    of the payload (msgpack and the length prefix made three: a download's bytes go here)."""
    body = msg.data
    size = len(body)
    if size < 0x100:
        bin_head = _BIN8.pack(0xC4, size)
    elif size < 0x10000:
        bin_head = _BIN16.pack(0xC5, size)
    else:
        bin_head = _BIN32.pack(0xC6, size)
    parts = [b"", _BULK_HEADS[type(msg)], _pack(msg.id), b"\xa4data", bin_head, body]
    if type(msg) is SseRaw:
        parts += [b"\xa6events", _pack(msg.events)]
    parts[0] = _LENGTH.pack(sum(map(len, parts)))
    return b"".join(parts)


def encode_payload(msg: Message) -> bytes:
    """The msgpack payload alone, without the length prefix."""
    payload: bytes = _pack(message_to_map(msg))
    return payload


def decode_payload(payload: bytes) -> Message:
    """One message from one frame's payload; raise ProtocolError if it is not valid."""
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
        )
    except msgpack.ExtraData:
        raise ProtocolError("frame holds more than one msgpack object") from None
    except (ValueError, msgpack.UnpackException, TypeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed msgpack in frame: {type(exc).__name__}") from None
    except RecursionError:
        raise ProtocolError("malformed msgpack in frame: nested too deeply") from None
    return message_from_map(obj)


class FrameDecoder:
    """Incremental frame decoder: ``feed`` bytes, then iterate for messages."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0
        self.last_frame_size = 0
        """Size on the wire (prefix included) of the message most recently returned."""

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data
        self._check_header()

    def _check_header(self) -> None:
        if len(self._buf) - self._pos >= HEADER_SIZE:
            (length,) = _LENGTH.unpack_from(self._buf, self._pos)
            if length > self.max_frame:
                raise OversizedFrame(
                    f"frame of {length} bytes exceeds the {self.max_frame}-byte limit"
                )
            if length == 0:
                raise ProtocolError("empty frame")

    def next_payload(self) -> bytes | None:
        """The next complete frame's payload, or None if more bytes are needed."""
        avail = len(self._buf) - self._pos
        if avail < HEADER_SIZE:
            return None
        self._check_header()
        (length,) = _LENGTH.unpack_from(self._buf, self._pos)
        end = self._pos + HEADER_SIZE + length
        if end > len(self._buf):
            return None
        payload = bytes(self._buf[self._pos + HEADER_SIZE : end])
        self._pos = end
        self.last_frame_size = HEADER_SIZE + length
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        # A bad header right behind this frame is reported by the next call, so
        # this good frame is still delivered first (iterating reaches it at once).
        return payload

    def next_message(self) -> Message | None:
        """The next complete message, or None if more bytes are needed."""
        payload = self.next_payload()
        if payload is None:
            return None
        return decode_payload(payload)

    def __iter__(self) -> Iterator[Message]:
        while (msg := self.next_message()) is not None:
            yield msg

    def close(self) -> None:
        """The peer closed the stream: raise if it stopped in the middle of a frame."""
        if self.buffered:
            raise ProtocolError(
                f"connection closed in the middle of a frame ({self.buffered} bytes pending)"
            )
