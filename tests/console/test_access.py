"""Who gets into /console: login, session cookie, CSRF, throttle, allowlist, client certs.

Plain HTTP clients against real server processes (the browser tests are test_browser.py).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx

from support.certs import make_ca, make_client_cert, make_server_cert
from support.server import ServerProcess

from .helpers import ADMIN_TOKEN

PAGES = [
    "/console/",
    "/console/cluster",
    "/console/dead-letters",
    "/console/dead-letters/1",
    "/console/mailboxes",
    "/console/targets",
]


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert match, html[:2000]
    return match.group(1)


def _login(c: httpx.Client, server: ServerProcess, token: str = ADMIN_TOKEN) -> httpx.Response:
    return c.post(server.base_url + "/console/login", data={"token": token, "next": "/console/"})


def _level(server: ServerProcess) -> dict[str, object]:
    response = httpx.get(
        server.base_url + "/admin/degradation",
        timeout=10,
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    return dict(response.json())


def _audit(server: ServerProcess, action: str) -> list[str]:
    return [
        e["outcome"]
        for e in server.log_events()
        if e.get("event") == "audit" and e.get("action") == action
    ]


def test_without_a_session_only_the_login_form_is_served(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(env={"DOVECOTE_ADMIN_TOKEN": ADMIN_TOKEN})
    with httpx.Client(timeout=10) as c:
        for path in PAGES:
            response = c.get(server.base_url + path)
            assert response.status_code == 401, path
            assert 'name="token"' in response.text and "Sign in" in response.text
            # Nothing of the page itself: no navigation, no numbers, no CSRF token.
            assert "Sign out" not in response.text and 'name="csrf"' not in response.text
            assert "data-metric" not in response.text and "Dead letters" not in response.text
            csp = response.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "script-src 'self'" in csp
            assert "frame-ancestors 'none'" in csp and "http" not in csp
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["cache-control"] == "no-store"
        # The login form's own stylesheet and script are served (nothing secret in them).
        assert c.get(server.base_url + "/console/static/console.css").status_code == 200
        assert c.get(server.base_url + "/console/static/console.js").status_code == 200
        # Actions without a session change nothing.
        for path in ("/console/dead-letters/action", "/console/degradation", "/console/logout"):
            refused = c.post(
                server.base_url + path,
                data={"action": "purge", "ids": "1", "confirm": "yes", "level": "shed"},
            )
            assert refused.status_code == 403, path
        assert _level(server) == {"level": "normal", "forced": False}
        # A forged cookie is no session.
        c.cookies.set("dovecote_console", "eyJuIjoiYSJ9.forged.sig", path="/console")
        assert c.get(server.base_url + "/console/").status_code == 401


def test_console_disabled_without_admin_token(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory()
    with httpx.Client(timeout=10) as c:
        response = c.get(server.base_url + "/console/")
        assert response.status_code == 404 and "DOVECOTE_ADMIN_TOKEN" in response.text
        assert _login(c, server, "").status_code == 404


def test_login_sets_a_strict_session_actions_need_csrf_logout_ends_it(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(
        env={"DOVECOTE_ADMIN_TOKEN": ADMIN_TOKEN, "DOVECOTE_CONSOLE_SESSION_SECONDS": "600"}
    )
    with httpx.Client(timeout=10) as c:
        wrong = _login(c, server, "not-the-token")
        assert wrong.status_code == 401 and "not the admin token" in wrong.text
        assert "set-cookie" not in wrong.headers
        assert _audit(server, "console.login") == ["unauthorized"]

        ok = _login(c, server)
        assert ok.status_code == 303 and ok.headers["location"] == "/console/"
        cookie = ok.headers["set-cookie"]
        assert cookie.startswith("dovecote_console=")
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "max-age", "path"} <= attributes
        assert "samesite=strict" in cookie.lower() and "Max-Age=600" in cookie
        assert "Path=/console" in cookie
        assert "secure" not in attributes  # plain HTTP here; see the TLS test
        assert _audit(server, "console.login") == ["unauthorized", "ok"]
        for path in PAGES[:3] + PAGES[4:]:
            assert c.get(server.base_url + path).status_code == 200, path
        page = c.get(server.base_url + "/console/").text
        csrf = _csrf(page)

        action = server.base_url + "/console/degradation"
        # No CSRF token, a wrong one, or a foreign Origin: refused, nothing changes.
        assert c.post(action, data={"level": "shed"}).status_code == 403
        assert c.post(action, data={"level": "shed", "csrf": "0" * 64}).status_code == 403
        assert (
            c.post(
                action,
                data={"level": "shed", "csrf": csrf},
                headers={"origin": "https://evil.example"},
            ).status_code
            == 403
        )
        assert (
            c.post(
                action, data={"level": "shed", "csrf": csrf}, headers={"origin": "null"}
            ).status_code
            == 403
        )
        assert _level(server) == {"level": "normal", "forced": False}
        assert _audit(server, "console.csrf") == ["forbidden"] * 4
        # With it: done, and audited like the admin API.
        done = c.post(
            action, data={"level": "shed", "csrf": csrf}, headers={"origin": server.base_url}
        )
        assert done.status_code == 303
        assert _level(server) == {"level": "shed", "forced": True}
        assert _audit(server, "degradation.set") == ["ok"]
        c.post(action, data={"level": "auto", "csrf": csrf})
        assert _level(server) == {"level": "normal", "forced": False}
        # Hostile form input is a 4xx page, never a 5xx.
        assert c.post(action, data={"level": "nonsense", "csrf": csrf}).status_code == 400
        assert (
            c.post(
                server.base_url + "/console/dead-letters/action",
                data={"csrf": csrf, "action": "replay", "ids": "x"},
            ).status_code
            == 400
        )
        huge = c.post(
            server.base_url + "/console/dead-letters/action",
            content=b"csrf=" + csrf.encode() + b"&ids=" + b"1," * 40_000,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert huge.status_code == 413
        assert (
            c.get(server.base_url + "/console/dead-letters?offset=-1&kind=%00").status_code == 200
        )
        # Whatever comes back in a page is escaped.
        hostile = c.get(
            server.base_url + "/console/dead-letters",
            params={"target": '"><script>alert(1)</script>'},
        )
        assert hostile.status_code == 200 and "<script>alert" not in hostile.text
        assert "&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in hostile.text
        for item in ("99999999", "0", "9" * 30):
            assert c.get(f"{server.base_url}/console/dead-letters/{item}").status_code == 404
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        assert c.get(f"{server.base_url}/admin/dlq/{'9' * 30}", headers=admin).status_code == 404
        for path in ("replay", "purge"):
            done = c.post(
                f"{server.base_url}/admin/dlq/{path}", headers=admin, json={"ids": [10**30, -1]}
            )
            # Ids no dead letter can have are a clear 400, not a silent no-op.
            assert done.status_code == 400 and "ids" in done.json()["detail"]

        session_cookie = c.cookies.get("dovecote_console")
        out = c.post(server.base_url + "/console/logout", data={"csrf": csrf})
        assert out.status_code == 303 and out.headers["location"] == "/console/login"
        assert 'dovecote_console=""' in out.headers["set-cookie"]
        assert _audit(server, "console.logout") == ["ok"]
    # The old cookie, replayed after logout, is refused.
    with httpx.Client(timeout=10) as c:
        c.cookies.set("dovecote_console", session_cookie or "", path="/console")
        assert c.get(server.base_url + "/console/").status_code == 401


def test_failed_logins_are_throttled_and_logged_like_admin_auth(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(
        env={"DOVECOTE_ADMIN_TOKEN": ADMIN_TOKEN, "DOVECOTE_ADMIN_ALLOW": "127.0.0.0/8"}
    )
    with httpx.Client(timeout=10) as c:
        for _ in range(5):
            assert _login(c, server, "guess").status_code == 401
        throttled = _login(c, server, "guess")
        assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
        # While throttled even the right token is not tried (no guessing at full speed).
        assert _login(c, server).status_code == 429
        assert "set-cookie" not in throttled.headers
    assert _audit(server, "console.login") == ["unauthorized"] * 5 + ["throttled"] * 2
    # One budget per address with the admin API: /admin is throttled for it too.
    with httpx.Client(timeout=10) as c:
        admin = c.get(
            server.base_url + "/admin/cluster", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert admin.status_code == 429 and admin.json()["error"] == "admin_throttled"
    # Another address is not affected.
    with httpx.Client(timeout=10, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as c:
        assert _login(c, server).status_code == 303


def test_console_shares_the_admin_allowlist_and_client_certificate_checks(
    server_factory: Callable[..., ServerProcess],
    tmp_path: Path,
) -> None:
    ca = make_ca(tmp_path)
    server_cert = make_server_cert(ca, tmp_path)
    operator = make_client_cert(ca, tmp_path, "operator")
    tls = [
        "--tls-cert",
        str(server_cert.cert_path),
        "--tls-key",
        str(server_cert.key_path),
        "--admin-token",
        ADMIN_TOKEN,
        "--admin-client-ca",
        str(ca.cert_path),
    ]
    server = server_factory(start=False, args=tls)
    server.tls_ca = ca.cert_path
    narrow = server_factory(start=False, args=[*tls, "--admin-allow", "10.0.0.0/8"])
    narrow.tls_ca = ca.cert_path
    server.start(wait=False)
    narrow.start(wait=False)
    server.wait_ready()
    narrow.wait_ready()

    def context(with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(ca.cert_path))
        if with_cert:
            ctx.load_cert_chain(operator.cert_path, operator.key_path)
        return ctx

    # No client certificate: not even the login form or its stylesheet.
    with httpx.Client(verify=context(False), timeout=10) as c:
        for path in ("/console/", "/console/login", "/console/static/console.css"):
            denied = c.get(server.base_url + path)
            assert denied.status_code == 403 and "certificate" in denied.text, path
        assert _login(c, server).status_code == 403
    # With one: login works and the cookie is Secure (served over TLS).
    with httpx.Client(verify=context(True), timeout=10) as c:
        ok = _login(c, server)
        assert ok.status_code == 303
        assert "secure" in [p.strip().lower() for p in ok.headers["set-cookie"].split(";")]
        assert c.get(server.base_url + "/console/cluster").status_code == 200
        # A network outside ADMIN_ALLOW: refused before any token or session is looked at.
        refused = c.get(narrow.base_url + "/console/")
        assert refused.status_code == 403 and "ADMIN_ALLOW" in refused.text
        assert _login(c, narrow).status_code == 403
    # Refusals are the admin API's audit lines (action "auth").
    assert _audit(server, "auth").count("client_cert_required") >= 4
    assert _audit(narrow, "auth").count("forbidden") >= 2
