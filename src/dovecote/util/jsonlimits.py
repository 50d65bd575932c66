"""JSON nesting depth, checked on the raw text before parsing and on parsed values.

The standard library's parser recurses once per level and gives up only near the
interpreter's recursion limit; a 5 MiB body of "[" makes it do that work and then raise
RecursionError, which would surface as a 5xx. `too_deep` answers from the raw bytes at C
speed: strings are removed (brackets inside them do not nest), then each pass deletes
the innermost "[]"/"{}" pairs, so after `limit` passes anything left is deeper than that.
Written here because no maintained package offers a depth check without a full parse.
"""

from __future__ import annotations

import re
from typing import Any

DEFAULT_MAX_JSON_DEPTH = 32

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = re.compile(rb"[^\[\]{}]+")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def too_deep(raw: bytes | str, limit: int) -> bool:
    """True when the JSON text nests arrays/objects more than `limit` levels.

    Malformed text (unbalanced brackets, unterminated strings) answers False unless it is
    provably deep; the parser then refuses it as malformed.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    skeleton = _BRACKETS.sub(b"", _STRING.sub(b"", data))
    if re.search(rb"[\[{]{%d}" % (limit + 1), skeleton):
        return True  # that many opening brackets in a row nest that deep, closed or not
    if len(skeleton) <= 2 * limit:
        return False  # each level takes two brackets: balanced text this short is shallow
    for _ in range(limit):
        skeleton, removed = _INNERMOST.subn(b"", skeleton)
        if not skeleton or not removed:
            return False  # empty: it was shallow; nothing removed: malformed, not deep
    return bool(skeleton)


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
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return False
