"""The console in a real browser: Debian's chromium, headless, driven by Playwright.

Every test watches every request the pages make: none may leave the server's origin, and
no Content-Security-Policy violation may be reported. Screenshots go to the test's tmp
dir, and to docs/console/ with DOVECOTE_UPDATE_SCREENSHOTS=1 (`make console-screenshots`).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from playwright.async_api import Browser, BrowserContext, Page, expect

from reliability.helpers import FAST_OUTBOUND, post, received_ids, remote_forward, wait_until
from support.agent import Agent
from support.endpoint import FlakyEndpoint
from support.postgres import fresh_database
from support.server import ROOT, ServerProcess

from .helpers import (
    ADMIN_TOKEN,
    DESKTOP,
    PHONE,
    OriginWatch,
    browser,
    login,
    number,
    queue_messages,
    screenshot,
)

ENV = {"DOVECOTE_ADMIN_TOKEN": ADMIN_TOKEN}
UNIT = re.compile(r"^(\d[\d,.]*\s?(ms|s|min|h|d)\b|< 0\.1 ms|< 1 ms)")


class Watched:
    """A browser context whose requests and console messages are recorded."""

    def __init__(self, context: BrowserContext, server: ServerProcess) -> None:
        self.context = context
        self.origin = OriginWatch(server)
        self.console: list[str] = []
        context.on("request", self.origin)

    async def page(self) -> Page:
        page = await self.context.new_page()
        page.on("console", lambda message: self.console.append(message.text))
        return page

    def check(self) -> None:
        assert self.origin.urls, "the request listener saw nothing"
        assert any(url.endswith("/console/static/console.js") for url in self.origin.urls)
        assert self.origin.foreign() == []
        assert not [m for m in self.console if "Content Security Policy" in m], self.console


async def _open(
    chromium: Browser, server: ServerProcess, viewport: dict[str, int] = DESKTOP
) -> Watched:
    context = await chromium.new_context(viewport=viewport)  # type: ignore[arg-type]
    return Watched(context, server)


async def test_login_is_refused_with_a_wrong_token(
    server_factory: Callable[..., ServerProcess],
    tmp_path: Path,
) -> None:
    server = server_factory(env=ENV)
    async with browser() as chromium:
        watched = await _open(chromium, server)
        page = await watched.page()
        await login(page, server, "wrong-token-wrong-token-wrong-token")
        await expect(page.get_by_role("alert")).to_contain_text("not the admin token")
        await screenshot(page, "login", tmp_path)
        assert page.url.endswith("/console/login")
        assert await page.locator("nav").count() == 0
        assert not [c for c in await watched.context.cookies() if c["name"] == "dovecote_console"]
        # Any other page still shows only the login form.
        await page.goto(server.base_url + "/console/dead-letters")
        await expect(page.locator("#token")).to_be_visible()
        assert await page.locator("table").count() == 0
        # The right token gets in, and back to the page that was asked for.
        await page.fill("#token", ADMIN_TOKEN)
        await page.keyboard.press("Enter")
        await expect(page.locator("h1")).to_contain_text("Dead letters")
        cookie = next(c for c in await watched.context.cookies() if c["name"] == "dovecote_console")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert cookie["expires"] > time.time() + 3600
        watched.check()


async def test_overview_shows_the_live_numbers_of_a_server_with_queued_messages(
    server_factory: Callable[..., ServerProcess],
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    server = server_factory(env=ENV)
    alice = await queue_messages(client, server, 7)
    async with browser() as chromium:
        watched = await _open(chromium, server)
        page = await watched.page()
        await login(page, server)
        await expect(page.locator("h1")).to_contain_text("Overview")
        queued = page.locator('[data-metric="queued"]')
        # Sampled every 5 s; the page refreshes itself every 5 s.
        await expect(queued).to_have_text("7", timeout=30_000)
        await expect(page.locator('[data-metric="level"]')).to_contain_text("normal")
        await expect(page.locator('[data-metric="reason"]')).to_have_text("healthy")
        assert UNIT.match(await page.locator('[data-metric="oldest"]').inner_text())
        store_check = page.locator('tr[data-check="store"]')
        await expect(store_check).to_contain_text("ok")
        assert UNIT.match((await store_check.locator("td").nth(1).inner_text()).strip())

        # More messages arrive: the open page shows them without a reload.
        marker = await page.evaluate("() => (window.__kept = 1)")
        await queue_messages(client, server, 5, agent=alice)
        await expect(queued).to_have_text("12", timeout=30_000)
        assert await page.evaluate("() => window.__kept") == marker  # same document
        accepted = page.locator('tr[data-rate="accepted"]')
        one_minute = accepted.locator('td[data-col="one"]')
        await expect(one_minute).not_to_have_text("0.0/s", timeout=30_000)
        assert number(await accepted.locator('td[data-col="total"]').inner_text()) >= 12
        assert (await one_minute.inner_text()).endswith("/s")

        # Keyboard: the first Tab reaches the skip link; g then c opens the cluster page.
        await page.keyboard.press("Tab")
        assert await page.evaluate("() => document.activeElement.className") == "skip"
        await page.evaluate("() => document.activeElement.blur()")
        await page.keyboard.press("g")
        await page.keyboard.press("c")
        await expect(page.locator("h1")).to_contain_text("Cluster")
        await expect(page.locator("tr.self")).to_contain_text("alive")
        watched.check()


async def test_dead_letter_from_a_failing_endpoint_appears_and_replay_delivers_it(
    server_factory: Callable[..., ServerProcess],
    endpoints: Callable[..., FlakyEndpoint],
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    endpoint = endpoints(default="404")
    server = server_factory(env={**FAST_OUTBOUND, **ENV})
    bob = Agent.create(server.base_url)
    carol = Agent.create(server.base_url, endpoint=endpoint.url)
    envelope, message_id = await remote_forward(server, bob, carol)
    assert (await post(client, server, envelope)).status_code == 202

    async with browser() as chromium:
        watched = await _open(chromium, server)
        page = await watched.page()
        await login(page, server)
        await page.goto(server.base_url + "/console/dead-letters")
        rows = page.locator("tr[data-dead-letter]")
        deadline = time.monotonic() + 20
        while await rows.count() == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            await page.reload()
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text("http_404")
        await expect(rows.first).to_contain_text(endpoint.url)

        # Detail: the attempt history says what the endpoint answered.
        await rows.first.locator("a").click()
        await expect(page.locator("h1")).to_contain_text("Dead letter")
        await expect(page.locator("#h-history + .table-wrap")).to_contain_text("HTTP 404")
        await page.go_back()

        # The endpoint is fixed; the operator replays the dead letter from the list.
        endpoint.set_default("ok")
        await page.locator("tr[data-dead-letter] input[type=checkbox]").check()
        await page.get_by_role("button", name="Replay selected…").click()
        await expect(page.locator("h1")).to_have_text("Replay 1 dead letter?")
        await page.get_by_role("button", name="Yes, replay 1").click()
        await expect(page.locator("#result")).to_contain_text("Replayed 1 dead letter")
        await expect(rows).to_have_count(0)
        assert await wait_until(lambda: endpoint.bodies(succeeded_only=True), 15)
        assert await received_ids(carol, endpoint.bodies(succeeded_only=True)) == [message_id]
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        assert (await client.get(server.base_url + "/admin/dlq", headers=admin)).json()[
            "total"
        ] == 0

        # Purge, from the detail page, with its own confirmation.
        endpoint.set_default("410")
        second, _ = await remote_forward(server, bob, carol)
        assert (await post(client, server, second)).status_code == 202
        deadline = time.monotonic() + 20
        while await rows.count() == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            await page.goto(server.base_url + "/console/dead-letters?reason=http_410")
        await rows.first.locator("a").click()
        await page.get_by_role("button", name="Purge…").click()
        await expect(page.locator(".warn-text")).to_contain_text("deleted for good")
        await page.get_by_role("button", name="Yes, purge 1").click()
        await expect(page.locator("#result")).to_contain_text("Purged 1 dead letter")
        assert (await client.get(server.base_url + "/admin/dlq", headers=admin)).json()[
            "total"
        ] == 0
        events = [e for e in server.log_events() if e.get("event") == "audit"]
        assert [
            (e["action"], e["outcome"], e.get("count"))
            for e in events
            if e.get("via") == "console" and e["action"].startswith("dlq.")
        ] == [("dlq.replay", "ok", 1), ("dlq.purge", "ok", 1)]
        watched.check()


async def test_cluster_page_marks_dead_and_stopped_instances(
    server_factory: Callable[..., ServerProcess],
    tmp_path: Path,
) -> None:
    with fresh_database() as url:
        env = {**ENV, "DOVECOTE_STORE": url, "DOVECOTE_HEARTBEAT_INTERVAL": "1"}
        server = server_factory(env=env)
        crashed = server_factory(env=env)
        stopped = server_factory(env=env)
        crashed.kill()
        stopped.stop()
        async with browser() as chromium:
            watched = await _open(chromium, server)
            page = await watched.page()
            await login(page, server)
            await page.goto(server.base_url + "/console/cluster")
            await expect(page.locator("tr.dead")).to_have_count(1, timeout=20_000)
            await expect(page.locator("tr.stopped")).to_have_count(1)
            await expect(page.locator("tr.self")).to_contain_text("alive")
            await expect(page.locator("tr.dead")).to_contain_text("dead")
            await expect(page.locator("tr.dead time").first).to_contain_text("ago")
            await expect(page.locator("h1")).to_contain_text("1 alive of 3")
            await screenshot(page, "cluster", tmp_path)
            watched.check()
            await watched.context.close()
        server.kill()


async def test_every_page_at_desktop_and_phone_width(
    server_factory: Callable[..., ServerProcess],
    endpoints: Callable[..., FlakyEndpoint],
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    """A server with something on every page; each page is checked and photographed."""
    gone = endpoints(default="404")
    failing = endpoints(default="500")
    backups = tmp_path / "backups"
    server = server_factory(
        env={
            **FAST_OUTBOUND,
            **ENV,
            "DOVECOTE_BREAKER_RESET": "120",
            "DOVECOTE_RETRY_RETENTION": "600",
            "DOVECOTE_BACKUP_DIR": str(backups),
            "DOVECOTE_BACKUP_INTERVAL": "3600",
        }
    )
    await queue_messages(client, server, 25)
    await queue_messages(client, server, 4)
    bob = Agent.create(server.base_url)
    for target in (gone, gone, failing, failing, failing, failing):
        carol = Agent.create(server.base_url, endpoint=target.url)
        envelope, _ = await remote_forward(server, bob, carol)
        assert (await post(client, server, envelope)).status_code == 202
    # A backup taken while serving, named like the scheduled ones (safe while serving).
    backups.mkdir(exist_ok=True)
    await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "dovecote",
            "backup",
            "--data-dir",
            str(server.data_dir),
            str(backups / "dovecote-20260101T000000000Z.db"),
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}

    async def settled() -> bool:
        dlq = (await client.get(server.base_url + "/admin/dlq", headers=admin)).json()
        overview = (await client.get(server.base_url + "/admin/overview", headers=admin)).json()
        return bool(
            dlq["total"] == 2
            and overview["health"].get("breakers")
            and overview["queues"].get("queued") == 29
        )

    assert await wait_until(settled, 30, interval=0.5)

    async with browser() as chromium:
        for viewport, suffix in ((DESKTOP, ""), (PHONE, "-360")):
            watched = await _open(chromium, server, viewport)
            page = await watched.page()
            await login(page, server)
            await expect(page.locator('[data-metric="queued"]')).to_have_text("29")
            await expect(page.locator('[data-metric="breakers"]')).to_have_text("1")
            await expect(page.locator('[data-metric="backup"]')).to_contain_text("UTC")
            await expect(page.locator("#h-backup + dl")).to_contain_text("checksums")
            if not suffix:  # the trend column is left out at phone width
                await expect(page.locator("svg.spark").first).to_be_visible(timeout=20_000)
            await screenshot(page, "overview" + suffix, tmp_path)

            await page.get_by_role("link", name="Dead letters").click()
            await expect(page.locator("tr[data-dead-letter]")).to_have_count(2)
            await page.select_option("#f-kind", "forward")
            await page.fill("#f-target", f"127.0.0.1:{gone.port}")
            await page.get_by_role("button", name="Filter").click()
            await expect(page.locator("tr[data-dead-letter]")).to_have_count(2)
            await screenshot(page, "dead-letters" + suffix, tmp_path)
            await page.fill("#f-target", "no-such-host")
            await page.get_by_role("button", name="Filter").click()
            await expect(page.locator(".empty")).to_contain_text("No dead letter matches")
            await page.goto(server.base_url + "/console/dead-letters")
            await page.locator("[data-select-all]").check()
            assert await page.locator("input[name=ids]:checked").count() == 2
            await page.get_by_role("button", name="Replay selected…").click()
            await expect(page.locator("h1")).to_have_text("Replay 2 dead letters?")
            await screenshot(page, "confirm" + suffix, tmp_path)
            await page.get_by_role("link", name="Cancel").click()
            await page.locator("tr[data-dead-letter] a").first.click()
            await expect(page.locator("#h-history + .table-wrap")).to_contain_text("HTTP 404")
            await screenshot(page, "dead-letter" + suffix, tmp_path)

            await page.get_by_role("link", name="Mailboxes").click()
            largest = page.locator('[data-table="largest"] tbody tr')
            await expect(largest).to_have_count(2)
            await expect(largest.first.locator("td").nth(0)).to_have_text("25")
            await expect(largest.first.locator("td").nth(2)).to_contain_text("KiB")
            await expect(page.locator("main")).to_contain_text("100,000 messages")
            assert "did:" not in await page.content()
            await screenshot(page, "mailboxes" + suffix, tmp_path)

            await page.get_by_role("link", name="Outbound targets").click()
            row = page.locator(f'tr[data-target="127.0.0.1:{failing.port}"]')
            await expect(row).to_contain_text("open")
            await expect(row.locator("td").nth(3)).to_have_text("4")
            await expect(row).to_contain_text("trial in")
            await screenshot(page, "targets" + suffix, tmp_path)

            await page.get_by_role("link", name="Cluster").click()
            await expect(page.locator("tr.self")).to_contain_text("alive")
            if suffix:
                # Everything a filter matches, in one confirmed action.
                await page.goto(server.base_url + "/console/dead-letters?reason=http_404")
                await page.get_by_role("button", name="Purge all…").click()
                await expect(page.locator("h1")).to_have_text("Purge 2 dead letters?")
                await page.get_by_role("button", name="Yes, purge 2").click()
                await expect(page.locator("#result")).to_contain_text("Purged 2 dead letters")
                dlq = await client.get(server.base_url + "/admin/dlq", headers=admin)
                assert dlq.json()["total"] == 0
                # Readable at 360 px: the page itself never scrolls sideways (tables may).
                width = await page.evaluate("() => document.documentElement.scrollWidth")
                assert width <= PHONE["width"], width
            watched.check()
            await watched.context.close()
