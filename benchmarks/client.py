"""The measuring client: one process, raw trio sockets, the same code for every peer.

The harness runs it as ``python -m benchmarks.client SPEC_JSON`` so that its own
work (rich rendering, RSS sampling) never shares a GIL with a measurement. It
prints JSON lines on stdout; the last one is ``{"result": ...}``. The idle
scenario is interactive: the client prints ``{"phase": ...}`` lines and waits
for one line on stdin before each next phase.

How it reads:
- SSE latency: h11 for the HTTP framing, :class:`carapace.protocol.sse.SseParser`
  for the events, ``time.time()`` taken once per ``receive_some`` and compared
  with the ``ts`` the upstream put in each event (same host, same clock).
- SSE throughput: no parsing at all, so that the client is never the bound: it
  counts ``\\n\\n`` in the raw bytes. In an HTTP/1.1 response that is exactly the
  number of SSE events: header lines end in CRLF, a chunk-size line is
  ``\\r\\nHEX\\r\\n`` (a chunk boundary inside an event's blank line turns
  ``\\n\\n`` into ``\\n\\r\\nHEX\\r\\n\\n``, still one match), and SSE data never
  holds a blank line. The tail of the stream is checked for the last event's id.
- JSON-RPC: keep-alive connections, the request made once by h11, the answers
  read by :class:`FastResponses` (Content-Length only, strict).
- Download: h11.
"""

from __future__ import annotations

import gc
import json
import math
import resource
import socket
import sys
import time
from typing import Any

import h11
import trio

from carapace.protocol.sse import Event, SseParser
from carapace.runtime.errors import leaves

READ = 256 * 1024


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def connect(host: str, port: int) -> trio.SocketStream:
    sock = await trio.open_tcp_stream(host, port)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def get_request(host: str, port: int, path: str) -> tuple[h11.Connection, bytes]:
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(h11.Request(method="GET", target=path,
                                 headers=[("Host", f"{host}:{port}"),
                                          ("Accept", "*/*")]))
    data += conn.send(h11.EndOfMessage())
    return conn, data


class BenchError(Exception):
    pass


# ----------------------------------------------------------------------------- SSE latency


async def sse_latency_stream(host: str, port: int, path: str, count: int,
                             out: list[float], first_event: trio.Event | None = None) -> None:
    """Read ``count`` events; append arrival − ts (ms) of each to ``out``."""
    sock = await connect(host, port)
    async with sock:
        conn, req = get_request(host, port, path)
        await sock.send_all(req)
        parser = SseParser()
        while len(out) < count:
            data = await sock.receive_some(READ)
            now = time.time()
            if not data:
                raise BenchError(f"stream ended after {len(out)} of {count} events")
            conn.receive_data(data)
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    break
                if isinstance(ev, h11.Response):
                    if ev.status_code != 200:
                        raise BenchError(f"HTTP {ev.status_code} for {path}")
                elif isinstance(ev, h11.Data):
                    for item in parser.feed(bytes(ev.data)):
                        if isinstance(item, Event) and item.data:
                            out.append((now - float(json.loads(item.data)["ts"])) * 1000.0)
                            if first_event is not None:
                                first_event.set()
                elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                    if len(out) < count:
                        raise BenchError(f"stream ended after {len(out)} of {count} events")
                    return


async def run_sse_latency(spec: dict[str, Any]) -> dict[str, Any]:
    """Several peers at once, each stream started ``stagger_ms`` after the previous one
    so their events do not land in the client at the same instant."""
    peers: dict[str, list[Any]] = spec["peers"]  # name -> [host, port]
    count = int(spec["count"])
    path = spec["path"]
    stagger = float(spec.get("stagger_ms", 0)) / 1000.0
    samples: dict[str, list[float]] = {name: [] for name in peers}
    errors: dict[str, str] = {}

    async def one(name: str, host: str, port: int) -> None:
        try:
            await sse_latency_stream(host, port, path, count, samples[name])
        except (BenchError, OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            errors[name] = str(exc) or type(exc).__name__

    with trio.move_on_after(float(spec["timeout"])) as scope:
        async with trio.open_nursery() as nursery:
            for i, (name, (host, port)) in enumerate(peers.items()):
                if i:
                    await trio.sleep(stagger)
                nursery.start_soon(one, name, host, int(port))
    if scope.cancelled_caught:
        for name, values in samples.items():
            if len(values) < count:
                errors.setdefault(name, f"timed out after {len(values)} of {count} events")
    return {"samples": samples, "errors": errors}


# ----------------------------------------------------------------------------- SSE throughput


async def count_events(host: str, port: int, path: str, count: int) -> int:
    """Read an SSE response until ``count`` events arrived; return the bytes read."""
    sock = await connect(host, port)
    async with sock:
        _, req = get_request(host, port, path)
        await sock.send_all(req)
        first = await sock.receive_some(READ)
        if not first.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 ")):
            raise BenchError(f"bad answer for {path}: {first[:80]!r}")
        got = first.count(b"\n\n")
        last = first[-1:]
        tail = first[-4096:]
        total = len(first)
        receive = sock.receive_some
        while got < count:
            data = await receive(READ)
            if not data:
                raise BenchError(f"stream ended after {got} of {count} events")
            got += data.count(b"\n\n")
            if last == b"\n" and data[:1] == b"\n":
                got += 1
            last = data[-1:]
            tail = (tail + data)[-4096:] if len(data) < 4096 else data[-4096:]
            total += len(data)
        if got != count:
            raise BenchError(f"counted {got} events, expected {count}")
        if b"id: %d\n" % count not in tail:
            raise BenchError(f"the last event (id {count}) is not at the end of the stream")
        return total


async def run_sse_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["peer"]
    streams = int(spec["streams"])
    per_stream = int(spec["events_per_stream"])
    path = spec["path"].format(count=per_stream)
    total_bytes = 0
    gc.disable()
    cpu = time.process_time()
    start = time.perf_counter()
    with trio.fail_after(float(spec["timeout"])):
        async with trio.open_nursery() as nursery:

            async def one() -> None:
                nonlocal total_bytes
                n = await count_events(host, int(port), path, per_stream)
                total_bytes += n

            for _ in range(streams):
                nursery.start_soon(one)
    elapsed = time.perf_counter() - start
    gc.enable()
    events = streams * per_stream
    return {"events": events, "seconds": elapsed, "events_per_s": events / elapsed,
            "mb_per_s": total_bytes / elapsed / 1e6, "units": events,
            "cpu_s": time.process_time() - cpu}


# ----------------------------------------------------------------------------- JSON-RPC


class FastResponses:
    """Reads keep-alive responses that carry ``Content-Length`` — nothing else.

    h11 costs ~85 µs per request/response pair on these machines, more than
    the upstream's own work, so the JSON-RPC client would measure itself. The
    request bytes are made once by h11; answers are read with ``find`` and
    slicing, strictly: a status other than 200, a missing Content-Length or
    chunked framing is an error, never a guess.
    """

    def __init__(self, sock: trio.SocketStream) -> None:
        self.sock = sock
        self.buf = b""

    async def read(self) -> bytes:
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            data = await self.sock.receive_some(65536)
            if not data:
                raise BenchError("connection closed mid-response")
            buf += data
        head = buf[:end]
        if not head.startswith(b"HTTP/1.1 200 "):
            raise BenchError(f"unexpected answer {head[:60]!r}")
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at < 0 or b"\r\ntransfer-encoding:" in lower:
            raise BenchError(f"answer without Content-Length: {head[:200]!r}")
        line_end = lower.find(b"\r\n", at + 2)
        length = int(lower[at + 17 : line_end if line_end > 0 else len(lower)])
        body_start = end + 4
        while len(buf) < body_start + length:
            data = await self.sock.receive_some(65536)
            if not data:
                raise BenchError("connection closed mid-body")
            buf += data
        self.buf = buf[body_start + length :]
        return buf[body_start : body_start + length]


async def run_rpc(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["peer"]
    port = int(port)
    concurrency = int(spec["concurrency"])
    total = int(spec["requests"])
    warmup = int(spec.get("warmup", 0))
    body = json.dumps({"jsonrpc": "2.0", "method": "version", "id": 1}).encode()
    conn = h11.Connection(h11.CLIENT)
    request = conn.send(h11.Request(
        method="POST", target="/api/v1/rpc",
        headers=[("Host", f"{host}:{port}"), ("Content-Type", "application/json"),
                 ("Content-Length", str(len(body)))]))
    request += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    latencies: list[float] = []
    remaining = [warmup + total]
    measured_start = [0.0]
    done_warm = [0]
    # Bounded in count and in time: after max_seconds of measuring no new
    # request starts (a slow peer reports its rate over fewer requests).
    max_seconds = float(spec.get("max_seconds", math.inf))

    async def worker() -> None:
        sock = await connect(host, port)
        async with sock:
            reader = FastResponses(sock)
            while remaining[0] > 0:
                if measured_start[0] and time.perf_counter() - measured_start[0] > max_seconds:
                    break
                remaining[0] -= 1
                t0 = time.perf_counter()
                await sock.send_all(request)
                answer = await reader.read()
                t1 = time.perf_counter()
                if b'"result"' not in answer:
                    raise BenchError(f"not a JSON-RPC result: {answer[:120]!r}")
                if done_warm[0] < warmup:
                    done_warm[0] += 1
                    if done_warm[0] == warmup:
                        measured_start[0] = t1
                else:
                    latencies.append((t1 - t0) * 1000.0)

    gc.disable()
    cpu = time.process_time()
    start = time.perf_counter()
    with trio.fail_after(float(spec["timeout"])):
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    end = time.perf_counter()
    gc.enable()
    began = measured_start[0] or start
    elapsed = end - began
    return {"requests": len(latencies), "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed, "latencies": latencies,
            "units": done_warm[0] + len(latencies), "cpu_s": time.process_time() - cpu}


# ----------------------------------------------------------------------------- download


async def run_download(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["peer"]
    port = int(port)
    expected = int(spec["bytes"])
    sock = await connect(host, port)
    got = 0
    cpu = time.process_time()
    start = time.perf_counter()
    with trio.fail_after(float(spec["timeout"])):
        async with sock:
            conn, req = get_request(host, port, spec["path"])
            await sock.send_all(req)
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await sock.receive_some(READ)
                    if not data:
                        raise BenchError(f"connection closed after {got} bytes")
                    conn.receive_data(data)
                elif isinstance(ev, h11.Response):
                    if ev.status_code != 200:
                        raise BenchError(f"HTTP {ev.status_code}")
                elif isinstance(ev, h11.Data):
                    got += len(ev.data)
                elif isinstance(ev, h11.EndOfMessage):
                    break
                else:
                    raise BenchError(f"unexpected {ev!r}")
    elapsed = time.perf_counter() - start
    if got != expected:
        raise BenchError(f"got {got} bytes, expected {expected}")
    return {"bytes": got, "seconds": elapsed, "mb_per_s": got / elapsed / 1e6,
            "units": got, "cpu_s": time.process_time() - cpu}


# ----------------------------------------------------------------------------- idle streams


async def hold_stream(host: str, port: int, path: str, opened: list[int],
                      all_open: trio.Event, target: int, errors: list[str],
                      limiter: trio.CapacityLimiter, pending: trio.CancelScope) -> None:
    try:
        with pending:  # cancelled when the harness stops waiting for the rest
            async with limiter:
                sock = await connect(host, port)
                try:
                    _, req = get_request(host, port, path)
                    await sock.send_all(req)
                    seen = b""
                    while b"\n\n" not in seen:  # headers end in CRLFs; the event does not
                        data = await sock.receive_some(READ)
                        if not data:
                            raise BenchError("closed before the first event")
                        if not seen and not data.startswith(b"HTTP/1.1 200 "):
                            raise BenchError(f"bad answer: {data[:60]!r}")
                        seen = (seen + data)[-65536:]
                except BaseException:
                    sock.socket.close()
                    raise
        if pending.cancelled_caught:
            return
    except (OSError, trio.BrokenResourceError, BenchError) as exc:
        errors.append(str(exc) or type(exc).__name__)
        return
    opened[0] += 1
    if opened[0] == target:
        all_open.set()
    async with sock:
        while await sock.receive_some(READ):  # keepalive comments; EOF ends it
            pass


async def readline() -> str:
    return await trio.to_thread.run_sync(sys.stdin.readline)


async def run_idle(spec: dict[str, Any]) -> dict[str, Any]:
    """Open N idle SSE streams and report; hold them until a line arrives on stdin.

    Bounded: gives up waiting after ``open_timeout`` seconds, or when no stream
    opened for ``stall_seconds``; reports how many opened and the curve.
    """
    host, port = spec["peer"]
    n = int(spec["streams"])
    path = spec["path"]
    opened = [0]
    errors: list[str] = []
    all_open = trio.Event()
    limiter = trio.CapacityLimiter(int(spec.get("parallel_opens", 256)))
    stall = float(spec.get("stall_seconds", 15))
    result: dict[str, Any] = {}
    pending = [trio.CancelScope() for _ in range(n)]
    async with trio.open_nursery() as nursery:
        start = time.perf_counter()
        for scope in pending:
            nursery.start_soon(hold_stream, host, int(port), path, opened, all_open, n,
                               errors, limiter, scope)
        curve: list[tuple[float, int]] = []
        last_change, last_count, next_sample = start, 0, start + 1.0
        with trio.move_on_after(float(spec["open_timeout"])):
            while not all_open.is_set() and opened[0] + len(errors) < n:
                await trio.sleep(0.01)
                now = time.perf_counter()
                if opened[0] != last_count:
                    last_change, last_count = now, opened[0]
                elif now - last_change > stall:
                    break
                if now >= next_sample:
                    curve.append((round(now - start, 1), opened[0]))
                    next_sample += 1.0
        result["open_seconds"] = time.perf_counter() - start
        for scope in pending:  # stop opening the rest: hold only what is open
            scope.cancel()
        await trio.sleep(0)
        result["opened"] = opened[0]
        result["open_errors"] = len(errors)
        result["first_errors"] = sorted(set(errors))[:5]
        result["curve"] = curve
        emit({"phase": "open", **result})
        await readline()
        nursery.cancel_scope.cancel()
    return result


# ----------------------------------------------------------------------------- entry


MODES = {
    "sse-latency": run_sse_latency,
    "sse-throughput": run_sse_throughput,
    "rpc": run_rpc,
    "download": run_download,
    "idle": run_idle,
}


def describe(exc: BaseException) -> str:
    """The first leaf of an exception (group), as ``Type: message``."""
    leaf = next(leaves(exc))
    return f"{type(leaf).__name__}: {leaf}"


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass
    try:
        result = trio.run(MODES[spec["mode"]], spec)
    except Exception as exc:
        emit({"error": describe(exc)})
        sys.exit(1)
    emit({"result": result})


if __name__ == "__main__":
    main()
