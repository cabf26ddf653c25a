"""Agent A of the noisy-neighbour scenario: one attack on the server, for a bounded time.

Run as ``python -m benchmarks.attacker SPEC_JSON`` (``port``, ``agent``,
``token``, ``attack``, ``seconds``, ``tools``); it prints ``{"phase":
"attacking"}`` as it starts and at the end one JSON line,
``{"result": {"summary": ..., ...}}``: what it sent and how the server answered
(request errors by status and code, links the server closed, refused
handshakes). Loopback only; every loop stops at the deadline by itself, and
the harness kills the process if the server's RSS passes its cap.

The attacks speak the wire protocol raw (:mod:`benchmarks.wire`), as a hostile
VM would, not through the real agent. Each is named in :data:`ATTACKS`.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from carapace.protocol.errors import ProtocolError
from carapace.protocol.framing import DEFAULT_MAX_FRAME, encode
from carapace.protocol.messages import (
    CliRequest,
    Data,
    End,
    Exit,
    HttpRequest,
    HttpResponse,
    Message,
    Ping,
    RequestFailed,
)

from .wire import LinkClosed, Wire, huge_hello

BIG = DEFAULT_MAX_FRAME - 64 * 1024
"""Payload of a "16 MiB" attack frame: just under the server's default frame cap,
so that the frame is taken in and parsed rather than refused by its length."""

FORGED_LOG = ("signal\n2026-01-01 00:00:00,000 INFO carapace.server: agent vm2 allowed "
              "signal POST /api/v1/rpc (forged)")
EMOJI_ARG = ("\U0001F600" * 2048).encode()


@dataclass
class Tally:
    """What the attacker did and what came back."""

    sent: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    links: int = 0
    ends: Counter[str] = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)

    def answer(self, msg: Message) -> bool:
        """Count ``msg``; True when it ends its request."""
        if isinstance(msg, RequestFailed):
            self.answers[f"{msg.status} {msg.code}"] += 1
        elif isinstance(msg, HttpResponse):
            self.answers[f"HTTP {msg.status}"] += 1
        elif isinstance(msg, Exit):
            self.answers[f"exit {msg.code}"] += 1
        elif isinstance(msg, End):
            self.answers["end"] += 1
        else:
            return False
        return True

    def summary(self) -> str:
        parts = [f"{self.sent:,} sent"]
        if self.answers:
            parts.append(", ".join(f"{k}×{v:,}" for k, v in self.answers.most_common(3)))
        else:
            parts.append("no answers")
        if self.ends:
            parts.append("link " + ", ".join(f"{k}×{v:,}" for k, v in self.ends.most_common(2)))
        parts += [f"{k} {v}" for k, v in self.extra.items() if k != "first_close"]
        return "; ".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "sent": self.sent, "answers": dict(self.answers),
                "links": self.links, "ends": dict(self.ends), **self.extra}


Spec = dict[str, Any]


async def _link(spec: Spec, tally: Tally) -> Wire | None:
    """A fresh authenticated link, or None (counted) if the server would not have it."""
    try:
        wire = await Wire.connect(int(spec["port"]))
    except OSError as exc:
        tally.ends[f"connect failed ({type(exc).__name__})"] += 1
        return None
    try:
        await wire.handshake(spec["agent"], spec["token"].encode())
    except (LinkClosed, trio.BrokenResourceError, OSError) as exc:
        tally.ends[f"handshake: {exc}"[:60]] += 1
        await wire.aclose()
        return None
    tally.links += 1
    return wire


async def flood(spec: Spec, tally: Tally, frame: Callable[[int], bytes], inflight: int) -> None:
    """Send ``frame(id)`` requests, at most ``inflight`` unanswered, link after link."""
    while True:
        wire = await _link(spec, tally)
        if wire is None:
            await trio.sleep(0.05)
            continue
        slots = trio.Semaphore(inflight)
        how = ["closed"]
        async with trio.open_nursery() as nursery:

            async def read(wire: Wire = wire, slots: trio.Semaphore = slots,
                           how: list[str] = how) -> None:
                try:
                    while True:
                        if tally.answer(await wire.receive()):
                            slots.release()
                except LinkClosed as exc:
                    how[0] = f"{exc} by the server"
                except ProtocolError as exc:  # a frame we cannot decode: say so, end the link
                    how[0] = f"bad frame: {exc}"[:60]
                nursery.cancel_scope.cancel()

            nursery.start_soon(read)
            try:
                rid = 0
                while True:
                    await slots.acquire()
                    rid += 1
                    await wire.send_raw(frame(rid))
                    tally.sent += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                how[0] = f"send failed ({type(exc).__name__})"
                nursery.cancel_scope.cancel()
        tally.ends[how[0]] += 1
        await wire.aclose()
        await trio.sleep(0.02)  # not a reconnect storm: that is another attack


def http(tool: str, body: bytes, rid: int) -> bytes:
    return encode(HttpRequest(id=rid, tool=tool, method="POST", target="/api/v1/rpc",
                              headers=((b"content-type", b"application/json"),), body=body))


def cli(tool: str, argv: tuple[bytes, ...], rid: int) -> bytes:
    return encode(CliRequest(id=rid, tool=tool, argv=argv, cwd=b"/", env=(),
                             tty=(False, False, False)))


# ----------------------------------------------------------------------------- the attacks


async def batch16(spec: Spec, tally: Tally) -> None:
    """1. One JSON-RPC http_request at a time whose body is a 16 MiB batch ``[{},{},…]``."""
    n = (BIG - 2) // 3
    body = b"[" + b"{}," * (n - 1) + b"{}]"
    await flood(spec, tally, lambda rid: http(spec["tools"]["rpc"], body, rid), 1)


async def argv16(spec: Spec, tally: Tally) -> None:
    """2. cli_requests with ~16 MiB of argv (4 KiB arguments), one at a time."""
    argv = (b"a" * 4096,) * (BIG // (4096 + 3))
    await flood(spec, tally, lambda rid: cli(spec["tools"]["cli"], argv, rid), 1)


async def hello16(spec: Spec, tally: Tally) -> None:
    """3. Unauthenticated 16 MiB ``hello`` frames (a huge ``versions`` list), two senders
    at a time, beside ``idle_conns`` unauthenticated connections held open (and
    reopened when the server drops them)."""
    frame = huge_hello(spec["agent"], BIG)
    held = [0, 0, 0, 0]  # open now, most open at once, opened, closed by the server

    async def sender() -> None:
        while True:
            try:
                wire = await Wire.connect(int(spec["port"]))
            except OSError as exc:
                tally.ends[f"connect failed ({type(exc).__name__})"] += 1
                await trio.sleep(0.05)
                continue
            try:
                await wire.send_raw(frame)
                tally.sent += 1
                with trio.move_on_after(10):
                    msg = await wire.receive()
                    tally.answers[msg.TYPE] += 1
            except (LinkClosed, trio.BrokenResourceError, OSError) as exc:
                tally.ends[str(exc) if isinstance(exc, LinkClosed) else "send failed"] += 1
            except ProtocolError as exc:  # an answer we cannot decode: say so, go on
                tally.ends[f"bad frame: {exc}"[:60]] += 1
            finally:
                await wire.aclose()

    async def idle() -> None:
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", int(spec["port"]))
            except OSError:
                await trio.sleep(0.2)
                continue
            held[0] += 1
            held[1] = max(held[1], held[0])
            held[2] += 1
            try:
                while await stream.receive_some(4096):
                    pass
                held[3] += 1
            except (trio.BrokenResourceError, OSError):
                held[3] += 1
            finally:
                held[0] -= 1
                with trio.move_on_after(1):
                    await stream.aclose()

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(int(spec.get("idle_conns", 500))):
                nursery.start_soon(idle)
            for _ in range(2):
                nursery.start_soon(sender)
    finally:
        tally.extra["idle conns"] = f"{held[2]} opened, {held[1]} at once, " \
                                    f"{held[3]} dropped by the server"


async def pings(spec: Spec, tally: Tally) -> None:
    """4. Ping frames as fast as the server takes them; its pongs are never read."""
    batch = b"".join(encode(Ping(nonce=i)) for i in range(1000))
    while True:
        wire = await _link(spec, tally)
        if wire is None:
            await trio.sleep(0.05)
            continue
        try:
            while True:
                await wire.send_raw(batch)
                tally.sent += 1000
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            tally.ends["send failed"] += 1
        finally:
            tally.extra["MiB sent"] = round(wire.sent_bytes / 2**20)
            await wire.aclose()


async def stdin30(spec: Spec, tally: Tally) -> None:
    """5. 30 allowed ``sleep 50`` calls, each sent 16 MiB of stdin it never reads."""
    wire = await _link(spec, tally)
    if wire is None:
        return
    chunk = b"x" * (1024 * 1024 - 64)
    how = ["held to the end"]
    try:
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                try:
                    while True:
                        tally.answer(await wire.receive())
                except LinkClosed as exc:
                    how[0] = f"{exc} by the server"
                except ProtocolError as exc:
                    how[0] = f"bad frame: {exc}"[:60]
                nursery.cancel_scope.cancel()

            nursery.start_soon(read)
            for rid in range(1, 31):
                await wire.send_raw(cli(spec["tools"]["sleep"], (b"50",), rid))
                tally.sent += 1
            for rid in range(1, 31):
                for _ in range(16):
                    await wire.send(Data(id=rid, data=chunk))
            tally.extra["MiB of stdin sent"] = round(wire.sent_bytes / 2**20)
            await trio.sleep_forever()
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
        # Raised inside the nursery, so it comes wrapped in an ExceptionGroup.
        how[0] = f"send failed ({type(group.exceptions[0]).__name__})"
    finally:
        tally.extra.setdefault("MiB of stdin sent", round(wire.sent_bytes / 2**20))
        tally.ends[how[0]] += 1
        await wire.aclose()


async def emoji(spec: Spec, tally: Tally) -> None:
    """6. Denied cli_requests of 256 arguments of 2,048 emoji each (2 MiB frames)."""
    argv = (EMOJI_ARG,) * 256
    await flood(spec, tally, lambda rid: cli(spec["tools"]["cli"], argv, rid), 4)


async def ratelimit(spec: Spec, tally: Tally) -> None:
    """7. Small allowed JSON-RPC calls as fast as they go, to the tool agent B uses,
    until its (shared) rate_limit is spent."""
    body = json.dumps({"jsonrpc": "2.0", "method": "version", "id": 1}).encode()
    await flood(spec, tally, lambda rid: http(spec["tools"]["rpc"], body, rid), 32)


async def newline(spec: Spec, tally: Tally) -> None:
    """8. Requests for a tool whose name holds a newline and a forged log line."""
    body = json.dumps({"jsonrpc": "2.0", "method": "version", "id": 1}).encode()
    await flood(spec, tally, lambda rid: http(FORGED_LOG, body, rid), 32)


ATTACKS: dict[str, tuple[str, Callable[[Spec, Tally], Awaitable[None]]]] = {
    "batch16": ("16 MiB JSON-RPC batch [{},…]", batch16),
    "argv16": ("cli_request, 16 MiB of argv", argv16),
    "hello16": ("16 MiB hellos + idle unauthenticated conns", hello16),
    "pings": ("ping flood, pongs never read", pings),
    "stdin30": ("30 × sleep 50, 16 MiB stdin each", stdin30),
    "emoji": ("denied cli_request, 256 × 2,048 emoji", emoji),
    "ratelimit": ("A spends the tool's rate_limit", ratelimit),
    "newline": ("tool name with a newline + forged log line", newline),
}


async def run(spec: Spec) -> dict[str, Any]:
    tally = Tally()
    start = time.monotonic()
    with trio.move_on_after(float(spec["seconds"])):
        await ATTACKS[spec["attack"]][1](spec, tally)
    out = tally.as_json()
    out["seconds"] = round(time.monotonic() - start, 2)
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sys.stdout.write(json.dumps({"phase": "attacking"}) + "\n")  # the harness starts B's clock
    sys.stdout.flush()
    result = trio.run(run, spec)
    sys.stdout.write(json.dumps({"result": result}) + "\n")


if __name__ == "__main__":
    main()
