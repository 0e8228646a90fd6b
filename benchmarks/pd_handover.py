"""P/D time to first token through the proxy: ``python -m benchmarks.pd_handover``.

Starts a prefill server (P), a decode server (D), both ``kvbridge serve`` with NixlConnector
over real NIXL, and ``kvbridge proxy`` as subprocesses running the code under ``--src``
(default: this checkout's ``src``; point it at an older checkout's ``src`` for a "before"
column). Then, per round and prompt length, with fresh random prompts (no prefix hit anywhere):

- *P alone*: a streamed request straight to P (``max_tokens`` 1): when its first token's event
  reaches the client. This is when P has its first token, plus one local HTTP hop.
- *P/D*: a streamed request through the proxy (``max_tokens`` N): when the first token's event
  and the second token's event reach the client.

Handover overhead = P/D TTFT - P-alone TTFT (p50 of each, and p50 of the paired differences of
adjacent rounds). Rounds alternate the two kinds so load on the box hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import httpx

REPO = Path(__file__).resolve().parents[1]


class Row(NamedTuple):
    prompt_len: int
    p_alone_ms: list[float]
    pd_first_ms: list[float]
    pd_second_ms: list[float]

    def summary(self) -> dict[str, float]:
        diffs = [a - b for a, b in zip(self.pd_first_ms, self.p_alone_ms, strict=True)]
        return {
            "prompt_len": self.prompt_len,
            "p_alone_p50_ms": statistics.median(self.p_alone_ms),
            "pd_ttft_p50_ms": statistics.median(self.pd_first_ms),
            "pd_second_token_p50_ms": statistics.median(self.pd_second_ms),
            "overhead_p50_ms": statistics.median(self.pd_first_ms)
            - statistics.median(self.p_alone_ms),
            "paired_overhead_p50_ms": statistics.median(diffs),
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _nixl(role: str) -> str:
    extra = {"side_channel_host": "127.0.0.1", "side_channel_port": 0}
    return json.dumps({"kv_connector": "NixlConnector", "kv_role": role,
                       "kv_connector_extra_config": extra})  # fmt: skip


@contextmanager
def stack(src: Path, model: str, blocks: int, log_dir: Path) -> Iterator[dict[str, str]]:
    """P, D and the proxy; yields their URLs once all answer ``/health``."""
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    ports = {name: _free_port() for name in ("p", "d", "proxy")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    serve = [sys.executable, "-m", "kvbridge.cli", "serve", "--model", model,
             "--num-gpu-blocks", str(blocks)]  # fmt: skip
    argv = {
        "p": [*serve, "--port", str(ports["p"]), "--kv-transfer-config", _nixl("kv_producer")],
        "d": [*serve, "--port", str(ports["d"]), "--kv-transfer-config", _nixl("kv_consumer")],
        "proxy": [
            sys.executable,
            "-m",
            "kvbridge.cli",
            "proxy",
            "--port",
            str(ports["proxy"]),
            "--prefill",
            urls["p"],
            "--decode",
            urls["d"],
        ],
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, args in argv.items():
            log = (log_dir / f"{name}.log").open("wb")
            procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        with httpx.Client(timeout=2, trust_env=False) as client:
            for url in urls.values():
                while True:
                    try:
                        if client.get(url + "/health").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                        raise RuntimeError(f"servers did not start; logs in {log_dir}")
                    time.sleep(0.2)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _token_times(client: httpx.Client, url: str, body: dict[str, Any]) -> list[float]:
    """Seconds from sending to each streamed event that carries a token (choice 0)."""
    start = time.monotonic()
    times: list[float] = []
    with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            ids = choices[0].get("token_ids") if choices else None
            now = time.monotonic() - start
            times.extend(now for _ in ids or ())
    return times


def measure(
    urls: dict[str, str], lengths: Sequence[int], rounds: int, max_tokens: int, warmup: int
) -> list[Row]:
    rng = random.Random(0)
    rows = []
    with httpx.Client(timeout=120, trust_env=False) as client:
        for length in lengths:
            row = Row(length, [], [], [])
            for i in range(warmup + rounds):
                base = {"temperature": 0, "ignore_eos": True}
                alone = [rng.randrange(512) for _ in range(length)]
                pd = [rng.randrange(512) for _ in range(length)]
                t_alone = _token_times(client, urls["p"], {**base, "prompt": alone,
                                                           "max_tokens": 1})  # fmt: skip
                t_pd = _token_times(client, urls["proxy"], {**base, "prompt": pd,
                                                            "max_tokens": max_tokens})  # fmt: skip
                if i >= warmup:
                    row.p_alone_ms.append(1e3 * t_alone[0])
                    row.pd_first_ms.append(1e3 * t_pd[0])
                    row.pd_second_ms.append(1e3 * t_pd[1])
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=REPO / "src", help="kvbridge sources to run")
    parser.add_argument("--model", default="small")
    parser.add_argument("--lengths", default="128,1024", help="prompt lengths, comma-separated")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=512, help="KV blocks per server")
    parser.add_argument("--logs", type=Path, default=Path("/tmp/kvbridge-pd-handover"))
    parser.add_argument("--json", action="store_true", help="print one JSON line per length")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    with stack(args.src.resolve(), args.model, args.blocks, args.logs) as urls:
        rows = measure(urls, lengths, args.rounds, args.max_tokens, args.warmup)
    print(f"src {args.src}, model {args.model}, {args.rounds} rounds per length")
    head = ("prompt", "P alone p50", "P/D TTFT p50", "P/D 2nd token p50", "overhead p50",
            "paired overhead p50")  # fmt: skip
    print(" | ".join(head))
    for row in rows:
        s = row.summary()
        if args.json:
            print(json.dumps(s))
        print(f"{s['prompt_len']} | {s['p_alone_p50_ms']:.1f} ms | {s['pd_ttft_p50_ms']:.1f} ms | "
              f"{s['pd_second_token_p50_ms']:.1f} ms | {s['overhead_p50_ms']:.1f} ms | "
              f"{s['paired_overhead_p50_ms']:.1f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
