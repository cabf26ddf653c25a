"""The four code folders install as carapace.* from a regular (non-editable) install too."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("carapace.server", "carapace.agent", "carapace.protocol", "carapace.debug")


def test_regular_install_imports_every_package(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, capture_output=True, timeout=180,
    )
    # -S: no site processing, so the editable install's finder is not loaded; the
    # dependencies come from this venv's site-packages, Carapace from the target.
    deps = sysconfig.get_paths()["purelib"]
    code = (
        f"import sys; sys.path[:0] = [{str(target)!r}, {deps!r}]\n"
        "import importlib\n"
        f"for name in {PACKAGES!r} + ('carapace.server.main', 'carapace.agent.main', "
        "'carapace.agent.shim', 'carapace.debug.main'):\n"
        "    print(importlib.import_module(name).__file__)\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    files = out.stdout.split()
    assert len(files) == 8
    assert all(f.startswith(str(target)) for f in files), files
    assert (target / "carapace" / "protocol" / "README.md").exists()
    for script in ("carapace-server", "carapace-agent", "carapace-shim", "carapace-debug"):
        assert (target / "bin" / script).exists()


def test_editable_install_maps_the_folders() -> None:
    """`make` installs in strict editable mode: a tree of links to these folders."""
    import carapace.agent
    import carapace.debug
    import carapace.protocol
    import carapace.server

    for module, folder in ((carapace.server, "server"), (carapace.agent, "agent"),
                           (carapace.protocol, "protocol"), (carapace.debug, "debug")):
        assert Path(module.__file__ or "").resolve().parent == ROOT / folder
