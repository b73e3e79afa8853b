"""The recipe's YAML reader on dataclasses of its own: every type a recipe uses, and the one-line
error that names the key."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from vicuna_sky.recipe_yaml import RecipeError, build, load_mapping, one_of, yaml_number


@dataclass(frozen=True)
class Inner:
    rate: float
    names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Outer:
    inner: Inner
    prices: dict[str, float] = field(default_factory=dict)
    cap: int | None = None
    enabled: bool = False


def read(text: str) -> Outer:
    return build(Outer, load_mapping(text, "o.yaml"), prefix="", source="o.yaml")


def test_every_type_is_built():
    o = read("inner: {rate: 3e-4, names: solo}\nprices: {a: 1, b: 2.5}\ncap: ~\nenabled: true\n")
    assert o == Outer(Inner(3e-4, ["solo"]), {"a": 1.0, "b": 2.5}, None, True)
    assert isinstance(o.prices["a"], float)  # an integer where a number goes is that number
    assert read("inner: {rate: 1}\ncap: 7\n").cap == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("inner: {rate: .inf}\n", "'inner.rate' must be a finite number, got inf"),
        ("inner: {rate: 1, names: [a, 2]}\n", "'inner.names[1]' must be a string, got 2"),
        ("inner: {rate: 1}\nprices: {a: x}\n", "'prices.a' must be a number, got 'x'"),
        ("inner: {rate: 1}\nprices: [1]\n", "'prices' must be a mapping, got [1]"),
        ("inner: {rate: 1}\ncap: true\n", "'cap' must be an integer, got True"),
        ("inner: {rat: 1}\n", "unknown key 'inner.rat' (did you mean 'inner.rate'?)"),
        ("inner: {names: []}\n", "missing required key 'inner.rate'"),
        ("inner: 3\n", "'inner' must be a mapping of keys to values"),
        ("- a\n- b\n", "a recipe is a YAML mapping of keys to values"),
        ("inner: {rate: 1}\nprices:\n  a: 1\n  a: 2\n", "key 'a' appears twice (lines 3 and 4)"),
        ("inner: {rate: [\n", "not valid YAML (line 2)"),
    ],
)
def test_each_problem_is_one_line_naming_the_key(text, message):
    with pytest.raises(RecipeError) as e:
        read(text)
    assert str(e.value) == f"o.yaml: {message}"


def test_numbers_render_as_a_person_writes_them():
    assert [yaml_number(x) for x in (3, 3.0, 2e-05, 0.5, 1e3)] == ["3", "3", "2e-05", "0.5", "1000"]


def test_one_of_suggests_the_nearest_choice():
    one_of("o.yaml", "mode", "fast", ("fast", "slow"))
    with pytest.raises(RecipeError, match=r"^o.yaml: 'mode' must be one of fast, slow, got "
                                          r"'fsat' \(did you mean 'fast'\?\)$"):  # fmt: skip
        one_of("o.yaml", "mode", "fsat", ("fast", "slow"))
