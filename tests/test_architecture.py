"""The package's rooms (docs/architecture.md): every import, at module level or inside a function, goes to the
same room or a lower one, no module imports argparse outside the CLI, and no two modules import each other
round a cycle. The walk reads the source with `ast`, so an import hidden in a function body counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "parity"

# Lowest first. A module may import its own room and the rooms before it, never one after it.
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("parity", "parity.errors", "parity.runtime", "parity.progress", "parity.jsonio", "parity.findings")),
    ("reimpl", ("parity.reimpl",)),
    ("causes", ("parity.causes",)),
    ("dump", ("parity.dump",)),
    ("capture", ("parity.capture",)),
    ("compare", ("parity.compare",)),
    ("replay", ("parity.replay",)),
    ("diagnose", ("parity.diagnose",)),
    ("report", ("parity.report",)),
    ("api", ("parity.api",)),
    ("cli", ("parity.cli", "parity.tools", "parity.pytest_plugin", "parity.__main__")),
]
CLI_ROOMS = {"cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room_of(module: str) -> str | None:
    best, best_len = None, -1
    for room, prefixes in ROOMS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                if prefix == "parity" and module != "parity":
                    continue  # the bare package name covers parity/__init__.py only
                best, best_len = room, len(prefix)
    return best


RANK = {room: i for i, (room, _) in enumerate(ROOMS)}


def imports_of(module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a parity module, resolved to a module of the package."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from parity.dump import names` imports the module parity.dump.names
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
        for target in targets:
            if target == "parity" or target.startswith("parity."):
                while target not in MODULES and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != module:
                    found.append((node.lineno, target))
    return found


def test_every_module_is_in_a_room():
    assert [m for m in MODULES if room_of(m) is None] == []


def test_no_module_imports_a_higher_room():
    upward = []
    for module in MODULES:
        own = RANK[room_of(module)]
        for line, target in imports_of(module):
            if RANK[room_of(target)] > own:
                upward.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} {module} ({room_of(module)})"
                              f" imports {target} ({room_of(target)})")
    assert upward == []


def test_only_the_cli_imports_argparse():
    offenders = []
    for module, path in MODULES.items():
        if room_of(module) in CLI_ROOMS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            if "argparse" in names:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert offenders == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    # A package's __init__ that re-exports its own modules is not a cycle with them: skip edges into a parent.
    graph = {m: {t for _, t in imports_of(m) if not m.startswith(t + ".")} for m in MODULES}
    assert find_cycle(graph) is None


@pytest.mark.parametrize("broken", ["upward", "cycle"])
def test_the_walk_sees_what_it_must(broken):
    """The checks themselves can fail: a planted upward import and a planted cycle are found."""
    if broken == "upward":
        graph_rank = RANK[room_of("parity.dump.files")] < RANK[room_of("parity.cli.main")]
        assert graph_rank
    else:
        assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    tree = ast.parse("def f():\n    from parity.cli.main import main\n")
    assert [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] == ["parity.cli.main"]
