"""The import contract holds: what may import what, and no cycles among modules.

The layer rules are import-linter contracts in pyproject.toml; this test
runs them, and adds the two rules import-linter cannot say: no module is
part of an import cycle (counting imports under ``if TYPE_CHECKING:``),
and the debug CLI uses nothing of the server but its policy engine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
POLICY_ENGINE = "carapace.server.policy"


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph("carapace", include_external_packages=False, cache_dir=None)


def import_cycles(graph: grimp.ImportGraph, prefix: str = "carapace") -> list[tuple[str, ...]]:
    """Each direct import that closes a cycle, as the chain back to its importer.

    A package's ``__init__`` importing its own submodules is the usual way to
    publish an API, and a submodule importing a sibling through the package is
    not, so an edge from a module into its own package counts like any other.
    """
    cycles = []
    for module in sorted(m for m in graph.modules if m.startswith(prefix)):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if not imported.startswith(prefix) or module.startswith(imported + "."):
                continue  # an import of one's own package: its __init__ runs first anyway
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None:
                cycles.append((module, *back))
    return cycles


def imports_outside_policy_engine(graph: grimp.ImportGraph) -> list[str]:
    """Imports by debug of server modules other than the policy engine, and imports by
    the policy engine of the rest of the server (which would bring it in indirectly)."""
    found = []
    for module in sorted(graph.modules):
        inside_engine = module == POLICY_ENGINE or module.startswith(POLICY_ENGINE + ".")
        if not (module.startswith("carapace.debug") or inside_engine):
            continue
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if not imported.startswith("carapace.server"):
                continue
            if imported == POLICY_ENGINE or imported.startswith(POLICY_ENGINE + "."):
                continue
            found.append(f"{module} -> {imported}")
    return found


def test_import_linter_contracts_are_kept() -> None:
    out = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_module_is_part_of_an_import_cycle() -> None:
    cycles = import_cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_debug_uses_only_the_servers_policy_engine() -> None:
    assert imports_outside_policy_engine(_graph()) == []


def test_the_cycle_check_finds_a_cycle_through_a_type_checking_import() -> None:
    graph = grimp.ImportGraph()
    for a, b in (("carapace.server.app", "carapace.server.metrics"),
                 ("carapace.server.metrics", "carapace.server.app")):
        graph.add_import(importer=a, imported=b)
    graph.add_import(importer="carapace.server.app", imported="carapace.server")
    assert import_cycles(graph) == [
        ("carapace.server.app", "carapace.server.metrics", "carapace.server.app"),
        ("carapace.server.metrics", "carapace.server.app", "carapace.server.metrics"),
    ]


def test_the_policy_rule_finds_a_debug_import_of_the_server() -> None:
    graph = grimp.ImportGraph()
    graph.add_import(importer="carapace.debug.ops", imported="carapace.server.policy.load")
    graph.add_import(importer="carapace.debug.ops", imported="carapace.server.metrics")
    graph.add_import(importer="carapace.server.policy.load", imported="carapace.server.audit")
    assert imports_outside_policy_engine(graph) == [
        "carapace.debug.ops -> carapace.server.metrics",
        "carapace.server.policy.load -> carapace.server.audit",
    ]


def test_type_checking_imports_are_in_the_graph(tmp_path: Path) -> None:
    """The cycle rule counts ``if TYPE_CHECKING:`` imports: grimp must see them."""
    pkg = tmp_path / "tcpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from . import b\n")
    (pkg / "b.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    try:
        graph = grimp.build_graph("tcpkg", cache_dir=None)
    finally:
        sys.path.remove(str(tmp_path))
    assert graph.direct_import_exists(importer="tcpkg.a", imported="tcpkg.b")
