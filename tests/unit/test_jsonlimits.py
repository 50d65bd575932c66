"""JSON bounds before and after parsing."""

from __future__ import annotations

import json
import random
import time

import pytest

from dovecote.util import jsonlimits
from dovecote.util.jsonlimits import depth_exceeds, raw_problem, too_deep


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_depth_at_the_limit_passes_one_more_fails() -> None:
    assert not too_deep(nested(32), 32)
    assert too_deep(nested(33), 32)
    assert too_deep("[ [\n[ {" + "}]]]", 3)
    assert not depth_exceeds(json.loads(nested(32)), 32)
    assert depth_exceeds(json.loads(nested(33)), 32)
    assert depth_exceeds(json.loads('{"a":' * 40 + "1" + "}" * 40), 32)


def test_container_count_bounds_the_parse() -> None:
    wide = "[" + ",".join(["[[1],{}]"] * 300_000) + "]"
    assert raw_problem(wide, 32) == "holds more than 10000 arrays and objects"
    assert raw_problem("[" + ",".join(["{}"] * 5000) + "]", 32) is None


def test_five_mib_attacks_are_refused_quickly() -> None:
    started = time.perf_counter()
    assert raw_problem(b"[" * (5 << 20), 32) is not None
    assert raw_problem(b'{"a":' * (1 << 20) + b"1" + b"}" * (1 << 20), 32) is not None
    assert raw_problem(json.dumps(["x" * 10] * 400_000), 32) is None  # strings are cheap
    assert time.perf_counter() - started < 1.0  # measured ~0.05 s; generous when loaded


def test_malformed_is_left_to_the_parser_unless_deep() -> None:
    assert not too_deep("[[]", 2)
    assert not too_deep("[]]]]]]", 2)
    assert too_deep("[[[[", 2)


def test_room_bodies_are_bounded_too() -> None:
    import pytest

    from dovecote.errors import LimitExceeded
    from dovecote.rooms.models import parse_json

    assert parse_json(b'{"data": ' + b"[" * 20 + b"]" * 20 + b"}")
    for raw in (
        b'{"data": ' + b"[" * 40 + b"]" * 40 + b"}",
        b'{"data": ' + b'{"a":' * 900 + b"1" + b"}" * 900 + b"}",
    ):
        with pytest.raises(LimitExceeded):
            parse_json(raw)


@pytest.mark.parametrize(
    "text",
    [
        b'{"type":"t","body":{"n":1.5,"s":"caf\\u00e9","l":[true,null]}}',
        b'{"x":NaN,"y":-Infinity}',  # not JSON, but json.loads has always taken it
        b'{"s":"\\ud800"}',  # a lone surrogate
        '{"u":"\u00e9"}'.encode("utf-16"),  # UTF-16 with a BOM
        '{"k":1}',
        b'{"a":1,"a":2}',  # the last duplicate wins in both
    ],
)
def test_envelope_loads_parses_what_json_loads_parses(text: bytes | str) -> None:
    expected = json.loads(text)
    got = jsonlimits.loads_envelope(text)
    # NaN != NaN: compare the texts json writes for both.
    assert json.dumps(got) == json.dumps(expected)


@pytest.mark.parametrize("text", [b"", b"{", b'{"a":1}x', b"\xff\xfe\x00", b"[1,]"])
def test_envelope_loads_refuses_what_json_loads_refuses(text: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        jsonlimits.loads_envelope(text)


def test_envelope_loads_reads_integers_past_64_bits_as_floats() -> None:
    # Why plaintexts keep json.loads: this would change an attachment written back.
    assert jsonlimits.loads_envelope(b'{"n":123456789012345678901234567890}') == {
        "n": 1.2345678901234568e29
    }


def _random_value(rng: random.Random, depth: int = 0) -> object:
    """Parsed-JSON-like values, mostly strings, with every character class that JSON
    writers escape differently: controls, DEL, non-ASCII, astral, lone surrogates."""
    alphabet = [chr(c) for c in range(0x00, 0x80)] + ["é", "€", "\u2028", "𝄞", "\ud800", "\udfff"]

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))

    roll = rng.random()
    if depth < 4 and roll < 0.25:
        return {text(): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    if depth < 4 and roll < 0.4:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if roll < 0.45:
        return rng.choice([1.5, 1e16, 2**70, -0.0, float("nan"), float("inf"), True, None, 7])
    if roll < 0.6:  # the common case: plain base64url text
        return "".join(rng.choice("abcXYZ019-_") for _ in range(rng.randrange(40)))
    return text()


def test_dumps_compact_gives_the_bytes_json_dumps_gives() -> None:
    """The stored and digested bytes of a forwarded attachment must not depend on which
    encoder wrote them."""
    rng = random.Random(20261203)
    fast = 0
    for _ in range(20_000):
        value = _random_value(rng)
        expected = json.dumps(value, separators=(",", ":")).encode()
        assert jsonlimits.dumps_compact(value) == expected, value
        fast += jsonlimits._strings_only(value) and expected.isascii()
    assert fast > 2_000  # the orjson path was taken, not only the fallback
    jwe = {"protected": "eyJ", "recipients": [{"header": {"kid": "did:x#1"}, "encrypted_key": "k"}]}
    assert jsonlimits.dumps_compact(jwe) == json.dumps(jwe, separators=(",", ":")).encode()
