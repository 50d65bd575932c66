"""The admin and push tokens appear in no /admin view, /health, /metrics, console page or log
line (SecretStr in Settings; tests/unit/test_settings_secrets.py covers repr and dumps)."""

from __future__ import annotations

import pytest
import structlog

from fast.instance import ADMIN_TOKEN, Fast

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
PUSH_TOKEN = "push-secret-fast-4242"
VIEWS = (
    "/admin/dlq",
    "/admin/degradation",
    "/admin/cluster",
    "/admin/mailboxes",
    "/admin/targets",
    "/admin/overview",
    "/health",
    "/health/ready",
    "/metrics",
)


@pytest.mark.fast_settings(push_token=PUSH_TOKEN, push_url="https://push.example/send")
async def test_no_view_or_log_line_shows_a_secret(fast: Fast) -> None:
    with structlog.testing.capture_logs() as logs:
        for path in VIEWS:
            response = await fast.client.get(path, headers=ADMIN)
            assert response.status_code < 500, (path, response.status_code)
            for secret in (ADMIN_TOKEN, PUSH_TOKEN):
                assert secret not in response.text, path
        login = await fast.client.get("/console/login")
        assert ADMIN_TOKEN not in login.text
        await fast.client.get("/admin/dlq", headers={"authorization": "Bearer wrong"})
    assert logs, "the views were logged (audit lines at least)"
    text = repr(logs)
    for secret in (ADMIN_TOKEN, PUSH_TOKEN):
        assert secret not in text
