"""Base DIDs of DID URLs and the checks on client DIDs."""

from __future__ import annotations

import pytest

from dovecote.util.did import base_did, did_problem


@pytest.mark.parametrize(
    "value,base",
    [
        ("did:peer:2.Ez6L", "did:peer:2.Ez6L"),
        ("did:peer:2.Ez6L#key-2", "did:peer:2.Ez6L"),
        ("did:example:abc?service=x#frag", "did:example:abc"),
        ("did:web:example.com%3A8080:user/path/a#k", "did:web:example.com%3A8080:user"),
        ("did:key:z6Mk#z6Mk", "did:key:z6Mk"),
        ("8HH5gYEeNc3z7PYXmd54d4x6qAfCNrqQq", "8HH5gYEeNc3z7PYXmd54d4x6qAfCNrqQq"),
    ],
)
def test_base_did(value: str, base: str) -> None:
    assert base_did(value) == base


def test_did_problems() -> None:
    assert did_problem("did:example:ok") is None
    assert did_problem("did:example:" + "a" * 5000) is not None
    assert did_problem("did:example:" + "é" * 2100) is not None  # > 4096 UTF-8 bytes
    assert did_problem("did:example:" + "a" * 5000, max_bytes=10_000) is None
    assert did_problem("did:example:a\x00b") == "contains NUL"
    assert did_problem("did:example:\udc80") is not None
    assert did_problem("not-a-did") == "is not a DID"
    assert did_problem(42) == "is not a string"
