"""Who installs what: each role's install set resolves from wheels alone for Linux x86_64 and
Python 3.10-3.12, the node set holds nothing of the launcher's or that builds from source, and
each spec's setup installs its own role only.

Resolution is `uv pip compile --only-binary :all:` against the package index (PyPI, or what
UV_INDEX_URL names): it reads metadata and installs nothing. This is the one test that reaches a
package index; when it cannot, it skips and says why.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ("3.10", "3.11", "3.12")
# Nodes and serving workers run on SkyPilot's GPU images (Ubuntu 22.04, glibc 2.35); the
# launcher on a user's Linux machine, so an older glibc (manylinux_2_28: RHEL 8, Debian 10+).
ROLES = {
    "node": ((), "x86_64-manylinux_2_35"),
    "serving": (("vllm",), "x86_64-manylinux_2_35"),
    "launcher": (("cloud",), "x86_64-manylinux_2_28"),
}
# What never belongs on a training or evaluation node: the launcher's, the serving engine, and
# flash-attn (an sdist whose build imports torch: pip aborts the whole install).
NOT_ON_NODES = {"skypilot", "flash-attn", "vllm", "moto"}
NETWORK_ERRORS = re.compile(
    r"error sending request|failed to fetch|dns error|tcp connect|connection refused|"
    r"network is unreachable|timed out|could not connect|failed to download",
    re.IGNORECASE,
)


def _uv() -> str:
    beside = Path(sys.executable).parent / "uv"
    found = str(beside) if beside.exists() else shutil.which("uv")
    if not found:
        pytest.fail("uv is not installed: it is in the test extra (pip install -e '.[test]')")
    return found


@pytest.fixture(scope="module")
def uv_cache(tmp_path_factory) -> Path:
    """One metadata cache for every resolution of the module (HOME is private to the session)."""
    return tmp_path_factory.mktemp("uv-cache")


def compile_set(
    uv_cache: Path, extras: tuple[str, ...], platform: str, python: str, extra: str = ""
) -> subprocess.CompletedProcess:
    """`uv pip compile` of pyproject.toml with `extras` (and one more requirement line)."""
    requirements = [str(ROOT / "pyproject.toml")]
    if extra:
        constraints = uv_cache / f"extra-{abs(hash(extra))}.txt"
        constraints.write_text(extra + "\n")
        requirements.append(str(constraints))
    command = [
        _uv(),
        "pip",
        "compile",
        *requirements,
        *(x for e in extras for x in ("--extra", e)),
        "--only-binary",
        ":all:",
        "--python-platform",
        platform,
        "--python-version",
        python,
        "--no-header",
        "--no-annotate",
        "--quiet",
        "--cache-dir",
        str(uv_cache),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if result.returncode != 0 and NETWORK_ERRORS.search(result.stderr):
        pytest.skip(f"the package index cannot be reached: {result.stderr.strip()[:300]}")
    return result


def resolve(
    uv_cache: Path, extras: tuple[str, ...], platform: str, python: str, extra: str = ""
) -> dict[str, str]:
    """The pinned set `pip install .[extras]` would install there: {name: version}."""
    result = compile_set(uv_cache, extras, platform, python, extra)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(result.args[1:])}\n{result.stderr[-3000:]}")
    pins = {}
    for line in result.stdout.splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("role", list(ROLES))
def test_role_resolves_from_wheels(role, python, uv_cache):
    extras, platform = ROLES[role]
    pins = resolve(uv_cache, extras, platform, python)
    assert {"torch", "transformers"} <= pins.keys()
    if role == "node":
        assert not NOT_ON_NODES & pins.keys(), NOT_ON_NODES & pins.keys()
    if role == "serving":
        assert "vllm" in pins and not {"skypilot", "flash-attn"} & pins.keys()
    if role == "launcher":
        # skypilot 0.14.1's pins, as pyproject.toml's comments state them.
        assert pins["skypilot"] == "0.14.1"
        assert pins["click"].startswith("8.1.")
        assert tuple(map(int, pins["transformers"].split(".")[:2])) <= (5, 17)
        assert "flash-attn" not in pins


def test_node_set_is_not_capped_by_the_launchers_pins(uv_cache):
    """skypilot's click<8.2 -> huggingface_hub<1.30 -> transformers<=5.17 chain stays on the
    launcher: a node resolves a newer transformers (and the hub it needs)."""
    pins = resolve(uv_cache, (), ROLES["node"][1], "3.12", extra="transformers>5.17.0")
    assert tuple(map(int, pins["transformers"].split(".")[:2])) > (5, 17)
    capped = compile_set(uv_cache, ("cloud",), ROLES["launcher"][1], "3.12", "transformers>5.17.0")
    assert capped.returncode != 0 and "unsatisfiable" in capped.stderr, capped.stderr[-2000:]


def test_make_installs_resolve_with_the_cpu_torch(uv_cache):
    """`make test` / `make demo` install torch==2.13.0 first, then .[cloud,test]: the set must
    be satisfied by that torch (a requirement it does not satisfy pulls GBs of CUDA builds)."""
    for python in PYTHONS:
        pins = resolve(
            uv_cache, ("cloud", "test"), "x86_64-manylinux_2_28", python, extra="torch==2.13.0"
        )
        assert pins["torch"] == "2.13.0" and pins["skypilot"] == "0.14.1"
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet torch==2.13.0\n" in makefile
    assert "pip install --quiet -e '.[cloud,test]'" in makefile


def setup_installs(spec: str) -> list[str]:
    """The `pip install` targets a spec's setup names (`-e .`, `-e ".[vllm]"`)."""
    setup = yaml.safe_load((ROOT / "sky" / spec).read_text()).get("setup") or ""
    return re.findall(r"pip install[^\n|&;]*?-e\s+(\S+)", setup)


@pytest.mark.parametrize(
    ("spec", "installs"),
    [
        ("train.yaml", {"."}),
        ("eval.yaml", {".", ".[vllm]"}),
        ("serve-worker.yaml", {".", ".[vllm]"}),
        ("service.yaml", {".", ".[vllm]"}),
        ("serve-controller.yaml", {"."}),
    ],
)
def test_each_spec_installs_its_role_only(spec, installs):
    assert {t.strip("\"'") for t in setup_installs(spec)} == installs
    setup = yaml.safe_load((ROOT / "sky" / spec).read_text())["setup"]
    pip_lines = [line for line in setup.splitlines() if "pip install" in line]
    for banned in ("flash-attn", "flash_attn", "skypilot", "[cloud]", "[gpu]"):
        assert not any(banned in line for line in pip_lines), (banned, pip_lines)


def test_extras_are_the_three_roles_and_no_sdist_only_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(extras) == {"cloud", "vllm", "test"}
    everything = project["dependencies"] + [r for reqs in extras.values() for r in reqs]
    names = {re.split(r"[<>=!\[ ;]", r, maxsplit=1)[0].lower() for r in everything}
    assert "flash-attn" not in names
    base = {re.split(r"[<>=!\[ ;]", r, maxsplit=1)[0].lower() for r in project["dependencies"]}
    assert not {"skypilot", "vllm", "moto"} & base
