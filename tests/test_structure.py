"""How the code is laid out, checked from its syntax trees: no import circles, ground types that import nothing of
ours, formats reached only through their contract, status words spelled only in the Status enum."""

from __future__ import annotations

import ast
from pathlib import Path

from pipeline.types import Status
from tests.conftest import REPO

PACKAGES = ("pipeline", "flows")
PROBES = ("hasattr", "getattr")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (at any depth of the file: imports inside functions count)."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = ".".join((base[: len(base) - node.level + 1] if node.level else []) + [node.module or ""])
            candidates = [module.strip(".")] + [f"{module}.{a.name}".strip(".") for a in node.names]
        else:
            continue
        for target in candidates:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
    return targets


def test_no_import_circles():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}

    def reaches(start: str, goal: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == goal:
                    return path + [goal]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    circles = [" -> ".join(c) for name in sorted(graph) if (c := reaches(name, name))]
    assert circles == []


def test_ground_types_import_nothing_of_ours():
    known = modules()
    assert imports("pipeline.types", known["pipeline.types"], known) == set()


def test_formats_are_reached_only_through_their_contract():
    """The plan, the steps, the recipe and the flows never probe a format with hasattr/getattr."""
    callers = ["pipeline/convert.py", "pipeline/plan.py", "pipeline/recipe.py", "pipeline/handoff.py",
               "pipeline/report.py", "pipeline/formats/__init__.py",
               *map(str, (REPO / "flows").glob("*.py"))]  # fmt: skip
    probes = []
    for file in callers:
        path = REPO / file
        for node in ast.walk(ast.parse(path.read_text())):
            probe = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in PROBES
            if probe and any(word in ast.unparse(node.args[0]).lower() for word in ("fmt", "format")):
                probes.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert probes == []


def test_status_words_are_spelled_only_in_the_enum():
    words = {s.value for s in Status}
    spelled = []
    for name, path in modules().items():
        if name == "pipeline.types":
            continue
        tree = ast.parse(path.read_text())
        keys = {id(k) for node in ast.walk(tree) if isinstance(node, ast.Dict) for k in node.keys if k is not None}
        keys |= {id(node.slice) for node in ast.walk(tree) if isinstance(node, ast.Subscript)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in words and id(node) not in keys:
                spelled.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert spelled == []  # (a dict key or subscript named "ok", such as the summary's, is not a status)
