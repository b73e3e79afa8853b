"""Arrows point one way (DESIGN.md): each package imports only from the floors below it, and no
module imports itself back through others. Every import counts, the ones inside functions too:
an import deferred for speed is still an arrow."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLOORS = [
    ["checkpoints_sync"],
    ["errors", "terminal", "assets"],
    ["ports", "procs", "inputs", "recipe_yaml", "spot", "output"],
    ["recipe", "data", "gguf", "eval", "delta"],
    ["tiny", "plan"],
    ["models"],
    ["train", "serve"],
    ["launch"],
    ["localcloud"],  # implements launch.backend; the command line chooses it
    ["demo"],
    ["cli"],
]
"""The ground floor first. A unit is a package or a module of `vicuna_sky` (or
checkpoints_sync), named without the prefix."""


def modules() -> dict[str, Path]:
    found = {}
    for base, folder in (("vicuna_sky", ROOT / "src" / "vicuna_sky"), ("", ROOT)):
        for path in (folder if base else ROOT / "checkpoints_sync").rglob("*.py"):
            parts = path.relative_to(folder.parent if base else ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules `path` imports (`from a import b` names a.b when b is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {name for name in out if name in known}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if parts[0] == "vicuna_sky" and len(parts) > 1 else parts[0]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_every_unit_has_a_floor():
    floor_of = {u for floor in FLOORS for u in floor}
    units = {unit(m) for m in graph() if m != "vicuna_sky"}
    assert units <= floor_of, f"give these a floor in FLOORS: {sorted(units - floor_of)}"


def arrows_up(edges: dict[str, set[str]]) -> list[str]:
    floor = {u: i for i, names in enumerate(FLOORS) for u in names}
    return sorted(
        f"{a} -> {b}"
        for a, targets in edges.items()
        for b in targets
        if unit(a) != unit(b) and floor.get(unit(b), -1) >= floor.get(unit(a), -1)
    )


def circles(edges: dict[str, set[str]]) -> list[str]:
    found = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_imports_point_down():
    up = arrows_up(graph())
    assert not up, "imports that point sideways or up:\n" + "\n".join(up)


def test_no_module_imports_itself_through_others():
    found = circles(graph())
    assert not found, "circles:\n" + "\n".join(found)


def test_the_check_sees_an_arrow_up_and_a_circle(tmp_path):
    """The walk itself: an import inside a function is an arrow, up is refused, and so is a
    circle within one floor."""
    known = {"vicuna_sky.launch.a": tmp_path / "a.py", "vicuna_sky.cli.b": tmp_path / "b.py"}
    known["vicuna_sky.launch.a"].write_text("def f():\n    from vicuna_sky.cli import b\n")
    known["vicuna_sky.cli.b"].write_text("import vicuna_sky.launch.a\n")
    edges = {name: imports(path, known) for name, path in known.items()}
    assert edges == {
        "vicuna_sky.launch.a": {"vicuna_sky.cli.b"},
        "vicuna_sky.cli.b": {"vicuna_sky.launch.a"},
    }
    assert arrows_up(edges) == ["vicuna_sky.launch.a -> vicuna_sky.cli.b"]
    assert circles(edges) == ["vicuna_sky.cli.b -> vicuna_sky.launch.a -> vicuna_sky.cli.b"]
    sideways = {"vicuna_sky.serve.x": {"vicuna_sky.train.y"}, "vicuna_sky.train.y": set()}
    assert arrows_up(sideways) == ["vicuna_sky.serve.x -> vicuna_sky.train.y"]
