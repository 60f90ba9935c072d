import asyncio

import pytest

from server.errors import APIError
from server.media import ImageFetcher, MediaConfig, is_public_address
from tests.server.live_server import ImageHost, png_bytes


@pytest.fixture(scope="module")
def host():
    image_host = ImageHost()
    yield image_host
    image_host.close()


def load(config: MediaConfig, url: str):
    async def run():
        fetcher = ImageFetcher(config)
        try:
            return await fetcher.load(url)
        finally:
            await fetcher.close()

    return asyncio.run(run())


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("172.16.5.4", False),
        ("169.254.169.254", False),
        ("::1", False),
        ("fe80::1", False),
        ("::ffff:127.0.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("2606:4700::1111", True),
    ],
)
def test_address_classes(address, public):
    assert is_public_address(address) is public


def test_redirect_to_a_private_address_is_checked_again(host):
    """localhost is allowed by name; its redirect to 127.0.0.1 is checked as a new destination."""
    port = host.url.rsplit(":", 1)[1]
    config = MediaConfig(allowed_hosts=("localhost",))
    assert load(config, f"http://localhost:{port}/red.png").size == (40, 30)
    with pytest.raises(APIError) as err:
        load(config, f"http://localhost:{port}/redirect?to=http://127.0.0.1:{port}/red.png")
    assert err.value.code == "image_url_forbidden"


def test_redirect_cap(host):
    chain = f"{host.url}/red.png"
    for _ in range(3):
        chain = f"{host.url}/redirect?to={chain}"
    with pytest.raises(APIError) as err:
        load(MediaConfig(allow_private_networks=True, max_redirects=2), chain)
    assert err.value.code == "too_many_redirects"
    assert load(MediaConfig(allow_private_networks=True, max_redirects=3), chain).size == (40, 30)


def test_byte_cap_and_pixel_cap(host):
    with pytest.raises(APIError) as err:
        load(MediaConfig(allow_private_networks=True, max_image_bytes=100), f"{host.url}/red.png")
    assert err.value.status == 413
    with pytest.raises(APIError) as err:
        load(MediaConfig(allow_private_networks=True, max_image_pixels=100), f"{host.url}/red.png")
    assert err.value.code == "invalid_image" and "exceeds" in err.value.message


def test_local_files_only_under_the_allowed_folder(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    config = MediaConfig(local_image_dir=str(tmp_path / "ok"))
    assert load(config, str(tmp_path / "ok" / "a.png")).size == (40, 30)
    for url in (str(tmp_path / "secret.png"), f"{tmp_path}/ok/../secret.png", f"file://{tmp_path}/secret.png"):
        with pytest.raises(APIError):
            load(config, url)
    with pytest.raises(APIError, match="not enabled"):
        load(MediaConfig(), str(tmp_path / "ok" / "a.png"))
