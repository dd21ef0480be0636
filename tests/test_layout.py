"""The package's shape: a library core that no study imports, no import circles, imports at module level.

The floors are computed, not listed: a module's floor is one above the highest module it imports, so an
import circle has no floors and fails here, and a core module that reaches up into ``ropekit.studies`` or the
command line fails too. ``python tests/test_layout.py`` prints the floors.
"""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ropekit"
TOP = {"ropekit.cli"}  # the command: above everything
# Imports that stay inside a function, and why: the Triton kernel module needs Triton, which exists only on
# Linux x86_64/aarch64 (elsewhere the torch reference runs).
LAZY = {"ropekit.kernels.rope"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The ropekit modules an import statement loads (``from ropekit import data`` loads ropekit.data)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [n for n in names if n.split(".")[0] == "ropekit" and n != module]


def imports() -> dict[str, dict[str, set[str]]]:
    """module -> {"top": modules imported at module level, "inner": modules imported inside a function}."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(n) for n in tree.body}
        edges = {"top": set(), "inner": set()}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                kind = "top" if id(node) in top_level else "inner"
                edges[kind].update(_targets(node, module, path.name == "__init__.py"))
        graph[module] = edges
    return graph


def floors(graph) -> dict[str, int]:
    """A module's floor: 0 when it imports no ropekit module, else one above the highest it imports (the
    package ``ropekit`` itself, which re-exports the public API, is left out of the count)."""
    done: dict[str, int] = {}
    visiting: list[str] = []

    def floor(m: str) -> int:
        if m in done:
            return done[m]
        if m in visiting:
            raise AssertionError("import circle: " + " -> ".join([*visiting[visiting.index(m) :], m]))
        visiting.append(m)
        deps = {d for kind in ("top", "inner") for d in graph[m][kind] if d != "ropekit" and d in graph}
        done[m] = 1 + max(map(floor, deps)) if deps else 0
        visiting.pop()
        return done[m]

    for m in graph:
        floor(m)
    return done


def test_no_import_circles():
    floors(imports())  # raises, naming the circle


def test_the_core_imports_no_study_and_not_the_command_line():
    graph = imports()
    core = [m for m in graph if not m.startswith("ropekit.studies") and m not in TOP]
    for m in core:
        up = {d for kind in ("top", "inner") for d in graph[m][kind] if d.startswith("ropekit.studies") or d in TOP}
        assert not up, f"{m} (core) imports {sorted(up)}: a study must be deletable without touching the core"


def test_studies_do_not_import_each_other_except_the_static_report():
    # each study owns its room; the benchmark drives the kernel's static report (``ropekit bench --static``)
    graph = imports()
    allowed = {("ropekit.studies.bench", "ropekit.studies.kernel_static")}
    for m, edges in graph.items():
        if m.startswith("ropekit.studies."):
            for d in edges["top"] | edges["inner"]:
                if d.startswith("ropekit.studies.") and d != m:
                    assert (m, d) in allowed, f"study {m} imports study {d}"


def test_ropekit_imports_sit_at_module_level():
    lazy = {(m, d) for m, e in imports().items() for d in e["inner"] if d not in LAZY}
    assert not lazy, f"imports inside functions (move them to the top, or name the optional dependency): {lazy}"


def test_the_package_root_is_imported_by_no_module():
    # ``import ropekit`` inside the package hides where a name comes from and invites circles
    users = sorted(m for m, e in imports().items() if "ropekit" in e["top"] | e["inner"] and m != "ropekit")
    assert not users, f"modules importing the package root instead of the module they need: {users}"


if __name__ == "__main__":
    by_floor: dict[int, list[str]] = {}
    for m, f in floors(imports()).items():
        by_floor.setdefault(f, []).append(m.removeprefix("ropekit."))
    for f in sorted(by_floor):
        print(f, " ".join(sorted(by_floor[f])))
    sys.exit(0)
