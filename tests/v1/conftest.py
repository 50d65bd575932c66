"""Servers shared by the v1 tests (a server start costs seconds on a busy machine)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.endpoint import FlakyEndpoint
from support.postgres import ENGINES
from support.server import ServerProcess, running_server
from support.v1agent import Special


@pytest.fixture(scope="package", params=ENGINES)
def v1_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One default server per store engine for every v1 test module."""
    with running_server(tmp_path_factory.mktemp("v1"), request.param) as server:
        yield server


@pytest.fixture(scope="package")
def v1_special(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Special]:
    """A SQLite server with every non-default the v1 tests need, all compatible with one
    another: loopback endpoints allowed, a push endpoint, fast expiry sweeps, one message
    per mailbox, and a 1 s WebSocket idle timeout."""
    push = FlakyEndpoint().start()
    env = {
        "DOVECOTE_OUTBOUND_ALLOW_PRIVATE": "true",
        "DOVECOTE_PUSH_URL": push.url,
        "DOVECOTE_SWEEP_INTERVAL": "0.5",
        "DOVECOTE_MAILBOX_MAX_MESSAGES": "1",
        "DOVECOTE_WS_IDLE_TIMEOUT": "1",
    }
    try:
        with running_server(tmp_path_factory.mktemp("v1-special"), env=env) as server:
            yield Special(server, push)
    finally:
        push.stop()
