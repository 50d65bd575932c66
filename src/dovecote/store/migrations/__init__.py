"""Numbered schema migrations, one folder per engine; applied in order at start."""

from __future__ import annotations

from importlib import resources


def load(engine: str) -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration of an engine, in order."""
    folder = resources.files(__package__).joinpath(engine)
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text(encoding="utf-8")))
    return sorted(found)
