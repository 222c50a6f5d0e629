"""Fetching images on a user's behalf without letting a URL reach inside the network (SPEC §8).

A URL must be `https`, or `http` to a host in BRIDGE_FETCH_ALLOW_HOSTS. Its host is resolved
once and every address checked: loopback, private, link-local, multicast, reserved and other
non-global addresses are refused unless the host is allow-listed. The connection is then
pinned to the checked addresses (a resolver that answers only with them), so a second DNS
answer cannot slip another address in (DNS rebinding); TLS still verifies the host name.
Redirects are followed by hand, each hop checked the same way, at most `max_redirects`.
The body is read with a size cap (counted while streaming) under one overall timeout.

`URLGuard` (the check and the pin) and `pinned_session` serve other URLs a server names
for the bridge to connect to the same way: ChatGPT web's sockets (`wss`, or `ws`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

__all__ = [
    "FetchError",
    "FetchFailed",
    "FetchRefused",
    "FetchTooLarge",
    "Fetched",
    "ImageFetcher",
    "PinnedResolver",
    "URLGuard",
    "address_is_public",
    "pinned_session",
    "sniff_image_type",
]

log = structlog.get_logger(__name__)

Resolve = Callable[[str, int], Awaitable[list[str]]]  # (host, port) → IP addresses

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 65536
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)
# Not global, though `is_global` says so on Python releases before the CVE-2024-4032 fix
# (3.11.10, 3.12.4): 6to4, whose address embeds any IPv4 one (2002:a9fe:a9fe:: is
# 169.254.169.254 to a host with a 6to4 route); deprecated site-local; documentation.
_NOT_GLOBAL = tuple(ipaddress.IPv6Network(net) for net in ("2002::/16", "fec0::/10", "3fff::/20"))


class FetchError(Exception):
    """An image could not be fetched; `reason` is for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FetchRefused(FetchError):
    """The URL may not be fetched: its scheme, or an address inside the network."""


class FetchTooLarge(FetchError):
    """The body is larger than the cap."""

    def __init__(self, reason: str, limit_bytes: int) -> None:
        super().__init__(reason)
        self.limit_bytes = limit_bytes


class FetchFailed(FetchError):
    """The server could not be reached, answered an error, or sent no image."""


@dataclass(frozen=True, slots=True)
class Fetched:
    url: str  # where the bytes came from, after redirects
    data: bytes
    content_type: str

    @property
    def data_url(self) -> str:
        return f"data:{self.content_type};base64,{base64.b64encode(self.data).decode()}"


def address_is_public(address: str) -> bool:
    """True for a global unicast address; False for loopback, private, link-local,
    multicast, reserved, shared (CGNAT), unspecified and documentation ranges."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _NOT_GLOBAL):
            return False
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback)


def sniff_image_type(data: bytes) -> str | None:
    """The image type from the first bytes, or None when they are no known image."""
    for magic, content_type in _MAGIC:
        if data.startswith(magic):
            return content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class PinnedResolver(AbstractResolver):
    """Answers only with the addresses checked for each host; any other name fails."""

    def __init__(self) -> None:
        self.pins: dict[str, list[str]] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = self.pins.get(host.lower().rstrip("."))
        if not addresses:
            raise OSError(f"{host} was not checked before connecting")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        """Nothing to release."""


def pinned_session(resolver: PinnedResolver, **options: Any) -> aiohttp.ClientSession:
    """A session that connects only to the addresses pinned in `resolver` (`URLGuard.pin`)."""
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, limit=4)
    return aiohttp.ClientSession(connector=connector, **options)


class URLGuard:
    """The SSRF rules for URLs of one pair of schemes (`https`/`http`, `wss`/`ws`): the
    secure one to any host, the plain one only to a host of `plain_hosts` (by default the
    allow-listed ones); a host not allow-listed must resolve to public addresses only."""

    def __init__(
        self,
        *,
        allow_hosts: Collection[str] = (),
        plain_hosts: Collection[str] | None = None,
        resolve: Resolve = system_resolve,
        schemes: tuple[str, str] = ("https", "http"),
    ) -> None:
        self.allow_hosts = frozenset(_normal_host(host) for host in allow_hosts)
        self.plain_hosts = (
            self.allow_hosts
            if plain_hosts is None
            else frozenset(_normal_host(host) for host in plain_hosts)
        )
        self.secure, self.plain = schemes
        self._resolve = resolve

    async def pin(self, url: str, resolver: PinnedResolver) -> URL:
        """`url` parsed and checked, its host's checked addresses pinned in `resolver`;
        connect to the URL returned, through `pinned_session(resolver)`."""
        target = _parse(url)  # one parse, for the check and the connection alike
        host, addresses = await self.check(target)
        resolver.pins[host] = addresses
        return target

    async def check(self, url: str | URL) -> tuple[str, list[str]]:
        """The URL's host and the addresses it may be reached at; FetchRefused if none."""
        # Parsed by yarl, as aiohttp parses it to connect: the host checked is the host
        # connected to. `urlsplit` keeps a Unicode host that yarl maps by UTS 46 (a host
        # `1\U0001fbf27.0.0.1`, with a "segmented digit", is the IP literal 127.0.0.1 to
        # yarl, which aiohttp connects to without asking the resolver, but a name to
        # `urlsplit`, which the system resolver turned into `xn--17-3e23a.0.0.1`: a DNS
        # server answering every name let a loopback connection through).
        try:
            parts = url if isinstance(url, URL) else URL(url)
            hostname = parts.raw_host
            port = parts.port
        except (ValueError, UnicodeError) as exc:  # `https://[::1`, `https://[not-an-ip]/`
            raise FetchRefused("malformed URL") from exc
        host = _normal_host(hostname or "")
        if not host:
            raise FetchRefused("no host in the URL")
        allowed = _listed(host, self.allow_hosts)
        secure, plain = self.secure, self.plain
        if parts.scheme == plain and not _listed(host, self.plain_hosts):
            raise FetchRefused(
                f"{plain} to {host} (only {secure}, or {plain} to allow-listed hosts)"
            )
        if parts.scheme not in (plain, secure):
            raise FetchRefused(f"scheme {parts.scheme or '(none)'} is not fetched")
        port = port or (443 if parts.scheme == secure else 80)
        addresses = [host] if _is_ip(host) else await self._addresses(host, port)
        if not allowed:
            inside = [a for a in addresses if not address_is_public(a)]
            if inside:
                raise FetchRefused(f"{host} resolves to a non-public address ({inside[0]})")
        return host, addresses

    async def _addresses(self, host: str, port: int) -> list[str]:
        try:
            addresses = await self._resolve(host, port)
        except UnicodeError as exc:  # not a name IDNA can encode: an empty or 64+ label
            raise FetchRefused(f"bad host name {host[:80]!r}") from exc
        except OSError as exc:
            raise FetchFailed(f"cannot resolve {host}: {exc}") from exc
        if not addresses:
            raise FetchFailed(f"{host} has no address")
        return addresses


class ImageFetcher:
    """Downloads images under the SSRF rules, the size cap and a timeout."""

    def __init__(
        self,
        *,
        allow_hosts: Collection[str] = (),
        max_bytes: int = 10 * 1024 * 1024,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        max_redirects: int = 5,
        resolve: Resolve = system_resolve,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.guard = URLGuard(allow_hosts=allow_hosts, resolve=resolve)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_redirects = max_redirects
        self._headers = headers or {}

    async def fetch(self, url: str) -> Fetched:
        """The image at `url`; FetchRefused, FetchTooLarge or FetchFailed otherwise."""
        resolver = PinnedResolver()
        timeout = aiohttp.ClientTimeout(sock_connect=self.connect_timeout_s)
        async with pinned_session(resolver, timeout=timeout, headers=self._headers) as session:
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await self._follow(session, resolver, url)
            except TimeoutError as exc:
                raise FetchFailed(f"timed out after {self.timeout_s:g} s") from exc
            except aiohttp.ClientError as exc:
                raise FetchFailed(f"cannot fetch: {type(exc).__name__}") from exc

    async def _follow(
        self, session: aiohttp.ClientSession, resolver: PinnedResolver, url: str
    ) -> Fetched:
        for _ in range(self.max_redirects + 1):
            target = await self.guard.pin(url, resolver)
            async with session.get(target, allow_redirects=False) as response:
                if response.status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchFailed(f"HTTP {response.status} without a Location")
                    try:
                        url = urljoin(url, location)
                    except ValueError as exc:
                        raise FetchFailed(f"HTTP {response.status} to a malformed URL") from exc
                    continue
                if response.status != 200:
                    raise FetchFailed(f"HTTP {response.status}")
                data = await self._read_capped(response)
                return Fetched(url, data, _image_type(response.content_type, data))
        raise FetchFailed(f"more than {self.max_redirects} redirects")

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self.max_bytes
        if response.content_length is not None and response.content_length > limit:
            raise FetchTooLarge(f"Content-Length {response.content_length} > {limit}", limit)
        body = bytearray()
        async for chunk in response.content.iter_chunked(_READ_CHUNK):
            body += chunk
            if len(body) > limit:
                raise FetchTooLarge(f"more than {limit} bytes", limit)
        return bytes(body)


def _image_type(declared: str, data: bytes) -> str:
    sniffed = sniff_image_type(data)
    if sniffed is not None:
        return sniffed
    if declared.startswith("image/"):
        return declared
    raise FetchFailed(f"not an image ({declared or 'no content type'})")


def _parse(url: str) -> URL:
    try:
        return URL(url)
    except (ValueError, UnicodeError) as exc:
        raise FetchRefused("malformed URL") from exc


def _normal_host(host: str) -> str:
    """`host` as yarl (and so aiohttp) spells it: lower case, IDNA-encoded (`bücher.de` is
    `xn--bcher-kva.de`), an IPv6 address compressed, without brackets or a trailing dot;
    as given if yarl refuses it."""
    host = host.strip().strip("[]").rstrip(".")
    if host.startswith("."):  # a domain's entry (`_listed`): its name normalised the same way
        name = _normal_host(host.lstrip("."))
        return f".{name}" if name else ""
    address, zone = host.partition("%")[::2]
    if _is_ip(address):
        host = str(ipaddress.ip_address(address)) + (f"%{zone}" if zone else "")
    elif host:
        with contextlib.suppress(ValueError, UnicodeError):
            host = URL.build(scheme="http", host=host).raw_host or host
    return host.lower().rstrip(".")


def _listed(host: str, entries: frozenset[str]) -> bool:
    """`host` is an entry, or a name under one written with a leading dot (`.corp.example`
    lists `a.corp.example`, not `corp.example` itself), as NO_PROXY lists domains."""
    return host in entries or (
        not _is_ip(host)  # (an address is listed as itself: `.0.0.1` lists no 127.0.0.1)
        and any(entry.startswith(".") and host.endswith(entry) for entry in entries)
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def describe(exc: FetchError) -> dict[str, Any]:
    """Log fields for a failed fetch (never the URL's query: it may hold a token)."""
    return {"error": type(exc).__name__, "reason": exc.reason}
