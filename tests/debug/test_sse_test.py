"""`carapace-debug sse-test`: the analysis on made-up arrivals, and serve + measure for real."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from carapace.debug.sse_test import Collection, Sample, analyse, percentile, sample_from_event
from helpers.deployment import Deployment, deployment
from helpers.procs import free_port, running, script

# ---------------------------------------------------------------- analysis (no I/O)


def collection(
    arrivals_ms: list[float],
    ts_ms: list[float],
    *,
    requested: int = 0,
    ids: list[str] | None = None,
) -> Collection:
    col = Collection(url="http://x/", requested=requested, started=1000.0)
    for i, (arr, ts) in enumerate(zip(arrivals_ms, ts_ms, strict=True)):
        sid = ids[i] if ids else str(i + 1)
        col.samples.append(
            Sample(arrival=1000.0 + arr / 1000, id=sid, ts=1000.0 + ts / 1000, seq=i + 1)
        )
    return col


def test_percentile() -> None:
    assert percentile([1.0], 99) == 1.0
    assert percentile([0.0, 10.0], 50) == 5.0
    assert percentile([float(i) for i in range(101)], 99) == 99.0


def test_sample_from_event_reads_ts_and_seq_only_from_json_objects() -> None:
    s = sample_from_event(5.0, "m", "7", '{"ts": 4.5, "seq": 3}')
    assert (s.ts, s.seq, s.id, s.event) == (4.5, 3, "7", "m")
    for data in (None, "", "not json", "[1]", '{"ts": "soon"}', '{"ts": true}', '{"ts": NaN}'):
        assert sample_from_event(5.0, None, None, data).ts is None


def test_real_time_stream_passes() -> None:
    ts = [i * 100.0 for i in range(20)]
    report = analyse(collection([t + 1.5 for t in ts], ts, requested=20))
    assert report["verdict"] == "real-time" and report["exit_code"] == 0
    assert report["p50_ms"] == pytest.approx(1.5)
    assert report["rate_per_s"] == pytest.approx(10.0)
    assert report["buffered"] is False and report["problems"] == []


def test_bursts_after_a_hold_are_buffering_even_with_low_latency_limit_off() -> None:
    # Generated every 100 ms, released every 400 ms: bursts of 4.
    ts = [i * 100.0 for i in range(12)]
    arrivals = [(i // 4 + 1) * 400.0 + 1 for i in range(12)]
    report = analyse(collection(arrivals, ts), max_p99_ms=0)  # latency test off
    assert report["buffered"] is True and report["exit_code"] == 1
    assert report["bursts"]["largest"] == 4 and report["bursts"]["count"] == 3
    assert report["verdict"] == "buffered"


def test_high_p99_is_buffering() -> None:
    ts = [i * 100.0 for i in range(10)]
    report = analyse(collection([t + 300 for t in ts], ts), max_p99_ms=250)
    assert report["buffered"] is True and report["bursts"]["count"] == 0


def test_one_late_event_is_not_a_burst() -> None:
    ts = [i * 100.0 for i in range(20)]
    arrivals = [t + 2 for t in ts]
    arrivals[7] += 80  # one hiccup: the next event is "compressed" once, no more
    report = analyse(collection(arrivals, ts))
    assert report["bursts"]["compressed_events"] == 1
    assert report["buffered"] is False and report["exit_code"] == 0


def test_gaps_and_short_streams_fail() -> None:
    ts = [0.0, 10.0, 20.0, 30.0]
    report = analyse(collection([t + 1 for t in ts], ts, ids=["1", "2", "5", "4"]))
    assert report["gaps"]["missing_ids"] == 2 and report["gaps"]["out_of_order"] == 1
    assert report["verdict"] == "gaps" and report["exit_code"] == 1
    col = collection([1.0], [0.0], requested=5)
    col.ended = "stream-end"
    report = analyse(col)
    assert report["verdict"] == "incomplete" and report["exit_code"] == 1


def test_untimed_events_are_counted_not_timed() -> None:
    col = Collection(url="u", requested=2, started=0.0)
    col.samples = [Sample(arrival=1.0, id="1"), Sample(arrival=2.0, id="2")]
    report = analyse(col)
    assert (report["events"], report["timed"], report["untimed"]) == (2, 0, 2)
    assert report["p50_ms"] is None and report["exit_code"] == 0
    assert "not timed" in report["notes"][0]


# ---------------------------------------------------------------- the real commands


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    port = free_port()
    argv = [script("carapace-debug"), "sse-test", "serve", "--port", str(port),
            "--interval-ms", "25"]
    with running(argv, port=port):
        yield f"http://127.0.0.1:{port}"


def measure(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [script("carapace-debug"), "sse-test", "measure", *args],
        capture_output=True, text=True, timeout=30,
    )
    return proc.returncode, proc.stdout, proc.stderr


def measure_json(*args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = measure(*args, "--json")
    assert out.count("\n") == 1, (out, err)
    report: dict[str, Any] = json.loads(out)
    assert report["exit_code"] == code, report
    return code, report


def test_measure_real_time_stream(served: str) -> None:
    code, report = measure_json(f"{served}/events", "--count", "12")
    assert code == 0, report
    assert report["verdict"] == "real-time"
    assert report["events"] == report["timed"] == 12
    assert 0 <= report["p50_ms"] <= report["p99_ms"] <= report["max_ms"] < 250
    assert report["rate_per_s"] == pytest.approx(40, rel=0.5)
    assert report["gaps"]["missing_ids"] == 0


def test_measure_catches_a_buffering_upstream(served: str) -> None:
    url = f"{served}/sse-buffered?count=10&interval_ms=80&hold_ms=400"
    code, report = measure_json(url, "--count", "10")
    assert code == 1, report
    assert report["buffered"] is True and report["verdict"] == "buffered"
    assert report["bursts"]["largest"] >= 3
    assert report["events"] == 10


def test_measure_human_output_and_short_stream(served: str) -> None:
    code, out, _ = measure(f"{served}/sse?count=3&interval_ms=10", "--count", "5")
    assert code == 1
    assert "INCOMPLETE" in out and "only 3 of 5 events" in out
    assert "p99" in out


def test_measure_unreachable_exits_2() -> None:
    url = f"http://127.0.0.1:{free_port()}/events"
    code, report = measure_json(url, "--timeout", "5")
    assert code == 2 and report["verdict"] == "unreachable"
    assert "cannot connect" in report["error"] and "listens" in report["hint"]
    code, out, err = measure(url)
    assert code == 2 and "cannot connect" in err and out == ""


def test_measure_non_sse_endpoint_exits_2(served: str) -> None:
    code, report = measure_json(f"{served}/echo")
    assert code == 2 and "text/event-stream" in report["error"]


# ---------------------------------------------------------------- through the tunnel


@pytest.fixture(scope="module")
def tunnel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployment(tmp_path_factory.mktemp("sse-test")) as d:
        yield d


def test_measure_through_the_tunnel_is_real_time(tunnel: Deployment) -> None:
    code, report = measure_json(tunnel.url("/events?interval_ms=30"), "--count", "15")
    assert code == 0, report
    assert report["verdict"] == "real-time" and report["events"] == 15
    assert report["p99_ms"] < 250 and report["bursts"]["count"] == 0


def test_measure_through_the_tunnel_catches_a_buffering_upstream(tunnel: Deployment) -> None:
    url = tunnel.url("/sse-buffered?count=10&interval_ms=80&hold_ms=400")
    code, report = measure_json(url, "--count", "10")
    assert code == 1, report
    assert report["buffered"] is True and report["bursts"]["largest"] >= 3
