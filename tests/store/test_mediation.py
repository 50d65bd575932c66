"""Mediation grants, recipient updates and lookups (each engine)."""

from __future__ import annotations

import asyncio

import pytest

from dovecote.errors import StoreError
from dovecote.store import Store

from .helpers import mediate

ALICE = "did:example:alice"
BOB = "did:example:bob"


async def test_mediation_state(engine: Store) -> None:
    assert await engine.get_mediation(ALICE) is None
    await engine.set_mediation(ALICE, "denied", "did:example:routing")
    assert await engine.get_mediation(ALICE) == "denied"
    await engine.set_mediation(ALICE, "granted", "did:example:routing")
    assert await engine.get_mediation(ALICE) == "granted"


async def test_recipient_updates(engine: Store) -> None:
    await mediate(engine, ALICE)
    await mediate(engine, BOB, "did:example:bobs")
    results = await engine.update_recipients(
        ALICE,
        [
            ("did:example:r1", "add"),
            ("did:example:r1", "add"),  # already mine
            ("did:example:bobs", "add"),  # someone else's DID
            ("did:example:r2", "remove"),  # never added
            ("did:example:r3", "add"),
            ("did:example:r3", "remove"),
            ("did:example:r4", "rename"),  # no such action
        ],
    )
    assert results == [
        "success",
        "no_change",
        "client_error",
        "no_change",
        "success",
        "success",
        "client_error",
    ]
    assert await engine.list_recipients(ALICE, 0, 10) == (["did:example:r1"], 1)
    # Removing someone else's recipient changes nothing.
    assert await engine.update_recipients(ALICE, [("did:example:bobs", "remove")]) == ["no_change"]
    assert await engine.find_mediatee("did:example:bobs") == BOB


async def test_recipients_need_a_mediation_record(engine: Store) -> None:
    with pytest.raises(StoreError):
        await engine.update_recipients("did:example:stranger", [("did:example:x", "add")])
    assert await engine.find_mediatee("did:example:x") is None


async def test_concurrent_adds_of_one_recipient_have_one_winner(engine: Store) -> None:
    mediatees = [f"did:example:m{i}" for i in range(6)]
    for mediatee in mediatees:
        await mediate(engine, mediatee)
    results = await asyncio.gather(
        *[engine.update_recipients(m, [("did:example:contested", "add")]) for m in mediatees]
    )
    assert sorted(r[0] for r in results) == ["client_error"] * 5 + ["success"]
    winner = mediatees[[r[0] for r in results].index("success")]
    assert await engine.find_mediatee("did:example:contested") == winner


async def test_list_recipients_pages_in_bytewise_order(engine: Store) -> None:
    names = [
        "did:example:b",
        "did:example:B",
        "did:example:a-1",
        "did:example:a1",
        "did:example:a_1",
        "did:example:a.1",
    ]
    await mediate(engine, ALICE, *names)
    first, total = await engine.list_recipients(ALICE, 0, 4)
    rest, _ = await engine.list_recipients(ALICE, 4, 4)
    assert total == len(names)
    assert first + rest == sorted(names)  # Python's str order is bytewise for ASCII
    assert await engine.list_recipients(BOB, 0, 10) == ([], 0)


async def test_a_recipient_is_its_base_did(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:plain")
    await mediate(engine, BOB, "did:example:keyed#key-2")
    # Any DID URL form finds the owner of its base DID, whichever form was registered.
    for form in ("", "#key-1", "#key-2", "?service=a", "/path#x"):
        assert await engine.find_mediatee("did:example:plain" + form) == ALICE, form
        assert await engine.find_mediatee("did:example:keyed" + form) == BOB, form
    assert await engine.find_mediatee("did:example:unknown") is None
    assert await engine.list_recipients(BOB, 0, 10) == (["did:example:keyed"], 1)


async def test_another_mediatee_cannot_take_any_form_of_an_owned_did(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:shared")
    await mediate(engine, BOB)
    forms = ["did:example:shared", "did:example:shared#key-9", "did:example:shared?x=1"]
    assert await engine.update_recipients(BOB, [(f, "add") for f in forms]) == ["client_error"] * 3
    assert await engine.update_recipients(BOB, [(f, "remove") for f in forms]) == ["no_change"] * 3
    assert await engine.find_mediatee("did:example:shared#key-9") == ALICE
    assert await engine.list_recipients(BOB, 0, 10) == ([], 0)
    # The owner's later forms are the same recipient; removing any form frees it.
    assert await engine.update_recipients(ALICE, [("did:example:shared#key-1", "add")]) == [
        "no_change"
    ]
    assert await engine.update_recipients(ALICE, [("did:example:shared#key-1", "remove")]) == [
        "success"
    ]
    assert await engine.update_recipients(BOB, [("did:example:shared#key-9", "add")]) == ["success"]
    assert await engine.find_mediatee("did:example:shared") == BOB


async def test_concurrent_claims_of_forms_of_one_did_have_one_winner(engine: Store) -> None:
    mediatees = [f"did:example:m{i}" for i in range(6)]
    for m in mediatees:
        await mediate(engine, m)
    results = await asyncio.gather(
        *[
            engine.update_recipients(m, [(f"did:example:contested#key-{i}", "add")])
            for i, m in enumerate(mediatees)
        ]
    )
    assert sorted(r[0] for r in results) == ["client_error"] * 5 + ["success"]
    winner = mediatees[[r[0] for r in results].index("success")]
    assert await engine.find_mediatee("did:example:contested") == winner


async def test_paging_past_any_integer_is_just_past_the_end(engine: Store) -> None:
    await mediate(engine, ALICE, "did:example:r1")
    assert await engine.list_recipients(ALICE, 10**30, 10) == ([], 1)
    assert await engine.list_recipients(ALICE, 0, 10**30) == (["did:example:r1"], 1)
    assert await engine.dlq_list(10**30, 10**30) == ([], 0)
