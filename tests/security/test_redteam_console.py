"""Red team: console parameters that `str.isdigit()` admits but `int()` refuses.

`"²".isdigit()` is True, and so is a 5,000-digit string (past Python's int conversion
limit): `/console/dead-letters?offset=²` and a dead-letter action with `ids=²` were 500s
for a signed-in operator. They now count as no offset / no id.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from support.server import ServerProcess, running_server

TOKEN = "r" * 40
ODD = ["²", "1" * 5000, "٣"]
ODD_IDS = ["superscript-two", "5000-digits", "arabic-indic-three"]


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"DOVECOTE_ADMIN_TOKEN": TOKEN}
    with running_server(tmp_path_factory.mktemp("redteam-console"), env=env) as server:
        yield server


@pytest.fixture
def session(console_server: ServerProcess) -> Iterator[tuple[httpx.Client, str]]:
    with httpx.Client(base_url=console_server.base_url, timeout=20) as client:
        assert (
            client.post("/console/login", data={"token": TOKEN, "next": "/console/"}).status_code
            == 303
        )
        match = re.search(r'name="csrf" value="([0-9a-f]{64})"', client.get("/console/").text)
        assert match
        yield client, match.group(1)


@pytest.mark.parametrize("value", ODD, ids=ODD_IDS)
def test_odd_offset_is_no_offset(session: tuple[httpx.Client, str], value: str) -> None:
    client, _ = session
    answer = client.get("/console/dead-letters", params={"offset": value})
    assert answer.status_code == 200, answer.text[:300]


@pytest.mark.parametrize("value", ODD, ids=ODD_IDS)
def test_odd_dead_letter_id_is_no_id(
    session: tuple[httpx.Client, str], console_server: ServerProcess, value: str
) -> None:
    client, csrf = session
    answer = client.post(
        "/console/dead-letters/action",
        data={"csrf": csrf, "action": "replay", "ids": value},
        headers={"origin": console_server.base_url},
    )
    assert answer.status_code < 500, answer.text[:300]
