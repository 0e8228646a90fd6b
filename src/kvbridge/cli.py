"""``kvbridge`` command line: demo, serve, proxy, bench.

``--log-level LEVEL`` goes before the command or anywhere among its arguments (before a
``--``): ``kvbridge --log-level INFO serve`` and ``kvbridge serve --log-level INFO`` alike.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# bench name -> module exposing ``main(argv) -> int``; imported only when run. These check a
# machine's links; development benchmarks live in the repository's benchmarks/.
BENCHMARKS: dict[str, str] = {
    "engine": "kvbridge.bench.engine",
    "offload": "kvbridge.bench.offload",
    "nixl": "kvbridge.bench.nixl",
    "disk": "kvbridge.bench.disk",
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# command -> module exposing ``main(argv) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("kvbridge.demo", "P/D demo: prefill + decode servers + proxy, checks outputs"),
    "serve": ("kvbridge.serve.cli", "serve one engine over HTTP (/v1/completions)"),
    "proxy": ("kvbridge.serve.proxy_cli", "P/D router in front of prefill and decode servers"),
}


def _run_module(module_name: str, argv: list[str]) -> int:
    result: int = importlib.import_module(module_name).main(argv)
    return result


def take_log_level(args: list[str]) -> tuple[str | None, list[str]]:
    """A command's arguments without ``--log-level X`` / ``--log-level=X`` (the last one wins),
    and that level; arguments after ``--`` are left alone."""
    level, out, i = None, [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        if arg == "--log-level" and i + 1 < len(args):
            level, i = args[i + 1], i + 2
            continue
        if arg.startswith("--log-level="):
            level, i = arg.split("=", 1)[1], i + 1
            continue
        out.append(arg)
        i += 1
    return level, out


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown level {value!r} (one of {', '.join(LOG_LEVELS)})"
        )
    return level


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="kvbridge",
        description="Move paged KV cache blocks between GPU, pinned CPU memory and other engines.",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=_log_level,
        help="logging level (default WARNING); also accepted after the command",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    sub.add_parser(
        "bench", add_help=False, help=f"benchmarks ({', '.join(BENCHMARKS)}), same-run baselines"
    )
    args, rest = parser.parse_known_args(argv)
    if rest[-1:] == ["--log-level"]:
        parser.error("argument --log-level: expected one argument")
    level, rest = take_log_level(rest)
    try:
        args.log_level = args.log_level if level is None else _log_level(level)
    except argparse.ArgumentTypeError as e:
        parser.error(f"argument --log-level: {e}")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(args.log_level)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "bench":
        if not rest or rest[0] not in BENCHMARKS:
            print(f"usage: kvbridge bench {{{','.join(BENCHMARKS)}}} [options]  (NAME --help)")
            print("development benchmarks: python -m benchmarks.NAME, in a checkout of kvbridge")
            return 0 if not rest or rest[0] in ("-h", "--help") else 2
        return _run_module(BENCHMARKS[rest[0]], rest[1:])
    module_name, _ = COMMANDS[args.command]
    return _run_module(module_name, rest)


if __name__ == "__main__":
    sys.exit(main())
