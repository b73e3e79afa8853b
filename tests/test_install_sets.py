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
import tempfile
from concurrent.futures import ThreadPoolExecutor
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


CPU_TORCH = "torch==2.13.0"
NEWER_TRANSFORMERS = "transformers>5.17.0"
MAKE_SET = (("cloud", "test"), "x86_64-manylinux_2_28")
"""What `make test` / `make demo` install (after torch==2.13.0), on the launcher's platform."""
RESOLUTIONS = [
    *((*ROLES[role], python, "") for role in ROLES for python in PYTHONS),
    ((), ROLES["node"][1], "3.12", NEWER_TRANSFORMERS),
    (*ROLES["launcher"], "3.12", NEWER_TRANSFORMERS),
    *((*MAKE_SET, python, CPU_TORCH) for python in PYTHONS),
]
"""Every (extras, platform, python, one more requirement) the tests below resolve."""


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory) -> dict[tuple, subprocess.CompletedProcess]:
    """Every resolution of the module, run at once: each waits on the index far more than it
    computes, so one after the other they took minutes. One metadata cache (HOME is private
    to the session); uv locks its entries, so concurrent resolutions share it safely."""
    cache = tmp_path_factory.mktemp("uv-cache")
    with ThreadPoolExecutor(len(RESOLUTIONS)) as pool:
        running = {key: pool.submit(compile_set, cache, *key) for key in RESOLUTIONS}
    return {key: future.result() for key, future in running.items()}


def compile_set(
    cache: Path, extras: tuple[str, ...], platform: str, python: str, extra: str = ""
) -> subprocess.CompletedProcess:
    """`uv pip compile` of pyproject.toml with `extras` (and one more requirement line)."""
    requirements = [str(ROOT / "pyproject.toml")]
    if extra:
        constraints = Path(tempfile.mkdtemp(dir=cache)) / "extra.txt"
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
        str(cache),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


def outcome(resolutions: dict, *key) -> subprocess.CompletedProcess:
    """The resolution of `key`; the test skips (saying why) when the index could not be reached."""
    result = resolutions[key]
    if result.returncode != 0 and NETWORK_ERRORS.search(result.stderr):
        pytest.skip(f"the package index cannot be reached: {result.stderr.strip()[:300]}")
    return result


def pins(resolutions: dict, *key) -> dict[str, str]:
    """The pinned set `pip install .[extras]` would install there: {name: version}."""
    result = outcome(resolutions, *key)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(result.args[1:])}\n{result.stderr[-3000:]}")
    found = {}
    for line in result.stdout.splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("role", list(ROLES))
def test_role_resolves_from_wheels(role, python, resolutions):
    extras, platform = ROLES[role]
    resolved = pins(resolutions, extras, platform, python, "")
    assert {"torch", "transformers"} <= resolved.keys()
    if role == "node":
        assert not NOT_ON_NODES & resolved.keys(), NOT_ON_NODES & resolved.keys()
    if role == "serving":
        assert "vllm" in resolved and not {"skypilot", "flash-attn"} & resolved.keys()
    if role == "launcher":
        # skypilot 0.14.1's pins, as pyproject.toml's comments state them.
        assert resolved["skypilot"] == "0.14.1"
        assert resolved["click"].startswith("8.1.")
        assert tuple(map(int, resolved["transformers"].split(".")[:2])) <= (5, 17)
        assert "flash-attn" not in resolved


def test_node_set_is_not_capped_by_the_launchers_pins(resolutions):
    """skypilot's click<8.2 -> huggingface_hub<1.30 -> transformers<=5.17 chain stays on the
    launcher: a node resolves a newer transformers (and the hub it needs)."""
    node = pins(resolutions, (), ROLES["node"][1], "3.12", NEWER_TRANSFORMERS)
    assert tuple(map(int, node["transformers"].split(".")[:2])) > (5, 17)
    capped = outcome(resolutions, *ROLES["launcher"], "3.12", NEWER_TRANSFORMERS)
    assert capped.returncode != 0 and "unsatisfiable" in capped.stderr, capped.stderr[-2000:]


def test_make_installs_resolve_with_the_cpu_torch(resolutions):
    """`make test` / `make demo` install torch==2.13.0 first, then .[cloud,test]: the set must
    be satisfied by that torch (a requirement it does not satisfy pulls GBs of CUDA builds)."""
    for python in PYTHONS:
        resolved = pins(resolutions, *MAKE_SET, python, CPU_TORCH)
        assert resolved["torch"] == "2.13.0" and resolved["skypilot"] == "0.14.1"
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet torch==2.13.0\n" in makefile
    assert "pip install --quiet -e '.[cloud,test]'" in makefile


def setup_installs(spec: str) -> list[str]:
    """What a spec's setup installs through sky/install.sh: `.` or `.[extra]`."""
    setup = yaml.safe_load((ROOT / "sky" / spec).read_text()).get("setup") or ""
    calls = re.findall(r"bash sky/install\.sh(?:[ \t]+(\w+))?", setup)
    return [
        "controller" if extra == "controller" else f".[{extra}]" if extra else "."
        for extra in calls
    ]


@pytest.mark.parametrize(
    ("spec", "installs"),
    [
        ("train.yaml", {"."}),
        ("eval.yaml", {".", ".[vllm]"}),
        ("serve-worker.yaml", {".", ".[vllm]"}),
        ("service.yaml", {".", ".[vllm]"}),
        ("serve-controller.yaml", {"controller"}),
    ],
)
def test_each_spec_installs_its_role_only(spec, installs):
    assert {t.strip("\"'") for t in setup_installs(spec)} == installs
    setup = yaml.safe_load((ROOT / "sky" / spec).read_text())["setup"]
    assert "pip install" not in setup  # one install path for every spec: sky/install.sh
    script = (ROOT / "sky" / "install.sh").read_text()
    pip_lines = [line for line in script.splitlines() if "pip install" in line]
    assert pip_lines and all('-e "$target"' in line or '-r "$lock"' in line for line in pip_lines)
    for banned in ("flash-attn", "flash_attn", "skypilot", "[cloud]", "[gpu]"):
        assert not any(banned in line for line in pip_lines), (banned, pip_lines)


def test_install_script_skips_what_the_image_has_and_says_how_it_installs(tmp_path):
    """On a node whose python already has the package (an image with it, or this venv), the
    script installs nothing; on one without, it names the tool and the time (uv when SkyPilot
    put it in $HOME/.local/bin)."""
    import os
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(ROOT / "sky" / "install.sh")], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and "already in this image" in done.stdout, done
    # A python without the package, uv where SkyPilot installs it, nothing to install from:
    # the install is attempted with uv and fails as setup would (FAILED_SETUP, not a hang).
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    (tmp_path / ".local" / "bin").mkdir(parents=True)
    (tmp_path / ".local" / "bin" / "uv").symlink_to(bin_dir / "uv")
    env = {
        **os.environ,
        "PATH": f"{bare / 'bin'}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "UV_OFFLINE": "1",
        "UV_NO_CACHE": "1",
    }
    attempt = subprocess.run(
        ["bash", str(ROOT / "sky" / "install.sh")], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert attempt.returncode != 0
    assert "already in this image" not in attempt.stdout
    # uv's own words (pip says "No matching distribution"): the install went through uv.
    assert "No solution found" in attempt.stderr, attempt


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


def lock_pins(lock: str = "node.lock") -> list[tuple[str, str, str]]:
    """(name, version, marker) of each line of sky/node.lock (or another lock there)."""
    pins = []
    for line in (ROOT / "sky" / lock).read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            pin, _, marker = line.partition(";")
            name, _, version = pin.strip().partition("==")
            pins.append((name.lower().replace("_", "-"), version, marker.strip()))
    return pins


@pytest.mark.parametrize("python", PYTHONS)
def test_the_node_lock_meets_every_requirement_and_holds_nothing_else(python):
    """The versions every attempt of a run installs (sky/install.sh): for each Python a node
    may have, the lock pins one version of each node requirement, inside its range. A change
    to pyproject.toml the lock does not meet fails here: `make lock`."""
    from packaging.markers import Marker
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    env = {"python_version": python, "python_full_version": f"{python}.0",
           "sys_platform": "linux", "platform_machine": "x86_64", "platform_system": "Linux",
           "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "os_name": "posix", "extra": ""}  # fmt: skip
    chosen: dict[str, list[str]] = {}
    for name, version, marker in lock_pins():
        if not marker or Marker(marker).evaluate(env):
            chosen.setdefault(name, []).append(version)
    assert all(len(v) == 1 for v in chosen.values()), {
        n: v for n, v in chosen.items() if len(v) > 1
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate(env):
            continue
        name = req.name.lower().replace("_", "-")
        assert name in chosen, f"{name} is not in sky/node.lock: make lock"
        assert req.specifier.contains(chosen[name][0], prereleases=True), (text, chosen[name])
    assert not NOT_ON_NODES & set(chosen)


def _install(tmp_path: Path, index: str) -> subprocess.CompletedProcess:
    """sky/install.sh on a python without the package, its uv pointed at `index`."""
    import os

    bin_dir = Path(sys.executable).parent
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    (tmp_path / ".local" / "bin").mkdir(parents=True)
    (tmp_path / ".local" / "bin" / "uv").symlink_to(bin_dir / "uv")
    env = {
        **os.environ,
        "PATH": f"{bare / 'bin'}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "UV_NO_CACHE": "1",
        "UV_DEFAULT_INDEX": index,
        "INSTALL_RETRY_SECONDS": "0.1 0.1",
    }
    return subprocess.run(
        ["bash", str(ROOT / "sky" / "install.sh")], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


def test_an_install_that_cannot_reach_an_index_is_tried_again_then_exits_76(tmp_path):
    """A package index that does not answer (a closed port here): three tries, then 76, which
    sky/train.yaml recovers on a new cluster (tests/localcloud/test_cluster.py)."""
    from vicuna_sky.ports import free_port

    done = _install(tmp_path, f"http://127.0.0.1:{free_port()}/simple")
    assert done.returncode == 76, done.stderr[-2000:]
    assert done.stderr.count("could not reach the package index") == 2
    assert (
        done.stderr.strip().splitlines()[-1].startswith("install: no package index answered in 3")
    )
    train = yaml.safe_load((ROOT / "sky" / "train.yaml").read_text())
    assert 76 in train["resources"]["job_recovery"]["recover_on_exit_codes"]


def test_an_install_that_cannot_be_resolved_fails_at_once(tmp_path):
    """An index that answers without the packages: no new cluster would change that, so no 76
    (a recovery loop would bill machine after machine)."""
    index = tmp_path / "empty-index"
    index.mkdir()
    done = _install(tmp_path, index.as_uri())
    assert done.returncode == 1, done.stderr[-2000:]
    assert "not retried" in done.stderr.strip().splitlines()[-1]
    assert "could not reach" not in done.stderr


MODEL_STACK = ("torch", "transformers", "accelerate", "peft", "safetensors", "triton", "vllm")
"""What a controller never needs: it routes requests, it runs no model."""


def test_the_controller_lock_is_the_node_sets_versions_without_the_model_stack():
    """sky/controller.lock pins what sky/controller.in asks for, each at sky/node.lock's version
    (one version of a package across the fleet), and nothing of the model stack or CUDA; each
    of controller.in's requirements is pyproject.toml's own (one place for a range)."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {Requirement(t).name.lower().replace("_", "-"): t for t in project["dependencies"]}
    asked = [
        line
        for line in (ROOT / "sky" / "controller.in").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    pins = lock_pins("controller.lock")
    chosen = {name for name, _, _ in pins}
    for text in asked:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        assert declared.get(name) == text, (
            f"{text!r} is not pyproject.toml's {declared.get(name)!r}"
        )
        assert name in chosen, f"{name} is not in sky/controller.lock: make lock"
    node = set(lock_pins())
    assert all(pin in node for pin in pins), [p for p in pins if p not in node][:5]
    stack = [n for n in chosen if n in MODEL_STACK or n.startswith(("nvidia-", "cuda-"))]
    assert not stack, stack


BLOCK_MODEL_STACK = """
import importlib.abc, sys

class NoModelStack(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on a controller)")
        return None

sys.meta_path.insert(0, NoModelStack())
"""


def test_the_controller_and_its_chat_ui_run_without_the_model_stack(tmp_path):
    """What sky/controller.lock installs is enough: the controller and the chat UI start, route
    a chat to a worker and serve the page on a Python where torch, transformers and the rest
    of the model stack cannot be imported (a controller that imported any would fail here)."""
    import os

    import httpx

    from vicuna_sky.ports import free_port
    from vicuna_sky.serve.local_fleet import LocalFleet

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_MODEL_STACK.format(blocked=set(MODEL_STACK)))
    blocked = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"], env={**os.environ, **blocked}, capture_output=True
    )
    assert b"not on a controller" in probe.stderr  # the block holds
    with LocalFleet(tmp_path / "fleet", "fleet-secret") as fleet:
        fleet.start_controller(env=blocked)
        fleet.wait_workers({fleet.start_worker("echo", "echo", "echo")})
        r = httpx.post(
            f"{fleet.url}/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert r.status_code == 200 and "hi" in r.json()["choices"][0]["message"]["content"]
        port = free_port()
        ui_log = (tmp_path / "webui.log").open("w")
        ui = subprocess.Popen(
            [sys.executable, "-m", "vicuna_sky.serve.webui", "--port", str(port),
             "--controller-url", fleet.url],
            env={**os.environ, **blocked, "VICUNA_SKY_UI_PASSWORD": "pw"},
            stdout=ui_log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            fleet.wait_http(f"http://127.0.0.1:{port}/", timeout=120)
            assert ui.poll() is None
        finally:
            ui.terminate()
            ui.wait(30)
    said = (tmp_path / "webui.log").read_text() + (
        tmp_path / "fleet" / "controller.log"
    ).read_text()
    assert "not on a controller" not in said
