"""Loading: the anchor files load unchanged; every mistake is an error that says where."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from carapace.server.policy import (
    BASE_ENV,
    CliTool,
    HttpTool,
    Policy,
    PolicyError,
    env_name_is_secret,
    load_policy,
    load_policy_file,
    passthrough_refusal,
)

ANCHORS = Path(__file__).resolve().parents[3].parent / "shared" / "anchor-policies"
needs_anchors = pytest.mark.skipif(
    not ANCHORS.is_dir(), reason=f"anchor policies not found at {ANCHORS}"
)

LONG_TOKEN = "tok-0123456789abcdefghijklmnopqrstuv"  # 36 chars, clearly a secret


def load(text: str) -> Policy:
    return load_policy(textwrap.dedent(text), "test.yaml")


def error_of(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load(text)
    return info.value


# -- the anchor files --------------------------------------------------------


@needs_anchors
@pytest.mark.parametrize("name", ["1password.yaml", "gogcli.yaml", "signal-cli.yaml"])
def test_anchor_files_load_unchanged(name: str) -> None:
    policy = load_policy_file(ANCHORS / name)
    assert policy.tools
    assert policy.agents is None


@needs_anchors
def test_anchor_1password_fields() -> None:
    op = load_policy_file(ANCHORS / "1password.yaml").tools["op"]
    assert isinstance(op, CliTool)
    assert op.binary == "/usr/bin/op"
    assert op.argv_allow_patterns[0] == "item get *"
    assert "item delete *" in op.argv_deny_patterns
    assert op.env_inject["HOME"] == "/home/<your-username>"
    assert op.timeout_secs == 30
    assert op.audit.enabled and op.audit.log_argv
    assert op.audit.redact_patterns == ("--session",)


@needs_anchors
def test_anchor_signal_fields() -> None:
    sig = load_policy_file(ANCHORS / "signal-cli.yaml").tools["signal-cli"]
    assert isinstance(sig, HttpTool)
    assert sig.upstream == "http://127.0.0.1:18080"
    assert sig.jsonrpc_allow_methods is not None and "send" in sig.jsonrpc_allow_methods
    assert sig.jsonrpc_deny_methods == ("deleteEverything", "removeAccount", "unregister")
    assert sig.jsonrpc_param_filters is not None
    assert sig.jsonrpc_param_filters["sendReaction"].field == "recipients"
    assert sig.jsonrpc_param_filters["send"].deny_patterns == ()
    assert sig.rate_limit is not None and sig.rate_limit.max_requests == 100
    assert sig.rate_limit.window_secs == 60
    assert sig.audit.log_body is False


@needs_anchors
def test_anchor_gog_secrets_classified_by_name() -> None:
    policy = load_policy_file(ANCHORS / "gogcli.yaml")
    # GOG_KEYRING_BACKEND ("file") is not a secret; GOG_KEYRING_PASSWORD is.
    assert policy.secrets() == [b"<your-keyring-password>"]
    assert load_policy_file(ANCHORS / "1password.yaml").secrets() == []


# -- unknown keys, wrong types ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("tools: {}\nextra: 1\n", "extra"),
        ("tools:\n  op: {type: cli, binary: /bin/op, argv_allow: [x]}\n", "tools.op.argv_allow"),
        (
            "tools:\n  s: {type: http, upstream: 'http://h:1', rate_limit: "
            "{max_requests: 1, window_secs: 1, burst: 2}}\n",
            "tools.s.rate_limit.burst",
        ),
        ("tools:\n  op: {type: cli, binary: /bin/op, audit: {log_args: true}}\n",
         "tools.op.audit.log_args"),
        (
            "tools:\n  s:\n    type: http\n    upstream: 'http://h:1'\n"
            "    jsonrpc_param_filters: {send: {field: r, allow: ['+1*']}}\n",
            "tools.s.jsonrpc_param_filters.send.allow",
        ),
        ("tools: {}\nsettings: {min_secret_len: 4}\n", "settings.min_secret_len"),
        ("tools: {}\nagents: {a: {tools: [], extra: 1}}\n", "agents.a.extra"),
    ],
)
def test_unknown_keys_name_key_and_path(text: str, path: str) -> None:
    err = error_of(text)
    assert err.path == path
    assert path in str(err)
    assert "unknown key" in str(err)
    assert str(err).startswith("test.yaml: ")


def test_key_of_other_tool_type_explains() -> None:
    err = error_of("tools:\n  op: {type: cli, binary: /bin/op, upstream: 'http://x'}\n")
    assert err.path == "tools.op.upstream"
    assert "http tools" in str(err)


@pytest.mark.parametrize(
    ("fragment", "path", "words"),
    [
        ("timeout_secs: 0", "tools.t.timeout_secs", "positive number"),
        ("timeout_secs: -3", "tools.t.timeout_secs", "positive number"),
        ("timeout_secs: '30'", "tools.t.timeout_secs", "positive number"),
        ("timeout_secs: true", "tools.t.timeout_secs", "positive number"),
        ("timeout_secs: .inf", "tools.t.timeout_secs", "positive number"),
        ("rate_limit: {max_requests: 10, window_secs: fast}", "tools.t.rate_limit.window_secs",
         "positive number"),
        ("rate_limit: {max_requests: 1.5, window_secs: 1}", "tools.t.rate_limit.max_requests",
         "whole number"),
        ("rate_limit: {max_requests: 0, window_secs: 1}", "tools.t.rate_limit.max_requests",
         "whole number"),
        ("rate_limit: {max_requests: 3}", "tools.t.rate_limit.window_secs", "required"),
        ("argv_allow_patterns: 'item get *'", "tools.t.argv_allow_patterns", "list of strings"),
        ("argv_allow_patterns: [ok, 12]", "tools.t.argv_allow_patterns[1]", "string"),
        ("argv_deny_patterns: [[x]]", "tools.t.argv_deny_patterns[0]", "string"),
        ("argv_deny_patterns:", "tools.t.argv_deny_patterns", "list of strings"),
        ("audit: {enabled: maybe}", "tools.t.audit.enabled", "true or false"),
        ("audit: {redact_patterns: x}", "tools.t.audit.redact_patterns", "list"),
        ("cwd_allowed: [relative/dir]", "tools.t.cwd_allowed[0]", "absolute"),
        ("cwd_allowed: [/a/../etc]", "tools.t.cwd_allowed[0]", "'..'"),
        ("env_inject: {1BAD: x}", "tools.t.env_inject.1BAD", "environment variable name"),
        ("env_inject: {HOME: 5}", "tools.t.env_inject.HOME", "string"),
        ("env_passthrough: [FOO=BAR]", "tools.t.env_passthrough[0]", "variable name"),
        ("agents: alice", "tools.t.agents", "list"),
    ],
)
def test_wrong_types_are_errors_with_path(fragment: str, path: str, words: str) -> None:
    err = error_of(f"tools:\n  t:\n    type: cli\n    binary: /usr/bin/t\n    {fragment}\n")
    assert err.path == path, str(err)
    assert path in str(err)
    assert words in str(err)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("", ""),
        ("[1, 2]", ""),
        ("agents: {}", "tools"),
        ("tools: [op]", "tools"),
        ("tools:\n  op: {binary: /bin/op}", "tools.op.type"),
        ("tools:\n  op: {type: shell, binary: /bin/op}", "tools.op.type"),
        ("tools:\n  op: {type: cli}", "tools.op.binary"),
        ("tools:\n  op: {type: cli, binary: op}", "tools.op.binary"),
        ("tools:\n  s: {type: http}", "tools.s.upstream"),
        ("tools:\n  'bad name': {type: cli, binary: /bin/x}", "tools.bad name"),
        ("tools:\n  yes: {type: cli, binary: /bin/x}", "tools"),
    ],
)
def test_structural_errors(text: str, path: str) -> None:
    assert error_of(text).path == path


@pytest.mark.parametrize(
    "upstream",
    [
        "ftp://host:21",
        "http://",
        "http://user:pw@host:1",
        "http://host:1/?q=1",
        "http://host:1/#frag",
        "http://host:notaport",
        "http://host:1/a/../b",
        "http://host:1/a%2fb",
        "http://ho st:1",
        "127.0.0.1:8080",
    ],
)
def test_bad_upstreams(upstream: str) -> None:
    err = error_of(f"tools:\n  s: {{type: http, upstream: '{upstream}'}}\n")
    assert err.path == "tools.s.upstream"
    if "pw" in upstream:
        assert "pw" not in str(err)  # credentials in a URL are never echoed


def test_upstream_with_base_path_is_kept() -> None:
    policy = load("tools:\n  s: {type: http, upstream: 'https://api.example.com/v2/'}\n")
    tool = policy.tools["s"]
    assert isinstance(tool, HttpTool)
    assert tool.upstream == "https://api.example.com/v2"


@pytest.mark.parametrize(
    "entry", ["POST", "POST  /x", "/api/v1/rpc", "PO ST /x", "GET api", "GET /a b", "G\tT /x"]
)
def test_bad_allow_paths(entry: str) -> None:
    err = error_of(
        f"tools:\n  s: {{type: http, upstream: 'http://h:1', allow_paths: [{entry!r}]}}\n"
    )
    assert err.path == "tools.s.allow_paths[0]"


def test_allow_paths_parse() -> None:
    policy = load(
        "tools:\n  s:\n    type: http\n    upstream: 'http://h:1'\n"
        "    allow_paths: ['POST /api/v1/rpc', '* /api/v1/check', 'GET /api/v1/*']\n"
    )
    tool = policy.tools["s"]
    assert isinstance(tool, HttpTool) and tool.allow_paths is not None
    assert [r.method for r in tool.allow_paths] == ["POST", "*", "GET"]
    assert tool.allow_paths[2].text == "GET /api/v1/*"


def test_duplicate_yaml_keys_are_refused() -> None:
    err = error_of(
        "tools:\n  op:\n    type: cli\n    binary: /bin/op\n"
        "    argv_deny_patterns: ['item delete *']\n    argv_deny_patterns: []\n"
    )
    assert "duplicate key" in str(err)
    assert "line 6" in str(err)


def test_yaml_merge_keys_may_be_overridden() -> None:
    policy = load(
        """
        tools:
          op: &base {type: cli, binary: /usr/bin/op, argv_allow_patterns: [whoami]}
          op2: {<<: *base, binary: /usr/bin/op2}
        """
    )
    tool = policy.tools["op2"]
    assert isinstance(tool, CliTool)
    assert tool.binary == "/usr/bin/op2" and tool.argv_allow_patterns == ("whoami",)


def test_yaml_syntax_error_has_position() -> None:
    err = error_of("tools:\n  op: {type: cli\n")
    assert "invalid YAML" in str(err)
    assert "line" in str(err)


def test_unsafe_yaml_tags_are_refused() -> None:
    err = error_of("tools: !!python/object/apply:os.system ['true']\n")
    assert "invalid YAML" in str(err)


# -- agents ------------------------------------------------------------------


def test_agents_section_parses() -> None:
    policy = load(
        """
        agents:
          alice: {tools: [op], rate_limit: {max_requests: 5, window_secs: 10}}
          bob: {tools: []}
        tools:
          op: {type: cli, binary: /bin/op, agents: [alice]}
        """
    )
    assert policy.agents is not None
    assert policy.agents["alice"].tools == ("op",)
    assert policy.agent_rate_limit("alice") is not None
    assert policy.agent_rate_limit("bob") is None
    assert policy.agent_rate_limit("carol") is None
    assert policy.tools_for("alice") == ["op"]
    assert policy.tools_for("bob") == []


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("agents: {a: {tools: [nope]}}\ntools: {}", "agents.a.tools[0]"),
        ("agents: {a: {}}\ntools: {}", "agents.a.tools"),
        ("agents: {'a b': {tools: []}}\ntools: {}", "agents.a b"),
        ("agents: {a: {tools: [op]}}\ntools:\n  op: {type: cli, binary: /b, agents: [z]}",
         "tools.op.agents[0]"),
        ("tools:\n  op: {type: cli, binary: /b, agents: ['no way']}", "tools.op.agents[0]"),
    ],
)
def test_agent_errors(text: str, path: str) -> None:
    assert error_of(text).path == path


# -- secrets -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("GOG_KEYRING_PASSWORD", True),
        ("GOG_KEYRING_BACKEND", False),
        ("GOG_ACCOUNT", False),
        ("HOME", False),
        ("API_KEY", True),
        ("APIKEY", True),
        ("apiKey", True),
        ("OP_SERVICE_ACCOUNT_TOKEN", True),
        ("GITHUB_TOKEN", True),
        ("OAUTH_CLIENT", True),
        ("AUTH", True),
        ("GIT_AUTHOR_NAME", False),
        ("DB_PASSWD", True),
        ("DB_PASS", True),
        ("SESSION_ID", True),
        ("MY_COOKIE_JAR", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("CREDENTIALS_FILE", True),
        ("PATH", False),
        ("KEYRING_DIR", False),
    ],
)
def test_env_name_is_secret(name: str, secret: bool) -> None:
    assert env_name_is_secret(name) is secret


def test_short_env_secret_is_refused_without_echoing_it() -> None:
    err = error_of("tools:\n  t:\n    type: cli\n    binary: /bin/t\n"
                   "    env_inject: {MY_TOKEN: 'abc1234'}\n")
    assert err.path == "tools.t.env_inject.MY_TOKEN"
    assert "min_secret_length" in str(err)
    assert "abc1234" not in str(err) and "abc1234" not in repr(err)


def test_short_header_secret_is_refused_without_echoing_it() -> None:
    err = error_of("tools:\n  s:\n    type: http\n    upstream: 'http://h:1'\n"
                   "    headers_inject: {X-Api: 'short'}\n")
    assert err.path == "tools.s.headers_inject.X-Api"
    assert "'short'" not in str(err) and "short'" not in repr(err)


def test_min_secret_length_setting() -> None:
    text = ("settings: {min_secret_length: 4}\ntools:\n  t:\n    type: cli\n"
            "    binary: /bin/t\n    env_inject: {MY_TOKEN: 'abcd'}\n")
    assert load(text).secrets() == [b"abcd"]
    err = error_of(text.replace("4}", "0}"))
    assert err.path == "settings.min_secret_length"


def test_secrets_listed_longest_first_and_unique() -> None:
    policy = load(
        f"""
        tools:
          t:
            type: cli
            binary: /bin/t
            env_inject: {{A_TOKEN: 'secret-one', B_TOKEN: '{LONG_TOKEN}', HOME: /home/x}}
          s:
            type: http
            upstream: 'http://h:1'
            headers_inject: {{Authorization: 'Bearer {LONG_TOKEN}', X-K: 'secret-one'}}
        """
    )
    assert policy.secrets() == [
        f"Bearer {LONG_TOKEN}".encode(),
        LONG_TOKEN.encode(),
        b"secret-one",
    ]


def test_secrets_never_in_reprs() -> None:
    policy = load(
        f"""
        tools:
          t: {{type: cli, binary: /bin/t, env_inject: {{OP_TOKEN: '{LONG_TOKEN}'}}}}
          s:
            type: http
            upstream: 'http://h:1'
            headers_inject: {{Authorization: 'Bearer {LONG_TOKEN}'}}
        """
    )
    assert LONG_TOKEN not in repr(policy)
    assert LONG_TOKEN not in str(policy.tools["t"])
    assert LONG_TOKEN not in repr(policy.tools["s"])


@pytest.mark.parametrize(
    "bad",
    [
        # each of these errors must not quote the secret on the line
        f"env_inject: {{OP_TOKEN: '{LONG_TOKEN}', OP_TOKEN: '{LONG_TOKEN}x'}}",
        f"env_inject: {{OP_TOKEN: '{LONG_TOKEN}'  bad}}",
        f"env_inject: {{OP_TOKEN: [\"{LONG_TOKEN}\"]}}",
        f"env_inject: {{OP_TOKEN: '{LONG_TOKEN}', 'BAD NAME': x}}",
        f"env_inject: {{OP_TOKEN: \"{LONG_TOKEN}\\x00\"}}",
    ],
)
def test_secrets_never_in_error_text(bad: str) -> None:
    err = error_of(f"tools:\n  t:\n    type: cli\n    binary: /bin/t\n    {bad}\n")
    assert LONG_TOKEN not in str(err)
    assert LONG_TOKEN not in repr(err)


def test_header_secret_errors_do_not_echo() -> None:
    for extra in (f'"Bearer {LONG_TOKEN}\\n"', f"['{LONG_TOKEN}']", f"'{LONG_TOKEN}\u00e9'"):
        err = error_of("tools:\n  s:\n    type: http\n    upstream: 'http://h:1'\n"
                       f"    headers_inject: {{Authorization: {extra}}}\n")
        assert LONG_TOKEN not in str(err)


@pytest.mark.parametrize("header", ["Host", "content-length", "Transfer-Encoding", "Connection"])
def test_framing_headers_cannot_be_injected(header: str) -> None:
    err = error_of("tools:\n  s:\n    type: http\n    upstream: 'http://h:1'\n"
                   f"    headers_inject: {{{header}: '{LONG_TOKEN}'}}\n")
    assert err.path == f"tools.s.headers_inject.{header}"


# -- env_passthrough ----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["LD_PRELOAD", "LD_LIBRARY_PATH", "BASH_ENV", "ENV", "PYTHONPATH", "PYTHONSTARTUP", "PATH",
     "GIT_SSH_COMMAND", "HTTPS_PROXY", "http_proxy", "NODE_OPTIONS", "PERL5OPT", "HOME",
     "GLIBC_TUNABLES", "DYLD_INSERT_LIBRARIES", "BASH_FUNC_x%%", "LC_ALL"],
)
def test_dangerous_passthrough_refused(name: str) -> None:
    if name == "BASH_FUNC_x%%":
        assert passthrough_refusal(name) is not None
        return
    err = error_of(f"tools:\n  t: {{type: cli, binary: /bin/t, env_passthrough: [{name}]}}\n")
    assert err.path == "tools.t.env_passthrough[0]"
    assert name in str(err)


def test_harmless_passthrough_accepted() -> None:
    policy = load("tools:\n  t: {type: cli, binary: /bin/t, env_passthrough: [TERM, OP_FORMAT]}\n")
    tool = policy.tools["t"]
    assert isinstance(tool, CliTool)
    assert tool.env_passthrough == ("TERM", "OP_FORMAT")
    assert set(BASE_ENV) == {"PATH", "LANG", "LC_ALL"}


def test_load_policy_file_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy_file(tmp_path / "missing.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"tools: {}\n# \xe9\n")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy_file(bad)
    good = tmp_path / "ok.yaml"
    good.write_text("tools: {}\n")
    assert load_policy_file(good).source == str(good)
