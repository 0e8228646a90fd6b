"""``kvbridge demo``: real servers and proxy as processes, outputs identical, nothing left behind.

Every process the demo starts inherits a unique environment tag; after the demo exits, no
process on the machine may carry it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from kvbridge.config import TransferConfig
from kvbridge.connector.stats import KVConnectorStats, MultiKVConnectorStats
from kvbridge.demo.processes import ProcessSet, ServiceError, stop_group
from kvbridge.demo.reference import compare
from kvbridge.demo.report import RunSummary, percentile, render_report
from kvbridge.demo.workload import PromptBuilder, RequestRecord, WorkloadSpec
from kvbridge.oracle import Trace
from kvbridge.serve.config_file import ProxyConfig, load_serve_config
from kvbridge.serve.metrics import ServerMetrics
from kvbridge.serve.tokenizer import ByteTokenizer
from support.nixl_marks import needs_nixl

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
TAG_KEY = "KVBRIDGE_DEMO_TEST_TAG"


def _tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries ``tag``."""
    needle = f"{TAG_KEY}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != "Z":
            pids.append(int(entry.name))
    return pids


def _demo_env(tag: str) -> dict[str, str]:
    return {**os.environ, TAG_KEY: tag, "COLUMNS": "120"}


def _demo_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvbridge.cli", "demo", *args]


# -- the demo end to end --------------------------------------------------------------------------
@needs_nixl
def test_demo_outputs_identical_and_no_process_left():
    tag = uuid.uuid4().hex
    argv = _demo_argv("--requests", "4", "--users", "2", "--max-tokens", "8", "--keep-logs")
    start = time.monotonic()
    done = subprocess.run(argv, env=_demo_env(tag), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "outputs identical: 8/8" in out  # 4 requests with reuse + 4 on the baseline stack
    assert re.search(r"TTFT p50 / p95 \(ms\)\s*│\s*\d+ / \d+", out), out
    assert re.search(r"tokens moved over NIXL\s*│\s*[1-9]", out), out
    assert out.count("one warm-up request (") == 2, out  # one per stack, before timing
    reads = re.search(r"NIXL reads\s*│[^│]* in (\d+),[^│]*│[^│]* in (\d+),", out)
    assert reads is not None, out
    assert all(1 <= int(n) <= 4 for n in reads.groups()), out  # the warm-up's READ not counted
    assert _tagged_pids(tag) == []
    assert elapsed < 60, f"demo took {elapsed:.0f}s"
    found = re.search(r"configs and logs: (\S+)", out)
    assert found is not None, out
    logs = Path(found.group(1))
    try:
        assert "listening on http://127.0.0.1:" in (logs / "reuse-prefill.log").read_text()
        config = load_serve_config(logs / "reuse-decode.json", {})
        assert config.kv_transfer_config is not None
        assert config.kv_transfer_config.kv_connector == "MultiConnector"
    finally:
        shutil.rmtree(logs, ignore_errors=True)


@needs_nixl
def test_demo_with_a_disk_tier_reports_it(tmp_path: Path):
    tag = uuid.uuid4().hex
    argv = _demo_argv("--requests", "4", "--users", "2", "--max-tokens", "8", "--no-baseline",
                      "--disk-tier", str(tmp_path))  # fmt: skip
    done = subprocess.run(argv, env=_demo_env(tag), capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "outputs identical: 4/4" in out
    assert re.search(r"disk tier CPU->disk\s*│\s*[1-9][\d.]* [KMG]iB, [\d.]+ GB/s", out), out
    assert re.search(r"disk records evicted / corrupt\s*│\s*0 / 0", out), out
    assert list(tmp_path.glob("*/namespace.json")) and list(tmp_path.rglob("*.kvb"))
    assert _tagged_pids(tag) == []


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@needs_nixl
def test_ctrl_c_stops_every_server():
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        _demo_argv("--requests", "40", "--users", "4"),
        env=_demo_env(tag),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Ctrl-C at a terminal: SIGINT not ignored, even when these tests run as a shell's
        # background job (which starts with SIGINT ignored; Python then keeps ignoring it)
        preexec_fn=_sigint_default,
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    for line in proc.stdout:  # the prefill/decode/proxy line comes once all three listen
        lines.append(line)
        if line.startswith("reuse: prefill") or time.monotonic() > deadline:
            break
    assert any(line.startswith("reuse: prefill") for line in lines), "".join(lines)
    assert len(_tagged_pids(tag)) >= 3
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted" in rest
    assert _tagged_pids(tag) == []
    logs = re.search(r"configs and logs: (\S+)", rest)  # kept: the run did not succeed
    assert logs is not None, rest
    shutil.rmtree(logs.group(1), ignore_errors=True)


def test_bad_flag_is_a_usage_error_naming_it():
    done = subprocess.run(
        _demo_argv("--users", "0"), capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert done.returncode == 2
    assert "--users" in done.stderr


# -- processes ------------------------------------------------------------------------------------
def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_child_that_dies_before_listening_is_named_with_its_log(tmp_path: Path):
    with ProcessSet(tmp_path) as procs:
        service = procs.start("broken", _python("print('bad config'); raise SystemExit(3)"))
        with pytest.raises(ServiceError, match=r"broken exited with code 3[\s\S]*bad config"):
            service.wait_ready(time.monotonic() + 30)


def test_stop_all_kills_a_child_that_ignores_sigterm(tmp_path: Path):
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('listening on http://127.0.0.1:9/ (test)', flush=True)\n"
        "time.sleep(60)\n"
    )
    procs = ProcessSet(tmp_path)
    stubborn = procs.start("stubborn", _python(code))
    polite = procs.start("polite", _python(code.replace("SIG_IGN", "SIG_DFL")))
    assert stubborn.wait_ready(time.monotonic() + 30) == "http://127.0.0.1:9/"
    polite.wait_ready(time.monotonic() + 30)
    killed = procs.stop_all(timeout_s=1.0)
    assert killed == ["stubborn"]
    assert not stubborn.group_alive() and not polite.group_alive()
    assert polite.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL


def test_stop_group_terms_kills_the_stubborn_and_wakes_a_paused_group() -> None:
    ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    cases = [
        ("import time; time.sleep(60)", 5.0, -signal.SIGTERM, False),
        (ignore, 0.5, -signal.SIGKILL, False),
        ("import time; time.sleep(60)", None, -signal.SIGKILL, False),
        ("import time; time.sleep(60)", 5.0, -signal.SIGTERM, True),
    ]
    for code, term_s, returncode, paused in cases:
        proc = subprocess.Popen(_python(code), start_new_session=True)
        time.sleep(0.3)
        if paused:
            os.killpg(proc.pid, signal.SIGSTOP)
        start = time.monotonic()
        stop_group(proc, term_s, 5.0)
        assert time.monotonic() - start < 5.0
        assert proc.wait(5) == returncode
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)


# -- workload and checks --------------------------------------------------------------------------
def test_requests_spread_over_users_turn_by_turn():
    spec = WorkloadSpec.build(users=4, turns=3, requests=5, max_tokens=8)
    assert (spec.users, spec.turns, spec.requests) == (4, 2, 5)
    assert [spec.turns_of(u) for u in range(4)] == [2, 1, 1, 1]
    assert WorkloadSpec.build(users=4, turns=3, requests=2, max_tokens=8).users == 2
    with pytest.raises(ValueError, match="--requests"):
        WorkloadSpec.build(users=4, turns=3, requests=0, max_tokens=8)


def test_each_turn_extends_the_previous_and_users_share_the_system_prompt():
    builder = PromptBuilder(ByteTokenizer(bos_token_id=256), 256)
    system = builder.system_prompt()
    first = [builder.first(u) for u in range(3)]
    assert all(p[: len(system)] == system for p in first)
    assert first[0] != first[1]
    answer = [300, 301, 257]
    second = builder.extend(first[0], answer, 0, 1)
    assert second[: len(first[0]) + 3] == first[0] + answer
    assert second.count(256) == 1  # one BOS, at the start
    spec = WorkloadSpec.build(users=3, turns=2, requests=None, max_tokens=3)
    assert builder.longest_prompt(spec) >= len(second)


def test_compare_flags_failures_other_tokens_and_moved_logprobs():
    """The demo's check is the logprob oracle: the third record has the right tokens but a
    logprob off by 0.01, which the token-only check before it passed."""

    def record(tokens: tuple[int, ...], logprobs: tuple[float, ...], error: str | None = None):
        return RequestRecord(0, 0, (1, 2), tokens, 0.01, 0.02, error, logprobs)

    expected: dict[tuple[int, ...], Trace] = {(1, 2): Trace((5, 6), (-1.0, -2.0))}
    records = [
        record((5, 6), (-1.0, -2.00001)),
        record((5, 7), (-1.0, -2.0)),
        record((5, 6), (-1.0, -2.01)),
        record((), (), "HTTP 500"),
        record((5, 6), ()),  # no logprobs in the answer
    ]
    same, bad, worst = compare(records, expected)
    assert same == 1 and worst == pytest.approx(1e-5)
    assert [m.problem.split(":")[0] for m in bad] == [
        "token 1", "token 1 (6)", "HTTP 500", "2 tokens but 0 log-probabilities"
    ]  # fmt: skip


def test_summary_reads_the_series_the_servers_export():
    prefill, decode = ServerMetrics("small"), ServerMetrics("small")
    done = {"finish_reason": "length", "num_prompt_tokens": 100, "e2e_seconds": 0.1}
    prefill.observe_finished(**done, num_generated=1, num_cached=48, num_external=32, remote=False)
    decode.observe_finished(**done, num_generated=8, num_cached=16, num_external=83, remote=True)
    nixl, offload = KVConnectorStats(), KVConnectorStats()
    for nbytes, seconds in ((3e6, 0.002), (1e6, 0.002)):
        nixl.observe("bytes_transferred", nbytes)
        nixl.observe("xfer_time_seconds", seconds)
    offload.incr("cpu_hit_tokens", 32)
    offload.incr("gpu_to_cpu_bytes", 2_000_000)
    offload.observe("gpu_to_cpu_time_s", 0.001)
    offload.incr("evictions", 3)
    multi = MultiKVConnectorStats()
    multi.add("NixlConnector", nixl)
    multi.add("SimpleCPUOffloadConnector", offload)
    decode.record_connector_stats(multi, name="MultiConnector")
    records = [RequestRecord(0, t, (1,), (2,), 0.1 * (t + 1), 0.5) for t in range(3)]
    summary = RunSummary.collect(
        "reuse",
        records,
        1.0,
        prefill=prefill.render().decode(),
        decode=decode.render().decode(),
        proxy="",
    )
    assert (summary.prefill_computed, summary.prefill_cache_hits) == (20, 48)
    assert (summary.decode_cache_hits, summary.nixl_tokens) == (16, 83)
    assert (summary.cpu_hit_tokens, summary.cpu_evictions) == (32, 3)
    assert summary.nixl.count == 2 and summary.nixl.gb_per_s == pytest.approx(1.0)
    assert summary.to_cpu.gb_per_s == pytest.approx(2.0)
    assert summary.ttft_ms(50) == pytest.approx(200.0)


def test_summary_counts_only_what_came_after_the_warm_up():
    """``before``: the servers' /metrics texts taken after the warm-up request; the summary
    counts each series' growth since then."""
    server = ServerMetrics("small")

    def request(cached: int, nbytes: float, seconds: float) -> str:
        """One finished 64-token request and its READ; the /metrics text after it."""
        server.observe_finished(
            finish_reason="length",
            num_prompt_tokens=64,
            e2e_seconds=0.1,
            num_generated=2,
            num_cached=cached,
            num_external=0,
            remote=False,
        )
        nixl = KVConnectorStats()
        nixl.observe("bytes_transferred", nbytes)
        nixl.observe("xfer_time_seconds", seconds)
        server.record_connector_stats(nixl, name="NixlConnector")
        return server.render().decode()

    warm = request(0, 5e6, 0.01)
    after = request(16, 1e6, 0.001)
    before = {"prefill": warm, "decode": warm, "proxy": ""}
    summary = RunSummary.collect("reuse", [], 1.0, prefill=after, decode=after, proxy="",
                                 before=before)  # fmt: skip
    whole = RunSummary.collect("reuse", [], 1.0, prefill=after, decode=after, proxy="")
    assert (summary.prefill_computed, summary.prefill_cache_hits) == (48, 16)
    assert whole.prefill_computed == 64 + 48
    assert summary.nixl.count == 1 and summary.nixl.gb_per_s == pytest.approx(1.0)
    assert whole.nixl.count == 2


def test_summary_and_table_show_the_disk_tier_only_when_it_is_on():
    server = ServerMetrics("small")
    stats = KVConnectorStats()
    stats.incr("disk_hits", 7)
    stats.incr("disk_misses", 2)
    stats.incr("disk_evictions", 5)
    stats.incr("disk_corrupt_records", 1)
    stats.incr("cpu_to_disk_bytes", 4_000_000)
    stats.observe("cpu_to_disk_time_s", 0.002)
    stats.incr("disk_to_cpu_bytes", 1_000_000)
    stats.observe("disk_to_cpu_time_s", 0.001)
    server.record_connector_stats(stats, name="SimpleCPUOffloadConnector")
    server.set_connector_gauges({"SimpleCPUOffloadConnector": {"kv_offload_disk_bytes": 9}})
    text = server.render().decode()
    on = RunSummary.collect("reuse", [], 1.0, prefill=text, decode=text, proxy="")
    off = RunSummary.collect("baseline", [], 1.0, prefill="", decode="", proxy="")
    assert off.disk is None and on.disk is not None
    assert (on.disk.hits, on.disk.misses, on.disk.evictions, on.disk.corrupt) == (14, 4, 10, 2)
    assert on.disk.to_disk.gb_per_s == pytest.approx(2.0)
    assert on.disk.from_disk.gb_per_s == pytest.approx(1.0)
    console = Console(width=200, record=True)
    render_report(console, [on, off])
    table = console.export_text()
    assert re.search(r"disk tier hits / misses\s*│\s*14 / 4\s*│\s*-", table), table
    render_report(console := Console(width=200, record=True), [off])
    assert "disk tier" not in console.export_text()


def test_percentile_interpolates():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


# -- examples/ ------------------------------------------------------------------------------------
def test_example_configs_describe_a_pd_stack():
    prefill = load_serve_config(REPO / "examples" / "prefill.yaml", {})
    decode = load_serve_config(REPO / "examples" / "decode.yaml", {})
    proxy = ProxyConfig.load(REPO / "examples" / "proxy.yaml", {})
    for config, role in ((prefill, "kv_producer"), (decode, "kv_consumer")):
        transfer = config.kv_transfer_config
        assert isinstance(transfer, TransferConfig)
        assert (transfer.kv_connector, transfer.kv_role) == ("MultiConnector", role)
        children = transfer.kv_connector_extra_config["connectors"]
        assert [c["kv_connector"] for c in children] == [
            "NixlConnector",
            "SimpleCPUOffloadConnector",
        ]
    assert proxy.prefill == (f"http://127.0.0.1:{prefill.port}",)
    assert proxy.decode == (f"http://127.0.0.1:{decode.port}",)
    assert len({prefill.port, decode.port, proxy.port}) == 3
