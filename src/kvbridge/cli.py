"""``kvbridge`` command line: demo, serve, proxy, bench."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# bench name -> module exposing ``main(argv) -> int``; imported only when run.
BENCHMARKS: dict[str, str] = {
    "engine": "kvbridge.bench.engine",
    "offload": "kvbridge.bench.offload",
    "nixl": "kvbridge.bench.nixl",
    "nixl-modes": "kvbridge.bench.nixl_modes",
    "ttft": "kvbridge.bench.ttft",
    "soak": "kvbridge.bench.soak",
    "gpu": "kvbridge.bench.gpu_suite",
    "pd-gpu": "kvbridge.bench.pd_gpu",
}
# command -> module exposing ``main(argv) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("kvbridge.demo", "P/D demo: prefill + decode servers + proxy, checks outputs"),
    "serve": ("kvbridge.serve.cli", "serve one engine over HTTP (/v1/completions)"),
    "proxy": ("kvbridge.serve.proxy_cli", "P/D router in front of prefill and decode servers"),
}


def _run_module(module_name: str, argv: list[str], what: str) -> int:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"kvbridge: '{what}' is not built yet ({module_name} is missing).")
            return 2
        raise
    result: int = module.main(argv)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="kvbridge",
        description="Move paged KV cache blocks between GPU, pinned CPU memory and other engines.",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    sub.add_parser(
        "bench", add_help=False, help=f"benchmarks ({', '.join(BENCHMARKS)}), same-run baselines"
    )
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "bench":
        if not rest or rest[0] not in BENCHMARKS:
            print(f"usage: kvbridge bench {{{','.join(BENCHMARKS)}}} [options]  (NAME --help)")
            return 0 if not rest or rest[0] in ("-h", "--help") else 2
        return _run_module(BENCHMARKS[rest[0]], rest[1:], f"bench {rest[0]}")
    module_name, _ = COMMANDS[args.command]
    return _run_module(module_name, rest, args.command)


if __name__ == "__main__":
    sys.exit(main())
