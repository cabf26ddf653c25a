"""``carapace-agent shims install|list|remove``: the symlinks that make tools run on the host.

A shim is a symlink named after the tool, pointing at the ``carapace-shim``
executable. We only ever touch symlinks whose target is named
``carapace-shim``: an existing file, directory or other symlink with a
tool's name is somebody else's and is left alone, with an error.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from .shim import SHIM_NAME


class ShimError(Exception):
    """A shim operation that must not go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class ShimChange:
    tool: str
    path: Path
    action: str
    """``installed``, ``updated``, ``unchanged``, ``removed`` or ``absent``."""


def shim_executable() -> Path:
    """The ``carapace-shim`` of this installation: beside our interpreter, else on PATH."""
    beside = Path(sys.executable).parent / SHIM_NAME
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside.absolute()
    found = shutil.which(SHIM_NAME)
    if found:
        return Path(found).absolute()
    raise ShimError(f"cannot find the {SHIM_NAME} executable (not next to {sys.executable} "
                    "and not on PATH); is Carapace installed?")


def _check_tool_name(tool: str) -> None:
    if not tool or tool in (".", "..") or "/" in tool or "\0" in tool:
        raise ShimError(f"{tool!r} is not a tool name (a plain file name, like 'gh')")
    if tool == SHIM_NAME:
        raise ShimError(f"a shim cannot be named {SHIM_NAME}")


def _check_ours(directory: Path, tools: list[str], refusal: str) -> None:
    """Raise before anything changes if a tool name is invalid or its file is not a shim."""
    for tool in tools:
        _check_tool_name(tool)
        path = directory / tool
        if (path.exists() or path.is_symlink()) and not is_shim(path):
            raise ShimError(f"{path} exists and is not a {SHIM_NAME} symlink; refusing to "
                            f"{refusal}")


def is_shim(path: Path) -> bool:
    """True if ``path`` is a symlink to a ``carapace-shim`` (ours to replace or remove)."""
    try:
        return path.is_symlink() and os.path.basename(os.readlink(path)) == SHIM_NAME
    except OSError:
        return False


def install(directory: Path, tools: list[str], target: Path | None = None) -> list[ShimChange]:
    """Link each tool to the shim. Idempotent; refuses (before changing anything) to
    replace a file that is not already a shim."""
    target = target or shim_executable()
    _check_ours(directory, tools, "replace it (remove it yourself if it should go)")
    directory.mkdir(parents=True, exist_ok=True)
    changes = []
    for tool in tools:
        path = directory / tool
        if path.is_symlink():
            if Path(os.readlink(path)) == target:
                changes.append(ShimChange(tool, path, "unchanged"))
                continue
            action = "updated"
        else:
            action = "installed"
        tmp = directory / f".{tool}.carapace-shim-tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        tmp.replace(path)  # atomic: the tool name never disappears mid-update
        changes.append(ShimChange(tool, path, action))
    return changes


def list_shims(directory: Path) -> list[tuple[str, Path]]:
    """The shims in ``directory``: (tool, link target), sorted by tool."""
    if not directory.is_dir():
        return []
    found = []
    for entry in sorted(directory.iterdir()):
        if is_shim(entry):
            found.append((entry.name, Path(os.readlink(entry))))
    return found


def remove(directory: Path, tools: list[str]) -> list[ShimChange]:
    """Remove the shims for ``tools``; refuses (before changing anything) to remove
    anything that is not a shim. A missing shim is not an error."""
    _check_ours(directory, tools, "remove it")
    changes = []
    for tool in tools:
        path = directory / tool
        if path.is_symlink():
            path.unlink()
            changes.append(ShimChange(tool, path, "removed"))
        else:
            changes.append(ShimChange(tool, path, "absent"))
    return changes


# --------------------------------------------------------------------------
# The click group, registered on ``carapace-agent`` in main.py.

_DIR = click.option("--dir", "directory", required=True,
                    type=click.Path(file_okay=False, path_type=Path),
                    help="Directory of the shims (put it early on the VM user's PATH).")


@click.group("shims")
def shims_group() -> None:
    """Manage tool shims: symlinks that run a host tool through this agent."""


@shims_group.command("install")
@_DIR
@click.argument("tools", nargs=-1, required=True)
def install_cmd(directory: Path, tools: tuple[str, ...]) -> None:
    """Link each TOOL in DIR to carapace-shim."""
    try:
        changes = install(directory, list(tools))
    except (ShimError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    for change in changes:
        click.echo(f"{change.action}: {change.path} -> {os.readlink(change.path)}")


@shims_group.command("list")
@_DIR
def list_cmd(directory: Path) -> None:
    """Show the shims in DIR."""
    for tool, target in list_shims(directory):
        click.echo(f"{tool} -> {target}")


@shims_group.command("remove")
@_DIR
@click.argument("tools", nargs=-1, required=True)
def remove_cmd(directory: Path, tools: tuple[str, ...]) -> None:
    """Remove the shims for each TOOL from DIR (only carapace-shim symlinks)."""
    try:
        changes = remove(directory, list(tools))
    except (ShimError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    for change in changes:
        click.echo(f"{change.action}: {change.path}")
