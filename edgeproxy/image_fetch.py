"""Fetch a client-supplied image URL for a Gemini request, refusing internal targets.

Job: ``fetch_image(session, url)`` returns ``(mime type, bytes)`` of an http(s) image, or
raises ``ImageFetchError`` with a message safe to show the client. SPEC §10: a URL a
client supplied must not reach the relay's own network, and size and time are bounded.

How the target is vetted: the host is resolved once with ``loop.getaddrinfo``; if any
address it resolves to is private, loopback, link-local, multicast, reserved or
unspecified (IPv4 embedded in IPv6 included), the fetch is refused. The request then
goes to that vetted IP itself, with the original ``Host`` header and, for https, the
original name as ``server_hostname`` (TLS SNI and certificate check). Connecting by IP is
what defeats DNS rebinding: nothing resolves the name a second time, so a short-TTL
record cannot swap in an internal address between the check and the connection.
Redirects are followed by hand, at most ``MAX_REDIRECTS``, each hop vetted the same way.

It must not: follow a redirect unvetted, read more than ``max_bytes``, run past
``timeout_s`` in all, or put an address, a resolver error or a stack trace in a message.
This module does I/O with aiohttp, so only ``proxy.py`` imports it (same layer).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import aiohttp
from yarl import URL

MAX_REDIRECTS = 3  # image CDNs redirect once or twice; more is a loop or a probe
READ_CHUNK = 64 * 1024
REDIRECTS = frozenset({301, 302, 303, 307, 308})

# NAT64 (RFC 6052) maps IPv4 into IPv6; Python counts 64:ff9b::/96 as global.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class ImageFetchError(Exception):
    """An image URL could not be fetched; ``message`` is safe to show the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def is_public_address(address: str) -> bool:
    """True when ``address`` is a globally routable unicast IP (IPv4 inside IPv6 checked)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return is_public_address(str(embedded))
    return ip.is_global and not ip.is_multicast


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client's address
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


async def fetch_image(
    session: aiohttp.ClientSession,
    url: str,
    *,
    max_bytes: int = 10 * 1024 * 1024,
    timeout_s: float = 10.0,
    allow_private: bool = False,
) -> tuple[str, bytes]:
    """(mime type, bytes) of the image at ``url``; raises ``ImageFetchError``."""
    try:
        async with asyncio.timeout(timeout_s):
            target = _parse(url)
            for _ in range(MAX_REDIRECTS + 1):
                address = await _resolve(target, allow_private)
                location = await _get(session, target, address, max_bytes)
                if isinstance(location, tuple):
                    return location
                target = _parse(str(target.join(location)))
            raise ImageFetchError("image URL redirected too many times")
    except TimeoutError:
        raise ImageFetchError("image URL took too long to fetch") from None
    except aiohttp.ClientError:
        raise ImageFetchError("image URL could not be fetched") from None


def _parse(url: str) -> URL:
    try:
        target = URL(url)
    except (ValueError, TypeError):
        raise ImageFetchError("image URL is not a valid URL") from None
    if target.scheme not in ("http", "https") or not target.raw_host:
        raise ImageFetchError("image URL must be http or https")
    if target.user is not None or target.password is not None:
        raise ImageFetchError("image URL must not carry credentials")
    return target


async def _resolve(target: URL, allow_private: bool) -> str:
    """The address to connect to, after vetting every address the host resolves to."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            target.raw_host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except (OSError, UnicodeError):
        raise ImageFetchError("image URL host could not be resolved") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise ImageFetchError("image URL host could not be resolved")
    if not allow_private and not all(is_public_address(a) for a in addresses):
        raise ImageFetchError("image URL points to a private or reserved address")
    return addresses[0]


async def _get(
    session: aiohttp.ClientSession, target: URL, address: str, max_bytes: int
) -> tuple[str, bytes] | URL:
    """One request pinned to ``address``: the image, or the redirect's Location."""
    headers = {
        "Host": target.host_port_subcomponent or target.raw_host or "",
        "Accept": "image/*",
        "Accept-Encoding": "identity",  # the session may not decompress
    }
    async with session.get(
        target.with_host(address.split("%", 1)[0]),
        headers=headers,
        allow_redirects=False,
        server_hostname=target.raw_host if target.scheme == "https" else None,
    ) as response:
        if response.status in REDIRECTS and response.headers.get("Location"):
            return URL(response.headers["Location"])
        if response.status != 200:
            raise ImageFetchError(f"image URL answered HTTP {response.status}")
        mime = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if not mime.startswith("image/"):
            raise ImageFetchError("image URL did not return an image")
        return mime, await _read_capped(response, max_bytes)


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    too_big = ImageFetchError(f"image is larger than {max_bytes} bytes")
    if response.content_length is not None and response.content_length > max_bytes:
        raise too_big
    body = bytearray()
    async for chunk in response.content.iter_chunked(READ_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise too_big
    return bytes(body)
