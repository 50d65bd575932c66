"""JSON depth checks before and after parsing."""

from __future__ import annotations

import json
import time

from dovecote.util.jsonlimits import depth_exceeds, too_deep


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_depth_at_the_limit_passes_one_more_fails() -> None:
    assert not too_deep(nested(32), 32)
    assert too_deep(nested(33), 32)
    assert not depth_exceeds(json.loads(nested(32)), 32)
    assert depth_exceeds(json.loads(nested(33)), 32)


def test_brackets_in_strings_do_not_count() -> None:
    text = json.dumps({"a": "[" * 1000 + '\\"{{{', "b": [{"c": "]]]]"}]})
    assert not too_deep(text, 8)
    assert too_deep(json.dumps({"a": [[[[[[[[[["x"]]]]]]]]]]}), 8)


def test_wide_but_shallow_is_fine_and_fast() -> None:
    text = "[" + ",".join(["[[1],{}]"] * 300_000) + "]"
    started = time.perf_counter()
    assert not too_deep(text, 32)
    assert time.perf_counter() - started < 2.0  # generous: a loaded CI machine


def test_five_mib_of_open_brackets_is_refused_quickly() -> None:
    started = time.perf_counter()
    assert too_deep(b"[" * (5 << 20), 32)
    assert too_deep(b"{\"a\":" * (1 << 20) + b"1" + b"}" * (1 << 20), 32)
    assert time.perf_counter() - started < 2.0


def test_malformed_is_left_to_the_parser_unless_deep() -> None:
    assert not too_deep("[[]", 2)
    assert not too_deep("[]]]]]]", 2)
    assert not too_deep('"unterminated [[', 2)
    assert too_deep("[[[[", 2)
