"""Helpers for the console tests: the admin token, the system chromium, data to show."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Browser, Page, Request, async_playwright

from support.agent import Agent
from support.mailbox import pack_forwards, post_all
from support.server import ROOT, ServerProcess

ADMIN_TOKEN = "console-test-admin-token-0123456789abcdef"
CHROMIUM = Path(os.environ.get("DOVECOTE_TEST_CHROMIUM", "/usr/bin/chromium"))
# A headless browser that talks to nobody but the page's server.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = ROOT / "docs" / "console"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 360, "height": 780}


@asynccontextmanager
async def browser() -> AsyncIterator[Browser]:
    """Debian's chromium driven by Playwright (no browser download)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: run `bash scripts/install-chromium.sh` (make test does)",
            pytrace=False,
        )
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()


class OriginWatch:
    """Every request a page makes, to prove none leaves the server's origin."""

    def __init__(self, server: ServerProcess) -> None:
        self.origin = urlsplit(server.base_url)
        self.urls: list[str] = []

    def __call__(self, request: Request) -> None:
        self.urls.append(request.url)

    def foreign(self) -> list[str]:
        return [
            url
            for url in self.urls
            if (urlsplit(url).scheme, urlsplit(url).netloc)
            != (self.origin.scheme, self.origin.netloc)
        ]


async def login(page: Page, server: ServerProcess, token: str = ADMIN_TOKEN) -> None:
    await page.goto(server.base_url + "/console/")
    await page.fill("#token", token)
    await page.click("form[action='/console/login'] button")


async def queue_messages(
    client: httpx.AsyncClient, server: ServerProcess, count: int, agent: Agent | None = None
) -> Agent:
    """`count` forwards queued for an offline mediatee (mediated first)."""
    if agent is None:
        agent = Agent.create(server.base_url, server.did, via_mediator=True)
        await agent.mediate(client)
    ids = [f"console-{len(agent.did)}-{i}-{os.urandom(4).hex()}" for i in range(count)]
    accepted = await post_all(
        client, server.base_url, await pack_forwards(server.base_url, agent, ids)
    )
    assert len(accepted) == count
    return agent


def number(text: str) -> int:
    """The integer in a rendered count such as '1,234'."""
    match = re.search(r"-?[\d,]+", text)
    assert match, text
    return int(match.group().replace(",", ""))


async def screenshot(page: Page, name: str, out: Path) -> Path:
    """A full-page PNG in `out`; also in docs/console/ with DOVECOTE_UPDATE_SCREENSHOTS=1."""
    path = out / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    if os.environ.get("DOVECOTE_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        (SCREENSHOTS / path.name).write_bytes(data)
    return path
