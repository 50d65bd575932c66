"""Outbound HTTP that goes where it was checked to go (forwards, replies, webhooks, push,
the rooms JWKS URL).

The check and the connection are one step. `GuardedBackend` is an httpcore network
backend: when the connection pool opens a TCP connection for `host`, it resolves `host`
once, refuses unless EVERY address is allowed, and connects to those same addresses. The
URL, the Host header and the TLS server name (SNI and certificate check) stay the
hostname, so nothing changes for the target; a DNS answer that changes between a check
and a connect (rebinding) cannot steer the connection, because there is no second lookup.

Fail closed: a lookup that errors, times out (OUTBOUND_CONNECT_TIMEOUT) or returns no
address is refused, never treated as public. Redirects are not followed (the caller sees
the 3xx). Environment proxies are ignored (a proxy would do its own lookup).

Allowed: public unicast addresses. Refused unless OUTBOUND_ALLOW_PRIVATE or listed in
OUTBOUND_ALLOW_NETWORKS: loopback, private, link-local, shared (CGNAT), unspecified,
reserved, multicast, and IPv4-mapped/6to4/Teredo forms of those.

OUTBOUND_DNS_SERVER (host:port) sends lookups to that server (dnspython) instead of the
system resolver: for a resolver the operator trusts, and for tests with their own DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpcore
import httpx
import structlog

from dovecote.ops import metrics

if TYPE_CHECKING:
    from dovecote.ops.settings import Settings

log = structlog.get_logger("dovecote.outbound")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
SHARED = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598: not is_private in every Python


class OutboundRefused(Exception):
    """An outbound call that was not made; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _embedded(address: Address) -> Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo), if any."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def is_forbidden(address: Address) -> bool:
    """Whether `address` is not a public unicast address (or hides one that is not)."""
    inner = _embedded(address)
    if inner is not None and is_forbidden(inner):
        return True
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_reserved
        or address.is_multicast
        or (isinstance(address, ipaddress.IPv4Address) and address in SHARED)
    )


@dataclass
class Policy:
    """Which addresses outbound calls may reach, and how names are looked up."""

    allow_private: bool = False
    allow_networks: list[Network] = field(default_factory=list)
    lookup_timeout: float = 5.0
    dns_server: tuple[str, int] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        server = None
        if settings.outbound_dns_server:
            host, _, port = settings.outbound_dns_server.rpartition(":")
            server = (host.strip("[]"), int(port))
        return cls(
            allow_private=settings.outbound_allow_private,
            allow_networks=[
                ipaddress.ip_network(n, strict=False) for n in settings.outbound_allow_networks
            ],
            lookup_timeout=settings.outbound_connect_timeout,
            dns_server=server,
        )

    def allowed(self, address: Address) -> bool:
        if self.allow_private or any(address in net for net in self.allow_networks):
            return True
        return not is_forbidden(address)

    async def resolve(self, host: str) -> list[str]:
        """Every address of `host`, all checked; OutboundRefused otherwise (fail closed)."""
        host = host.strip("[]")
        try:
            literal: Address | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            found = [literal]
        else:
            found = await self._lookup(host)
        refused = [str(a) for a in found if not self.allowed(a)]
        if refused:
            metrics.OUTBOUND_REFUSED.labels("private_address").inc()
            raise OutboundRefused(
                "private_address",
                f"{host} is or resolves to a private or otherwise "
                f"non-public address ({refused[0]})",
            )
        return [str(a) for a in found]

    async def _lookup(self, host: str) -> list[Address]:
        try:
            async with asyncio.timeout(self.lookup_timeout):
                if self.dns_server is not None:
                    texts = await self._query(host)
                else:
                    infos = await asyncio.get_running_loop().getaddrinfo(
                        host, None, type=socket.SOCK_STREAM
                    )
                    texts = [str(info[4][0]) for info in infos]
        except TimeoutError:
            metrics.OUTBOUND_REFUSED.labels("lookup_timeout").inc()
            raise OutboundRefused("lookup_timeout", f"looking up {host} timed out") from None
        except (OSError, UnicodeError) as exc:
            metrics.OUTBOUND_REFUSED.labels("unresolvable").inc()
            raise OutboundRefused("unresolvable", f"cannot look up {host}: {exc}") from None
        found: list[Address] = []
        for text in texts:
            # getaddrinfo gives scoped IPv6 as "fe80::1%eth0"; the scope is not the address.
            address = ipaddress.ip_address(text.split("%", 1)[0])
            if address not in found:
                found.append(address)
        if not found:
            metrics.OUTBOUND_REFUSED.labels("unresolvable").inc()
            raise OutboundRefused("unresolvable", f"{host} has no address")
        return found

    async def _query(self, host: str) -> list[str]:
        """A and AAAA from OUTBOUND_DNS_SERVER (no search domains, no /etc/hosts)."""
        import dns.asyncresolver
        import dns.exception
        import dns.resolver

        assert self.dns_server is not None
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [self.dns_server[0]]
        resolver.port = self.dns_server[1]
        texts: list[str] = []
        failures = 0
        for rdtype in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(
                    host, rdtype, lifetime=self.lookup_timeout, search=False
                )
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                failures += 1
                continue
            except dns.exception.Timeout as exc:
                raise TimeoutError from exc
            except dns.exception.DNSException as exc:
                raise OSError(str(exc)) from exc
            texts += [rr.to_text() for rr in answer]
        if failures == 2:
            raise OSError(f"{host}: no such name")
        return texts


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolve once, check every address, connect to a checked address (see module doc)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore API)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self.policy.resolve(host)
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore API)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise OutboundRefused("unix_socket", "outbound calls use TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool on a `GuardedBackend`."""

    def __init__(
        self, policy: Policy, limits: httpx.Limits, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        super().__init__(limits=limits, trust_env=False)
        ssl_context = ssl_context or httpx.create_ssl_context(trust_env=False)
        # httpx builds its pool without a way to pass a network backend; this is the same
        # pool it would build (see httpx/_transports/default.py) on our backend.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(policy),
        )


def client(
    policy: Policy,
    timeout: httpx.Timeout,
    limits: httpx.Limits | None = None,
    headers: typing.Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> httpx.AsyncClient:
    """An AsyncClient whose every connection is checked by `policy`; no redirects.

    `ssl_context` (default: the system's CAs, hostname checked) is for private CAs."""
    limits = limits or httpx.Limits()
    return httpx.AsyncClient(
        transport=GuardedTransport(policy, limits, ssl_context),
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        headers=headers,
    )
