"""Mutation score of the modules that guard access and data (issue #30), with cosmic-ray.

    make mutation                       every module below
    make mutation MUTATE="auth atomic"  some of them (names from MODULES)
    make mutation MUTATE="--retry-survivors auth"   after adding tests: run its survivors again
    make mutation-changed BASE=<commit>  the lines changed since BASE, in every source file

The changed lines of a file are mutated against the tests named for it in MODULES, else its
mirror (tests/serve/test_hop.py for src/vicuna_sky/serve/hop.py), else its package's test folder.

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
import hashlib
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "mutation"
BIN = Path(sys.executable).parent
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
    timeout: float | None = 120.0
    """Seconds for one mutant's tests (a mutant that hangs them is killed by the timeout);
    None: three times what they take unmutated."""
    lines: tuple[str, ...] = ()
    """Only these line ranges ("a-b"), with `functions` or alone (the lines a change touched)."""


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
    # The checks every route passes, and the head's size and deadline (issue 37).
    "routes": Module(
        "src/vicuna_sky/serve/http_server.py",
        ["tests/serve/test_http_server.py"],
        functions=(
            "__call__",
            "refusal",
            "_header",
            "local_origin",
            "data_received",
            "on_headers_complete",
            "on_message_complete",
            "on_response_complete",
            "_headers_too_large",
        ),
        timeout=90,
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


def prepare(session: Path, module: Module, test_command: str, timeout: float) -> Path:
    """cosmic-ray's config beside `session`, and the session with this module's mutants (only
    those on its lines, with the operators kept, outside annotations) unless it exists."""
    config = session.with_suffix(".toml")
    lines = ""
    filtered = bool(module.functions or module.lines)
    if filtered:
        ranges = function_lines(ROOT / module.path, module.functions) + list(module.lines)
        lines = f'[cosmic-ray.filters.line-filter.lines]\n"{module.path}" = {json.dumps(ranges)}\n'
    config.write_text(
        f"""[cosmic-ray]
module-path = "{module.path}"
timeout = {timeout + 30}
excluded-modules = []
test-command = {json.dumps(test_command)}

[cosmic-ray.distributor]
name = "local"

[cosmic-ray.filters.operators-filter]
exclude-operators = {json.dumps(EXCLUDED_OPERATORS)}

{lines}"""
    )
    if not session.exists():
        run(str(BIN / "cosmic-ray"), "init", str(config), str(session))
        run(str(BIN / "cr-filter-operators"), str(session), str(config))
        if filtered:
            run(str(BIN / "cr-filter-lines"), "--config", str(config), str(session))
        skip_annotation_mutants(session, ROOT / module.path)
    return config


def mutants(module: Module) -> int:
    """How many mutants `score` would run for `module` (a session made and thrown away)."""
    WORK.mkdir(parents=True, exist_ok=True)
    session = WORK / f"plan-{os.getpid()}.sqlite"
    try:
        prepare(session, module, "true", 0)
        from cosmic_ray.work_db import use_db

        with use_db(str(session)) as db:
            return sum(1 for _ in db.pending_work_items)
    finally:
        session.unlink(missing_ok=True)
        session.with_suffix(".toml").unlink(missing_ok=True)


def limited(seconds: float) -> list[str]:
    """coreutils' timeout: SIGINT at `seconds`, SIGKILL 20 s later."""
    return ["timeout", "-s", "INT", "-k", "20", str(int(seconds))]


def score(name: str, module: Module, retry_survivors: bool = False) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    session = WORK / f"{name}.sqlite"
    # A mutant that hangs the tests gets Ctrl-C (SIGINT) at the module's timeout: pytest then
    # tears its fixtures down, so the servers a test started are stopped, not orphaned (as
    # cosmic-ray's own timeout, a SIGKILL of pytest alone, would leave them).
    # LangSmith's pytest plugin (a dependency's) takes two seconds to import and has no use here.
    pytest = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    pytest += ["-p", "no:langsmith_plugin"]
    # The tests must pass unmutated, or every mutant would count as killed.
    started = time.monotonic()
    baseline = subprocess.run(
        [*limited(module.timeout or 900), *pytest, *module.tests],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if baseline.returncode != 0:
        raise SystemExit(f"{name}: the tests fail without a mutant:\n{baseline.stdout[-3000:]}")
    timeout = module.timeout or max(60.0, 3 * (time.monotonic() - started))
    test_command = shlex.join([*limited(timeout), *pytest, *module.tests])
    config = prepare(session, module, test_command, timeout)
    if retry_survivors:  # only new tests can change their outcome; the killed stay killed
        with sqlite3.connect(session) as db:
            db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'")
    # Resumes where an interrupted run stopped; every file is restored after each mutant.
    subprocess.run([str(BIN / "cosmic-ray"), "exec", str(config), str(session)], cwd=ROOT)
    source = (ROOT / module.path).read_text().splitlines()
    equivalent, annotations = equivalent_mutants(), annotation_lines(ROOT / module.path)
    killed = survived = 0
    survivors, excused = [], []
    for raw in run(str(BIN / "cosmic-ray"), "dump", str(session)).splitlines():
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


SOURCES = ("src", "checkpoints_sync")


def changed_lines(base: str) -> dict[str, list[str]]:
    """Each Python source file changed since `base`, with the line ranges ("a-b") that are new
    or changed in it now (deleted lines leave nothing to mutate)."""
    diff = run("git", "diff", "-U0", "--no-color", "--no-renames", base, "--", *SOURCES)
    found: dict[str, list[str]] = {}
    path = None
    for line in diff.splitlines():
        if line.startswith("+++ "):
            name = line[4:].removeprefix("b/")
            path = name if name.endswith(".py") and name != "/dev/null" else None
        elif line.startswith("@@") and path:
            new = line.split()[2].lstrip("+")  # "@@ -a,b +c,d @@": c,d (d omitted means 1)
            start, _, count = new.partition(",")
            if int(count or 1):
                found.setdefault(path, []).append(f"{start}-{int(start) + int(count or 1) - 1}")
    return found


# Files whose mirror tests little of them: the tests that do (each mutant runs them all, first
# failure first, so the quick ones lead).
TESTS_OF = {
    "src/vicuna_sky/serve/controller.py": [
        "tests/serve/test_controller.py",
        "tests/serve/test_registry.py",
        "tests/serve/test_http_server.py",
        "tests/serve/test_auth.py",
        "tests/serve/test_tls.py",
        "-k",
        "not pins_each and not abandoned",
    ],
    # A stream whose client left is ended by `_stream`: only an abandoned TLS stream shows it.
    "src/vicuna_sky/serve/http_server.py": [
        "tests/serve/test_http_server.py",
        "tests/serve/test_tls.py::test_a_stream_abandoned_mid_answer_stops_at_once_and_leaves_no_traceback",
    ],
    # The fleet's launch on the cloud is tested in its own file (the rest of cloud.py's).
    "src/vicuna_sky/launch/cloud.py": [
        "tests/launch/test_cloud.py",
        "tests/launch/test_cloud_fleet.py",
    ],
    # The tests' own fleet: its TLS ports and its limits are what the TLS and connection tests use.
    "src/vicuna_sky/serve/local_fleet.py": [
        "tests/serve/test_tls.py",
        "tests/serve/test_connections.py",
        "-k",
        "not flood and not silent",
    ],
    # A refused worker's exit code (3, which sky/serve-worker.yaml does not recover) is tested
    # with the TLS fleet that refuses it.
    "src/vicuna_sky/serve/worker.py": [
        "tests/serve/test_worker.py",
        "tests/serve/test_tls.py::test_a_worker_that_does_not_know_the_fingerprint_is_refused",
        "tests/serve/test_tls.py::test_a_worker_with_another_fleets_secret_stops_and_an_unreachable_controller_is_waited_for",
    ],
    # The page's https and its pinned controller are tested beside the other servers' TLS.
    "src/vicuna_sky/serve/webui.py": [
        "tests/serve/test_webui.py",
        "tests/serve/test_tls.py::test_servers_off_loopback_without_a_certificate_do_not_start",
        "tests/serve/test_tls.py::test_the_client_port_and_the_chat_ui_are_https_off_loopback",
    ],
}


def tests_for(path: str) -> list[str] | None:
    """The tests TESTS_OF or MODULES names for `path`, else its mirror, else the test files of
    its package's folder that import it (never a whole folder: minutes a mutant)."""
    if path in TESTS_OF:
        return TESTS_OF[path]
    for module in MODULES.values():
        if module.path == path:
            return module.tests
    relative = Path(path).relative_to("src/vicuna_sky" if path.startswith("src/") else ".")
    mirror = ROOT / "tests" / relative.parent / f"test_{relative.stem}.py"
    if mirror.exists():
        return [str(mirror.relative_to(ROOT))]
    package = ".".join(relative.parent.parts)
    imports = re.compile(
        rf"\b{re.escape(package)}\.{relative.stem}\b|from \S*{re.escape(package)} import .*\b"
        rf"{relative.stem}\b"
    )
    users = sorted(
        str(test.relative_to(ROOT))
        for test in (ROOT / "tests" / relative.parent).glob("test_*.py")
        if imports.search(test.read_text())
    )
    return users or None


def changed_modules(base: str, only: list[str]) -> dict[str, Module]:
    """A Module for each changed file (or those of `only`): its changed lines, its tests."""
    modules = {}
    for path, ranges in sorted(changed_lines(base).items()):
        if only and path not in only:
            continue
        tests = tests_for(path)
        if tests is None:
            print(f"{path}: no tests mirror it; not mutated", file=sys.stderr)
            continue
        # The name carries the ranges: a later change or another BASE gets a session of its own.
        tag = hashlib.sha256(json.dumps([path, ranges]).encode()).hexdigest()[:8]
        name = f"changed-{Path(path).stem}-{tag}"
        modules[name] = Module(path, tests, timeout=None, lines=tuple(ranges))
    return modules


def main(args: list[str]) -> int:
    retry, plan = "--retry-survivors" in args, "--plan" in args
    args = [a for a in args if a not in ("--retry-survivors", "--plan")]
    if args[:1] == ["--changed"]:
        if len(args) < 2:
            print("usage: mutation.py --changed BASE [--plan] [FILE ...]", file=sys.stderr)
            return 2
        try:
            modules = changed_modules(args[1], args[2:])
        except subprocess.CalledProcessError as e:
            print(f"cannot diff against {args[1]!r}: {e.stderr.strip()}", file=sys.stderr)
            return 2
        if not modules:
            print(f"no source lines changed since {args[1]}")
            return 0
    else:
        names = args or list(MODULES)
        unknown = sorted(set(names) - set(MODULES))
        if unknown:
            print(f"unknown module(s) {unknown}; known: {' '.join(MODULES)}", file=sys.stderr)
            return 2
        modules = {name: MODULES[name] for name in names}
    if plan:  # what a run would do, and nothing else
        for module in modules.values():
            print(f"{module.path}: {mutants(module)} mutants, tests: {' '.join(module.tests)}")
        return 0
    paths = [m.path for m in modules.values()]
    dirty = run("git", "status", "--porcelain", "--", *paths)
    if dirty.strip():
        print(f"commit or stash these first (they are mutated in place):\n{dirty}")
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = [score(name, module, retry) for name, module in modules.items()]
    print()
    for r in results:
        for survivor in r["survivors"]:
            print(f"  survived: {survivor}")
    width = max(12, *(len(r["module"]) for r in results))
    print(f"\n{'module':<{width}} {'killed':>7} {'survived':>9} {'equivalent':>11} {'score':>7}")
    for r in results:
        line = f"{r['module']:<{width}} {r['killed']:>7} {r['survived']:>9} {r['equivalent']:>11}"
        print(f"{line} {r['score']:>7.0%}")
    (WORK / "scores.json").write_text(json.dumps(results, indent=1))
    left = run("git", "status", "--porcelain", "--", *paths)
    if left.strip():
        print(f"a mutant was left on disk (cosmic-ray interrupted?): git checkout {left}")
        return 1
    return 0 if all(r["score"] >= GOAL for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
