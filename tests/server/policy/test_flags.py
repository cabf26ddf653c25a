"""argv_deny_flags / argv_allow_flags: a flag is found in every spelling a parser accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carapace.server.policy import (
    Policy,
    PolicyError,
    argv_matches,
    decide_cli,
    load_policy,
    load_policy_file,
)

POLICY = """
tools:
  op:
    type: cli
    binary: /usr/bin/op
    argv_allow_patterns: ["*"]
    argv_deny_flags: [--reveal, --out-file, -o]
  gh:
    type: cli
    binary: /usr/bin/gh
    argv_allow_patterns: ["pr *", "issue *"]
    argv_deny_flags: [--web, -w, --jq, -q, --body-file, -F]
  strict:
    type: cli
    binary: /usr/bin/gh
    argv_allow_patterns: ["*"]
    argv_allow_flags: [--repo, -R, --json, --limit, -L]
  bare:
    type: cli
    binary: /bin/cat
    argv_allow_patterns: ["*"]
"""


FLAGS_POLICY = load_policy(POLICY)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return FLAGS_POLICY


def run(policy: Policy, tool: str, args: list[str]):  # type: ignore[no-untyped-def]
    return decide_cli(policy, "default", tool, [a.encode() for a in args], b"/", [])


@pytest.mark.parametrize(
    ("tool", "args", "flag"),
    [
        ("op", ["item", "get", "x", "--reveal"], "--reveal"),
        ("op", ["item", "get", "x", "--reveal=true"], "--reveal"),  # passed "* --reveal *"
        ("op", ["item", "get", "--reveal", "x"], "--reveal"),
        ("op", ["item", "get", "x", "-reveal"], "--reveal"),  # Go's flag package
        ("op", ["read", "op://v/i/f", "--out-file", "/var/log/carapace/audit.jsonl"], "--out-file"),
        ("op", ["read", "op://v/i/f", "--out-file=/etc/x", "--force"], "--out-file"),
        ("op", ["read", "op://v/i/f", "-o", "/etc/x"], "-o"),
        ("op", ["read", "op://v/i/f", "-o/etc/x"], "-o"),  # attached value
        ("op", ["document", "get", "d", "-fo", "/etc/x"], "-o"),  # in a cluster
        ("gh", ["pr", "view", "1", "-w"], "-w"),  # passed "* --web*"
        ("gh", ["pr", "view", "1", "-cw"], "-w"),
        ("gh", ["pr", "view", "1", "-wc"], "-w"),
        ("gh", ["pr", "view", "1", "--web"], "--web"),
        ("gh", ["pr", "list", "--json", "number", "--jq", "$ENV.GH_TOKEN|explode"], "--jq"),
        ("gh", ["pr", "list", "--json", "number", "--jq=$ENV"], "--jq"),
        ("gh", ["pr", "list", "--json", "number", "-q", ".[]"], "-q"),
        ("gh", ["pr", "list", "--json", "number", "-q.[]"], "-q"),
        ("gh", ["issue", "create", "--title", "t", "--body-file", "/etc/carapace/tokens"],
         "--body-file"),
        ("gh", ["issue", "comment", "1", "-F", "/etc/carapace/policy.yaml"], "-F"),
        ("gh", ["issue", "comment", "1", "-F/etc/carapace/policy.yaml"], "-F"),
    ],
)
def test_denied_flag_in_every_spelling(policy: Policy, tool: str, args: list[str],
                                       flag: str) -> None:
    decision = run(policy, tool, args)
    assert not decision.allow, args
    assert "argv_deny_flags" in decision.rule and flag in decision.rule, decision.rule
    assert flag in decision.reason


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        ("op", ["item", "get", "x", "--", "--reveal"]),  # after --: an operand
        ("op", ["item", "get", "--vault", "Private", "x"]),
        ("op", ["item", "get", "reveal"]),
        ("op", ["read", "op://v/i/f"]),
        ("op", ["read", "-"]),  # a lone dash is an operand (stdin)
        ("gh", ["pr", "list", "--json", "number"]),
        ("gh", ["pr", "view", "1", "--comments"]),
        ("gh", ["issue", "create", "--title", "web", "--body", "x"]),
        ("gh", ["pr", "view", "1", "--", "-w"]),
        ("gh", ["pr", "list", "--repo=x/web"]),
        ("gh", ["issue", "create", "--body", "x"]),  # not an abbreviation of --body-file
    ],
)
def test_other_flags_and_operands_pass(policy: Policy, tool: str, args: list[str]) -> None:
    decision = run(policy, tool, args)
    assert decision.allow, (args, decision.reason)


def test_bare_command_matches_star(policy: Policy) -> None:
    """``"*"`` is a glob over the joined line, and an empty argv is the empty line."""
    assert run(policy, "bare", []).allow
    assert argv_matches([], "*") and argv_matches([], "")
    assert not argv_matches([], "x*")


@pytest.mark.parametrize(
    ("args", "allowed"),
    [
        (["pr", "list", "--repo", "x/y", "--json", "number", "-L", "5"], True),
        (["pr", "list", "-R", "x/y", "--limit=5"], True),
        (["pr", "list", "-RL", "x/y"], True),  # a cluster of listed short flags
        (["pr", "list", "--", "--web"], True),
        (["pr", "list", "--web"], False),
        (["pr", "list", "--jq", "."], False),
        (["pr", "list", "--rep", "x/y"], False),  # allow lists name flags exactly
        (["pr", "list", "-Rx/y"], False),  # attached value: x is no listed flag
        (["pr", "list", "-w"], False),
    ],
)
def test_allow_flags(policy: Policy, args: list[str], allowed: bool) -> None:
    decision = run(policy, "strict", args)
    assert decision.allow is allowed, (args, decision.reason)
    if not allowed:
        assert "argv_allow_flags" in decision.reason


def test_denied_value_is_not_echoed(policy: Policy) -> None:
    decision = run(policy, "strict", ["x", "--token=hunter2hunter2"])
    assert not decision.allow
    assert "hunter2" not in decision.reason and "hunter2" not in decision.rule


@pytest.mark.parametrize("flag", ["web", "-", "---web", "--web=x", "-ab", "--", "-", "--a b"])
def test_bad_flag_in_policy_is_an_error(flag: str) -> None:
    text = f"tools: {{t: {{type: cli, binary: /bin/t, argv_deny_flags: [{flag!r}]}}}}"
    with pytest.raises(PolicyError, match=r"argv_deny_flags\[0\].*is not a flag"):
        load_policy(text)


# -- properties ----------------------------------------------------------------------

words = st.text(alphabet="abcdefxyz/=.:", min_size=0, max_size=6)
prefix_args = st.lists(words.filter(lambda w: not w.startswith("-")), max_size=4)


def _spellings(long: str, short: str, value: str) -> st.SearchStrategy[list[str]]:
    """Every way a getopt/pflag-style parser reads the flag, value or not."""
    return st.sampled_from([
        [f"--{long}"],
        [f"--{long}={value}"],
        [f"--{long}", value],
        [f"-{short}"],
        [f"-{short}{value}"],
        [f"-x{short}"],
        [f"-{short}x"],
        [f"-x{short}y", value],
    ])


@settings(deadline=None)
@given(before=prefix_args, after=prefix_args, data=st.data(),
       value=st.text(alphabet="abc/.", min_size=1, max_size=5))
def test_property_a_denied_flag_is_found_before_double_dash(
    before: list[str], after: list[str], data: st.DataObject, value: str
) -> None:
    policy = FLAGS_POLICY
    spelled = data.draw(_spellings("web", "w", value))
    decision = run(policy, "gh", ["pr", "view", *before, *spelled, *after])
    assert not decision.allow


@settings(deadline=None)
@given(before=prefix_args, after=prefix_args, data=st.data(),
       value=st.text(alphabet="abc/.", min_size=1, max_size=5))
def test_property_after_double_dash_it_is_an_operand(
    before: list[str], after: list[str], data: st.DataObject, value: str
) -> None:
    policy = FLAGS_POLICY
    spelled = data.draw(_spellings("web", "w", value))
    decision = run(policy, "gh", ["pr", "view", *before, "--", *spelled, *after])
    assert decision.allow, decision.reason


@settings(deadline=None)
@given(st.lists(st.text(max_size=8), max_size=6))
def test_property_flags_never_raise(args: list[str]) -> None:
    policy = FLAGS_POLICY
    for tool in ("op", "gh", "strict", "bare"):
        run(policy, tool, [a for a in args if a.isprintable()])


ANCHORS = Path(__file__).resolve().parents[3].parent / "shared" / "anchor-policies"


@pytest.mark.skipif(not ANCHORS.is_dir(), reason=f"anchor policies not found at {ANCHORS}")
@pytest.mark.parametrize(("name", "tool"), [("1password.yaml", "op"), ("gogcli.yaml", "gog")])
def test_anchor_cli_policies_still_deny_a_bare_command(name: str, tool: str) -> None:
    """No anchor pattern matches the empty line, so ``"*"`` matching it changes nothing there."""
    anchor = load_policy_file(ANCHORS / name)
    decision = run(anchor, tool, [])
    assert not decision.allow and decision.rule.startswith("default deny"), decision.rule
