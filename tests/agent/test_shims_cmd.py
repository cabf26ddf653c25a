"""``carapace-agent shims install|list|remove``: symlinks to carapace-shim, and nothing else."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from helpers.procs import script


def shims(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([script("carapace-agent"), "shims", *args], capture_output=True,
                          text=True, timeout=30)


def test_install_list_remove_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "shims"
    r = shims("install", "--dir", str(d), "gh", "op")
    assert r.returncode == 0, r.stderr
    assert "installed:" in r.stdout
    for tool in ("gh", "op"):
        assert (d / tool).is_symlink()
        assert os.readlink(d / tool) == script("carapace-shim")
    again = shims("install", "--dir", str(d), "gh")
    assert again.returncode == 0 and "unchanged" in again.stdout  # idempotent
    listed = shims("list", "--dir", str(d))
    assert listed.stdout.splitlines() == [f"gh -> {script('carapace-shim')}",
                                          f"op -> {script('carapace-shim')}"]
    r = shims("remove", "--dir", str(d), "gh", "never-installed")
    assert r.returncode == 0, r.stderr
    assert not (d / "gh").exists() and (d / "op").is_symlink()
    assert "absent" in r.stdout


def test_install_refuses_to_overwrite_a_file_that_is_not_a_shim(tmp_path: Path) -> None:
    (tmp_path / "gh").write_text("#!/bin/sh\necho the real gh\n")
    os.symlink("/usr/bin/env", tmp_path / "env")
    for tool in ("gh", "env"):
        r = shims("install", "--dir", str(tmp_path), "op", tool)
        assert r.returncode != 0
        assert "not a carapace-shim symlink" in r.stderr and "refusing" in r.stderr
    assert (tmp_path / "gh").read_text().startswith("#!/bin/sh")
    assert os.readlink(tmp_path / "env") == "/usr/bin/env"
    assert not (tmp_path / "op").exists(), "nothing is changed when one tool is refused"
    r = shims("remove", "--dir", str(tmp_path), "gh")
    assert r.returncode != 0 and "refusing" in r.stderr
    assert (tmp_path / "gh").exists()
    assert shims("list", "--dir", str(tmp_path)).stdout == ""


def test_install_updates_a_shim_pointing_at_an_old_installation(tmp_path: Path) -> None:
    os.symlink("/old/venv/bin/carapace-shim", tmp_path / "gh")
    r = shims("install", "--dir", str(tmp_path), "gh")
    assert r.returncode == 0 and "updated" in r.stdout
    assert os.readlink(tmp_path / "gh") == script("carapace-shim")


def test_tool_names_must_be_plain_names(tmp_path: Path) -> None:
    for bad in ("../evil", "a/b", "carapace-shim", ".."):
        r = shims("install", "--dir", str(tmp_path), bad)
        assert r.returncode != 0, bad
    assert list(tmp_path.iterdir()) == []
