"""Secret references: parsed at load without reading anything, resolved on request.

Every kind, every way it can fail, and the rule that an error names the key
path and the reference but never a value. The resolver is given a fake
environment and a fake command runner here; ``run_command`` itself runs real
processes (its timeout kills a whole process group).
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from carapace.server.policy import (
    DEFAULT_SECRET_COMMAND_TIMEOUT,
    CliTool,
    CommandResult,
    HttpTool,
    Policy,
    PolicyError,
    SecretRef,
    SecretResolver,
    UnresolvedSecret,
    load_policy,
    load_policy_file,
    resolve_policy,
    run_command,
)
from carapace.server.policy.secret_refs import MAX_SECRET_BYTES

ANCHORS = Path(__file__).resolve().parents[3].parent / "shared" / "anchor-policies"

SECRET = "s3cr3t-0123456789abcdefghijklmnop"
OTHER = "other-secret-9876543210zyxwvu"


def load(text: str) -> Policy:
    return load_policy(textwrap.dedent(text), "test.yaml")


def cli_policy(ref: str, name: str = "GH_TOKEN", extra: str = "") -> Policy:
    return load_policy(extra + textwrap.dedent(f"""\
        tools:
          gh:
            type: cli
            binary: /usr/bin/gh
            env_inject:
              {name}: {ref}
        """), "test.yaml")


def http_policy(ref: str) -> Policy:
    return load(f"""\
        tools:
          api:
            type: http
            upstream: http://127.0.0.1:9
            headers_inject:
              Authorization: {ref}
        """)


def error_of(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load(text)
    return info.value


class FakeRunner:
    """Records each call; answers with a fixed result (or raises)."""

    def __init__(self, result: CommandResult | OSError) -> None:
        self.result = result
        self.calls: list[tuple[tuple[str, ...], float, dict[str, str]]] = []

    def __call__(self, argv: Sequence[str], timeout: float,
                 env: Mapping[str, str]) -> CommandResult:
        self.calls.append((tuple(argv), timeout, dict(env)))
        if isinstance(self.result, OSError):
            raise self.result
        return self.result


def resolver(run: FakeRunner | None = None, environ: Mapping[str, str] | None = None,
             credentials_dir: str | None = None) -> SecretResolver:
    runner = run or FakeRunner(CommandResult(0, f"{SECRET}\n".encode(), b""))
    return SecretResolver(environ or {}, credentials_dir, runner)


def resolve_error(policy: Policy, res: SecretResolver) -> UnresolvedSecret:
    with pytest.raises(UnresolvedSecret) as info:
        resolve_policy(policy, res)
    return info.value


def secret_file(tmp_path: Path, content: str | bytes, mode: int = 0o600,
                name: str = "secret") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return path


# -- parsing -------------------------------------------------------------------


def test_every_kind_parses_into_a_reference_and_nothing_is_read() -> None:
    policy = load("""\
        tools:
          gh:
            type: cli
            binary: /usr/bin/gh
            env_inject:
              A_TOKEN: {file: /nonexistent/secret}
              B_TOKEN: {credential: gh-token}
              C_TOKEN: {env: GH_TOKEN}
              D_TOKEN: {command: [op, read, "op://vault/item/field"], timeout_secs: 3}
              MODE: plain
          api:
            type: http
            upstream: http://127.0.0.1:9
            headers_inject: {Authorization: {command: [/usr/bin/pass, show, api]}}
        """)
    gh = policy.tools["gh"]
    assert isinstance(gh, CliTool)
    assert dict(gh.env_inject) == {"MODE": "plain"}  # references are not values yet
    assert dict(gh.env_inject_refs) == {
        "A_TOKEN": SecretRef("file", "/nonexistent/secret"),
        "B_TOKEN": SecretRef("credential", "gh-token"),
        "C_TOKEN": SecretRef("env", "GH_TOKEN"),
        "D_TOKEN": SecretRef("command", argv=("op", "read", "op://vault/item/field"),
                             timeout_secs=3.0),
    }
    assert sorted(policy.unresolved_refs()) == [
        "tools.api.headers_inject.Authorization", *(f"tools.gh.env_inject.{n}_TOKEN"
                                                    for n in "ABCD")]
    assert policy.secrets() == []


def test_a_reference_shows_its_target_but_not_a_commands_arguments() -> None:
    ref = SecretRef("command", argv=("op", "read", "op://vault/item/field"))
    assert str(ref) == '{command: ["op" ...]}'
    assert "vault" not in repr(ref)
    assert str(SecretRef("file", "/etc/carapace/gh")) == '{file: "/etc/carapace/gh"}'
    assert str(SecretRef("credential", "gh")) == '{credential: "gh"}'
    assert str(SecretRef("env", "GH_TOKEN")) == '{env: "GH_TOKEN"}'


@pytest.mark.parametrize(("ref", "path", "words"), [
    ("{}", "tools.gh.env_inject.GH_TOKEN", "exactly one of file, credential, env, command"),
    ("{file: /a, env: B}", "tools.gh.env_inject.GH_TOKEN", "exactly one of"),
    ("{path: /a}", "tools.gh.env_inject.GH_TOKEN", "exactly one of"),
    ("{file: /a, mode: x}", "tools.gh.env_inject.GH_TOKEN.mode", 'unknown key "mode"'),
    ("{file: /a, timeout_secs: 3}", "tools.gh.env_inject.GH_TOKEN.timeout_secs",
     "unknown key"),
    ("{file: relative/path}", "tools.gh.env_inject.GH_TOKEN.file", "absolute path"),
    ("{file: /etc/../secret}", "tools.gh.env_inject.GH_TOKEN.file", "'..'"),
    ("{file: 42}", "tools.gh.env_inject.GH_TOKEN.file", "must be a string"),
    ("{credential: ../etc/shadow}", "tools.gh.env_inject.GH_TOKEN.credential",
     "not a valid name"),
    ("{credential: a/b}", "tools.gh.env_inject.GH_TOKEN.credential", "not a valid name"),
    ("{env: 1BAD}", "tools.gh.env_inject.GH_TOKEN.env", "not a valid environment variable"),
    ("{command: []}", "tools.gh.env_inject.GH_TOKEN.command", "must name a program"),
    ('{command: [""]}', "tools.gh.env_inject.GH_TOKEN.command", "must name a program"),
    ("{command: op read x}", "tools.gh.env_inject.GH_TOKEN.command", "list of strings"),
    ("{command: [op], timeout_secs: 0}", "tools.gh.env_inject.GH_TOKEN.timeout_secs",
     "positive number"),
    ("[a, b]", "tools.gh.env_inject.GH_TOKEN", "must be a string"),
])
def test_a_malformed_reference_is_an_error_naming_its_key(ref: str, path: str,
                                                          words: str) -> None:
    exc = error_of(f"""\
        tools:
          gh:
            type: cli
            binary: /usr/bin/gh
            env_inject: {{GH_TOKEN: {ref}}}
        """)
    assert exc.path == path
    assert words in str(exc)


def test_a_header_given_twice_once_by_reference_is_refused() -> None:
    exc = error_of("""\
        tools:
          api:
            type: http
            upstream: http://127.0.0.1:9
            headers_inject:
              Authorization: {env: API}
              authorization: "Bearer 0123456789abcdef"
        """)
    assert "listed twice" in str(exc)


def test_framing_headers_cannot_be_injected_by_reference_either() -> None:
    exc = error_of("""\
        tools:
          api:
            type: http
            upstream: http://127.0.0.1:9
            headers_inject: {Host: {env: API}}
        """)
    assert "cannot be injected" in str(exc)


@pytest.mark.skipif(not ANCHORS.is_dir(), reason=f"anchor policies not found at {ANCHORS}")
@pytest.mark.parametrize("name", ["signal-cli.yaml", "1password.yaml", "gogcli.yaml"])
def test_anchor_policies_have_no_references_and_resolve_to_themselves(name: str) -> None:
    policy = load_policy_file(ANCHORS / name)
    assert policy.secret_refs() == {}
    never = FakeRunner(OSError("must not run"))
    assert resolve_policy(policy, SecretResolver({}, None, never)) is policy
    assert never.calls == []


# -- resolving each kind ---------------------------------------------------------


def test_file_one_trailing_newline_is_dropped(tmp_path: Path) -> None:
    for content, expected in [(f"{SECRET}\n", SECRET), (f"{SECRET}\r\n", SECRET),
                              (SECRET, SECRET), (f"{SECRET}\n\n", f"{SECRET}\n"),
                              (f" {SECRET}", f" {SECRET}")]:
        path = secret_file(tmp_path, content)
        policy = resolve_policy(cli_policy(f"{{file: {path}}}"), resolver())
        assert policy.tools["gh"].env_inject["GH_TOKEN"] == expected  # type: ignore[union-attr]


def test_file_readable_by_others_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = secret_file(tmp_path, SECRET, 0o644)
    exc = resolve_error(cli_policy(f"{{file: {path}}}"), resolver())
    assert exc.path == "tools.gh.env_inject.GH_TOKEN"
    assert exc.ref == SecretRef("file", str(path))
    message = str(exc)
    assert "tools.gh.env_inject.GH_TOKEN" in message and str(path) in message
    assert "readable by every user" in message and "0644" in message
    assert f"chmod o-r {path}" in message
    assert SECRET not in message


def test_file_readable_by_its_group_is_accepted(tmp_path: Path) -> None:
    path = secret_file(tmp_path, SECRET, 0o640)
    policy = resolve_policy(http_policy(f"{{file: {path}}}"), resolver())
    assert policy.tools["api"].headers_inject["Authorization"] == SECRET  # type: ignore[union-attr]


@pytest.mark.parametrize(("setup", "words"), [
    ("missing", "cannot open the file: No such file or directory"),
    ("directory", "not a regular file"),
    ("fifo", "not a regular file"),
    ("huge", f"larger than {MAX_SECRET_BYTES} bytes"),
    ("binary", "not UTF-8 text"),
])
def test_file_that_cannot_give_a_secret(tmp_path: Path, setup: str, words: str) -> None:
    path = tmp_path / "secret"
    if setup == "directory":
        path.mkdir(mode=0o700)
    elif setup == "fifo":
        os.mkfifo(path, 0o600)  # no writer: reading must not hang the load
    elif setup == "huge":
        secret_file(tmp_path, "x" * (MAX_SECRET_BYTES + 1))
    elif setup == "binary":
        secret_file(tmp_path, b"\xff\xfe" + SECRET.encode())
    exc = resolve_error(cli_policy(f"{{file: {path}}}"), resolver())
    assert words in str(exc)
    assert exc.path == "tools.gh.env_inject.GH_TOKEN"


def test_credential_comes_from_the_credentials_directory(tmp_path: Path) -> None:
    secret_file(tmp_path, f"{SECRET}\n", 0o400, name="gh-token")
    policy = resolve_policy(cli_policy("{credential: gh-token}"),
                            resolver(credentials_dir=str(tmp_path)))
    assert policy.tools["gh"].env_inject["GH_TOKEN"] == SECRET  # type: ignore[union-attr]
    from_env = SecretResolver.from_environment({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert from_env.credentials_dir == str(tmp_path)


def test_credential_without_a_credentials_directory_says_how_to_get_one() -> None:
    exc = resolve_error(cli_policy("{credential: gh-token}"), resolver())
    assert "$CREDENTIALS_DIRECTORY is not set" in str(exc)
    assert "LoadCredential=gh-token" in str(exc)


def test_credential_missing_from_the_directory(tmp_path: Path) -> None:
    exc = resolve_error(cli_policy("{credential: gh-token}"),
                        resolver(credentials_dir=str(tmp_path)))
    assert '{credential: "gh-token"}' in str(exc) and "No such file" in str(exc)


def test_env_comes_from_the_given_environment_only() -> None:
    policy = resolve_policy(cli_policy("{env: FROM_HOST}"),
                            resolver(environ={"FROM_HOST": SECRET}))
    assert policy.tools["gh"].env_inject["GH_TOKEN"] == SECRET  # type: ignore[union-attr]
    os.environ.setdefault("CARAPACE_TEST_NOT_GIVEN", SECRET)
    exc = resolve_error(cli_policy("{env: CARAPACE_TEST_NOT_GIVEN}"), resolver())
    assert "not set in the server's environment" in str(exc)
    assert '{env: "CARAPACE_TEST_NOT_GIVEN"}' in str(exc)


def test_command_gets_argv_timeout_and_environment_and_is_stripped() -> None:
    run = FakeRunner(CommandResult(0, f"  {SECRET}\n\n".encode(), b"some warning\n"))
    policy = cli_policy('{command: [op, read, "op://v/i/f"]}')
    resolved = resolve_policy(policy, resolver(run, environ={"HOME": "/home/op"}))
    assert resolved.tools["gh"].env_inject["GH_TOKEN"] == SECRET  # type: ignore[union-attr]
    assert run.calls == [(("op", "read", "op://v/i/f"), DEFAULT_SECRET_COMMAND_TIMEOUT,
                          {"HOME": "/home/op"})]
    own = cli_policy("{command: [op], timeout_secs: 2.5}")
    resolve_policy(own, SecretResolver({}, None, run, command_timeout=30))
    assert run.calls[-1][1] == 2.5
    resolve_policy(policy, SecretResolver({}, None, run, command_timeout=30))
    assert run.calls[-1][1] == 30


def test_failed_command_shows_its_status_and_a_masked_stderr_line_never_stdout() -> None:
    run = FakeRunner(CommandResult(
        3, f"partial {SECRET}\n".encode(),
        f"[ERROR] vault locked; last token {SECRET} and {OTHER}\nsecond line\n".encode()))
    policy = cli_policy("{command: [op, read, x]}", extra=f"# {OTHER}\n")
    with pytest.raises(UnresolvedSecret) as info:
        resolve_policy(policy, resolver(run), known_secrets=[OTHER.encode()])
    message = str(info.value)
    assert "tools.gh.env_inject.GH_TOKEN" in message
    assert "{command: [\"op\" ...]}" in message
    assert "'op' exited with status 3: [ERROR] vault locked" in message
    assert SECRET not in message and OTHER not in message and "partial" not in message
    assert "second line" not in message


def test_failed_command_without_stderr() -> None:
    exc = resolve_error(cli_policy("{command: [op]}"), resolver(FakeRunner(
        CommandResult(1, b"", b""))))
    assert "'op' exited with status 1 (and wrote nothing on stderr)" in str(exc)


def test_command_that_times_out_or_cannot_start_or_prints_nothing() -> None:
    timed_out = resolve_error(cli_policy("{command: [op], timeout_secs: 4}"),
                              resolver(FakeRunner(CommandResult(None, b"", b""))))
    assert "'op' did not finish within 4 s and was killed" in str(timed_out)
    missing = resolve_error(cli_policy("{command: [op]}"), resolver(FakeRunner(
        FileNotFoundError(2, "No such file or directory"))))
    assert "cannot run 'op': No such file or directory" in str(missing)
    empty = resolve_error(cli_policy("{command: [op]}"), resolver(FakeRunner(
        CommandResult(0, b" \n", b""))))
    assert "'op' printed nothing on stdout" in str(empty)


# -- resolved values are secrets like any other -------------------------------------------


def test_a_resolved_value_is_a_secret_whatever_its_name() -> None:
    policy = resolve_policy(cli_policy("{env: X}", name="GOG_KEYRING_BACKEND"),
                            resolver(environ={"X": SECRET}))
    assert policy.secrets() == [SECRET.encode()]
    plain = cli_policy("plain-value", name="GOG_KEYRING_BACKEND")
    assert plain.secrets() == []


def test_a_short_resolved_value_is_refused_without_showing_it() -> None:
    exc = resolve_error(cli_policy("{env: X}", name="BACKEND"), resolver(environ={"X": "abc12"}))
    assert exc.path == "tools.gh.env_inject.BACKEND"
    assert "shorter than settings.min_secret_length (8 characters)" in str(exc)
    assert '(the value comes from {env: "X"})' in str(exc)
    assert "abc12" not in str(exc)
    lowered = cli_policy("{env: X}", extra="settings: {min_secret_length: 4}\n")
    resolved = resolve_policy(lowered, resolver(environ={"X": "abc12"}))
    assert resolved.secrets() == [b"abc12"]


def test_a_resolved_header_must_be_printable() -> None:
    exc = resolve_error(http_policy("{env: X}"), resolver(environ={"X": f"{SECRET}\x07"}))
    assert "printable ASCII" in str(exc) and SECRET not in str(exc)
    nul = resolve_error(cli_policy("{env: X}"), resolver(environ={"X": f"{SECRET}\x00"}))
    assert "NUL" in str(nul)


def test_resolving_keeps_written_values_and_everything_else() -> None:
    policy = load("""\
        tools:
          gh:
            type: cli
            binary: /usr/bin/gh
            argv_allow_patterns: ["*"]
            env_inject: {GH_TOKEN: {env: X}, MODE: plain}
            timeout_secs: 7
          api:
            type: http
            upstream: http://127.0.0.1:9
            headers_inject: {Authorization: {env: Y}, X-Other: "written-0123456789"}
        """)
    resolved = resolve_policy(policy, resolver(environ={"X": SECRET, "Y": OTHER}))
    gh, api = resolved.tools["gh"], resolved.tools["api"]
    assert isinstance(gh, CliTool) and isinstance(api, HttpTool)
    assert dict(gh.env_inject) == {"GH_TOKEN": SECRET, "MODE": "plain"}
    assert gh.timeout_secs == 7 and gh.argv_allow_patterns == ("*",)
    assert dict(api.headers_inject) == {"Authorization": OTHER, "X-Other": "written-0123456789"}
    assert resolved.unresolved_refs() == {}
    assert sorted(resolved.secrets()) == sorted([SECRET.encode(), OTHER.encode(),
                                                 b"written-0123456789"])
    assert policy.unresolved_refs() != {}  # the loaded policy is unchanged
    assert SECRET not in repr(resolved)


# -- run_command: real processes -------------------------------------------------------------


def test_run_command_returns_stdout_and_closes_stdin() -> None:
    done = run_command([sys.executable, "-c", "import sys; print(sys.stdin.read() == '')"],
                       10, dict(os.environ))
    assert done == CommandResult(0, b"True\n", b"")


def test_run_command_uses_no_shell() -> None:
    done = run_command(["/bin/echo", "$HOME;", "`id`"], 10, {})
    assert done.stdout == b"$HOME; `id`\n"


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def test_run_command_timeout_kills_its_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    start = time.monotonic()
    done = run_command(["/bin/sh", "-c", script], 0.5, {"PATH": "/usr/bin:/bin"})
    assert done.returncode is None
    assert time.monotonic() - start < 5
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while not _gone(child):  # killed by SIGKILL: only reaping is left
        assert time.monotonic() < deadline, "the command's child outlived the timeout"
        time.sleep(0.01)


def test_run_command_missing_program_raises_oserror() -> None:
    with pytest.raises(OSError):
        run_command(["/nonexistent/program"], 1, {})


def test_run_command_stops_a_flood_and_keeps_no_more_than_it_can_use() -> None:
    start = time.monotonic()
    done = run_command(["/usr/bin/yes", "0123456789"], 10, {})
    assert time.monotonic() - start < 5  # stopped at once, not at the timeout
    assert len(done.stdout) == MAX_SECRET_BYTES + 1
    flood = cli_policy('{command: ["/usr/bin/yes", "0123456789"]}')
    exc = resolve_error(flood, SecretResolver({}, None))
    assert f"'/usr/bin/yes' printed more than {MAX_SECRET_BYTES} bytes" in str(exc)
    assert "0123456789" not in str(exc)


def test_run_command_waits_for_a_command_that_closed_its_output() -> None:
    done = run_command(["/bin/sh", "-c", "exec >&- 2>&-; sleep 0.2; exit 4"], 10, {})
    assert done == CommandResult(4, b"", b"")
