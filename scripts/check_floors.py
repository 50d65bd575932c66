"""Check that every direct dependency is installed at exactly its declared floor.

Run in the venv `make test-lowest` builds with `uv pip install --resolution lowest-direct`:
if the resolver had to pick something newer than a floor, that floor cannot be installed
together with the rest and is not tested, so it is not true. Prints each mismatch and
exits 1.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

EXTRAS = ("dev",)  # what the lowest-versions job installs besides the runtime dependencies
SPEC = re.compile(r"^\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)")


def _key(text: str) -> tuple[int, ...]:
    parts = [int(p) for p in re.findall(r"\d+", text)]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def main() -> int:
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in EXTRAS:
        specs += project["optional-dependencies"][extra]
    wrong = []
    for spec in specs:
        match = SPEC.match(spec)
        if match is None:
            wrong.append(f"{spec}: no >= floor")
            continue
        name, floor = match.groups()
        try:
            installed = version(name)
        except PackageNotFoundError:
            wrong.append(f"{name}: not installed")
            continue
        if _key(installed) != _key(floor):
            wrong.append(f"{name}: floor {floor}, but the lowest that resolves is {installed}")
    for line in wrong:
        print(f"floor not true: {line}", file=sys.stderr)
    print(f"{len(specs) - len(wrong)} of {len(specs)} direct dependencies at their floor")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
