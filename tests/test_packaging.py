"""Every module of the code folders installs as carapace.*, from a regular install too.

A package missing from pyproject's package list does not install and says
nothing: only importing each module from a regular ``pip install .`` shows it.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("protocol", "runtime", "server", "agent", "debug")


def code_modules() -> list[str]:
    """The dotted name of every module in the code folders, packages included."""
    names = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join(("carapace", folder, *parts)))
    return names


def test_regular_install_imports_every_module(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, capture_output=True, timeout=180,
    )
    modules = code_modules()
    # -S: no site processing, so the editable install's finder is not loaded; the
    # dependencies come from this venv's site-packages, Carapace from the target.
    deps = sysconfig.get_paths()["purelib"]
    code = (
        f"import sys; sys.path[:0] = [{str(target)!r}, {deps!r}]\n"
        "import importlib\n"
        f"for name in {modules!r}:\n"
        "    print(importlib.import_module(name).__file__)\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    files = out.stdout.split()
    assert len(files) == len(modules)
    assert all(f.startswith(str(target)) for f in files), files
    assert (target / "carapace" / "protocol" / "README.md").exists()
    for script in ("carapace-server", "carapace-agent", "carapace-shim", "carapace-debug"):
        assert (target / "bin" / script).exists()


def test_every_code_folder_is_in_the_package_list() -> None:
    """pyproject's package list names every package folder (a subpackage too)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    packages = {name for name in code_modules()
                if (ROOT / name.split(".")[1]).joinpath(*name.split(".")[2:], "__init__.py")
                .exists()}
    assert packages <= listed, sorted(packages - listed)


def test_editable_install_maps_the_folders() -> None:
    """`make` installs in strict editable mode: a tree of links to these folders."""
    for folder in FOLDERS:
        module = importlib.import_module(f"carapace.{folder}")
        assert Path(module.__file__ or "").resolve().parent == ROOT / folder
