"""Parse limits: each cap holds at its boundary, names itself, and is checked before parsing."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import trio
import trio.testing

from carapace.protocol.messages import HttpRequest
from carapace.server.audit.records import http_decision_fields
from carapace.server.policy import (
    DEFAULT_LIMITS,
    INLINE_DECIDE_BYTES,
    LIMIT_NAMES,
    AuditConfig,
    CliTool,
    Decision,
    HttpTool,
    ParseLimits,
    PolicyError,
    decide_cli,
    decide_http,
    load_policy,
    needs_worker,
    vm_denial,
)
from carapace.server.policy import cli as cli_mod
from carapace.server.policy import http as http_mod

POLICY = load_policy("""
tools:
  rpc:
    type: http
    upstream: "http://127.0.0.1:9"
    jsonrpc_allow_methods: [version]
  open:
    type: http
    upstream: "http://127.0.0.1:9"
  roomy:
    type: http
    upstream: "http://127.0.0.1:9"
    jsonrpc_allow_methods: [version]
    limits: {max_jsonrpc_body_bytes: 4096, max_jsonrpc_batch: 3, max_headers: 2,
             max_header_bytes: 100}
  op:
    type: cli
    binary: /bin/echo
    argv_allow_patterns: ["*"]
  tight:
    type: cli
    binary: /bin/echo
    argv_allow_patterns: ["*"]
    limits: {max_argv: 2, max_argv_bytes: 10, max_env: 1}
""")

CALL = b'{"jsonrpc":"2.0","method":"version","id":1}'
SMALL = ParseLimits(max_jsonrpc_body_bytes=1000, max_jsonrpc_batch=5, max_argv=4,
                    max_argv_bytes=20, max_env=3, max_headers=3, max_header_bytes=50)


def http(tool: str, body: bytes = CALL, headers: list[tuple[bytes, bytes]] | None = None,
         target: str = "/rpc", limits: ParseLimits = SMALL) -> Decision:
    return decide_http(POLICY, "vm", tool, "POST", target, headers or [], body, limits=limits)


def cli(tool: str, argv: list[bytes], env: list[tuple[bytes, bytes]] | None = None,
        limits: ParseLimits = SMALL) -> Decision:
    return decide_cli(POLICY, "vm", tool, argv, b"/", env or [], limits=limits)


def batch(n: int) -> bytes:
    return b"[" + b",".join([CALL] * n) + b"]"


def padded(size: int) -> bytes:
    """A valid JSON-RPC call of exactly ``size`` bytes."""
    base = b'{"jsonrpc":"2.0","method":"version","id":1,"p":""}'
    return base[:-2] + b"x" * (size - len(base)) + b'"}'


def assert_refused(decision: Decision, limit: str, seen: int, cap: int) -> None:
    assert not decision.allow
    assert decision.code == "bad_request"
    assert decision.limit == limit
    assert f"is {seen}, over the limit of {cap} ({limit})" in decision.reason
    assert f"--{limit.replace('_', '-')}" in decision.reason
    assert f"limits.{limit}" in decision.reason
    status, code, message = vm_denial(decision, "vm", "t")
    assert (status, code) == (400, "bad_request") and limit in message


# -- boundaries ------------------------------------------------------------------------


def test_jsonrpc_body_at_the_cap_is_judged_and_one_byte_more_is_refused() -> None:
    assert http("rpc", padded(1000)).allow
    assert_refused(http("rpc", padded(1001)), "max_jsonrpc_body_bytes", 1001, 1000)


def test_the_body_cap_applies_only_where_the_body_is_parsed() -> None:
    # A tool without JSON-RPC rules forwards its body unparsed: no cap here.
    assert http("open", b"x" * 5000).allow


def test_batch_at_the_cap_is_judged_and_one_call_more_is_refused() -> None:
    assert http("rpc", batch(5)).allow
    assert_refused(http("rpc", batch(6)), "max_jsonrpc_batch", 6, 5)


def test_header_count_and_bytes() -> None:
    three = [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]
    assert http("open", headers=three).allow
    assert_refused(http("open", headers=[*three, (b"d", b"4")]), "max_headers", 4, 3)
    # method (4) + target (4) + names and values: 50 bytes pass, 51 do not
    fits = [(b"x", b"v" * 41)]
    assert http("open", headers=fits).allow
    assert_refused(http("open", headers=[(b"x", b"v" * 42)]), "max_header_bytes", 51, 50)


def test_a_huge_target_counts_in_the_head() -> None:
    assert_refused(http("open", target="/" + "a" * 100), "max_header_bytes", 105, 50)


def test_argv_count_and_bytes() -> None:
    assert cli("op", [b"a"] * 4).allow
    assert_refused(cli("op", [b"a"] * 5), "max_argv", 5, 4)
    assert cli("op", [b"x" * 20]).allow
    assert_refused(cli("op", [b"x" * 11, b"y" * 10]), "max_argv_bytes", 21, 20)


def test_env_count() -> None:
    env = [(b"A", b"1"), (b"B", b"2"), (b"C", b"3")]
    assert cli("op", [b"a"], env).allow
    assert_refused(cli("op", [b"a"], [*env, (b"D", b"4")]), "max_env", 4, 3)


def test_malformed_items_are_left_to_the_syntax_checks() -> None:
    bad = http("open", headers=[("not", "bytes")])  # type: ignore[list-item]
    assert not bad.allow and bad.limit == "" and bad.code == "bad_request"
    bad = cli("op", ["text"])  # type: ignore[list-item]
    assert not bad.allow and bad.limit == ""


# -- nothing is parsed over a cap ------------------------------------------------------


def forbid(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> None:
    def boom(*args: object, **kwargs: object) -> Any:
        raise AssertionError(f"{name} was called over a cap")

    monkeypatch.setattr(module, name, boom)


def test_an_oversized_body_is_never_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid(monkeypatch, http_mod, "_parse_json")
    forbid(monkeypatch, http_mod, "_syntax_problem")
    assert http("rpc", b"[" + b"{}," * 100_000 + b"{}]").limit == "max_jsonrpc_body_bytes"


def test_an_oversized_batch_has_no_call_judged(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid(monkeypatch, http_mod, "_check_call")
    assert http("rpc", batch(6)).limit == "max_jsonrpc_batch"


def test_oversized_headers_are_never_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid(monkeypatch, http_mod, "_syntax_problem")
    many = [(b"x", b"\r\n")] * 1_000_000  # would be refused as malformed if looked at
    assert http("open", headers=many).limit == "max_headers"


def test_oversized_argv_is_never_decoded_or_matched(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid(monkeypatch, cli_mod, "_decoded_args")
    forbid(monkeypatch, cli_mod, "argv_matches")
    assert cli("op", [b"\xff"] * 1_000_000).limit == "max_argv"
    assert cli("op", [b"\xff" * 1_000_000]).limit == "max_argv_bytes"
    forbid(monkeypatch, cli_mod, "_environment")
    assert cli("op", [], [(b"A", b"1")] * 1_000_000).limit == "max_env"


# -- per-tool overrides and defaults ---------------------------------------------------


def test_a_tool_overrides_the_server_wide_limits_both_ways() -> None:
    # roomy raises the body cap above SMALL's 1000 and lowers the batch cap below its 5.
    assert http("roomy", padded(4096), headers=[]).allow
    refused = http("roomy", padded(4097))
    assert_refused(refused, "max_jsonrpc_body_bytes", 4097, 4096)
    assert "tools.roomy.limits.max_jsonrpc_body_bytes" in refused.rule
    assert_refused(http("roomy", batch(4)), "max_jsonrpc_batch", 4, 3)
    assert_refused(cli("tight", [b"a"] * 3), "max_argv", 3, 2)
    assert_refused(cli("tight", [b"a" * 11]), "max_argv_bytes", 11, 10)
    assert_refused(cli("tight", [], [(b"A", b""), (b"B", b"")]), "max_env", 2, 1)
    # The server-wide source is named when no override applies.
    assert "carapace-server --max-jsonrpc-batch" in http("rpc", batch(6)).rule


def test_defaults_let_ordinary_requests_through() -> None:
    assert decide_http(POLICY, "vm", "rpc", "POST", "/rpc", [(b"a", b"b")] * 50,
                       batch(100)).allow
    big = decide_http(POLICY, "vm", "rpc", "POST", "/rpc", [], batch(101))
    assert big.limit == "max_jsonrpc_batch"
    assert decide_cli(POLICY, "vm", "op", [b"x" * 1000] * 1000, b"/", []).allow
    assert DEFAULT_LIMITS.max_jsonrpc_body_bytes == 1024 * 1024


def test_every_limit_has_a_flag_help_and_one_tool_type() -> None:
    from carapace.server.policy.limits import CLI_LIMITS, HTTP_LIMITS, LIMIT_HELP

    assert tuple(LIMIT_HELP) == LIMIT_NAMES
    assert HTTP_LIMITS | CLI_LIMITS == set(LIMIT_NAMES) and not HTTP_LIMITS & CLI_LIMITS


def test_limits_keys_are_checked_at_load() -> None:
    def load(limits: str, kind: str = "http") -> None:
        where = 'upstream: "http://h"' if kind == "http" else "binary: /bin/true"
        load_policy(f"tools:\n  t:\n    type: {kind}\n    {where}\n    limits: {limits}\n")

    with pytest.raises(PolicyError, match=r"tools\.t\.limits\.max_argv: unknown key.*cli tools"):
        load("{max_argv: 3}")
    with pytest.raises(PolicyError, match=r"limits\.max_headers: unknown key.*http tools"):
        load("{max_headers: 3}", "cli")
    with pytest.raises(PolicyError, match=r"limits\.max_body: unknown key"):
        load("{max_body: 3}")
    with pytest.raises(PolicyError, match="positive whole number"):
        load("{max_jsonrpc_batch: 0}")
    with pytest.raises(PolicyError, match="must be a mapping"):
        load("[1]")


# -- what runs where, and what the audit trail keeps ---------------------------------


def test_only_large_decisions_need_a_worker() -> None:
    rpc, op = POLICY.tools["rpc"], POLICY.tools["op"]
    assert isinstance(rpc, HttpTool) and isinstance(op, CliTool)
    assert not needs_worker(rpc, DEFAULT_LIMITS, body=b"x" * INLINE_DECIDE_BYTES)
    assert needs_worker(rpc, DEFAULT_LIMITS, body=b"x" * (INLINE_DECIDE_BYTES + 1))
    # over the cap it is refused at once, inline
    assert not needs_worker(rpc, DEFAULT_LIMITS, body=b"x" * (2 * 1024 * 1024))
    assert not needs_worker(POLICY.tools["open"], DEFAULT_LIMITS, body=b"x" * 100_000)
    assert needs_worker(op, DEFAULT_LIMITS, argv=(b"x" * 20_000,))
    assert not needs_worker(op, DEFAULT_LIMITS, argv=(b"x",) * 5000)
    assert not needs_worker(None, DEFAULT_LIMITS, body=b"x" * 100_000)


async def test_the_pipeline_decides_a_large_request_off_the_event_loop() -> None:
    from carapace.server.pipeline import RequestPipeline

    pipeline = RequestPipeline(audit=None, metrics=None, stats=None,  # type: ignore[arg-type]
                               http_client=None)  # type: ignore[arg-type]
    loop_thread = threading.get_ident()
    seen: list[int] = []

    def decide() -> Decision:
        seen.append(threading.get_ident())
        return Decision(True, "ok", "r")

    await pipeline._decide("vm", decide, heavy=False)
    await pipeline._decide("vm", decide, heavy=True)
    assert seen[0] == loop_thread and seen[1] != loop_thread
    # One agent's large decisions take one worker at a time; another agent gets the other.
    release = threading.Event()

    def slow() -> Decision:
        release.wait(10)
        return Decision(True, "ok", "r")

    async with trio.open_nursery() as nursery:
        for agent in ("vm", "vm", "vm", "other"):
            nursery.start_soon(pipeline._decide, agent, slow, True)
        await trio.testing.wait_all_tasks_blocked()
        assert pipeline.deciders.borrowed_tokens == 2
        assert pipeline._agent_deciders["vm"].statistics().tasks_waiting == 2
        release.set()


def test_the_audit_record_names_the_limit_and_holds_no_huge_value() -> None:
    body = b"[" + b"{}," * 1_000_000 + b"{}]"
    req = HttpRequest(id=1, tool="rpc", method="POST", target="/rpc", headers=(), body=body)
    decision = decide_http(POLICY, "vm", "rpc", "POST", "/rpc", [], body)
    fields = http_decision_fields(req, AuditConfig(log_body=True), decision)
    assert fields["limit"] == "max_jsonrpc_body_bytes"
    assert fields["bytes_in"] == len(body)
    assert len(json.dumps(fields)) < 1000


# -- the server's flags ------------------------------------------------------------------


def test_the_server_flags_and_env_vars_set_the_limits(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from carapace.server import main as main_mod

    seen: list[ParseLimits] = []

    class Stop(Exception):
        pass

    def fake_server(config: Any, *args: object, **kwargs: object) -> None:
        seen.append(config.parse_limits)
        raise Stop

    monkeypatch.setattr(main_mod, "Server", fake_server)
    monkeypatch.setattr(main_mod, "setup_logging", lambda *args: None)  # keeps pytest's
    policy = tmp_path / "p.yaml"
    policy.write_text("tools: {}\n")
    tokens = tmp_path / "t"
    tokens.write_text("a:" + "x" * 40 + "\n")
    runner = CliRunner()
    help_text = runner.invoke(main_mod.main, ["--help"], terminal_width=200).output
    for name in LIMIT_NAMES:
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"CARAPACE_{name.upper()}" in help_text
    result = runner.invoke(
        main_mod.main, ["--policy", str(policy), "--token-file", str(tokens),
                        "--max-jsonrpc-batch", "7"],
        env={"CARAPACE_MAX_ARGV_BYTES": "99"})
    assert isinstance(result.exception, Stop), result.output
    assert seen == [ParseLimits(max_jsonrpc_batch=7, max_argv_bytes=99)]
    refused = runner.invoke(main_mod.main, ["--policy", str(policy), "--token-file",
                                            str(tokens), "--max-argv", "0"])
    assert refused.exit_code == 2 and "--max-argv" in refused.output
