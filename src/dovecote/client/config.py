"""The client's one typed settings object, with documented defaults as named constants."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DEFAULT_BATCH_SIZE = 100  # most messages one flush sends
DEFAULT_FLUSH_INTERVAL = 5.0  # seconds a queued message may wait for its batch to fill
DEFAULT_HTTP_CONCURRENCY = 16  # parallel POSTs within one flush
DEFAULT_ATTEMPTS_PER_ENDPOINT = 3  # failed attempts on one endpoint before the next
DEFAULT_BACKOFF_BASE = 0.5  # seconds; doubled per attempt, equal jitter (util/backoff.py)
DEFAULT_BACKOFF_MAX = 60.0
DEFAULT_RETENTION = 7 * 86_400.0  # seconds a message may stay undelivered before "failed"
DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_SEEN_IDS = 10_000  # received message ids remembered for dedup
DEFAULT_RECONNECT_MAX = 30.0  # cap of the live-mode reconnect backoff (seconds)
DEFAULT_PICKUP_LIMIT = 100

SendTransport = Literal["http", "ws"]
ServiceForm = Literal["routing-keys", "mediator-did"]


@dataclass
class ClientConfig:
    """How a client finds its state and behaves; every field has a safe default."""

    data_dir: Path = field(default_factory=lambda: Path.home() / ".dovecote-client")
    # Extra endpoints of the relay this client is mediated by (other instances of the
    # same cluster), tried in this order before the endpoints from the mediator's DID doc.
    relays: list[str] = field(default_factory=list)
    batch_size: int = DEFAULT_BATCH_SIZE
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    http_concurrency: int = DEFAULT_HTTP_CONCURRENCY
    # "ws": one flush goes over one WebSocket (all frames, then a trust-ping barrier);
    # "http": one POST per message, `http_concurrency` at a time.
    send_transport: SendTransport = "http"
    attempts_per_endpoint: int = DEFAULT_ATTEMPTS_PER_ENDPOINT
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_max: float = DEFAULT_BACKOFF_MAX
    retention: float = DEFAULT_RETENTION
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    seen_ids: int = DEFAULT_SEEN_IDS
    reconnect_max: float = DEFAULT_RECONNECT_MAX
    # How the routed DID names its mediator: "routing-keys" gives
    # {uri: <mediator http url>, routingKeys: [<mediator>#key-2]}; "mediator-did" gives
    # {uri: <mediator DID>} and lets senders resolve the mediator.
    service_form: ServiceForm = "routing-keys"
    rooms_url: str = ""
    rooms_token: str = field(default="", repr=False)  # a bearer token: kept out of repr

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser()
        if self.batch_size < 1 or self.http_concurrency < 1 or self.attempts_per_endpoint < 1:
            raise ValueError("batch_size, http_concurrency and attempts_per_endpoint must be >= 1")
