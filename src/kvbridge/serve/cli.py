"""``kvbridge serve``: one engine behind the OpenAI-style HTTP API."""

from __future__ import annotations

import argparse
import logging
import sys

from kvbridge.config import ConfigError
from kvbridge.serve.config_file import load_serve_config

logger = logging.getLogger(__name__)

EPILOG = """\
Flags override the config file. Example:
  kvbridge serve --model tiny --port 8100 \\
    --kv-transfer-config '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'
A config file (YAML or JSON) holds the same keys, e.g. `model: tiny`, `num_gpu_blocks: 512`,
`kv_transfer_config: {kv_connector: MultiConnector, ...}`. Port 0 picks a free port; the
address is printed once the server listens."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvbridge serve",
        description=(
            "Serve one engine: POST /v1/completions, POST /v1/chat/completions,\n"
            "GET /v1/models, GET /health, GET /metrics."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--config", metavar="FILE", help="YAML or JSON config file")
    add("--model", help="named config (tiny, small, ...) or HF checkpoint dir (default tiny)")
    add("--host", help="bind address (default 127.0.0.1)")
    add("--port", type=int, help="port (default 8000; 0 = any free port)")
    add("--device", help="cpu or cuda (default cpu)")
    add("--dtype", help="float32, float16 or bfloat16")
    add("--seed", type=int, help="weight seed for random models (default 0)")
    add("--num-gpu-blocks", type=int, metavar="N", help="KV cache blocks")
    add("--block-size", type=int, metavar="N", help="tokens per KV block (default 16)")
    add("--max-num-seqs", type=int, metavar="N", help="max requests per step")
    add("--kv-transfer-config", metavar="JSON", help="connector config (vLLM format)")
    add("--served-model-name", metavar="NAME", help="model name in responses")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        config = load_serve_config(args.config, flags)
        from kvbridge.serve.http_server import serve_forever
        from kvbridge.serve.server import build_server

        parts = build_server(config)
    except (ConfigError, ValueError, OSError) as e:
        print(f"kvbridge serve: error: {e}", file=sys.stderr)
        return 2

    def ready(url: str) -> None:
        connector = config.kv_transfer_config
        name = connector.kv_connector if connector else "no connector"
        print(f"kvbridge serve: {config.model_name} ({name}) listening on {url}", flush=True)

    try:
        serve_forever(parts.app, config.host, config.port, ready)
    except OSError as e:
        print(f"kvbridge serve: error: cannot listen on {config.host}:{config.port}: {e}",
              file=sys.stderr)  # fmt: skip
        parts.loop.shutdown()
        return 1
    return 0
