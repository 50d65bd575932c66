"""HTTP and WebSocket calls with their errors translated into the client's tree.

Status handling follows the relay's contract: 2xx means committed; 408, 425, 429 and
5xx mean nothing was stored and the same bytes may be sent again (honouring
Retry-After); any other 4xx is a rejection that no retry will fix.
"""

from __future__ import annotations

import email.utils
import time

import httpx
import websockets

from dovecote.client.errors import Rejected, TransportFailure

ENCRYPTED = "application/didcomm-encrypted+json"
RETRYABLE_4XX = {408, 425, 429}


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def check(response: httpx.Response, what: str) -> httpx.Response:
    """The response when 2xx; otherwise TransportFailure (retry) or Rejected (don't)."""
    status = response.status_code
    if 200 <= status < 300:
        return response
    detail = f"{what}: HTTP {status} {response.text[:200]}"
    wait = retry_after(response.headers.get("retry-after"))
    if status >= 500 or status in RETRYABLE_4XX:
        raise TransportFailure(detail, status=status, retry_after=wait)
    raise Rejected(detail, status=status)


async def post(
    http: httpx.AsyncClient,
    url: str,
    payload: bytes,
    content_type: str = ENCRYPTED,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST `payload`; transport errors and non-2xx become client errors."""
    try:
        response = await http.post(
            url, content=payload, headers={"content-type": content_type, **(headers or {})}
        )
    except httpx.HTTPError as exc:
        raise TransportFailure(f"POST {url}: {type(exc).__name__}: {exc}") from exc
    return check(response, f"POST {url}")


async def connect_ws(url: str, open_timeout: float) -> websockets.ClientConnection:
    try:
        return await websockets.connect(
            url, open_timeout=open_timeout, max_size=None, ping_interval=20, ping_timeout=20
        )
    except (OSError, TimeoutError, websockets.WebSocketException) as exc:
        raise TransportFailure(f"connect {url}: {type(exc).__name__}: {exc}") from exc
