"""``kvbridge`` itself: ``--log-level`` before or after any command, and what INFO shows."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from kvbridge import cli
from kvbridge.nixl.handshake import HandshakeListener


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, list[str]]]]:
    """The (module, argv) each command would run with; the root level is restored after."""
    calls: list[tuple[str, list[str]]] = []

    def run(module: str, argv: list[str]) -> int:
        calls.append((module, argv))
        return 0

    monkeypatch.setattr(cli, "_run_module", run)
    root = logging.getLogger()
    level = root.level
    yield calls
    root.setLevel(level)


@pytest.mark.parametrize(
    ("argv", "module", "rest"),
    [
        (["--log-level", "INFO", "serve", "--port", "0"], "kvbridge.serve.cli", ["--port", "0"]),
        (["serve", "--log-level", "INFO", "--port", "0"], "kvbridge.serve.cli", ["--port", "0"]),
        (["serve", "--port", "0", "--log-level=info"], "kvbridge.serve.cli", ["--port", "0"]),
        (["proxy", "--log-level", "INFO"], "kvbridge.serve.proxy_cli", []),
        (["demo", "--log-level", "INFO", "--keep-logs"], "kvbridge.demo", ["--keep-logs"]),
        (
            ["bench", "nixl", "--log-level", "INFO", "--iters", "3"],
            "kvbridge.bench.nixl",
            ["--iters", "3"],
        ),
        (["bench", "--log-level", "INFO", "nixl"], "kvbridge.bench.nixl", []),
    ],
)
def test_log_level_is_accepted_before_or_after_every_command(
    ran: list[tuple[str, list[str]]], argv: list[str], module: str, rest: list[str]
) -> None:
    """``kvbridge serve --log-level INFO`` was handed to serve's parser, which refused it."""
    assert cli.main(argv) == 0
    assert ran == [(module, rest)]
    assert logging.getLogger().level == logging.INFO


def test_the_commands_level_wins_and_arguments_after_a_double_dash_are_left_alone(
    ran: list[tuple[str, list[str]]],
) -> None:
    argv = ["--log-level", "ERROR", "serve", "--log-level", "DEBUG", "--", "--log-level", "X"]
    assert cli.main(argv) == 0
    assert ran == [("kvbridge.serve.cli", ["--", "--log-level", "X"])]
    assert logging.getLogger().level == logging.DEBUG


@pytest.mark.parametrize("argv", [["serve", "--log-level", "LOUD"], ["serve", "--log-level"]])
def test_a_bad_or_missing_level_is_a_usage_error_naming_the_option(
    ran: list[tuple[str, list[str]]], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and ran == []
    assert "--log-level" in capsys.readouterr().err


def test_the_side_channel_port_picked_for_port_0_is_logged_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="kvbridge.nixl.handshake"):
        listener = HandshakeListener("127.0.0.1", 0, b"", "hash")
        listener.close()
    (record,) = [r for r in caplog.records if "side channel listening" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert f"127.0.0.1:{listener.port} (a free port: side_channel_port 0)" in record.getMessage()
