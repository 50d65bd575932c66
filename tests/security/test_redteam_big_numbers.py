"""Red team: JSON numbers longer than Python converts (4,300 digits).

`json.loads` raises a plain ValueError for them, not JSONDecodeError, and the envelope
parsers caught only the latter: one unauthenticated POST of `{"x": 111...}` (5,000 digits)
was a 500 for every media type, closed a /ws socket, and a v1 plaintext with such a number
was a 500 after decryption. Each is now 400 `e.m.msg.malformed` with the usual body.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect

from dovecote.didcomm.v1 import envelope
from support.server import ServerProcess, running_server
from support.v1agent import V1

DIGITS = b"1" * 5000
ENVELOPE = b'{"protected":"eyJ9","iv":"","ciphertext":"","tag":"","x":' + DIGITS + b"}"


@pytest.fixture(scope="module")
def numbers_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("redteam-numbers")) as server:
        yield server


@pytest.mark.parametrize(
    "media_type", ["application/didcomm-encrypted+json", V1, "application/json"]
)
def test_long_number_in_an_envelope_is_400(numbers_server: ServerProcess, media_type: str) -> None:
    answer = httpx.post(
        numbers_server.base_url + "/",
        content=ENVELOPE,
        headers={"content-type": media_type},
        timeout=10,
    )
    assert answer.status_code == 400, (answer.status_code, answer.text[:200])
    assert answer.json()["error"] == "e.m.msg.malformed"


async def test_long_number_on_a_socket_gets_an_error_and_the_socket_stays(
    numbers_server: ServerProcess,
) -> None:
    async with connect(numbers_server.ws_url, proxy=None, open_timeout=10) as ws:
        for _ in range(2):  # the socket answers, and still answers after
            await ws.send(ENVELOPE.decode())
            frame = json.loads(await ws.recv())
            assert frame["error"] == "e.m.msg.malformed", frame


def test_long_number_in_a_v1_plaintext_is_400(numbers_server: ServerProcess) -> None:
    invitation = httpx.get(numbers_server.base_url + "/invitation/v1", timeout=10).json()
    mediator = envelope.to_verkey(invitation["services"][0]["recipientKeys"][0])
    plaintext = b'{"@type":"https://didcomm.org/trust_ping/1.0/ping","@id":"1","x":' + DIGITS + b"}"
    answer = httpx.post(
        numbers_server.base_url + "/",
        content=envelope.pack(plaintext, [mediator], None),
        headers={"content-type": V1},
        timeout=10,
    )
    assert answer.status_code == 400, (answer.status_code, answer.text[:200])
    assert answer.json()["error"] == "e.m.msg.malformed"
