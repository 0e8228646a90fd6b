"""P/D with real ``vllm serve`` processes, started with the README's own lines (issue #14, test 2).

P and D run kvbridge's MultiConnector (NixlConnector + SimpleCPUOffloadConnector) exactly as the
README's "both" lines say; D pulls P's blocks over real UCX. The oracle: per-token
log-probabilities of the greedy tokens (completions ``logprobs``) against a single vLLM — P
itself, asked without ``kv_transfer_params`` and with a ``cache_salt`` so that it computes the
whole prompt afresh — within ``TOL`` nats. The tests run in file order: the last one kills P.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from serve_harness import (
    README_MODEL,
    README_PORTS,
    REPO,
    Greedy,
    Server,
    bin_env,
    free_port,
    greedy,
    kv_config,
    max_gap,
    metric,
    oracle,
    readme_commands,
    substitute,
    wait_ready,
    with_kv_config,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]  # engines start slowly on 2 cores

# bf16 KV, same kernels: P/D matched the single engine to the last bit in every run here; the
# tolerance leaves room for kernel-order rounding, far below what wrong KV does (> 0.5 nats).
TOL = 0.02
MAX_TOKENS = 8
# D's NIXL transfer_timeout_s (README default 30 s): slack for loaded CI boxes; a dead P is
# detected by its closed side channel, well before this
TRANSFER_TIMEOUT_S = 60
STARTUP_S = 300  # deadline for both engines to answer /health (about 40 s on an idle 2-core box)
SOURCE = "vllm:prompt_tokens_by_source_total"
OTHER_MODEL = README_MODEL + "-seed1"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"f": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "f"}},
    "loggers": {
        name: {"handlers": ["out"], "level": "INFO", "propagate": False}
        for name in ("vllm", "kvbridge")
    },
}


@dataclass
class Stack:
    p_server: Server
    d_server: Server
    proxy_server: Server
    p_url: str
    d_url: str
    proxy_url: str
    client: httpx.Client
    other_server: Server  # a second P: README's line on a checkpoint of other weights (seed 1)
    other_url: str

    def complete(self, url: str, prompt: str | list[int], **fields: Any) -> dict[str, Any]:
        body = {
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": 5,
            "return_tokens_as_token_ids": True,
            **fields,
        }
        r = self.client.post(url + "/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def reference(self, prompt: str | list[int], salt: str) -> Greedy:
        """The single-vLLM answer: P, no kv_transfer_params, its caches bypassed by the salt."""
        return greedy(self.complete(self.p_url, prompt, cache_salt=salt))

    def prefill_params(self, prompt: str | list[int], url: str = "") -> dict[str, Any]:
        """What the proxy does first: P computes the prompt and returns D's params."""
        body = self.complete(
            url or self.p_url,
            prompt,
            max_tokens=1,
            logprobs=None,
            kv_transfer_params={"do_remote_decode": True},
        )
        params = body["kv_transfer_params"]
        assert params["do_remote_prefill"] is True, params
        return params

    def sources(self) -> dict[str, float]:
        return {
            s: metric(self.client, self.d_url, SOURCE, source=s)
            for s in ("local_compute", "local_cache_hit", "external_kv_transfer")
        }


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def _wait_metric_change(stack: Stack, before: dict[str, float]) -> dict[str, float]:
    """D's per-source counters once they moved (vLLM records them just after answering)."""
    deadline = time.monotonic() + 10
    while True:
        after = stack.sources()
        if after != before or time.monotonic() > deadline:
            return _delta(after, before)
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("pd-serve")
    cmds = readme_commands()
    ports = {name: free_port() for name in README_PORTS}
    values: dict[str, str | int] = {README_MODEL: str(root / "tiny-llama")}
    values.update({str(README_PORTS[name]): port for name, port in ports.items()})
    setup = "\n".join(substitute(c, values) for c in cmds.setup)
    (root / "logging.json").write_text(json.dumps(LOGGING))
    env = bin_env(VLLM_LOGGING_CONFIG_PATH=str(root / "logging.json"))
    for model, seed in ((README_MODEL, 0), (OTHER_MODEL, 1)):
        line = substitute(cmds.checkpoint, {README_MODEL: str(root / model.split("/")[-1])})
        made = subprocess.run(
            ["bash", "-c", f"{setup}\n{line} --seed {seed}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert made.returncode == 0, made.stdout + made.stderr

    p_cmd = cmds.server("KVBridgeMultiConnector", "kv_producer")
    d_cmd = cmds.server("KVBridgeMultiConnector", "kv_consumer")
    d_config = kv_config(d_cmd)
    assert d_config["kv_load_failure_policy"] == "recompute", "README: D should recompute"
    (nixl,) = (
        c for c in d_config["kv_connector_extra_config"]["connectors"]
        if c["kv_connector"] == "NixlConnector"
    )  # fmt: skip
    nixl.setdefault("kv_connector_extra_config", {})["transfer_timeout_s"] = TRANSFER_TIMEOUT_S
    d_cmd = with_kv_config(d_cmd, d_config)
    other = {
        README_MODEL: str(root / OTHER_MODEL.split("/")[-1]),
        str(README_PORTS["prefill"]): free_port(),
        str(README_PORTS["side_channel"]): free_port(),
    }
    raw_setup = "\n".join(cmds.setup)
    other_script = f"{substitute(raw_setup, other)}\n{substitute(p_cmd, other)}"
    other_url = f"http://127.0.0.1:{other[str(README_PORTS['prefill'])]}"

    servers: list[Server] = []
    try:
        for name, cmd in (("prefill", p_cmd), ("decode", d_cmd)):
            script = f"{setup}\n{substitute(cmd, values)}"
            servers.append(Server(name, script, root / f"{name}.log", env))
        # the second P starts with them and sleeps (SIGSTOP) until the test that needs it: an
        # idle NIXL agent keeps a core busy polling, three on a 2-core box slow all down
        other = Server("prefill-other-weights", other_script, root / "other.log", env)
        servers.append(other)
        p_url, d_url = f"http://127.0.0.1:{ports['prefill']}", f"http://127.0.0.1:{ports['decode']}"
        wait_ready([(servers[0], p_url), (servers[1], d_url), (other, other_url)], STARTUP_S)
        other.pause()
        proxy_cmd = substitute(cmds.proxy, values)
        proxy = Server("proxy", proxy_cmd, root / "proxy.log", env)
        servers.append(proxy)
        proxy_url = f"http://127.0.0.1:{ports['proxy']}"
        wait_ready([(proxy, proxy_url)], 60)
        with httpx.Client(timeout=120, trust_env=False) as client:
            yield Stack(
                servers[0], servers[1], proxy, p_url, d_url, proxy_url, client, other, other_url
            )
    finally:
        for server in reversed(servers):
            server.kill()


@pytest.fixture
def other_weights(stack: Stack) -> Iterator[str]:
    """The second P, awake for the test that needs it, then gone."""
    stack.other_server.resume()
    try:
        yield stack.other_url
    finally:
        stack.other_server.kill()


def _proxy_routes(stack: Stack) -> float:
    name = "kvbridge:proxy_requests_total"
    return metric(stack.client, stack.proxy_url, name, route="disaggregated")


def test_pd_through_proxy_matches_a_single_vllm(stack: Stack) -> None:
    prompt = (
        "Explain KV cache offloading in one sentence, then say why the decode engine reads the "
        "blocks of every prompt token from the prefill engine over the network instead of "
        "computing them again: 0123456789 + - * / = ( ) [ ] { }"
    )
    expected = stack.reference(prompt, salt="single")
    before, routed = stack.sources(), _proxy_routes(stack)

    body = stack.complete(stack.proxy_url, prompt)

    actual = greedy(body)
    assert oracle(expected, actual, TOL) is None, oracle(expected, actual, TOL)
    n = body["usage"]["prompt_tokens"]
    assert n > 32  # more than one block, the last one partial
    # D computed only the last prompt token; the rest came over NIXL from P
    moved = _wait_metric_change(stack, before)
    assert moved == {"local_compute": 1, "local_cache_hit": 0, "external_kv_transfer": n - 1}
    assert _proxy_routes(stack) == routed + 1


def test_proxy_streams_a_chat_answer_from_d(stack: Stack) -> None:
    story = "Tell me a story about a robot who learns to paint, then summarise it in three words."
    messages = [{"role": "user", "content": f"{story} Quick brown fox: {list(range(12))}"}]
    chat = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    route = "/v1/chat/completions"
    single = stack.client.post(stack.p_url + route, json={**chat, "cache_salt": "c"})
    assert single.status_code == 200, single.text
    before = stack.sources()

    text = []
    with stack.client.stream("POST", stack.proxy_url + route, json={**chat, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                text.append(delta.get("content") or "")

    assert "".join(text) == single.json()["choices"][0]["message"]["content"]
    assert _wait_metric_change(stack, before)["external_kv_transfer"] > 32


def test_params_of_another_prompt_are_refused_and_d_recomputes(stack: Stack) -> None:
    """D handed prompt B's params for prompt A (same length, so the block counts agree): the
    lease answer names the prompt P's blocks hold, D refuses them and computes A itself."""
    prompt_a = [(7 * i + 3) % 500 + 5 for i in range(70)]
    prompt_b = [(11 * i + 1) % 500 + 5 for i in range(70)]
    expected = stack.reference(prompt_a, salt="mismatch")
    before = stack.sources()

    params_b = stack.prefill_params(prompt_b)
    actual = greedy(stack.complete(stack.d_url, prompt_a, kv_transfer_params=params_b))

    assert oracle(expected, actual, TOL) is None, oracle(expected, actual, TOL)
    moved = _wait_metric_change(stack, before)
    assert moved == {"local_compute": 70, "local_cache_hit": 0, "external_kv_transfer": 0}


def test_control_kv_of_other_weights_is_flagged(stack: Stack, other_weights: str) -> None:
    """The oracle's control: P's blocks for the right prompt, but computed by other weights
    (a P on the seed-1 checkpoint; the handshake checks shapes, not weights). D reads them
    (the prompt matches) and the oracle must flag the answer it passes with the right P."""
    prompt = [(5 * i + 2) % 500 + 5 for i in range(70)]
    expected = stack.reference(prompt, salt="weights")
    right = greedy(
        stack.complete(stack.d_url, prompt, kv_transfer_params=stack.prefill_params(prompt))
    )
    assert oracle(expected, right, TOL) is None, oracle(expected, right, TOL)
    before = stack.sources()

    # the salt keeps D's own prefix cache (which now holds the prompt) out of it
    params = stack.prefill_params(prompt, url=other_weights)
    wrong = greedy(
        stack.complete(stack.d_url, prompt, kv_transfer_params=params, cache_salt="wrong")
    )

    assert _wait_metric_change(stack, before)["external_kv_transfer"] == len(prompt) - 1
    assert oracle(expected, wrong, TOL) is not None
    assert wrong.token_ids != expected.token_ids or max_gap(expected, wrong) > 10 * TOL


def test_prefill_killed_before_decode_reads_decode_recomputes(stack: Stack) -> None:
    """Runs last: P's process group is killed after it returned the params, before D reads."""
    prompt = (
        "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "
        "What happens to a decode engine when the prefill engine that holds its blocks is gone?"
    )
    expected = stack.reference(prompt, salt="killed")
    params = stack.prefill_params(prompt)
    stack.p_server.kill(crash=True)
    assert not stack.p_server.alive
    with pytest.raises(httpx.ConnectError):
        stack.client.get(stack.p_url + "/health")
    before = stack.sources()

    start = time.monotonic()
    actual = greedy(stack.complete(stack.d_url, prompt, kv_transfer_params=params))
    took = time.monotonic() - start

    assert oracle(expected, actual, TOL) is None, oracle(expected, actual, TOL)
    moved = _wait_metric_change(stack, before)
    assert moved["external_kv_transfer"] == 0, moved  # nothing came from P: D computed it
    assert moved["local_compute"] == actual.body["usage"]["prompt_tokens"]
    assert took < TRANSFER_TIMEOUT_S, f"D took {took:.1f}s to give up on the dead P"
