"""``carapace-debug policy lint`` warns when a policy lets risky flags of gh, op or gog through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from carapace.debug.policy_cmd import policy
from carapace.server.policy import RISKY_ARGS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"


def lint_messages(path: Path) -> list[str]:
    result = CliRunner().invoke(policy, ["lint", str(path), "--json"],
                                env={"CARAPACE_POLICY_FILE": ""})
    assert result.exit_code in (0, 1), result.output
    return [w["message"] for w in json.loads(result.output)]


@pytest.mark.parametrize(
    ("binary", "expected"),
    [
        ("/usr/bin/gh", ["--jq / -q", "--body-file / -F", "--web / -w", "--recover",
                         "--editor / -e", '"api user"']),
        ("/usr/bin/op", ["--out-file / -o", "--reveal", "--config"]),
        ("/usr/local/bin/gog", ["--account", "--force"]),
    ],
)
def test_lint_warns_on_risky_flags_an_open_policy_allows(
    tmp_path: Path, binary: str, expected: list[str]
) -> None:
    path = tmp_path / "open.yaml"
    path.write_text(f"tools: {{t: {{type: cli, binary: {binary}, argv_allow_patterns: ['*'], "
                    "timeout_secs: 5}}\n")
    messages = lint_messages(path)
    for words in expected:
        assert any(m.startswith(words) or words in m for m in messages), (words, messages)


def test_lint_counts_a_flag_denied_only_in_some_spellings(tmp_path: Path) -> None:
    path = tmp_path / "half.yaml"
    path.write_text("tools: {t: {type: cli, binary: /usr/bin/gh, argv_allow_patterns: ['pr *'], "
                    "argv_deny_patterns: ['api *', '* --web*'], "
                    "argv_deny_flags: [--jq, -q, --body-file, -F, --recover, --editor, -e, --web],"
                    " timeout_secs: 5}}\n")
    messages = lint_messages(path)
    assert any(m.startswith("-w is not in argv_deny_flags") for m in messages), messages
    assert not any("--jq" in m or "api" in m for m in messages), messages


def test_an_allow_list_of_flags_closes_them(tmp_path: Path) -> None:
    path = tmp_path / "closed.yaml"
    path.write_text("tools: {t: {type: cli, binary: /usr/bin/op, argv_allow_patterns: ['item *'],"
                    " argv_allow_flags: [--vault, --fields], timeout_secs: 5}}\n")
    assert not any("argv_deny_flags" in m for m in lint_messages(path))


@pytest.mark.parametrize("name", ["gh", "op", "gog"])
def test_the_examples_deny_every_risky_flag(name: str) -> None:
    messages = lint_messages(EXAMPLES / f"{name}.yaml")
    risky = [m for m in messages if "argv_deny_flags" in m or "the rules allow" in m]
    assert not risky, risky
    assert name in RISKY_ARGS
