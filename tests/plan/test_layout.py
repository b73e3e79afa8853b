"""The planner's arrows run one way: each module imports only modules before it in ORDER, and
nothing in the package imports the launcher or the CLI (they import the planner)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "vicuna_sky" / "plan"
ORDER = [
    "hardware",
    "errors",
    "catalog",
    "offers",
    "clouds",
    "egress",
    "tokens",
    "throughput",
    "memory",
    "checkpoint",
    "spot",
    "result",
    "planner",
    "render",
]


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_every_module_is_placed_and_imports_only_earlier_ones():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert sorted(ORDER) == modules
    for i, name in enumerate(ORDER):
        used = imports(PACKAGE / f"{name}.py")
        assert not any(u.startswith(("vicuna_sky.launch", "vicuna_sky.cli")) for u in used), name
        inside = {u.split(".")[2] for u in used if u.startswith("vicuna_sky.plan.")}
        assert inside <= set(ORDER[:i]), f"{name} imports {inside - set(ORDER[:i])}"
