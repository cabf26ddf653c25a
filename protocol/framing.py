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
from .messages import (
    MAX_REQUEST_ID,
    Data,
    Message,
    SseEvent,
    SseEvents,
    SseRaw,
    message_from_map,
    message_to_map,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

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
    return message_from_obj(obj)


def message_from_obj(obj: Any) -> Message:
    """:func:`message_from_map`, by hand for the streaming frames."""
    if type(obj) is dict:
        kind = obj.get("t")
        fast = _FAST_PATHS.get(kind) if type(kind) is str else None
        if fast is not None:
            msg = fast(obj)
            if msg is not None:
                return msg
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


# --------------------------------------------------------------------------
# The streaming hot path: the frames that carry a body or an event stream are
# checked by hand, the same checks as message_from_map's in one step (its walk
# over the schema cost most of a frame's decoding). Anything that is not
# plainly valid goes the general way, which says what is wrong with it.


def _fast_data(obj: dict[str, Any]) -> Message | None:
    if len(obj) != 3:
        return None
    rid = obj.get("id")
    data = obj.get("data")
    if type(rid) is not int or not 1 <= rid <= MAX_REQUEST_ID or type(data) is not bytes:
        return None
    return Data(rid, data)


def _fast_sse_raw(obj: dict[str, Any]) -> Message | None:
    if len(obj) != 4:
        return None
    rid = obj.get("id")
    data = obj.get("data")
    events = obj.get("events")
    if (type(rid) is not int or not 1 <= rid <= MAX_REQUEST_ID or type(data) is not bytes
            or type(events) is not int or events < 0 or not data.endswith(b"\n\n")
            or b"\r" in data):
        return None
    return SseRaw(rid, data, events)


def _plain_fields(event: Any, data: Any, sse_id: Any, retry: Any) -> bool:
    """One event's fields hold what ``sse_event`` allows (_sse_fields_problem's rules)."""
    return ((event is None or (type(event) is str and "\n" not in event and "\r" not in event))
            and (data is None or type(data) is str)
            and (sse_id is None or (type(sse_id) is str and "\n" not in sse_id
                                    and "\r" not in sse_id and "\x00" not in sse_id))
            and (retry is None or (type(retry) is int and retry >= 0)))


_SSE_EVENT_KEYS = frozenset({"t", *SseEvent._FIELDS})


def _fast_sse_event(obj: dict[str, Any]) -> Message | None:
    if not obj.keys() <= _SSE_EVENT_KEYS:
        return None
    rid = obj.get("id")
    fields = (obj.get("event"), obj.get("data"), obj.get("sse_id"), obj.get("retry"))
    if type(rid) is not int or not 1 <= rid <= MAX_REQUEST_ID or not _plain_fields(*fields):
        return None
    return SseEvent(rid, *fields)


def _fast_sse_events(obj: dict[str, Any]) -> Message | None:
    if len(obj) != 3:
        return None
    rid = obj.get("id")
    events = obj.get("events")
    if type(rid) is not int or not 1 <= rid <= MAX_REQUEST_ID or type(events) is not list:
        return None
    if not events or not all(type(e) is list and len(e) == 4 and _plain_fields(*e)
                             for e in events):
        return None
    return SseEvents(rid, tuple(map(tuple, events)))


_FAST_PATHS: dict[str, Callable[[dict[str, Any]], Message | None]] = {
    Data.TYPE: _fast_data,
    SseRaw.TYPE: _fast_sse_raw,
    SseEvent.TYPE: _fast_sse_event,
    SseEvents.TYPE: _fast_sse_events,
}
