"""The sandbox keys: ``settings.sandbox`` and a CLI tool's ``sandbox`` section.

These say *what* confinement a tool gets; ``server/sandbox.py`` builds the
bubblewrap command line from them. Every CLI tool is confined by default
(``settings.sandbox: auto``): it sees the host read-only, never the server's
own secrets (policy, tokens, TLS key, debug token, audit log) nor its
processes, and has a private ``/tmp``. A tool's section only loosens or
tightens that::

    settings:
      sandbox: auto | bwrap | none  # auto: bwrap when it works here, else none (loudly)
    tools:
      gh:
        type: cli
        sandbox:
          writable_paths: [/home/me/.config/gh]   # bound read-write (must exist)
          hide_paths: [/home/me/.ssh]             # replaced by an empty dir or file
          network: host | none                    # none: no network at all (own netns)
          rlimits: {cpu_secs: 60, memory_mb: 512, nproc: 64, fsize_mb: 100}

``memory_mb`` is the address-space limit (RLIMIT_AS); ``nproc`` counts the
processes of the server's user as the kernel does (RLIMIT_NPROC);
``fsize_mb`` is the largest file the tool may write (RLIMIT_FSIZE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, Protocol

SANDBOX_SETTINGS: Final = ("auto", "bwrap", "none")
"""Values of ``settings.sandbox``."""

DEFAULT_SANDBOX_SETTING: Final = "auto"
"""Confine when the host can: a tool that can read the server's token file can leak every
agent's token, so confinement is on unless the operator turns it off."""

NETWORK_MODES: Final = ("host", "none")
"""Values of ``tools.NAME.sandbox.network``."""

SANDBOX_KEYS: Final = ("writable_paths", "hide_paths", "network", "rlimits")
RLIMIT_KEYS: Final = ("cpu_secs", "memory_mb", "nproc", "fsize_mb")


class _Loader(Protocol):
    """The checks of the policy loader (``load._Loader``) that these keys use."""

    def fail(self, path: str, problem: str, fix: str = "") -> NoReturn: ...

    def mapping(self, value: Any, path: str, what: str = "a mapping") -> dict[str, Any]: ...

    def known_keys(self, value: dict[str, Any], path: str, allowed: Any,
                   hint: str = "") -> None: ...

    def strings(self, value: Any, path: str) -> tuple[str, ...]: ...

    def absolute_path(self, value: Any, path: str, what: str) -> str: ...

    def positive_int(self, value: Any, path: str) -> int: ...


@dataclass(frozen=True)
class Rlimits:
    """Resource limits of one tool's processes; None: the server's own limit."""

    cpu_secs: int | None = None
    memory_mb: int | None = None
    nproc: int | None = None
    fsize_mb: int | None = None

    def any(self) -> bool:
        return any(getattr(self, key) is not None for key in RLIMIT_KEYS)


@dataclass(frozen=True)
class ToolSandbox:
    """One CLI tool's ``sandbox`` section (the defaults: nothing loosened, network on)."""

    writable_paths: tuple[str, ...] = ()
    hide_paths: tuple[str, ...] = ()
    network: str = "host"
    rlimits: Rlimits = field(default_factory=Rlimits)


def load_sandbox_setting(loader: _Loader, value: Any, path: str) -> str:
    """``settings.sandbox``: one of :data:`SANDBOX_SETTINGS`."""
    if value not in SANDBOX_SETTINGS:
        loader.fail(path, f"must be one of {', '.join(SANDBOX_SETTINGS)}, not {value!r}"[:200],
                    "auto confines tools with bubblewrap when it works on this host.")
    return str(value)


def load_tool_sandbox(loader: _Loader, value: Any, path: str) -> ToolSandbox:
    """A CLI tool's ``sandbox`` section, validated."""
    raw = loader.mapping(value, path)
    loader.known_keys(raw, path, SANDBOX_KEYS)
    writable: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()
    if "writable_paths" in raw:
        p = f"{path}.writable_paths"
        writable = tuple(loader.absolute_path(item, f"{p}[{i}]", "a writable path")
                         for i, item in enumerate(loader.strings(raw["writable_paths"], p)))
        for i, item in enumerate(writable):
            if item == "/":
                loader.fail(f"{p}[{i}]", "the whole host cannot be writable",
                            "List the directories the tool must write to.")
    if "hide_paths" in raw:
        p = f"{path}.hide_paths"
        hidden = tuple(loader.absolute_path(item, f"{p}[{i}]", "a hidden path")
                       for i, item in enumerate(loader.strings(raw["hide_paths"], p)))
        for i, item in enumerate(hidden):
            if item == "/":
                loader.fail(f"{p}[{i}]", "the whole host cannot be hidden",
                            "List the files or directories the tool must not see.")
    network = "host"
    if "network" in raw:
        network = raw["network"]
        if network not in NETWORK_MODES:
            loader.fail(f"{path}.network",
                        f"must be one of {', '.join(NETWORK_MODES)}, not {network!r}"[:200],
                        "none gives the tool no network at all.")
    rlimits = Rlimits()
    if "rlimits" in raw:
        p = f"{path}.rlimits"
        limits = loader.mapping(raw["rlimits"], p)
        loader.known_keys(limits, p, RLIMIT_KEYS)
        rlimits = Rlimits(**{key: loader.positive_int(limits[key], f"{p}.{key}")
                             for key in RLIMIT_KEYS if key in limits})
    return ToolSandbox(writable_paths=writable, hide_paths=hidden, network=str(network),
                       rlimits=rlimits)
