"""Splitting a multi-host PostgreSQL URL into one URL per host (dovecote.store.pg_ha)."""

from __future__ import annotations

import pytest

from dovecote.store.pg_ha import is_sync_cancel, split_hosts


def test_each_host_gets_its_own_url_and_patroni_url() -> None:
    hosts = split_hosts(
        "postgresql://u:p%40ss@pg1:5432,pg2,[::1]:5433/db?sslmode=require",
        ["http://pg1:8008/", "http://pg2:8008", "http://[::1]:8008"],
    )
    assert [h.label for h in hosts] == ["pg1:5432", "pg2", "[::1]:5433"]
    assert hosts[0].url == (
        "postgresql://u:p%40ss@pg1:5432/db?sslmode=require&target_session_attrs=read-write"
    )
    assert hosts[2].url.startswith("postgresql://u:p%40ss@[::1]:5433/db?")
    assert [h.patroni for h in hosts] == ["http://pg1:8008", "http://pg2:8008", "http://[::1]:8008"]


def test_one_host_keeps_its_url_as_written() -> None:
    (host,) = split_hosts("postgresql://dovecote@db/dovecote")
    assert host.url == "postgresql://dovecote@db/dovecote" and host.patroni is None


def test_patroni_urls_must_match_the_hosts() -> None:
    with pytest.raises(ValueError, match="one per host"):
        split_hosts("postgresql://u@pg1,pg2/db", ["http://pg1:8008"])


def test_sync_cancel_warnings_are_recognised() -> None:
    class Message:
        def __init__(self, message: str) -> None:
            self.message = message

    assert is_sync_cancel(Message("canceling wait for synchronous replication due to user request"))
    assert is_sync_cancel(
        Message(
            "canceling the wait for synchronous replication and "
            "terminating connection due to administrator command"
        )
    )
    assert not is_sync_cancel(Message("canceling statement due to user request"))
