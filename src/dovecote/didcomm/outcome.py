"""`Outcome`: what a transport answers for one inbound envelope (v1 and v2 alike)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dovecote.didcomm.endpoints import ENCRYPTED
from dovecote.errors import DovecoteError


@dataclass
class Outcome:
    """What the transport should answer."""

    status: int = 202
    replies: list[bytes] = field(default_factory=list)
    error: DovecoteError | None = None
    return_route: bool = False
    media_type: str = ENCRYPTED
