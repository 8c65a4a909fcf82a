"""The import structure of src/sumtune: no circle, and every import points to the importer's layer or below, as
docs/architecture.md draws it (its layer table is read here, so the picture and the code cannot drift apart)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "sumtune"
DOC = REPO / "docs" / "architecture.md"


def modules() -> dict[str, Path]:
    """{"sumtune.x.y": path} for every module and package of src/sumtune."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(known: dict[str, Path]) -> dict[str, set[str]]:
    """Every sumtune module each module imports, anywhere in the file (lazy imports in functions and type-only
    imports included), plus the packages such an import runs (`a.b.c` runs `a/b/__init__`), except the root
    package and the importer's own packages (Python runs those while they are being imported)."""
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == "sumtune"}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sumtune":
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in known else node.module)
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        for target in list(targets):
            parts = target.split(".")
            targets |= {".".join(parts[:i]) for i in range(2, len(parts))} - own
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def layers() -> list[tuple[int, list[str]]]:
    """[(layer number, module patterns)] from the doc's table (`| 3 parts | ... | `a`, `b.*` |`)."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*(\d+)\s+\w+\s*\|.*\|(.*)\|\s*$", line)
        if match:
            rows.append((int(match.group(1)), re.findall(r"`([\w.*]+)`", match.group(2))))
    return rows


def layer_of(module: str, table: list[tuple[int, list[str]]]) -> list[int]:
    short = module.removeprefix("sumtune.") if module != "sumtune" else "sumtune"
    found = []
    for number, patterns in table:
        for pattern in patterns:
            if pattern.endswith(".*") and (short == pattern[:-2] or short.startswith(pattern[:-1])):
                found.append(number)
            elif short == pattern:
                found.append(number)
    return found


def test_no_import_circle():
    cycle = find_cycle(imports(modules()))
    assert cycle is None, "import circle: " + " → ".join(cycle)


def test_every_module_has_one_layer_and_imports_point_down():
    known = modules()
    table = layers()
    assert [n for n, _ in table] == [5, 4, 3, 2, 1], "the doc's layer table was not found"
    placed = {m: layer_of(m, table) for m in known}
    unplaced = sorted(m for m, found in placed.items() if len(found) != 1)
    assert not unplaced, f"modules without exactly one layer in {DOC.name}: {unplaced}"
    upward = [f"{m} (layer {placed[m][0]}) imports {t} (layer {placed[t][0]})"
              for m, targets in imports(known).items() for t in sorted(targets) if placed[t][0] > placed[m][0]]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_the_checks_catch_what_they_look_for():
    """The circle this redesign removed (recipe → profiling → runner → recipe) and an upward import are found."""
    graph = {"sumtune.recipe": {"sumtune.profiling"}, "sumtune.profiling": {"sumtune.profiling.runner"},
             "sumtune.profiling.runner": {"sumtune.recipe"}}
    assert find_cycle(graph) == ["sumtune.profiling", "sumtune.profiling.runner", "sumtune.recipe",
                                 "sumtune.profiling"]
    table = layers()
    assert layer_of("sumtune.modeling", table) == [2] and layer_of("sumtune.recipe", table) == [4]
    assert layer_of("sumtune.generation.decoding", table) == [2] and layer_of("sumtune", table) == [5]


MAX_MODULE_LINES = 500  # the style guide's "no module over ~500 lines without a reason"


def test_no_module_is_over_the_size_the_style_guide_allows():
    """Every module of src/sumtune fits in MAX_MODULE_LINES lines: a module that grows past it is split (or this test
    names it with its reason)."""
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    assert len(sizes) > 50
    assert {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES} == {}
