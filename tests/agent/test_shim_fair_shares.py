"""The shim on the server's fair-share refusals: exit 75 and when to retry, said once."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.test_shim_failures import run_against, shim_dir
from carapace.protocol.framing import encode
from carapace.protocol.messages import RequestFailed

__all__ = ["shim_dir"]  # the fixture, used by name


@pytest.mark.parametrize(("code", "status"), [("too_many_requests", 429),
                                              ("server_busy", 503)])
def test_fair_share_refusals_exit_75_and_say_when_to_retry(shim_dir: Path, code: str,
                                                            status: int) -> None:
    reply = encode(RequestFailed(id=1, status=status, code=code, retry_after=1,
                                 message="refused: the host already has 3 CLI processes"))
    r, _ = run_against(shim_dir, reply)
    assert r.returncode == 75  # EX_TEMPFAIL: try again later
    assert r.stderr.decode().rstrip().endswith("(retry in 1 s)")


def test_a_retry_hint_the_message_already_gives_is_not_repeated(shim_dir: Path) -> None:
    reply = encode(RequestFailed(id=1, status=429, code="too_many_requests", retry_after=1,
                                 message="refused: agent vm1 already has 2; retry in 1 s"))
    r, _ = run_against(shim_dir, reply)
    assert r.returncode == 75
    assert r.stderr.decode().count("retry in 1 s") == 1
