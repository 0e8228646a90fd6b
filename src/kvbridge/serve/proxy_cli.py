"""``kvbridge proxy``: the prefill/decode router."""

from __future__ import annotations

import argparse
import sys

from kvbridge.config import ConfigError
from kvbridge.serve.config_file import ProxyConfig

EPILOG = """\
Each request goes to a prefill server (max_tokens 1, do_remote_decode), then to a decode
server with the returned kv_transfer_params; several servers of a kind are used round-robin.
If the prefill server is down or answers 5xx, the decode server computes the prompt itself.
Example:
  kvbridge proxy --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 --port 8000
A config file (YAML or JSON) holds the same keys: prefill: [URL, ...], decode: [URL, ...],
host, port, timeout_s."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvbridge proxy",
        description=(
            "Route /v1/completions and /v1/chat/completions through prefill and decode "
            "servers (P/D)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--config", metavar="FILE", help="YAML or JSON config file")
    add("--prefill", action="append", metavar="URL", help="prefill server (repeatable)")
    add("--decode", action="append", metavar="URL", help="decode server (repeatable)")
    add("--host", help="bind address (default 127.0.0.1)")
    add("--port", type=int, help="port (default 8000; 0 = any free port)")
    add("--timeout", dest="timeout_s", type=float, metavar="S", help="upstream timeout (600)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        config = ProxyConfig.load(args.config, flags)
        from kvbridge.serve.http_server import serve_forever
        from kvbridge.serve.proxy import build_proxy_app

        app = build_proxy_app(
            config.prefill,
            config.decode,
            timeout_s=config.timeout_s,
            max_body_bytes=config.max_body_bytes,
        )
    except (ConfigError, ValueError) as e:
        print(f"kvbridge proxy: error: {e}", file=sys.stderr)
        return 2

    def ready(url: str) -> None:
        print(
            f"kvbridge proxy: listening on {url} (prefill: {', '.join(config.prefill) or '-'}; "
            f"decode: {', '.join(config.decode)})",
            flush=True,
        )

    try:
        serve_forever(app, config.host, config.port, ready)
    except OSError as e:
        print(f"kvbridge proxy: error: cannot listen on {config.host}:{config.port}: {e}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0
