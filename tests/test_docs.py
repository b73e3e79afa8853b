"""The documentation site: it builds without a warning (a broken link fails it), and its
reference, generated from the code, names every command and every recipe key with a meaning."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def generator():
    spec = importlib.util.spec_from_file_location("make_reference", ROOT / "docs/make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(tmp_path: Path) -> subprocess.CompletedProcess:
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("reference"))
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    subprocess.run(
        [sys.executable, "docs/make_reference.py", "docs/reference"], cwd=tmp_path, check=True
    )
    return subprocess.run(
        [str(BIN / "zensical"), "build", "--strict", "--config-file", "mkdocs.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )


def test_the_site_builds_without_a_warning_and_a_broken_link_fails_it(tmp_path):
    """Built from a copy: the repository's docs/ is never written by a test."""
    built = build(tmp_path / "ok")
    said = built.stdout + built.stderr
    assert built.returncode == 0 and "No issues found" in said and "Warning" not in said, said
    site = tmp_path / "ok" / "runs" / "site"
    for page in yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]:
        for target in _pages(page):
            assert (site / target.removesuffix(".md") / "index.html").exists() or target == (
                "index.md"
            ), target
    with open(tmp_path / "ok" / "docs" / "recipes.md", "a") as f:
        f.write("\n[a page that is not there](nowhere.md)\n")
    broken = build_again(tmp_path / "ok")
    assert broken.returncode != 0 and "does not exist" in broken.stdout + broken.stderr


def build_again(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "zensical"), "build", "--strict", "--config-file", "mkdocs.yml"],
        cwd=folder,
        capture_output=True,
        text=True,
    )


def _pages(entry: object) -> list[str]:
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, dict):
        return [p for value in entry.values() for p in _pages(value)]
    return [p for item in entry for p in _pages(item)]


def test_the_reference_names_every_command_and_every_key_a_recipe_takes(tmp_path):
    module = generator()
    cli = module.cli_page()
    # The commands as the launcher lists them itself, group by group.
    listed = _commands_from_help([])
    assert {"train", "serve", "down", "data clean", "eval launch", "chaos train"} <= set(listed)
    for command in listed:
        assert f"## `vicuna-sky {command}`" in cli, command
    for option in ("--dryrun", "--skip-preflight", "--public", "--fleet", "--workdir"):
        assert f"`{option}`" in cli, option
    page = module.recipe_page()
    documented = re.findall(r"^\| `([a-z_.]+)` \| `[^`]+` \| [^|]* \| (.+) \|$", page, re.M)
    keys = dict(documented)
    assert all(meaning.strip() for meaning in keys.values())  # every key says what it does
    # Every key the shipped recipes set is there (and a recipe is refused for any other).
    for path in (ROOT / "recipes").glob("*.yaml"):
        for key in _keys(yaml.safe_load(path.read_text())):
            assert key in keys, (path.name, key)
    assert {"serve.tls", "resources.nodes", "plan.preemption_rates", "budget_usd"} <= set(keys)


def _keys(mapping: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in mapping.items():
        if isinstance(value, dict) and key != "preemption_rates":
            found += _keys(value, f"{prefix}{key}.")
        else:
            found.append(prefix + key)
    return found


def _commands_from_help(group: list[str]) -> list[str]:
    text = subprocess.run(
        [str(BIN / "vicuna-sky"), *group, "--help"], capture_output=True, text=True, check=True
    ).stdout
    names = re.findall(r"^  ([a-z][a-z-]*)  ", text.split("Commands:", 1)[-1], re.M)
    found = []
    for name in names:
        found.append(" ".join([*group, name]))
        sub = subprocess.run(
            [str(BIN / "vicuna-sky"), *group, name, "--help"], capture_output=True, text=True
        ).stdout
        if "Commands:" in sub:
            found += _commands_from_help([*group, name])
    return found
