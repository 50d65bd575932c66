"""The OpenAPI document against the running server: schemathesis generates requests from
/openapi.json (valid ones, ones pinned to a real room and message, and invalid ones) and
checks every answer: never a 5xx, a documented status, content type and body schema."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok

# Imported here, at collection, rather than lazily by from_url() mid-test: pytest rewrites
# schemathesis's modules (it is a plugin) as they are imported, and a rewrite that ran
# during a test once met CPython 3.11's AST SystemError (a finaliser of an earlier test's
# leftover task ran inside it). The proxy no longer leaves such tasks; this keeps the
# rewrite away from test bodies altogether.
from schemathesis.specs.openapi import schemas as _schemas  # noqa: F401
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from support.rooms import RoomsClient

EXAMPLES = 4  # per operation and kind of input
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_openapi_document_is_served(rooms: RoomsClient) -> None:
    doc = httpx.get(f"{rooms.base_url}/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert "/v1/rooms/{room}/messages" in doc["paths"]
    page = httpx.get(f"{rooms.base_url}/docs")
    assert page.status_code == 200 and "/v1/rooms/{room}/events" in page.text


def test_schemathesis_finds_no_server_error_or_schema_violation(rooms: RoomsClient) -> None:
    room = rooms.create_room({"fuzzer": "admin"}, room_id=f"fuzz-{id(rooms) % 10_000}")
    message = rooms.post(room, "fuzzer", "fuzz me").json()["id"]
    auth = rooms.as_("fuzzer", roles=["admin"])
    schema = schemathesis.openapi.from_url(f"{rooms.base_url}/openapi.json")
    failures: list[str] = []
    calls = 0

    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operation = result.ok()
        params = {
            p["name"] for p in operation.definition.raw.get("parameters", []) if p["in"] == "path"
        }
        pinned = {k: v for k, v in {"room": room, "message": message}.items() if k in params}
        strategies = [
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        ]
        if pinned and operation.definition.raw.get("operationId") != "deleteRoom":
            strategies.append(
                operation.as_strategy(GenerationMode.POSITIVE, path_parameters=pinned)
            )

        @given(case=st.one_of(*strategies))
        @settings(
            max_examples=EXAMPLES * len(strategies),
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def exercise(case: Any) -> None:
            nonlocal calls
            calls += 1
            response = case.call(base_url=rooms.base_url, headers=auth, timeout=30)
            try:
                case.validate_response(response, checks=CHECKS)
            except Exception as exc:  # collect and report them all  # noqa: BLE001
                failures.append(
                    f"{case.method} {case.formatted_path} -> "
                    f"{response.status_code}: {str(exc)[:300]}"
                )

        exercise()

    assert calls > 100
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize(
    "path",
    [
        "/v1/rooms/x/events?after=-1",
        "/v1/rooms/x/events?limit=0",
        "/v1/rooms/x/events?before=99999999999999999999",
        "/v1/rooms?after=%00",
        "/v1/rooms?limit=abc",
    ],
)
def test_bad_query_values_are_400(rooms: RoomsClient, path: str) -> None:
    r = rooms.http.get(rooms.base_url + path, headers=rooms.as_("a", roles=["admin"]))
    assert r.status_code in (400, 404), r.text
    assert r.status_code != 404 or r.json()["error"] == "e.m.req.not-found"
