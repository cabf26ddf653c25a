"""The secret scrubber (server/masking/): what it masks, how it streams, the SSE rule."""

from __future__ import annotations

import base64
import json
import re
import textwrap
import urllib.parse

import pytest

from carapace.protocol.sse import Event
from carapace.server.masking import (
    REDACTED,
    REDACTED_TEXT,
    SSE_SPLIT_MIN,
    EventScrubber,
    Scrubber,
    encoded_forms,
    expand_secrets,
    policy_scrubber,
)
from carapace.server.policy import load_policy

TOKEN = b"ghp_Zq8xV3kT0pLmN4wR7yB2cD5fG9hJ1sA6uE0i"  # 40 characters
ODD = "p@ss/w\u00f6rd+Tok en&more\"=\\x"  # every escaping rule has something to do


@pytest.fixture(scope="module")
def scrubber() -> Scrubber:
    return Scrubber([TOKEN, ODD.encode()])


def stream_all(s: Scrubber, pieces: list[bytes]) -> bytes:
    st = s.stream()
    out = [st.feed(p) for p in pieces]
    out.append(st.flush())
    return b"".join(out)


def leaks(s: Scrubber, out: bytes) -> list[bytes]:
    """Forms still in ``out`` (literal ones as substrings, base64 ones also wrapped)."""
    found = [f for f in s.literal_forms + s.wrapped_forms if f in out]
    m = s._full.search(out)
    return found + ([m.group()] if m else [])


# -- what is masked ---------------------------------------------------------------------


def test_the_secret_itself(scrubber: Scrubber) -> None:
    out = scrubber.scrub(b"token=" + TOKEN + b"; again " + TOKEN + b".")
    assert out == b"token=[REDACTED]; again [REDACTED]."


@pytest.mark.parametrize("form", [
    json.dumps(ODD)[1:-1],
    json.dumps(ODD, ensure_ascii=False)[1:-1],
    json.dumps(ODD)[1:-1].replace("/", "\\/"),
    json.dumps(ODD)[1:-1].replace("\\u00f6", "\\u00F6"),
    urllib.parse.quote(ODD),
    urllib.parse.quote(ODD, safe=""),
    re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), urllib.parse.quote(ODD, safe="")),
    urllib.parse.quote_plus(ODD),
    base64.b64encode(ODD.encode()).decode(),
    base64.b64encode(ODD.encode()).decode().rstrip("="),
    base64.urlsafe_b64encode(ODD.encode()).decode(),
    base64.urlsafe_b64encode(ODD.encode()).decode().rstrip("="),
], ids=["json", "json-utf8", "json-slash", "json-upper-hex", "quote", "quote-safe-none",
        "quote-lower-hex", "quote-plus", "b64", "b64-nopad", "b64url", "b64url-nopad"])
def test_each_encoding(scrubber: Scrubber, form: str) -> None:
    assert form.encode() != ODD.encode()
    text = f'{{"error": "bad credentials {form}", "more": 1}}'.encode()
    out = scrubber.scrub(text)
    assert form.encode() not in out
    assert out.count(REDACTED) == 1, out
    assert not leaks(scrubber, out)


@pytest.mark.parametrize("before", range(6))
@pytest.mark.parametrize("wrap", [0, 76, 64], ids=["one-line", "wrap76", "wrap64"])
def test_base64_inside_a_larger_stream(scrubber: Scrubber, before: int, wrap: int) -> None:
    env = (b"PATH=/usr/local/bin:/usr/bin:/bin\n" + b"X" * before + b"GH_TOKEN=" + TOKEN
           + b"\nLANG=C.UTF-8\nHOME=/home/someone/with/a/long/path\n")
    encoded = base64.b64encode(env)
    if wrap:
        encoded = b"\n".join(encoded[i:i + wrap] for i in range(0, len(encoded), wrap)) + b"\n"
    out = scrubber.scrub(encoded)
    assert REDACTED in out
    assert not leaks(scrubber, out)
    # What is left decodes to the text around the token, never to the token.
    kept = out.replace(b"\n", b"").split(REDACTED)
    assert len(kept) == 2
    assert TOKEN[3:-3] not in base64.b64decode(kept[0] + b"=" * (-len(kept[0]) % 4) or b"",
                                               validate=False)


def test_crlf_wrapped_base64(scrubber: Scrubber) -> None:
    encoded = base64.b64encode(b"A" * 40 + TOKEN + b"B" * 40)
    crlf = b"\r\n".join(encoded[i:i + 64] for i in range(0, len(encoded), 64))
    out = scrubber.scrub(crlf)
    assert REDACTED in out and not leaks(scrubber, out)


def test_a_short_line_break_is_not_a_wrap(scrubber: Scrubber) -> None:
    """A line break splits a base64 form only after a 60-column base64 line."""
    b64 = base64.b64encode(TOKEN)
    text = b"short line " + b64[:10] + b"\n" + b64[10:] + b"\n"
    out = scrubber.scrub(text)
    assert out == text  # two fragments, neither a form: nothing to mask (and no false hit)


def test_values_that_are_not_injected_pass_untouched(scrubber: Scrubber) -> None:
    # A password that a tool is meant to return (op item get) is not an injected secret.
    text = b"password: correct-horse-battery-staple\nusername: someone\n"
    assert scrubber.scrub(text) is text
    assert scrubber.stream().feed(text) == text


def test_no_secrets_no_scrubbing() -> None:
    s = Scrubber([])
    assert not s.active
    assert s.output_filters() is None
    assert s.scrub(b"anything") == b"anything"


def test_text_and_headers(scrubber: Scrubber) -> None:
    assert scrubber.scrub_text(f"cannot use {ODD} here") == "cannot use [REDACTED] here"
    headers = scrubber.scrub_headers([(b"X-Echo", b"Bearer " + TOKEN), (b"Server", b"x")])
    assert headers == ((b"X-Echo", b"Bearer [REDACTED]"), (b"Server", b"x"))


def test_forms_are_listed() -> None:
    literal, wrapped = encoded_forms(ODD.encode())
    assert ODD.encode() in literal
    assert urllib.parse.quote_plus(ODD).encode() in literal
    assert base64.b64encode(ODD.encode()) in wrapped


# -- derived secrets ------------------------------------------------------------------


def test_authorization_values_mask_their_credentials_too() -> None:
    basic = b"Basic " + base64.b64encode(b"someone:hunter2-but-longer")
    got = expand_secrets([b"Bearer " + TOKEN, basic], min_length=8)
    assert TOKEN in got and b"someone:hunter2-but-longer" in got
    assert b"hunter2-but-longer" in got
    s = Scrubber([b"Bearer " + TOKEN, basic])
    assert s.scrub(b'{"token": "' + TOKEN + b'"}') == b'{"token": "[REDACTED]"}'
    assert s.scrub(b"pw hunter2-but-longer!") == b"pw [REDACTED]!"


def test_multi_line_secrets_are_masked_line_by_line() -> None:
    pem = b"-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7\n-----END"
    s = Scrubber([pem])
    out = s.scrub(b"key:\n" + pem + b"\n")
    assert b"MIIEvQIBADANBgkqhkiG9w0BAQEFAASC" not in out
    assert b"BKcwggSjAgEAAoIBAQC7" not in out


def test_policy_scrubber_takes_every_injected_secret() -> None:
    policy = load_policy(textwrap.dedent(f"""\
        tools:
          api:
            type: http
            upstream: "http://127.0.0.1:1"
            headers_inject: {{Authorization: "Bearer {TOKEN.decode()}"}}
          op:
            type: cli
            binary: /usr/bin/op
            argv_allow_patterns: ["*"]
            env_inject: {{OP_SESSION_TOKEN: "op-session-0123456789", HOME: /home/someone}}
        """))
    s = policy_scrubber(policy)
    assert policy_scrubber(policy) is s  # built once per set of secrets
    out = s.scrub(b"HOME=/home/someone OP_SESSION_TOKEN=op-session-0123456789 " + TOKEN)
    assert out == b"HOME=/home/someone OP_SESSION_TOKEN=[REDACTED] [REDACTED]"


# -- streaming ------------------------------------------------------------------------


def test_split_across_two_chunks_at_every_point(scrubber: Scrubber) -> None:
    for text in (b"env: GH_TOKEN=" + TOKEN + b"\n",
                 base64.b64encode(b"xy" + TOKEN + b"z"),
                 json.dumps({"v": ODD}).encode()):
        whole = scrubber.scrub(text)
        assert REDACTED in whole
        for cut in range(1, len(text)):
            assert stream_all(scrubber, [text[:cut], text[cut:]]) == whole, cut


def test_one_byte_at_a_time(scrubber: Scrubber) -> None:
    text = b"GH_TOKEN=" + TOKEN + b"\nnext " + base64.b64encode(TOKEN) + b" end"
    st = scrubber.stream()
    out = []
    for i in range(len(text)):
        out.append(st.feed(text[i:i + 1]))
        assert len(st.held) <= scrubber.max_hold
    out.append(st.flush())
    assert b"".join(out) == b"GH_TOKEN=[REDACTED]\nnext [REDACTED] end"


def test_holds_only_what_could_still_match_and_releases_when_disproved(
        scrubber: Scrubber) -> None:
    st = scrubber.stream()
    assert st.feed(b"a quiet line, then ") == b"a quiet line, then "
    assert st.feed(TOKEN[:12]) == b""  # could be the token: held back
    assert st.held == TOKEN[:12]
    assert st.feed(b"!") == TOKEN[:12] + b"!"  # it was not: out at once, no timer
    assert st.held == b""
    assert st.feed(TOKEN[:20]) == b""
    assert st.feed(TOKEN[20:]) == REDACTED  # complete, and no longer form begins with it
    assert st.feed(b" done") == b" done"
    assert st.flush() == b""


def test_end_of_stream_releases_a_partial(scrubber: Scrubber) -> None:
    st = scrubber.stream()
    assert st.feed(b"x " + TOKEN[:30]) == b"x "
    assert st.flush() == TOKEN[:30]


def test_nothing_is_held_after_ordinary_line_ends(scrubber: Scrubber) -> None:
    st = scrubber.stream()
    for line in (b"tick 1\n", b'{"seq": 2}\n', b"data: {}\n\n", b"ok\r\n", b"Z\n"):
        assert st.feed(line) == line
        assert st.held == b""


# -- the SSE event rule -------------------------------------------------------------


def ev(data: str | None, id: str | None = None) -> Event:
    return Event(data=data, id=id)


def test_ordinary_events_are_never_held(scrubber: Scrubber) -> None:
    es = scrubber.events()
    for e in (ev('{"seq": 1}', "1"), ev("tick 2"), ev(None, "3"), ev(""), ev("ghp")):
        assert es.feed(e) == [e]
        assert not es.holding


@pytest.mark.parametrize("cut", range(1, len(TOKEN)))
def test_a_secret_split_across_two_events(scrubber: Scrubber, cut: int) -> None:
    es: EventScrubber = scrubber.events()
    first = ev('{"value": "Bearer ' + TOKEN[:cut].decode(), "1")
    second = ev(TOKEN[cut:].decode() + '"}', "2")
    sent = es.feed(first)
    if cut >= SSE_SPLIT_MIN:
        assert sent == [] and es.holding  # held until the next event
        sent = es.feed(second)
        assert [e.id for e in sent] == ["1", "2"]
        assert sent[0].data == '{"value": "Bearer ' + REDACTED_TEXT
    else:
        assert sent == [first]  # 1-3 characters go; the rest is masked in the next event
        sent = es.feed(second)
        assert [e.id for e in sent] == ["2"]
    assert sent[-1].data == REDACTED_TEXT + '"}'
    assert es.flush() == []
    shown = first.data + sent[-1].data if cut < SSE_SPLIT_MIN else sent[0].data + sent[1].data
    assert TOKEN[min(cut, SSE_SPLIT_MIN - 1):].decode() not in shown


def test_a_held_event_goes_when_the_next_one_does_not_complete_it(scrubber: Scrubber) -> None:
    es = scrubber.events()
    first = ev("prefix " + TOKEN[:10].decode(), "1")
    assert es.feed(first) == []
    second = ev("something else", "2")
    assert es.feed(second) == [first, second]
    assert es.feed(ev("x " + TOKEN[:8].decode(), "3")) == []
    assert [e.id for e in es.flush()] == ["3"]  # end of stream: released unchanged
    assert es.feed(ev("y " + TOKEN[:8].decode(), "4")) == []
    released = es.feed(ev(None, "5"))  # an event without data releases it too
    assert [e.id for e in released] == ["4", "5"]


@pytest.mark.parametrize("padding", [b"x", b"A", b"lorem ipsum dolor sit amet\n"])
@pytest.mark.parametrize("count", [1, 3])
def test_long_chunks_at_every_offset(padding: bytes, count: int) -> None:
    """A chunk long enough to be sampled (by words, or with one find per needle) still has
    every form found, wherever it is."""
    s = Scrubber([TOKEN, ODD.encode(), b"third-secret-0123456789"][:count])
    assert s._word_step  # word sampling is possible: padding and many needles use it
    filler = padding * (20_000 // len(padding))
    for form in (TOKEN, base64.b64encode(b"." + TOKEN)[2:-2], base64.b64encode(TOKEN)):
        for at in range(0, 80):
            text = filler[:5000 + at] + form + filler[5000 + at:]
            out = s.scrub(text)
            assert form not in out and out.count(REDACTED) == 1, (form, at)
