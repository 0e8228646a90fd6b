"""The client side of ``benchmarks.pd_gpu``: one streamed request, and /metrics deltas."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, NamedTuple

import httpx

from kvbridge.demo.report import Scrape

if TYPE_CHECKING:
    from benchmarks.pd_gpu import Urls

# key -> (D's sample name, its ``key`` label or ""): one request's connector work on D.
_D_SAMPLES: dict[str, tuple[str, str]] = {
    "bytes": ("kvbridge:nixl_bytes_transferred_sum", ""),
    "xfer_s": ("kvbridge:nixl_xfer_time_seconds_sum", ""),
    "post_s": ("kvbridge:nixl_post_time_seconds_sum", ""),
    "descs": ("kvbridge:nixl_num_descriptors_sum", ""),
    "transfers": ("kvbridge:nixl_num_transfers_total", ""),
    "confirm_s": ("kvbridge:connector_samples_sum", "lease_confirm_time_seconds"),
    "stage_in_s": ("kvbridge:connector_samples_sum", "stage_in_time_seconds"),
    "ttft_s": ("kvbridge:time_to_first_token_seconds_sum", ""),  # D: arrival to first token
}
PREFILL_SAMPLE = "kvbridge:proxy_prefill_seconds_sum"
D_KEYS = (*_D_SAMPLES, "prefill_s")


class Completion(NamedTuple):
    """One streamed request as the client saw it."""

    ttft_s: float  # request sent to the first chunk carrying tokens
    tokens: tuple[int, ...]
    external_tokens: int  # prompt tokens whose KV the server loaded (usage details)
    error: str | None = None


def complete(client: httpx.Client, url: str, prompt: list[int], max_tokens: int) -> Completion:
    """POST a greedy, streamed completion of ``prompt`` to ``url``."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens: list[int] = []
    ttft = 0.0
    external = -1
    start = time.perf_counter()
    try:
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return Completion(0.0, (), -1, f"HTTP {r.status_code}: {r.text[:300]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    return Completion(0.0, tuple(tokens), -1, str(event["error"]))
                new = event["choices"][0]["token_ids"] if event.get("choices") else []
                if new and not tokens:
                    ttft = time.perf_counter() - start
                tokens.extend(new)
                usage = event.get("usage")
                if usage:
                    external = int(usage["prompt_tokens_details"]["external_tokens"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        return Completion(0.0, tuple(tokens), -1, f"{type(e).__name__}: {e}")
    return Completion(ttft, tuple(tokens), external)


def metrics_text(client: httpx.Client, url: str) -> str:
    r = client.get(url + "/metrics")
    r.raise_for_status()
    return r.text


def _values(text: str) -> dict[str, float]:
    scrape = Scrape(text)
    return {
        k: scrape.sum(name, key=label) if label else scrape.sum(name)
        for k, (name, label) in _D_SAMPLES.items()
    }


def metric_delta(
    client: httpx.Client, urls: Urls, before: tuple[str, str], timeout_s: float = 5.0
) -> dict[str, float]:
    """What D's connector and the proxy's prefill step counted since ``before`` (D's and the
    proxy's /metrics texts); ``descs`` per READ. Waits briefly for D to count its READ."""
    old = _values(before[0])
    deadline = time.monotonic() + timeout_s
    while True:
        new = _values(metrics_text(client, urls.decode))
        if new["transfers"] > old["transfers"] or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    delta = {k: new[k] - old[k] for k in new}
    if delta["transfers"] > 0:
        delta["descs"] /= delta["transfers"]
    proxy_now = Scrape(metrics_text(client, urls.proxy)).sum(PREFILL_SAMPLE)
    delta["prefill_s"] = proxy_now - Scrape(before[1]).sum(PREFILL_SAMPLE)
    return delta
