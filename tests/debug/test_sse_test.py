"""`carapace-debug sse-test`: the analysis on made-up arrivals; serve, measure and the plain
``--count/--interval-ms`` run (here, and --through the tunnel) for real."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from carapace.debug.sse_run import EventLog, Row, with_query
from carapace.debug.sse_timing import (
    Collection,
    Sample,
    analyse,
    percentile,
    sample_from_event,
)
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
    debug_port = free_port()
    with deployment(tmp_path_factory.mktemp("sse-test"),
                    server_args=["--debug-listen", f"127.0.0.1:{debug_port}"]) as d:
        d.debug_port = debug_port
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


# ---------------------------------------------------------------- the plain run


def test_with_query_adds_count_and_interval_unless_the_url_has_them() -> None:
    assert with_query("http://h:1/sse", 10, 100.0) == "http://h:1/sse?count=10&interval_ms=100"
    assert (with_query("http://h:1/e?account=%2B1&count=3", 10, 12.5)
            == "http://h:1/e?account=%2B1&count=3&interval_ms=12.5")


def _sample(seq: int, arrival: float, ts: float | None = None) -> Sample:
    return Sample(arrival=arrival, id=str(seq), ts=ts, seq=seq)


def test_event_log_pairs_each_event_with_its_direct_twin_in_order() -> None:
    shown: list[Row] = []
    log = EventLog(started=100.0, show=shown.append, paired=True)
    log.on_main(_sample(1, 100.010, ts=100.000))
    assert shown == []  # waits for the direct read's event 1
    log.on_direct(_sample(1, 100.002, ts=100.000))
    log.on_direct(_sample(2, 100.103, ts=100.100))
    assert [r.n for r in shown] == [1]
    assert shown[0].latency_ms == 10.0 and shown[0].direct_ms == 2.0
    assert shown[0].added_ms == 8.0 and shown[0].elapsed_ms == 10.0
    log.on_main(_sample(2, 100.104, ts=100.100))
    log.on_main(_sample(3, 100.205, ts=100.200))
    assert [r.n for r in shown] == [1, 2]
    log.direct_done()  # the direct read ended without event 3: it is shown unpaired
    assert [r.n for r in shown] == [1, 2, 3]
    assert shown[2].direct_ms is None and shown[2].added_ms is None
    assert shown[2].latency_ms == 5.0


def sse_run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([script("carapace-debug"), "sse-test", *args],
                          capture_output=True, text=True, timeout=timeout)


def event_lines(out: str) -> list[tuple[int, float]]:
    """(event number, elapsed ms) of each ``[Event #N] ... elapsed X ms`` line."""
    return [(int(n), float(ms)) for n, ms in
            re.findall(r"^\[Event #(\d+)\] .*?elapsed ([\d.]+) ms", out, flags=re.M)]


def test_plain_run_generates_and_reports_like_the_rust_tool() -> None:
    nobody = f"127.0.0.1:{free_port()}"
    done = sse_run("--count", "10", "--interval-ms", "50", "--debug", nobody)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = event_lines(done.stdout)
    assert [n for n, _ in lines] == list(range(1, 11))
    elapsed = [ms for _, ms in lines]
    assert elapsed == sorted(elapsed) and elapsed[-1] - elapsed[0] >= 9 * 50 * 0.9
    assert "Generated 10 of 10 events in" in done.stdout
    rate = float(re.search(r"^Rate: ([\d.]+) events/s", done.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert rate == pytest.approx(20, rel=0.3)
    assert "Not measured: the tunnel: without --through URL" in done.stdout
    assert "no server's debug listener answered here" in done.stdout and nobody in done.stdout


def test_plain_run_json_is_one_document() -> None:
    done = sse_run("--count", "5", "--interval-ms", "20", "--json", "--debug",
                   f"127.0.0.1:{free_port()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    report = json.loads(done.stdout)
    assert report["mode"] == "local" and report["received"] == 5 == len(report["events"])
    assert [e["n"] for e in report["events"]] == [1, 2, 3, 4, 5]
    assert all(e["latency_ms"] is not None and e["added_ms"] is None for e in report["events"])
    assert report["verdict"] == "real-time" and report["exit_code"] == 0
    assert any("the tunnel" in line for line in report["not_measured"])


def test_options_of_the_plain_run_before_a_subcommand_are_refused() -> None:
    done = sse_run("--count", "5", "serve")
    assert done.returncode == 2
    assert "--count (given before 'serve') is an option of the plain sse-test run" in done.stderr
    done = sse_run("--direct", "http://127.0.0.1:1/sse")
    assert done.returncode == 2 and "give both" in done.stderr


def test_through_the_tunnel_shows_the_latency_each_event_added(tunnel: Deployment) -> None:
    done = sse_run("--count", "10", "--interval-ms", "40", "--through", tunnel.url("/sse"),
                   "--direct", f"{tunnel.upstream_url}/sse", "--debug",
                   f"127.0.0.1:{tunnel.debug_port}", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["mode"] == "through" and report["verdict"] == "real-time"
    assert report["url"] == tunnel.url("/sse?count=10&interval_ms=40")
    assert [e["id"] for e in report["events"]] == [str(i) for i in range(1, 11)]
    assert all(e["added_ms"] is not None for e in report["events"]), report["events"]
    assert report["added"]["events"] == 10 and report["added"]["p99_ms"] < 250
    assert report["direct"] == {"received": 10}
    before, after = report["server"]["before"], report["server"]["after"]
    assert after["sse_events"] - before["sse_events"] >= 10
    assert any("forwarded" in line for line in report["measured"]), report["measured"]


def test_through_the_tunnel_human_output(tunnel: Deployment) -> None:
    done = sse_run("--count", "4", "--interval-ms", "30", "--through",
                   tunnel.url("/api/v1/events"), "--debug", f"127.0.0.1:{free_port()}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [n for n, _ in event_lines(done.stdout)] == [1, 2, 3, 4]
    assert "event=receive" in done.stdout and "latency" in done.stdout
    assert "Received 4 of 4 events" in done.stdout and "Verdict: REAL-TIME" in done.stdout
    assert "Not measured: a direct read of the source (--direct URL)" in done.stdout
    assert "Not measured: the server's side: no debug listener answered" in done.stdout


def test_through_the_tunnel_catches_a_buffering_upstream(tunnel: Deployment) -> None:
    done = sse_run("--count", "10", "--interval-ms", "80", "--through",
                   tunnel.url("/sse-buffered?hold_ms=400"), "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "buffered" and report["received"] == 10


def test_through_an_unreachable_url_exits_2() -> None:
    url = f"http://127.0.0.1:{free_port()}/sse"
    done = sse_run("--through", url, "--json", "--timeout", "5")
    assert done.returncode == 2
    report = json.loads(done.stdout)
    assert report["verdict"] == "unreachable" and "cannot connect" in report["error"]
    done = sse_run("--through", url, "--timeout", "5")
    assert done.returncode == 2 and "cannot connect" in done.stderr and "check:" in done.stderr
