"""``kvbridge serve`` / ``kvbridge proxy``: help fits a screen, config errors name the key,
and the real commands serve until SIGTERM."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kvbridge.cli import main as kvbridge_main
from kvbridge.serve import cli as serve_cli
from kvbridge.serve import proxy_cli

SCREEN_LINES = 40


@pytest.mark.parametrize("parser", [serve_cli.build_parser(), proxy_cli.build_parser()])
def test_help_fits_on_one_screen(parser):  # type: ignore[no-untyped-def]
    text = parser.format_help()
    assert len(text.splitlines()) <= SCREEN_LINES
    assert max(len(line) for line in text.splitlines()) <= 100


def test_serve_config_error_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "serve.yaml"
    path.write_text("model: tiny\nnum_gpu_blocks: many\n")
    assert kvbridge_main(["serve", "--config", str(path)]) == 2
    assert "num_gpu_blocks: expected int" in capsys.readouterr().err


def test_serve_bad_transfer_config_flag(capsys: pytest.CaptureFixture[str]):
    assert serve_cli.main(["--kv-transfer-config", '{"kv_connector": "Nope"}']) == 2
    assert "kv_connector: unknown connector 'Nope'" in capsys.readouterr().err


def test_proxy_needs_a_decode_server(capsys: pytest.CaptureFixture[str]):
    assert proxy_cli.main(["--prefill", "http://127.0.0.1:1"]) == 2
    assert "decode: at least one" in capsys.readouterr().err


def _start(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Start ``kvbridge ARGS --port 0`` and return it with the URL it prints when ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvbridge.cli", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    seen: list[str] = []
    while time.monotonic() < deadline:
        if not sel.select(timeout=deadline - time.monotonic()):
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise AssertionError(f"{args[0]} did not report its address: {''.join(seen)}")


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM: graceful shutdown, then uvicorn re-raises the signal (exit status -SIGTERM)."""
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out and "ERROR" not in out, out


def test_serve_and_proxy_processes():
    serve, serve_url = _start(["serve", "--model", "tiny", "--num-gpu-blocks", "32"])
    try:
        proxy, proxy_url = _start(["proxy", "--decode", serve_url])
        try:
            body = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
            r = httpx.post(proxy_url + "/v1/completions", json=body, timeout=60, trust_env=False)
            assert r.status_code == 200, r.text
            assert len(r.json()["choices"][0]["token_ids"]) == 2
        finally:
            _stop(proxy)
    finally:
        _stop(serve)
