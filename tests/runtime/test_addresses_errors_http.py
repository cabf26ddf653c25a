"""The small shared facts: addresses, the exception-group walker, HTTP helpers, tokens."""

from __future__ import annotations

import h11
import pytest
import trio

from carapace.runtime.addresses import parse_hostport
from carapace.runtime.errors import consists_of, find_exception, leaves
from carapace.runtime.http import HOP_BY_HOP, RequestHead, reason_phrase, response_head
from carapace.runtime.tokens import (
    DEFAULT_AGENT,
    TokenFileError,
    load_agent_token,
    load_server_tokens,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:8765", ("127.0.0.1", 8765)),
    ("8765", ("127.0.0.1", 8765)),
    (":9", ("127.0.0.1", 9)),
    ("[::1]:80", ("::1", 80)),
    ("host.example:0", ("host.example", 0)),
])
def test_host_port_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["host:", "host:65536", "[::1]80", "[::1", "a:b", "-1"])
def test_bad_host_port_says_what_is_wrong(text: str) -> None:
    with pytest.raises(ValueError, match=r"port|HOST"):
        parse_hostport(text)


def test_leaves_flatten_nested_groups() -> None:
    a, b, c = ValueError("a"), OSError("b"), KeyError("c")
    group = BaseExceptionGroup("outer", [a, ExceptionGroup("inner", [b, c])])
    assert list(leaves(group)) == [a, b, c]
    assert list(leaves(a)) == [a]


def test_consists_of_and_find_exception() -> None:
    broken = trio.BrokenResourceError()
    group = ExceptionGroup("g", [broken, ExceptionGroup("h", [ConnectionResetError()])])
    assert consists_of(group, (trio.BrokenResourceError, OSError))
    assert not consists_of(ExceptionGroup("g", [broken, ValueError()]), OSError)
    assert isinstance(find_exception(group, OSError), ConnectionResetError)
    assert find_exception(group, KeyError) is None


def test_reason_phrases_and_response_head() -> None:
    assert reason_phrase(404) == b"Not Found"
    assert reason_phrase(599) == b""
    head = response_head(503, [(b"content-length", b"0")])
    assert head.reason == b"Service Unavailable"


def test_hop_by_hop_is_lowercase_bytes() -> None:
    assert all(isinstance(h, bytes) and h == h.lower() for h in HOP_BY_HOP)
    assert b"transfer-encoding" in HOP_BY_HOP and b"content-type" not in HOP_BY_HOP


def test_request_head_parses_path_query_and_headers() -> None:
    event = h11.Request(method=b"get", target=b"/debug/sniff?type=a&type=b&x=",
                        headers=[(b"Host", b"h"), (b"Authorization", b"Bearer 1"),
                                 (b"authorization", b"Bearer 2")])
    head = RequestHead(event)
    assert (head.method, head.path) == ("GET", "/debug/sniff")
    assert head.query == {"type": ["a", "b"], "x": [""]}
    assert head.header("AUTHORIZATION") == "Bearer 2"  # the last one, as a dict of them gave
    assert head.header("missing") is None


def test_token_files(tmp_path) -> None:
    token = "t" * 20
    bare = tmp_path / "bare"
    bare.write_text(f"# comment\n\n{token}\n")
    assert load_agent_token(bare) == (DEFAULT_AGENT, token.encode())
    many = tmp_path / "many"
    many.write_text(f"vm1:{token}\nvm2:{'u' * 20}\n")
    assert load_server_tokens(many) == {"vm1": token.encode(), "vm2": b"u" * 20}
    many.write_text(f"vm1:{token}\nvm1:{token}\n")
    with pytest.raises(TokenFileError, match="listed twice"):
        load_server_tokens(many)
    many.write_text("vm1:short\n")
    with pytest.raises(TokenFileError, match="shorter than") as info:
        load_server_tokens(many)
    assert "short\n" not in str(info.value) and ":short" not in str(info.value)
