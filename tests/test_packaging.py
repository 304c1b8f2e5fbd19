"""The install story stays consistent: pyproject's floors are the versions the floor run tests, the lock pins
versions inside pyproject's ranges, and the README names the transformers range that CI tests."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def _floor(requirement: Requirement) -> str:
    floors = [s.version for s in requirement.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{requirement}: expected exactly one '>=' floor"
    return floors[0]


def test_every_floor_is_the_version_the_floor_run_tests():
    floor_pins = _pins(ROOT / ".ci" / "floor-constraints.txt")
    for requirement in _requirements():
        if requirement.name == "ruff":  # a lint tool: the lock's version is the one that matters
            continue
        name = canonicalize_name(requirement.name)
        assert name in floor_pins, f"{requirement.name} is not pinned in .ci/floor-constraints.txt"
        assert Version(floor_pins[name]) == Version(_floor(requirement)), (
            f"pyproject says {requirement}, but the floor run tests {requirement.name}=={floor_pins[name]}")


def test_lock_pins_versions_inside_the_claimed_ranges():
    lock = _pins(ROOT / "constraints.txt")
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement.name} is missing from constraints.txt"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={lock[name]}, outside pyproject's {requirement}")


def test_readme_states_the_tested_transformers_range():
    readme = (ROOT / "README.md").read_text()
    low = _pins(ROOT / ".ci" / "floor-constraints.txt")["transformers"]
    high = _pins(ROOT / "constraints.txt")["transformers"]
    assert re.search(rf"transformers\s+{re.escape(low)}\s+(to|–|-)\s+{re.escape(high)}", readme), (
        f"README should state the tested transformers range {low} to {high}")
