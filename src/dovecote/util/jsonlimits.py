"""Bounds on JSON from clients: nesting depth and container count, checked on the raw
text before parsing, and depth again on parsed values.

The standard library's parser recurses once per level and stops only at the interpreter's
recursion limit (a RecursionError, which used to surface as a 5xx), and it spends about
2 microseconds per container: 5 MiB of `[[1],{}]` costs ~3 s of CPU. So before parsing,
a body may open at most `max_depth` containers in a row and hold at most `max_containers`
containers in all (both counted at C speed on the bytes; brackets inside strings count
too, which only errs towards refusing, and the envelopes checked this way carry base64url
strings). Depth hidden behind keys (`{"a":{"a":...`) is then caught by the parser's own
limit or by `depth_exceeds` on the value, before anything uses it. Written here because
no maintained package bounds JSON without a full parse.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

DEFAULT_MAX_JSON_DEPTH = 32
DEFAULT_MAX_CONTAINERS = 10_000


def loads_envelope(raw: bytes | str) -> Any:
    """`json.loads(raw)` for a JWE envelope or header, parsed by orjson (15.6 -> 6.6 µs
    for a 3.3 KB forward envelope). Only for texts whose members that count are strings:
    orjson reads an integer past 64 bits as a float where json.loads gives an int, which
    an envelope refuses either way, so plaintexts (whose attachments are written back as
    stored bytes) keep json.loads. Texts orjson refuses that json.loads takes (NaN, lone
    surrogates, UTF-16) go to json.loads, so what is accepted does not change."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


# What dumps_compact falls back to: the bytes it must give (json.dumps builds an
# encoder per call when given separators).
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def dumps_compact(value: Any) -> bytes:
    """`json.dumps(value, separators=(",", ":")).encode()`, the same bytes, written by
    orjson where that is sure to give them (6.9 -> 2.5 µs for a forward's 2.3 KB JWE
    attachment, which is stored and digested as these bytes, so they must not change).

    orjson writes strings, objects and arrays as json.dumps does except for what it
    leaves unescaped: non-ASCII and DEL (json.dumps escapes both, ensure_ascii), checked
    on its output. Numbers differ (floats: "1e16" against "1e+16", NaN as null), so a
    value holding anything but strings takes json.dumps, as does one orjson refuses
    (lone surrogates). tests/unit/test_jsonlimits.py compares both on random values."""
    if _strings_only(value):
        try:
            out = orjson.dumps(value)
        except TypeError:  # orjson.JSONEncodeError: a lone surrogate
            pass
        else:
            if out.isascii() and b"\x7f" not in out:
                return out
    return _COMPACT.encode(value).encode()


def _strings_only(value: Any) -> bool:
    """Whether `value` is a string, or objects and arrays of strings all the way down
    (keys are strings in parsed JSON; the caller bounded its depth)."""
    if type(value) is str:
        return True
    if type(value) is dict:
        values: Any = value.values()
    elif type(value) is list:
        values = value
    else:
        return False
    for item in values:
        if type(item) is not str and not _strings_only(item):
            return False
    return True


def containers_in(raw: bytes | str) -> int:
    """The arrays and objects a JSON text opens at most (brackets in strings count too)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    return data.count(b"[") + data.count(b"{")


def raw_problem(
    raw: bytes | str,
    max_depth: int,
    max_containers: int = DEFAULT_MAX_CONTAINERS,
    containers: int | None = None,
) -> str | None:
    """Why this JSON text must not be parsed, or None; `containers` is
    `containers_in(raw)` when the caller has it already (a scan of the text)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if containers is None:
        containers = data.count(b"[") + data.count(b"{")
    if containers > max_containers:
        return f"holds more than {max_containers} arrays and objects"
    if containers > max_depth and re.search(rb"[\[{](?:\s*[\[{]){%d}" % max_depth, data):
        return f"nests deeper than {max_depth} levels"
    return None


def too_deep(raw: bytes | str, limit: int) -> bool:
    """True when the text provably opens more than `limit` levels in a row."""
    problem = raw_problem(raw, limit, max_containers=2**62)
    return problem is not None


def depth_exceeds(value: Any, limit: int) -> bool:
    """True when a parsed JSON value nests containers more than `limit` levels."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def stored_json(raw: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> tuple[bool, Any]:
    """`(True, value)` when `raw` is JSON within the bounds above, else `(False, None)`.

    For stored messages: their bytes are whatever a forward's sender chose (base64
    attachments and v1 `msg` strings are opaque when they arrive), so reading them back
    must never raise (deep nesting, 5,000-digit numbers, invalid UTF-8)."""
    if raw_problem(raw, max_depth) is not None:
        return False, None
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False, None
    if depth_exceeds(value, max_depth):
        return False, None
    return True, value
