"""Fuzz the DIDComm front door: random bodies never yield 5xx and never store anything."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.inspect import snapshot
from support.server import ServerProcess

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
b64 = st.binary(max_size=64).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("="))
jwe_like = st.fixed_dictionaries(
    {
        "protected": b64,
        "ciphertext": b64,
        "recipients": st.lists(
            st.fixed_dictionaries(
                {
                    "encrypted_key": b64,
                    "header": st.dictionaries(
                        st.sampled_from(["kid", "alg", "enc", "epk"]), json_values, max_size=4
                    ),
                }
            ),
            max_size=3,
        ),
    },
    optional={"iv": b64, "tag": b64, "unprotected": json_values},
)
# Nesting far past MAX_JSON_DEPTH, closed or not, and text any JSON escape can produce
# (NUL, lone surrogates): refused before parsing deeply, never a RecursionError or 5xx.
deep = st.tuples(st.integers(30, 20_000), st.sampled_from([b"[", b'{"a":']), st.booleans()).map(
    lambda t: t[1] * t[0] + ((b"]" if t[1] == b"[" else b"1}") * t[0] if t[2] else b"")
)
odd_text = st.text(alphabet=st.characters(codec=None, categories=None), max_size=20)
bodies = st.one_of(
    st.binary(max_size=512),
    deep,
    odd_text.map(
        lambda t: json.dumps(
            {"protected": t, "ciphertext": t, "recipients": [{"header": {"kid": t}}]}
        ).encode()
    ),
    json_values.map(lambda v: json.dumps(v).encode()),
    jwe_like.map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=bodies,
    content_type=st.sampled_from(
        ["application/didcomm-encrypted+json", "application/json", "text/plain", ""]
    ),
)
def test_random_bodies_get_4xx_and_store_nothing(
    shared_server: ServerProcess, body: bytes, content_type: str
) -> None:
    before = snapshot(shared_server)
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(shared_server.base_url + "/", content=body, headers=headers, timeout=30)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    payload: dict[str, Any] = response.json()
    assert isinstance(payload.get("error"), str) and payload.get("detail")
    assert snapshot(shared_server) == before
