"""What the interop tests share: finding the real clients, reading what they
report as it happens, restarting the agent, and checking a resumed stream.

Every client reports one JSON object per observation (``open``, ``message``
with ``id`` and ``data``, ``error``, ...). :class:`EventLog` stamps each with
its arrival time here and lets a test wait, with a deadline, for the one it
needs: the tests synchronise on what the clients saw, never on sleeps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers.deployment import Deployment, start_agent
from helpers.procs import stop_process

HERE = Path(__file__).resolve().parent
NODE_MODULES = HERE / "node_modules"
CLIENTS = HERE / "clients"

Event = dict[str, Any]


# --------------------------------------------------------------------------- finding tools


def node() -> str | None:
    return shutil.which("node")


def node_package_version(name: str) -> str | None:
    """Version of an npm package installed in tests/interop/node_modules, else None."""
    try:
        meta = json.loads((NODE_MODULES / name / "package.json").read_text())
    except (OSError, ValueError):
        return None
    return str(meta.get("version"))


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


# --------------------------------------------------------------------------- event log


@dataclass
class EventLog:
    """Observations from one client, in arrival order, with arrival times."""

    what: str
    events: list[Event] = field(default_factory=list)
    closed: bool = False
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def add(self, event: Event) -> None:
        event.setdefault("arrived", time.monotonic())
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[Event], bool], timeout: float = 20.0) -> Event:
        """The first event (from the start) matching ``pred``; waits for it up to ``timeout``."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for event in self.events[seen:]:
                    if pred(event):
                        return event
                seen = len(self.events)
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    why = "the client stopped" if self.closed else f"{timeout} s passed"
                    raise AssertionError(
                        f"{self.what}: {why} before the expected event; it reported:\n"
                        + "\n".join(json.dumps(_printable(e)) for e in self.events[-40:])
                    )
                self._cond.wait(left)

    def messages(self) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.get("type") == "message"]

    def count(self, kind: str) -> int:
        with self._cond:
            return sum(1 for e in self.events if e.get("type") == kind)


def _printable(event: Event) -> Event:
    return {k: v for k, v in event.items() if k != "arrived"}


def message_with_id(n: int) -> Callable[[Event], bool]:
    return lambda e: e.get("type") == "message" and str(e.get("id")) == str(n)


def message_at_least(n: int) -> Callable[[Event], bool]:
    return lambda e: (e.get("type") == "message" and str(e.get("id", "")).isdigit()
                      and int(e["id"]) >= n)


# --------------------------------------------------------------------------- node clients


@contextlib.contextmanager
def node_client(script: str, args: Sequence[str], *, what: str,
                node_args: Sequence[str] = ()) -> Iterator[tuple[EventLog, subprocess.Popen[str]]]:
    """Run ``node [node_args] clients/SCRIPT ARGS``; its JSON stdout lines feed an EventLog."""
    exe = node()
    assert exe, "node is not installed"
    stderr = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [exe, *node_args, str(CLIENTS / script), *args],
        stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True,
        cwd=HERE,
    )
    log = EventLog(what)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"type": "stdout", "text": line}
            log.add(event)
        log.close()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield log, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(5)
        stderr.seek(0)
        err = stderr.read()
        stderr.close()
        if err.strip():
            print(f"--- {what} stderr:\n{err}")


# --------------------------------------------------------------------------- chromium

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--no-proxy-server", "--no-default-browser-check",
)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    NUL-terminated JSON on fds 3 and 4), with a fresh profile. Calls to the page's
    ``carapaceReport(json)`` arrive as events in :attr:`log`."""

    BINDING = "carapaceReport"

    def __init__(self, exe: str, profile: Path) -> None:
        self.log = EventLog("chromium")
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        # Numbers >= 10, so the dup2 onto 3 and 4 below cannot clobber each other.
        child_in = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(res_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(cmd_r)
        os.close(res_w)

        def wire_pipes() -> None:  # in the child, before exec: dup2 clears CLOEXEC
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
            # Not close_fds: it would close 3 and 4 after wire_pipes. Every other
            # descriptor of ours is close-on-exec (PEP 446), so nothing else leaks.
            close_fds=False, preexec_fn=wire_pipes,
        )
        os.close(child_in)
        os.close(child_out)
        self._next_id = 0
        self._replies: dict[int, Event] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = ""

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._res_r, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                elif msg.get("method") == "Runtime.bindingCalled":
                    params = msg["params"]
                    if params.get("name") == self.BINDING:
                        self.log.add(json.loads(params["payload"]))
        self.log.close()
        with self._cond:
            self._cond.notify_all()

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             session: bool = True, timeout: float = 20.0) -> dict[str, Any]:
        with self._cond:
            self._next_id += 1
            msg_id = self._next_id
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while msg_id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.log.closed:
                    raise AssertionError(f"chromium did not answer {method}:\n{self.output()}")
                self._cond.wait(left)
            reply = self._replies.pop(msg_id)
        if "error" in reply:
            raise AssertionError(f"chromium: {method} failed: {reply['error']}")
        return dict(reply.get("result", {}))

    def open_page(self, url: str) -> None:
        """Attach to a new tab, load ``url`` (same origin as the streams it will read)."""
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = self.call("Target.attachToTarget",
                             {"targetId": target["targetId"], "flatten": True}, session=False)
        self.session = attached["sessionId"]
        self.call("Runtime.enable")
        self.call("Runtime.addBinding", {"name": self.BINDING})
        nav = self.call("Page.navigate", {"url": url})
        assert not nav.get("errorText"), f"chromium could not load {url}: {nav}"
        # Page.navigate answers once the new document is committed; wait until
        # the document is there before running script in it.
        self.evaluate("new Promise(r => document.readyState === 'complete' ? r(1) "
                      ": addEventListener('load', () => r(1)))")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression,
                                                "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"chromium: script failed: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def version(self) -> str:
        return str(self.call("Browser.getVersion", session=False).get("product"))

    def output(self) -> str:
        """Chromium's own log, without the D-Bus complaints of a machine with no session bus."""
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", "replace")
        return "\n".join(line for line in text.splitlines() if "dbus" not in line)[-4000:]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.poll() is None:
                self.call("Browser.close", session=False, timeout=5)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        self._reader.join(5)
        os.close(self._res_r)
        self._stderr.close()


EVENTSOURCE_JS = """
(() => {
  const report = (o) => %(binding)s(JSON.stringify(o));
  const es = new EventSource(%(url)s);
  window.__carapace_es = es;
  es.onopen = () => report({type: "open"});
  es.onerror = () => report({type: "error", readyState: es.readyState});
  es.onmessage = (e) => {
    report({type: "message", id: e.lastEventId, data: e.data});
    if (e.lastEventId === %(last)s) { es.close(); report({type: "done"}); }
  };
  return "started";
})()
"""


def start_browser_eventsource(browser: Chromium, url: str, last_id: int) -> None:
    """Open a WHATWG EventSource in the page; it reports open/message/error/done."""
    js = EVENTSOURCE_JS % {"binding": Chromium.BINDING, "url": json.dumps(url),
                           "last": json.dumps(str(last_id))}
    assert browser.evaluate(js) == "started"


# --------------------------------------------------------------------------- the agent


def restart_agent(d: Deployment, args: Sequence[str] = ()) -> None:
    """Stop the agent (SIGTERM: it ends event streams cleanly) and start a new one on
    the same ports, as an upgrade or `systemctl restart carapace-agent` does."""
    assert d.agent is not None
    stop_process(d.agent)
    print(d.agent.output())
    d.agent = start_agent(d, args)


# --------------------------------------------------------------------------- checks


def assert_resumed_without_gaps(log: EventLog, last_id: int, *, min_opens: int) -> None:
    """Ids 1..last_id, each exactly once and in order, over at least ``min_opens``
    connections: the client reconnected and resumed with Last-Event-ID."""
    ids = [int(e["id"]) for e in log.messages()]
    assert ids == list(range(1, last_id + 1)), f"{log.what}: ids {ids}"
    opens = log.count("open")
    assert opens >= min_opens, f"{log.what}: {opens} connection(s), expected >= {min_opens}"
