"""The sandbox as the runner uses it: real processes, the checked cwd, the mode, the secrets.

The cwd race is staged exactly: the policy's ``realpath`` resolves the
directory and then, before the runner uses it, the directory (or one of its
parents) is swapped for a symlink to somewhere else — what a VM sharing that
folder could do between the check and the chdir.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from carapace.protocol.messages import CliRequest, Exit, Message, Output, RequestFailed
from carapace.server.cli_runner import run_cli
from carapace.server.config import ServerConfig
from carapace.server.daemon import Server
from carapace.server.masking import REDACTED, private_key_blocks, server_scrubber
from carapace.server.policy import CliTool, decide_cli, load_policy
from carapace.server.sandbox import Sandbox, SandboxError, server_files
from carapace.server.streams import ServerStream


def _bwrap_works() -> bool:
    bwrap = shutil.which("bwrap")
    return bwrap is not None and subprocess.run(
        [bwrap, "--ro-bind", "/", "/", "--unshare-user", "--unshare-pid", "true"],
        capture_output=True, timeout=20).returncode == 0


MODES = ["none", pytest.param("bwrap", marks=pytest.mark.skipif(
    not _bwrap_works(), reason="bubblewrap is missing or cannot create namespaces here"))]


class Sink:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def send_many(self, msgs: Sequence[Message]) -> None:
        self.sent.extend(msgs)


def sandbox(mode: str, hidden: Sequence[str] = ()) -> Sandbox:
    sb = Sandbox(hidden)
    sb.configure(mode)
    return sb


async def run(sb: Sandbox, policy_text: str, tool: str, cwd: Path,
              realpath: Callable[[bytes], bytes] | None = None) -> list[Message]:
    policy = load_policy(policy_text)
    kwargs: dict[str, Any] = {"realpath": realpath} if realpath else {}
    decision = decide_cli(policy, "default", tool, [], bytes(cwd), [], **kwargs)
    assert decision.allow, decision.reason
    sink = Sink()
    stream = ServerStream(sink, 1, window=1 << 20)  # type: ignore[arg-type]
    req = CliRequest(id=1, tool=tool, argv=(), cwd=bytes(cwd), env=(), tty=(False,) * 3)
    found = policy.tools[tool]
    assert isinstance(found, CliTool)
    with trio.fail_after(20):
        await run_cli(stream, req, decision, found, sandbox=sb)
    return sink.sent


def stdout(sent: list[Message]) -> bytes:
    return b"".join(m.data for m in sent if isinstance(m, Output) and m.fd == 1)


def where_policy(allowed: Path) -> str:
    return f"tools:\n  where: {{type: cli, binary: /bin/pwd, argv_allow_patterns: [''], " \
           f"cwd_allowed: ['{allowed}']}}\n"


@pytest.mark.parametrize("mode", MODES)
async def test_checked_cwd_is_where_the_tool_runs(tmp_path: Path, mode: str) -> None:
    (tmp_path / "allowed" / "work").mkdir(parents=True)
    sent = await run(sandbox(mode), where_policy(tmp_path / "allowed"), "where",
                     tmp_path / "allowed" / "work")
    assert stdout(sent) == f"{tmp_path}/allowed/work\n".encode()
    assert isinstance(sent[-1], Exit) and sent[-1].code == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("swapped", ["work", "allowed/a"])
async def test_cwd_swapped_for_a_symlink_after_the_check_is_refused(
        tmp_path: Path, mode: str, swapped: str) -> None:
    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    (allowed / "a" / "work").mkdir(parents=True)
    (allowed / "work").mkdir()
    (secret / "work").mkdir(parents=True)
    target = allowed / "a" / "work" if swapped == "allowed/a" else allowed / "work"
    victim = allowed / "a" if swapped == "allowed/a" else allowed / "work"
    real_secret = secret if swapped == "allowed/a" else secret / "work"

    def racing_realpath(path: bytes) -> bytes:
        resolved: bytes = Path(path.decode()).resolve(strict=True).as_posix().encode()
        if path == bytes(target):  # checked: now the attacker swaps it
            victim.rename(victim.with_name(victim.name + ".moved"))
            victim.symlink_to(real_secret)
        return resolved

    sent = await run(sandbox(mode), where_policy(allowed), "where", target,
                     realpath=racing_realpath)
    assert str(secret).encode() not in stdout(sent)
    assert stdout(sent) == b""  # refused, not run elsewhere
    failed = sent[-1]
    assert isinstance(failed, RequestFailed) and failed.status == 502, sent
    assert "changed after the policy checked it" in failed.message or \
        "cannot run /bin/pwd in" in failed.message


def test_settings_bwrap_without_a_working_bwrap_refuses(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    broken = Sandbox((), bwrap="/nonexistent/bwrap")
    with pytest.raises(SandboxError, match=r"settings\.sandbox is bwrap, but bwrap could not"):
        broken.configure("bwrap")
    with caplog.at_level(logging.WARNING, logger="carapace.server"):
        status = broken.configure("auto")
    assert (status.mode, status.setting) == ("none", "auto")
    assert "UNCONFINED" in caplog.text and "/nonexistent/bwrap" in caplog.text


def test_reload_to_bwrap_without_bwrap_is_rejected(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("tools: {}\n")
    config = ServerConfig(policy_file=str(policy_file))
    server = Server(config, load_policy("tools: {}\n"), {"default": b"t" * 32},
                    sandbox=Sandbox((), bwrap="/nonexistent/bwrap"))
    assert server.sandbox_status.mode == "none"
    policy_file.write_text("settings: {sandbox: bwrap}\ntools: {}\n")
    assert server.reload() is False
    assert server.policy.settings.sandbox == "auto"  # the old policy stays


def test_server_files_hide_the_audit_directory_and_both_names(tmp_path: Path) -> None:
    real = tmp_path / "real-tokens"
    real.write_text("x")
    (tmp_path / "tokens").symlink_to(real)
    files = server_files(str(tmp_path / "policy.yaml"), str(tmp_path / "tokens"),
                         tls_key="/etc/k.pem", debug_token_file="/etc/d.token",
                         audit_log="/var/log/carapace/audit.jsonl")
    assert {str(tmp_path / "tokens"), str(real), "/etc/k.pem", "/etc/d.token",
            "/var/log/carapace"} <= set(files)
    assert server_files("p", "t", audit_log="/audit.jsonl")[-1] == "/audit.jsonl"


KEY = b"""-----BEGIN CERTIFICATE-----
MIIBszCCAVmgAwIBAgIUPublicCertificateBodyIsNotSecret0123456789AB
-----END CERTIFICATE-----
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSecretKeyMaterial
hRmVpbGxlZFdpdGhTZWNyZXRzAndMb3JlMoreSecretKeyMaterialForTheTest1
-----END PRIVATE KEY-----
"""


def test_tls_private_key_material_and_tokens_are_masked_in_output() -> None:
    blocks = private_key_blocks(KEY)
    assert len(blocks) == 1 and b"PublicCertificate" not in blocks[0]
    scrubber = server_scrubber(load_policy("tools: {}\n"), [*blocks, b"alice-token-1234567"])
    out = scrubber.scrub(b"cat key.pem:\n" + KEY + b"token alice-token-1234567\n")
    assert b"SecretKeyMaterial" not in out and b"alice-token" not in out
    assert out.count(REDACTED) == 3
    assert b"PublicCertificateBodyIsNotSecret" in out  # the certificate is public
