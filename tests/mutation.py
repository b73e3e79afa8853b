"""Mutation score of the modules that guard access and data (issue #30), with cosmic-ray.

    make mutation                       every module below
    make mutation MUTATE="auth atomic"  some of them (names from MODULES)
    make mutation MUTATE="--retry-survivors auth"   after adding tests: run its survivors again

Each module is mutated on disk, one mutant at a time, and only its own tests run against it
(`tests` below): a mutant is killed when they fail or time out. On disk, not in memory, because
most of these tests start real processes (controller, workers, the CLI) that import the module
themselves; cosmic-ray puts every file back after each mutant (`git diff` shows none left).
Survivors are listed with their line; one that no test can kill (it changes nothing a user
could observe) goes to the "Equivalent mutants" table of tests/MUTATIONS.md, with the reason,
and then no longer counts. Sessions are kept in runs/mutation/ (`cr-report` reads them).
Opt-in, never in CI: several minutes a module on two cores.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "mutation"
GOAL = 0.90
# Operators left out: swaps into operators no one would write there (x + y -> x ** y, x >> y,
# x ^ y ...) multiply the mutants without testing anything the kept swaps do not.
EXCLUDED_OPERATORS = [
    r"core/ReplaceBinaryOperator_.*_(Pow|RShift|LShift|BitOr|BitAnd|BitXor|FloorDiv|Mod)",
    r"core/ReplaceBinaryOperator_(Pow|RShift|LShift|BitXor)_.*",
]


@dataclass
class Module:
    path: str
    tests: list[str]
    """pytest arguments: the tests relevant to this module, nothing else."""
    functions: tuple[str, ...] = ()
    """Only these functions (or methods) are mutated; empty: the whole file."""
    timeout: float = 120.0
    """Seconds for one mutant's tests (a mutant that hangs them is killed by the timeout)."""


MODULES = {
    "auth": Module("src/vicuna_sky/serve/auth.py", ["tests/serve/test_auth.py"], timeout=60),
    "registry": Module("src/vicuna_sky/serve/registry.py", ["tests/serve/test_registry.py"]),
    # Who holds the sockets: the budget, one address's share, the handshake handed over.
    "connections": Module(
        "src/vicuna_sky/serve/connections.py",
        ["tests/serve/test_connections.py", "-k", "not flood and not silent"],
        timeout=60,
    ),
    # What the wire models refuse before anything runs: schemas, token ids, names, addresses.
    "wire": Module(
        "src/vicuna_sky/serve/protocol.py",
        [
            "tests/serve/test_protocol.py",
            "tests/serve/test_registry.py::test_an_address_has_one_spelling",
        ],
        functions=("check_refs", "_pointed_at", "check_worker_address"),
        timeout=60,
    ),
    # Stub workers (tests/serve/test_failover.py) answer as broken, draining or misplaced
    # workers would; the fleet tests with real workers take minutes a mutant.
    "failover": Module(
        "src/vicuna_sky/serve/hop.py",
        ["tests/serve/test_controller.py", "tests/serve/test_failover.py"],
        functions=("generate", "_worker_error"),
        timeout=90,
    ),
    # The local store only: commit, gc and the manifest are the same code on every store, and the
    # S3 and GCS emulators would triple the time (tests/checkpoints_sync/test_stores.py has them).
    "checkpoints": Module(
        "checkpoints_sync/checkpoints.py",
        [
            "tests/checkpoints_sync/test_checkpoints.py",
            "tests/checkpoints_sync/test_uploader.py",
            "-k",
            "not s3 and not gs",
        ],
    ),
    "manifest": Module(
        "checkpoints_sync/manifest.py",
        [
            "tests/checkpoints_sync/test_manifest.py",
            "tests/checkpoints_sync/test_checkpoints.py",
            "-k",
            "not s3 and not gs",
        ],
    ),
    "atomic": Module(
        "checkpoints_sync/atomic.py",
        [
            "tests/checkpoints_sync/test_atomic.py",
            "tests/checkpoints_sync/test_safety.py",
            "-k",
            "atomic or litter or live_writer or final_permissions",
        ],
    ),
    # In process: the CLI tests of the same rule (tests/test_outputs_never_inputs.py) take two
    # minutes a mutant here.
    "output": Module("src/vicuna_sky/output.py", ["tests/test_output.py"], timeout=60),
    # tests/data/test_labels.py first: its cases without a tokenizer catch most mutants before
    # transformers is imported. Not the packing tests: they test `pack`, not the labels.
    "labels": Module(
        "src/vicuna_sky/data/tokenize.py",
        ["tests/data/test_labels.py", "tests/data/test_tokenize.py", "-k", "not pack"],
        functions=("_label_tokens", "tokenize_messages", "trainable"),
    ),
    "cost": Module("src/vicuna_sky/launch/cost.py", ["tests/launch/test_cost.py"], timeout=60),
    # The plan's formulas: the spot model (expected billed time, cost, the relaunch's terms) and
    # the checkpoint's times and Young/Daly's interval, each against its own tests worked out by
    # hand (the planner's rank offers from the catalogs: seconds each, on every mutant).
    "plan-spot": Module(
        "src/vicuna_sky/plan/spot.py",
        ["tests/plan/test_spot.py"],
        timeout=60,
    ),
    "plan-checkpoint": Module(
        "src/vicuna_sky/plan/checkpoint.py",
        ["tests/plan/test_checkpoint.py", "tests/plan/test_spot.py"],
        timeout=60,
    ),
    # The trainer's resume state, in process (tests/train/test_trainer.py's torchrun resumes take
    # minutes a mutant): the data order, the RNG state, the learning-rate schedule and the count
    # of tokens already trained on.
    "sampler": Module(
        "src/vicuna_sky/train/data.py",
        ["tests/train/test_data.py", "tests/train/test_resume_state.py"],
        functions=(
            "__init__",
            "steps_per_epoch",
            "_permutation",
            "next_batch",
            "state_dict",
            "load_state_dict",
        ),
        timeout=60,
    ),
    "rng": Module(
        "src/vicuna_sky/train/checkpoint.py",
        ["tests/train/test_resume_state.py"],
        functions=("rng_state", "set_rng_state"),
        timeout=60,
    ),
    "schedule": Module(
        "src/vicuna_sky/train/trainer.py",
        ["tests/train/test_resume_state.py"],
        functions=("lr_lambda", "factor", "tokens_before"),
        timeout=60,
    ),
}


def function_lines(path: Path, names: tuple[str, ...]) -> list[str]:
    """The line ranges ("a-b") of the named functions, from the syntax tree (not by number)."""
    tree = ast.parse(path.read_text())
    return [
        f"{node.lineno}-{node.end_lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in names
    ]


def annotation_lines(path: Path) -> set[int]:
    """Lines inside type annotations: with `from __future__ import annotations` they are never
    evaluated, so a mutant there (`str | None` -> `str + None`) changes nothing."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        annotations = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            annotations = [a.annotation for a in every if a is not None] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        for annotation in filter(None, annotations):
            lines.update(range(annotation.lineno, annotation.end_lineno + 1))
    return lines


def skip_annotation_mutants(session: Path, path: Path) -> None:
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    lines = annotation_lines(path)
    with use_db(str(session)) as db:
        for item in list(db.pending_work_items):
            if item.mutations[0].start_pos[0] in lines:
                result = WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="annotation")
                db.set_result(item.job_id, result)


def equivalent_mutants() -> dict[tuple[str, str, str], str]:
    """(file, source line stripped, operator) -> why, from tests/MUTATIONS.md's table."""
    text = (ROOT / "tests" / "MUTATIONS.md").read_text()
    section = text.split("## Equivalent mutants", 1)[-1] if "## Equivalent mutants" in text else ""
    found = {}
    for line in section.splitlines():
        # A `|` inside a cell is written `\|` (Markdown's escape): split on the others only.
        cells = [c.strip().strip("`") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) == 4 and cells[0].endswith(".py"):
            found[(cells[0], cells[1].replace("\\|", "|"), cells[2])] = cells[3]
    return found


def run(*args: str) -> str:
    return subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True).stdout


def score(name: str, module: Module, retry_survivors: bool = False) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    config, session = WORK / f"{name}.toml", WORK / f"{name}.sqlite"
    # A mutant that hangs the tests gets Ctrl-C (SIGINT) at the module's timeout: pytest then
    # tears its fixtures down, so the servers a test started are stopped, not orphaned (as
    # cosmic-ray's own timeout, a SIGKILL of pytest alone, would leave them).
    # LangSmith's pytest plugin (a dependency's) takes two seconds to import and has no use here.
    pytest = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    pytest += ["-p", "no:langsmith_plugin"]
    limit = ["timeout", "-s", "INT", "-k", "20", str(int(module.timeout))]
    test_command = shlex.join([*limit, *pytest, *module.tests])
    # The tests must pass unmutated, or every mutant would count as killed.
    baseline = subprocess.run(shlex.split(test_command), cwd=ROOT, capture_output=True, text=True)
    if baseline.returncode != 0:
        raise SystemExit(f"{name}: the tests fail without a mutant:\n{baseline.stdout[-3000:]}")
    lines = ""
    if module.functions:
        ranges = function_lines(ROOT / module.path, module.functions)
        lines = f'[cosmic-ray.filters.line-filter.lines]\n"{module.path}" = {json.dumps(ranges)}\n'
    config.write_text(
        f"""[cosmic-ray]
module-path = "{module.path}"
timeout = {module.timeout + 30}
excluded-modules = []
test-command = {json.dumps(test_command)}

[cosmic-ray.distributor]
name = "local"

[cosmic-ray.filters.operators-filter]
exclude-operators = {json.dumps(EXCLUDED_OPERATORS)}

{lines}"""
    )
    bin_dir = Path(sys.executable).parent
    if not session.exists():
        run(str(bin_dir / "cosmic-ray"), "init", str(config), str(session))
        run(str(bin_dir / "cr-filter-operators"), str(session), str(config))
        if module.functions:
            run(str(bin_dir / "cr-filter-lines"), "--config", str(config), str(session))
        skip_annotation_mutants(session, ROOT / module.path)
    elif retry_survivors:  # only new tests can change their outcome; the killed stay killed
        with sqlite3.connect(session) as db:
            db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'")
    # Resumes where an interrupted run stopped; every file is restored after each mutant.
    subprocess.run([str(bin_dir / "cosmic-ray"), "exec", str(config), str(session)], cwd=ROOT)
    source = (ROOT / module.path).read_text().splitlines()
    equivalent, annotations = equivalent_mutants(), annotation_lines(ROOT / module.path)
    killed = survived = 0
    survivors, excused = [], []
    for raw in run(str(bin_dir / "cosmic-ray"), "dump", str(session)).splitlines():
        item, result = json.loads(raw)
        if not result or result["worker_outcome"] in ("skipped", "no-test"):
            continue
        if result["test_outcome"] == "incompetent":  # not valid Python: no mutant at all
            continue
        mutation = item["mutations"][0]
        line = mutation["start_pos"][0]
        where = (module.path, source[line - 1].strip(), mutation["operator_name"])
        if result["test_outcome"] == "killed":
            killed += 1
        elif where in equivalent or line in annotations:
            excused.append(where)
        else:
            survived += 1
            survivors.append(f"{module.path}:{line} {mutation['operator_name']}  {where[1]}")
    total = killed + survived
    return {
        "module": name,
        "killed": killed,
        "survived": survived,
        "equivalent": len(excused),
        "score": killed / total if total else 1.0,
        "survivors": survivors,
    }


def main(args: list[str]) -> int:
    retry = "--retry-survivors" in args
    names = [a for a in args if a != "--retry-survivors"] or list(MODULES)
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        print(f"unknown module(s) {unknown}; known: {' '.join(MODULES)}", file=sys.stderr)
        return 2
    dirty = run("git", "status", "--porcelain", "--", *(MODULES[n].path for n in names))
    if dirty.strip():
        print(f"commit or stash these first (they are mutated in place):\n{dirty}")
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = [score(name, MODULES[name], retry) for name in names]
    print()
    for r in results:
        for survivor in r["survivors"]:
            print(f"  survived: {survivor}")
    print(f"\n{'module':<12} {'killed':>7} {'survived':>9} {'equivalent':>11} {'score':>7}")
    for r in results:
        line = f"{r['module']:<12} {r['killed']:>7} {r['survived']:>9} {r['equivalent']:>11}"
        print(f"{line} {r['score']:>7.0%}")
    (WORK / "scores.json").write_text(json.dumps(results, indent=1))
    left = run("git", "status", "--porcelain", "--", *(MODULES[n].path for n in names))
    if left.strip():
        print(f"a mutant was left on disk (cosmic-ray interrupted?): git checkout {left}")
        return 1
    return 0 if all(r["score"] >= GOAL for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
