"""Reading a recipe's YAML: a mapping with no key given twice, built into typed dataclasses key
by key, every problem one `RecipeError` line that names the key (and the nearest known key,
for a typo)."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Union

import yaml

from vicuna_sky.errors import VicunaSkyError


class RecipeError(VicunaSkyError):
    """A recipe that cannot be used; the message names the offending key."""


def load_mapping(text: str, source: str) -> dict:
    """The YAML mapping in `text` (read from `source`)."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except _DuplicateKey as e:
        raise RecipeError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        raise RecipeError(f"{source}: not valid YAML{line}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of keys to values")
    return raw


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently: a recipe with `lr:` twice would train
    with whichever came last. Here the second one is an error naming its line."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice (lines {seen[key]} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def yaml_number(x: float) -> str:
    """Render a number the way a person writes it in YAML (3, 2e-05 -> '3', '2e-05')."""
    return str(int(x)) if float(x).is_integer() and abs(x) >= 1 else repr(float(x))


def one_of(source: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(value, allowed, n=1)
        tail = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise RecipeError(
            f"{source}: '{key}' must be one of {', '.join(allowed)}, got '{value}'{tail}"
        )


def _yaml_fields(cls: type) -> list[dataclasses.Field]:
    # `source` says where a recipe was read from: not a key of its YAML.
    return [f for f in dataclasses.fields(cls) if f.name != "source"]


def build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    fields = {f.name: f for f in _yaml_fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            full = f"{prefix}{key}"
            known = [f"{prefix}{name}" for name in fields]
            hint = difflib.get_close_matches(full, known, n=1, cutoff=0.6)
            tail = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise RecipeError(f"{source}: unknown key '{full}'{tail}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                raise RecipeError(f"{source}: missing required key '{key}'")
            continue
        values[name] = _coerce(hints[name], raw[name], key, source)
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: '{key}' must be a mapping of keys to values")
        return build(tp, value, prefix=f"{key}.", source=source)
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(item, v, f"{key}.{k}", source) for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise RecipeError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float and isinstance(value, str):
        # PyYAML reads `2e-5` (no dot) as a string; a person means the number.
        with contextlib.suppress(ValueError):
            value = float(value)
    # bool is an int in Python; a recipe saying `epochs: true` is a mistake, not 1.
    ok = {
        str: isinstance(value, str),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
    }[tp]
    if not ok:
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
        raise RecipeError(f"{source}: '{key}' must be {names[tp]}, got {value!r}")
    if tp is float and not math.isfinite(float(value)):
        # 1e400 reads as inf, .nan as nan: every check against them passes, every plan breaks.
        raise RecipeError(f"{source}: '{key}' must be a finite number, got {value!r}")
    return float(value) if tp is float else value
