"""The SSRF-guarded image fetcher: schemes, addresses, pinning, redirects, size cap, timeout.

The fake image host listens on 127.0.0.1, so the happy paths allow-list it; without the
allow-list the same URLs must be refused.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator

import pytest
from yarl import URL

from bridge.fetch import (
    FetchFailed,
    FetchRefused,
    FetchTooLarge,
    ImageFetcher,
    PinnedResolver,
    URLGuard,
    address_is_public,
    sniff_image_type,
)
from tests.fakes.images import FakeImages, png


@pytest.fixture
async def images() -> AsyncIterator[FakeImages]:
    fake = await FakeImages().start()
    yield fake
    await fake.close()


def loopback_ok(**options: object) -> ImageFetcher:
    return ImageFetcher(allow_hosts={"127.0.0.1"}, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("127.8.9.10", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # shared address space
        ("0.0.0.0", False),
        ("224.0.0.1", False),  # multicast (Python calls it global)
        ("239.255.255.250", False),
        ("240.0.0.1", False),  # reserved
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:10.0.0.1", False),
        ("::ffff:8.8.8.8", True),  # IPv4-mapped: judged as the IPv4 address it reaches
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::1", False),  # 6to4 of 169.254.169.254
        ("fec0::1", False),  # site-local (deprecated)
        ("3fff::1", False),  # documentation
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("::a9fe:a9fe", False),  # IPv4-compatible (deprecated)
        ("not an address", False),
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert address_is_public(address) is public


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.png",  # http, not allow-listed
        "https://127.0.0.1/a.png",  # loopback
        "https://10.0.0.1/a.png",  # private
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/a.png",
        "https://[::ffff:127.0.0.1]/a.png",
        "https://localhost/a.png",  # a name that resolves to loopback
        "ftp://example.com/a.png",
        "file:///etc/passwd",
        "data:image/png;base64,AAAA",
        "https:///nohost",
    ],
)
async def test_refused_urls(url: str) -> None:
    with pytest.raises(FetchRefused):
        await ImageFetcher().fetch(url)


async def test_a_name_resolving_to_a_private_address_is_refused() -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.7"]  # one inside is enough to refuse

    with pytest.raises(FetchRefused, match=r"10\.0\.0\.7"):
        await ImageFetcher(resolve=resolve).fetch("https://images.example/a.png")


async def test_http_to_a_public_host_not_allow_listed_is_refused() -> None:
    """Only `https`, or `http` to an allow-listed host: a public address is no excuse."""

    async def resolve(host: str, port: int) -> list[str]:
        return ["93.184.216.34"]

    fetcher = ImageFetcher(resolve=resolve, timeout_s=1, connect_timeout_s=0.5)
    with pytest.raises(FetchRefused, match="http"):
        await fetcher.fetch("http://images.example/a.png")


async def test_an_allow_listed_loopback_image_is_fetched(images: FakeImages) -> None:
    url = images.add("cat")
    fetched = await loopback_ok().fetch(url)
    assert fetched.data == png("cat")
    assert fetched.content_type == "image/png"
    assert fetched.data_url == "data:image/png;base64," + base64.b64encode(png("cat")).decode()


async def test_the_same_url_without_the_allow_list_is_refused(images: FakeImages) -> None:
    url = images.add("cat")
    with pytest.raises(FetchRefused):
        await ImageFetcher().fetch(url)
    with pytest.raises(FetchRefused):
        await ImageFetcher().fetch(url.replace("http://", "https://"))
    assert images.server.requests == []


async def test_the_connection_goes_to_the_checked_address(images: FakeImages) -> None:
    """The name is resolved once, by the checker; the connection uses that answer (a
    rebinding DNS server never gets a second question)."""
    calls: list[str] = []
    port = images.url.rsplit(":", 1)[1]

    async def resolve(host: str, port_: int) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"]

    images.add("dog")
    fetcher = ImageFetcher(allow_hosts={"pinned.test"}, resolve=resolve)
    fetched = await fetcher.fetch(f"http://pinned.test:{port}/img/dog")
    assert fetched.data == png("dog")
    assert calls == ["pinned.test"]
    assert images.server.requests[0].headers["Host"] == f"pinned.test:{port}"


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("wss://hub.example/socket", None),  # public
        ("ws://inside.test:8080/socket", None),  # allow-listed: ws, and a private address
        ("wss://metadata.example/socket", "non-public address (169.254.169.254)"),
        ("ws://hub.example/socket", "ws to hub.example (only wss"),
        ("https://hub.example/socket", "scheme https"),
        ("wss://base.test/socket", None),  # the configured host: any address
        ("ws://base.test/socket", "ws to base.test (only wss"),  # but not in the clear
    ],
)
async def test_socket_urls_follow_the_rules_with_their_own_schemes(
    url: str, refused: str | None
) -> None:
    """The guard of the sockets an upstream names (`wss`, `ws` only to allowed hosts):
    what it allows is pinned to the addresses it checked; what it refuses, not at all."""
    addresses = {
        "hub.example": ["93.184.216.34"],
        "metadata.example": ["169.254.169.254"],
        "inside.test": ["10.0.0.8"],
        "base.test": ["10.0.0.9"],
    }

    async def resolve(host: str, port: int) -> list[str]:
        return addresses[host]

    guard = URLGuard(allow_hosts={"inside.test", "base.test"}, plain_hosts={"inside.test"},
                     resolve=resolve, schemes=("wss", "ws"))  # fmt: skip
    resolver = PinnedResolver()
    if refused is not None:
        with pytest.raises(FetchRefused, match=re.escape(refused)):
            await guard.pin(url, resolver)
        assert resolver.pins == {}
        return
    target = await guard.pin(url, resolver)
    assert str(target) == url
    assert resolver.pins == {target.host: addresses[target.host or ""]}


async def test_a_redirect_is_checked_again(images: FakeImages) -> None:
    target = "https://10.0.0.1/secret.png"
    with pytest.raises(FetchRefused):
        await loopback_ok().fetch(f"{images.url}/redirect?to={target}")


async def test_a_redirect_to_an_allowed_image_is_followed(images: FakeImages) -> None:
    url = images.add("bird")
    fetched = await loopback_ok().fetch(f"{images.url}/redirect?to={url}")
    assert fetched.data == png("bird")
    assert fetched.url == url


async def test_redirects_are_bounded(images: FakeImages) -> None:
    url = images.add("fish")
    for _ in range(4):
        url = f"{images.url}/redirect?to={url.replace('?', '%3F').replace('=', '%3D')}"
    with pytest.raises(FetchFailed, match="redirects"):
        await loopback_ok(max_redirects=3).fetch(url)
    assert (await loopback_ok(max_redirects=4).fetch(url)).data == png("fish")  # exactly 4


@pytest.mark.parametrize("route", ["img", "chunked"])
async def test_the_size_cap(images: FakeImages, route: str) -> None:
    images.add("big", png("big", size=5000))
    images.add("fits", png("fits", size=1000))
    fetcher = loopback_ok(max_bytes=1000)
    with pytest.raises(FetchTooLarge) as refused:
        await fetcher.fetch(f"{images.url}/{route}/big")
    assert refused.value.limit_bytes == 1000
    assert len((await fetcher.fetch(f"{images.url}/{route}/fits")).data) == 1000


async def test_the_timeout(images: FakeImages) -> None:
    images.add("late")
    images.stall_s = 2.0
    with pytest.raises(FetchFailed, match="timed out"):
        await loopback_ok(timeout_s=0.2).fetch(f"{images.url}/slow/late")


async def test_an_error_status_fails(images: FakeImages) -> None:
    with pytest.raises(FetchFailed, match="404"):
        await loopback_ok().fetch(f"{images.url}/missing")


async def test_something_that_is_not_an_image_fails(images: FakeImages) -> None:
    images.content_type = "text/html"
    images.add("page", b"<html>hi</html>")
    with pytest.raises(FetchFailed, match="not an image"):
        await loopback_ok().fetch(f"{images.url}/img/page")


def test_sniffing() -> None:
    assert sniff_image_type(png("x")) == "image/png"
    assert sniff_image_type(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff_image_type(b"GIF89a...") == "image/gif"
    assert sniff_image_type(b"<html>") is None


@pytest.mark.parametrize(
    "url",
    [
        "https://[::1/a.png",  # urlsplit: "Invalid IPv6 URL"
        "https://[not-an-ip]/a.png",
        "https://" + "a" * 64 + ".example/a.png",  # a label IDNA cannot encode
        "https://a..example/a.png",  # an empty label
        "https://.example/a.png",
    ],
)
async def test_a_malformed_url_is_refused_not_raised(url: str) -> None:
    """Every URL a user can send ends in a FetchError (the user is told the image could not
    be read), never a ValueError/UnicodeError that fails the whole entry."""
    with pytest.raises(FetchRefused):
        await ImageFetcher().fetch(url)


async def test_a_redirect_to_a_malformed_url_fails(images: FakeImages) -> None:
    with pytest.raises(FetchFailed, match="malformed"):
        await loopback_ok().fetch(f"{images.url}/redirect?to=https://%5B::1/a.png")


async def test_a_host_that_is_an_ip_literal_only_to_the_connection_is_refused() -> None:
    """`1\\U0001fbf27.0.0.1` (a Unicode "segmented digit 2") is 127.0.0.1 to yarl, which
    aiohttp connects to without any resolver; `urlsplit` saw a name that the system resolver
    asks for as `xn--17-3e23a.0.0.1`. A DNS server that answers every name (a wildcard,
    NXDOMAIN rewriting) gave a public address, the check passed and the bridge connected to
    loopback. The host checked must be the host connected to."""
    accepted: list[object] = []

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        writer.close()

    inside = await asyncio.start_server(connected, "127.0.0.1", 0)
    port = inside.sockets[0].getsockname()[1]

    async def answers_everything(host: str, port_: int) -> list[str]:
        return ["93.184.216.34"]

    fetcher = ImageFetcher(resolve=answers_everything, timeout_s=2, connect_timeout_s=1)
    try:
        with pytest.raises(FetchRefused, match=r"127\.0\.0\.1"):
            await fetcher.fetch(f"https://1\U0001fbf27.0.0.1:{port}/a.png")
    finally:
        inside.close()
        await inside.wait_closed()
    assert accepted == []


async def test_an_internationalised_host_name_is_fetched(images: FakeImages) -> None:
    """Allow-listed and checked in the IDNA form aiohttp connects to (it was checked and
    pinned in Unicode, and the connection, asking for `xn--bcher-kva.test`, always failed)."""
    port = images.url.rsplit(":", 1)[1]
    asked: list[str] = []

    async def resolve(host: str, port_: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    images.add("book")
    fetcher = ImageFetcher(allow_hosts={"Bücher.test"}, resolve=resolve, timeout_s=5)
    fetched = await fetcher.fetch(f"http://bücher.test:{port}/img/book")
    assert fetched.data == png("book")
    assert asked == ["xn--bcher-kva.test"]


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://img.corp.example/a.png", None),  # under the listed domain: http, inside
        ("http://a.b.corp.example/a.png", None),
        ("http://corp.example/a.png", "http to corp.example"),  # the domain itself is not
        ("https://evilcorp.example/a.png", "non-public address"),  # nor a look-alike
    ],
)
async def test_an_allow_list_entry_with_a_leading_dot_lists_the_names_under_it(
    url: str, refused: str | None
) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return ["10.0.0.8"]

    guard = URLGuard(allow_hosts={".Corp.Example"}, resolve=resolve)
    if refused is None:
        assert await guard.check(url) == (URL(url).host, ["10.0.0.8"])
    else:
        with pytest.raises(FetchRefused, match=re.escape(refused)):
            await guard.check(url)


async def test_a_leading_dot_entry_is_spelled_as_hosts_are_and_lists_no_address() -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return ["10.0.0.8"]

    guard = URLGuard(allow_hosts={".Bücher.test", ".0.0.1"}, resolve=resolve)
    assert await guard.check("http://a.bücher.test/x.png") == ("a.xn--bcher-kva.test", ["10.0.0.8"])
    with pytest.raises(FetchRefused, match=re.escape("http to 127.0.0.1")):
        await guard.check("http://127.0.0.1/x.png")
