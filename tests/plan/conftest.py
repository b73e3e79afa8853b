"""Planner tests price from real SkyPilot catalog rows (tests/fixtures/catalog-v8, see its
README), passed to the planner as a directory: SkyPilot's own catalog under the session HOME
(made-up prices, tests/fixtures/catalog) stays what the other tests use."""

import dataclasses
from pathlib import Path

import pytest

from vicuna_sky.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]
REAL_CATALOG = ROOT / "tests" / "fixtures" / "catalog-v8"
BOTH = frozenset({"aws", "gcp"})


def recipe(name: str) -> Recipe:
    return Recipe.from_yaml(ROOT / "recipes" / f"{name}.yaml")


def replace(r: Recipe, section: str, **changes) -> Recipe:
    return dataclasses.replace(r, **{section: dataclasses.replace(getattr(r, section), **changes)})


@pytest.fixture
def real_catalog() -> Path:
    return REAL_CATALOG
