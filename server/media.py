"""Images for chat requests: data: URIs, http(s) URLs fetched safely, and local files.

URL fetching is an SSRF surface, so by default: connect and total timeouts, a byte cap, a
redirect cap, and no private, loopback, link-local (cloud metadata at 169.254.169.254 included),
reserved or multicast address, checked after DNS resolution and again on every redirect.
On-prem deployments allow specific hosts or private networks by flag. Local files are read only
under an explicitly allowed folder. Decoding runs off the event loop, with a pixel cap checked
from the header before decoding.

NOTE: the address is checked after resolving and then httpx resolves again to connect; a DNS
answer that changes in between (rebinding) is not caught. Deployments that must exclude it
should also block egress to private ranges at the network level.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image

from model.processor import DEFAULT_MAX_IMAGE_PIXELS, PromptError, open_image
from server.conversation import decode_data_uri
from server.errors import APIError, bad_request


@dataclass(frozen=True)
class MediaConfig:
    fetch_timeout_s: float = 10.0  # whole fetch, redirects included
    connect_timeout_s: float = 3.0
    max_image_bytes: int = 20 * 2**20  # fetched or inline
    max_redirects: int = 3
    allow_private_networks: bool = False  # on-prem: allow every private / loopback address
    allowed_hosts: tuple[str, ...] = ()  # on-prem: hosts allowed whatever they resolve to
    local_image_dir: str | None = None  # file paths are refused unless under this folder
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast
                or ip.is_unspecified)  # fmt: skip


class ImageFetcher:
    def __init__(self, config: MediaConfig, transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        timeout = httpx.Timeout(config.fetch_timeout_s, connect=config.connect_timeout_s)
        self.client = httpx.AsyncClient(timeout=timeout, follow_redirects=False, transport=transport)
        self.fetch_seconds: list[float] = []  # drained by the metrics

    async def close(self) -> None:
        await self.client.aclose()

    async def load(self, url: str) -> Image.Image:
        start = time.perf_counter()
        if url.startswith("data:"):
            try:
                data = decode_data_uri(url)
            except PromptError as err:
                raise bad_request(str(err), "messages.content.image_url.url", "invalid_image") from err
        elif url.startswith(("http://", "https://")):
            try:
                data = await asyncio.wait_for(self._fetch(url), self.config.fetch_timeout_s)
            except (TimeoutError, httpx.TimeoutException) as err:
                raise bad_request(f"fetching the image timed out after {self.config.fetch_timeout_s} s",
                                  "messages.content.image_url.url", "image_fetch_timeout") from err  # fmt: skip
            except httpx.HTTPError as err:
                raise bad_request(f"fetching the image failed: {err}", "messages.content.image_url.url",
                                  "image_fetch_failed") from err  # fmt: skip
        else:
            data = self._read_local(url)
        if len(data) > self.config.max_image_bytes:
            raise APIError(413, f"image of {len(data)} bytes exceeds {self.config.max_image_bytes}",
                           "messages.content.image_url.url", "image_too_large")  # fmt: skip
        try:
            image = await asyncio.to_thread(open_image, data, self.config.max_image_pixels)
        except PromptError as err:
            raise bad_request(str(err), "messages.content.image_url.url", "invalid_image") from err
        self.fetch_seconds.append(time.perf_counter() - start)
        return image

    async def _fetch(self, url: str) -> bytes:
        for _ in range(self.config.max_redirects + 1):
            await self._check_destination(url)
            async with self.client.stream("GET", url) as response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise bad_request(f"image URL answered HTTP {response.status_code}",
                                      "messages.content.image_url.url", "image_fetch_failed")  # fmt: skip
                declared = int(response.headers.get("content-length") or 0)
                if declared > self.config.max_image_bytes:
                    raise APIError(413, f"image of {declared} bytes exceeds {self.config.max_image_bytes}",
                                   "messages.content.image_url.url", "image_too_large")  # fmt: skip
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.config.max_image_bytes:
                        raise APIError(413, f"image exceeds {self.config.max_image_bytes} bytes",
                                       "messages.content.image_url.url", "image_too_large")  # fmt: skip
                    chunks.append(chunk)
                return b"".join(chunks)
        raise bad_request(f"image URL redirected more than {self.config.max_redirects} times",
                          "messages.content.image_url.url", "too_many_redirects")  # fmt: skip

    async def _check_destination(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad_request(f"image URL must be http(s) with a host, got {url[:100]!r}",
                              "messages.content.image_url.url", "invalid_image_url")  # fmt: skip
        host = parts.hostname
        if self.config.allow_private_networks or host in self.config.allowed_hosts:
            return
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise bad_request(f"image host {host!r} does not resolve", "messages.content.image_url.url",
                              "image_fetch_failed") from err  # fmt: skip
        for info in infos:
            if not is_public_address(info[4][0]):
                raise bad_request(f"image URL host {host!r} resolves to a private or local address; refused",
                                  "messages.content.image_url.url", "image_url_forbidden")  # fmt: skip

    def _read_local(self, url: str) -> bytes:
        root = self.config.local_image_dir
        if root is None:
            raise bad_request("image_url must be a data: URI or an http(s) URL (local files are not enabled)",
                              "messages.content.image_url.url", "invalid_image_url")  # fmt: skip
        path = Path(url.removeprefix("file://")).resolve()
        if not path.is_relative_to(Path(root).resolve()) or not path.is_file():
            raise bad_request("image file not found under the allowed folder", "messages.content.image_url.url",
                              "invalid_image_url")  # fmt: skip
        return path.read_bytes()
