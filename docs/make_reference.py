"""Write the reference pages from the code itself: every `vicuna-sky` command with its
arguments and options (click's own objects), and every recipe key with its type, default and
the docstring written under its field (vicuna_sky.recipe's dataclasses).

    python docs/make_reference.py docs/reference     (`make docs` runs it before mkdocs)
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import typing
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent


def commands(group: click.Group, prefix: str) -> list[tuple[str, click.Command]]:
    """Every command under `group`, depth first, by its full name."""
    found = []
    for name in sorted(group.commands):
        command = group.commands[name]
        full = f"{prefix} {name}"
        found.append((full, command))
        if isinstance(command, click.Group):
            found.extend(commands(command, full))
    return found


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def cli_page() -> str:
    from vicuna_sky.cli import app

    out = [
        "# Command reference",
        "",
        "Generated from the launcher's own definitions (`docs/make_reference.py`); "
        "`vicuna-sky COMMAND --help` prints the same.",
        "",
    ]
    for full, command in commands(app, "vicuna-sky"):
        out += [f"## `{full}`", "", inspect.cleandoc(command.help or ""), ""]
        arguments = [p for p in command.params if isinstance(p, click.Argument)]
        if arguments:
            names = " ".join(a.human_readable_name for a in arguments)
            out += [f"Arguments: `{names}`", ""]
        options = [p for p in command.params if isinstance(p, click.Option) and not p.hidden]
        if options:
            out += ["| option | default | what it does |", "|---|---|---|"]
            for option in options:
                flags = ", ".join(f"`{o}`" for o in option.opts + option.secondary_opts)
                shown = option.show_default and option.default not in (None, (), False)
                default = f"`{option.default}`" if shown else ""
                out.append(f"| {flags} | {_cell(default)} | {_cell(option.help or '')} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def field_docs(source: Path) -> dict[str, dict[str, str]]:
    """class -> field -> the docstring written under the field (attribute docstrings are not
    kept at runtime, so they are read from the source)."""
    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(source.read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        body = node.body
        for here, after in zip(body, [*body[1:], None], strict=True):
            if isinstance(here, ast.AnnAssign) and isinstance(here.target, ast.Name):
                doc = ""
                if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                    doc = str(after.value.value)
                fields[here.target.id] = doc
    return docs


def _type(hint: object) -> str:
    text = str(hint).replace("typing.", "")
    return text if not isinstance(hint, type) else hint.__name__


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "" if f.default is None else repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        made = f.default_factory()
        return "" if dataclasses.is_dataclass(made) else repr(made)
    return "required"


def recipe_keys() -> list[tuple[str, str, str, str]]:
    """(key, type, default, what it means) for every recipe key, sections first-level."""
    from vicuna_sky import recipe

    docs = field_docs(Path(recipe.__file__))
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or not f.compare:  # `source`: where it was loaded from, not a key
                continue
            hint = hints[f.name]
            key = prefix + f.name
            if dataclasses.is_dataclass(hint):
                walk(hint, key + ".")
                continue
            doc = docs.get(cls.__name__, {}).get(f.name, "")
            rows.append((key, _type(hint), _default(f), doc))

    walk(recipe.Recipe, "")
    return rows


def recipe_page() -> str:
    out = [
        "# Recipe reference",
        "",
        "Every key a recipe may set, generated from the recipe's own dataclasses "
        "(`src/vicuna_sky/recipe.py`; `docs/make_reference.py`). A key left out takes its "
        "default; an unknown key is refused with the closest name.",
        "",
        "| key | type | default | what it means |",
        "|---|---|---|---|",
    ]
    for key, kind, default, doc in recipe_keys():
        out.append(f"| `{key}` | `{kind}` | {_cell(default)} | {_cell(doc)} |")
    return "\n".join(out) + "\n"


def main(target: str) -> None:
    folder = Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cli.md").write_text(cli_page())
    (folder / "recipe.md").write_text(recipe_page())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(HERE / "reference"))
