"""Proxy server URLs are normalised once and bad ones are named."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from kvbridge.serve.proxy import PDProxy, normalise_url


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("127.0.0.1:8100", "http://127.0.0.1:8100"),
        ("http://127.0.0.1:8100/", "http://127.0.0.1:8100"),
        (" https://p.example:443 ", "https://p.example:443"),
    ],
)
def test_normalise(raw: str, want: str):
    assert normalise_url(raw) == want


@pytest.mark.parametrize("raw", ["ftp://h:1", "http://"])
def test_bad_url_is_named(raw: str):
    with pytest.raises(ValueError, match="server URL"):
        normalise_url(raw)


def test_decode_server_required():
    with pytest.raises(ValueError, match="decode"):
        PDProxy(["127.0.0.1:1"], [], httpx.AsyncClient())


def test_proxy_does_not_import_torch():
    """The proxy process stays light: no engine, no torch."""
    code = (
        "import sys, kvbridge.serve.proxy_cli, kvbridge.serve.proxy, kvbridge.serve.http_server;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
