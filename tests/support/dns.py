"""A scripted DNS server on loopback (dnslib), for tests of outbound lookups.

Each name has a list of A answers handed out in turn, one per A query (so successive
lookups of one name can get different addresses: DNS rebinding); AAAA queries get an
empty answer. `SILENT` makes the server drop queries for a name (a lookup timeout), a
name it does not know gets NXDOMAIN.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from dnslib import QTYPE, RCODE, RR, A, DNSError, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from support.server import free_port

SILENT = "silent"


@dataclass
class ScriptedDNS(BaseResolver):  # type: ignore[misc]
    """See the module docstring; `queries` counts A queries per name."""

    answers: dict[str, list[str]] = field(default_factory=dict)
    queries: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    port: int = 0
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        script = self.answers.get(name)
        if script == [SILENT]:
            raise DNSError("dropped on purpose")  # dnslib then sends nothing
        if script is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if request.q.qtype == QTYPE.A:
            with self._lock:
                index = self.queries[name]
                self.queries[name] += 1
            reply.add_answer(
                RR(request.q.qname, QTYPE.A, rdata=A(script[index % len(script)]), ttl=0)
            )
        return reply

    def start(self) -> ScriptedDNS:
        self.port = free_port()
        self._server = DNSServer(
            self,
            port=self.port,
            address="127.0.0.1",
            logger=DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data"),
        )
        self._server.start_thread()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"
