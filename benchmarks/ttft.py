"""Time to first token, recompute vs reload from the CPU tier: ``python -m benchmarks.ttft``.

For each prompt length, on one ``LLMEngine`` with ``SimpleCPUOffloadConnector``:
1. a fresh prompt is prefilled (TTFT *recompute*; its blocks are then stored to the CPU tier);
2. the GPU prefix cache is dropped, so only the CPU tier holds the prefix;
3. the same prompt again: every block but the last token's comes back from the CPU tier
   (TTFT *reload*). Its first token must equal the recompute's (greedy).
The baseline is the recompute in the same run; the table shows the speedup and the achieved
prefill TFLOP/s, so the recompute is known to be a fair (SDPA/flash) baseline. With
``--decode-tokens N`` the same engine then decodes N tokens at batch 1 after the shortest prompt.
``--load-modes`` runs the reload once per CPU-tier ``load_mode`` (``async``: the hit loads between
steps; ``layerwise``: inside the step that computes it, layer i computing while later layers
copy), each on its own engine, a row per mode.
With ``--disk-tier DIR`` the CPU tier has the disk tier behind it, and after step 3 a second
engine (a restart: empty GPU cache and CPU tier, warmed up on another prompt) on the same
directory answers the prompt from disk (TTFT *disk*).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import NamedTuple

from kvbridge.bench import harness
from kvbridge.config import TransferConfig
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.model_config import NAMED_CONFIGS, ModelConfig
from kvbridge.engine.request import RequestOutput
from kvbridge.engine.sampling import SamplingParams
from kvbridge.offload.config import LOAD_MODES
from kvbridge.oracle import TOLERANCE, TOP_K, Trace, check

ONE_TOKEN = SamplingParams(max_tokens=1, ignore_eos=True, logprobs=TOP_K)
# First tokens are judged by kvbridge.oracle: equal, or a near tie within the tolerance (bf16
# kernels that add in another order move a logprob by ~1e-2; float32 by ~1e-6).
BF16_TOLERANCE = 0.1


class TTFTRow(NamedTuple):
    load_mode: str
    prompt_len: int
    kv_gib: float
    recompute_ms: float
    reload_ms: float
    reloaded_tokens: int
    prefill_tflops: float
    same_token: bool  # every reloaded first token passed the oracle (same, or a near tie)
    gpu_hit_ms: float = 0.0  # the prompt again, its KV still in the GPU prefix cache
    disk_ms: float | None = None  # None: no --disk-tier
    disk_tokens: int = 0
    max_logprob_diff: float = 0.0  # of the first token, reload (and disk) vs recompute
    near_ties: int = 0  # first tokens that differed within the tolerance

    @property
    def speedup(self) -> float:
        return self.recompute_ms / self.reload_ms


class TTFTResult(NamedTuple):
    rows: list[TTFTRow]
    decode_tokens_per_s: float | None  # None: not measured (--decode-tokens 0)
    init_s: float  # building the engine (model weights, caches)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser("python -m benchmarks.ttft", __doc__)
    p.add_argument("--model", default="tiny", help=f"named config ({', '.join(NAMED_CONFIGS)})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    lens = harness.int_list
    p.add_argument("--prompt-lens", type=lens, default=[256, 1024], help="comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="timed prompts per length (median)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=0, help="batch-1 decode after (0: none)")
    p.add_argument("--disk-tier", metavar="DIR", help="also TTFT from a disk tier in DIR")
    p.add_argument(
        "--no-disk-guard",
        action="store_true",
        help="read disk hits even when recompute is predicted faster (disk_recompute_guard off)",
    )
    p.add_argument(
        "--logprob-tol",
        type=float,
        help=f"oracle tolerance, nats (default {TOLERANCE:g} in float32, {BF16_TOLERANCE:g} else)",
    )
    p.add_argument(
        "--profile",
        metavar="PATH",
        help="profile one more reload of the longest prompt: top ops table, Chrome trace PATH",
    )
    p.add_argument(
        "--load-modes",
        type=harness.subset(LOAD_MODES),
        default=["layerwise"],
        help=f"CPU-tier load modes, comma-separated ({', '.join(LOAD_MODES)})",
    )
    args = p.parse_args(argv)
    harness.positive(p, args, "repeats", "block_size")
    if min(args.prompt_lens) < 1 or args.decode_tokens < 0:
        p.error("--prompt-lens: must be >= 1; --decode-tokens: must be >= 0")
    return args


def prefill_flops(model: ModelConfig, n: int) -> float:
    """Matmul FLOPs of a causal prefill of ``n`` tokens (projections, MLP, attention, head)."""
    h, layers = model.hidden_size, model.num_layers
    q = model.num_heads * model.head_dim
    kv = model.num_kv_heads * model.head_dim
    per_token: float = layers * (h * (q + 2 * kv) + q * h + 3 * h * model.intermediate_size)
    per_token += h * model.vocab_size / n  # lm_head for the last token only
    attention = layers * 2 * n * n * q  # QK^T and PV over the causal half: 2 * (n^2/2) * 2q
    return 2 * per_token * n + attention


def _run(engine: LLMEngine, tokens: list[int]) -> RequestOutput:
    rid = engine.add_request(tokens, ONE_TOKEN)
    final: RequestOutput | None = None
    while final is None:
        outputs = engine.step()
        for out in outputs:
            if out.request_id == rid and out.finished:
                final = out
        if not outputs and not engine.scheduler.running:  # waiting on a transfer: yield the
            time.sleep(1e-4)  # GIL to the connector's threads, as the server's loop does
    engine.drain(timeout_s=120)
    if final.error is not None or final.ttft is None:
        raise RuntimeError(f"request failed: {final.error}")
    return final


def _drop_gpu_cache(engine: LLMEngine) -> None:
    engine.block_manager.reset_prefix_cache()


def build_engine(args: argparse.Namespace, max_len: int, load_mode: str) -> LLMEngine:
    """One engine whose GPU pool and CPU tier each hold one prompt of ``max_len`` tokens (and
    its ``--decode-tokens``)."""
    bs = args.block_size
    blocks = -(-(max_len + args.decode_tokens) // bs) + 8
    extra: dict[str, object] = {"num_cpu_blocks": blocks, "load_mode": load_mode}
    if args.disk_tier:
        extra.update(
            kv_offload_backend="disk",
            disk_path=args.disk_tier,
            disk_capacity_bytes=1 << 40,
            disk_recompute_guard=not args.no_disk_guard,
        )
    transfer = TransferConfig(
        kv_connector="SimpleCPUOffloadConnector", kv_connector_extra_config=extra
    )
    return LLMEngine(
        EngineConfig(
            model=args.model,
            block_size=bs,
            num_gpu_blocks=blocks,
            max_num_batched_tokens=max_len,
            max_model_len=max_len + args.decode_tokens + bs,
            device=args.device,
            dtype=args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"),
            kv_transfer_config=transfer,
        )
    )


def _settle_disk(engine: LLMEngine, timeout_s: float = 300.0) -> None:
    """Step until the disk tier has no write in flight (its records complete on disk)."""
    half = engine.scheduler_connector
    deadline = time.monotonic() + timeout_s
    while True:
        gauges = half.get_kv_connector_gauges() if half is not None else {}
        if not (isinstance(gauges, dict) and gauges.get("kv_offload_disk_inflight_blocks")):
            return
        if time.monotonic() > deadline:
            raise TimeoutError("disk tier: writes still in flight")
        engine.step()
        time.sleep(0.001)


def _from_disk(
    args: argparse.Namespace, tokens: list[int], rng: random.Random, load_mode: str
) -> RequestOutput:
    """``tokens`` on a restarted engine: GPU cache and CPU tier empty, the disk holds them."""
    with build_engine(args, max(args.prompt_lens), load_mode) as engine:
        vocab = engine.model_config.vocab_size
        _run(engine, [rng.randrange(vocab) for _ in range(len(tokens))])  # warm-up
        _settle_disk(engine)  # its writes no longer pin CPU blocks
        out = _run(engine, tokens)
        _settle_disk(engine)
    return out


def measure(
    engine: LLMEngine,
    args: argparse.Namespace,
    prompt_len: int,
    rng: random.Random,
    load_mode: str = "layerwise",
) -> TTFTRow:
    model = engine.model_config
    recompute, reload, disk, gpu_hit, same, reloaded, from_disk = [], [], [], [], True, 0, 0
    worst, ties = 0.0, 0
    tol = args.logprob_tol
    if tol is None:
        tol = TOLERANCE if engine.config.dtype == "float32" else BF16_TOLERANCE
    for _ in range(args.repeats):
        tokens = [rng.randrange(model.vocab_size) for _ in range(prompt_len)]
        first = _run(engine, tokens)
        gpu_hit.append(_run(engine, tokens).ttft)  # no copy: the step's own cost
        _drop_gpu_cache(engine)
        if args.disk_tier:
            _settle_disk(engine)  # the reload does not compete with write-through
        second = _run(engine, tokens)
        _drop_gpu_cache(engine)
        recompute.append(first.ttft)
        reload.append(second.ttft)
        judged = [check(Trace.from_output(first), Trace.from_output(second), tol)]
        reloaded = second.num_external_tokens
        if args.disk_tier:
            _settle_disk(engine)
            third = _from_disk(args, tokens, rng, load_mode)
            disk.append(third.ttft)
            judged.append(check(Trace.from_output(first), Trace.from_output(third), tol))
            from_disk = third.num_external_tokens
        same &= all(v.ok for v in judged)
        worst = max(worst, *(v.max_abs_diff for v in judged))
        ties += sum(1 for v in judged if v.ok and v.compared == 0)
    kv_bytes = engine.runner.cache_spec.block_bytes * (prompt_len / args.block_size)
    t_recompute = statistics.median(x for x in recompute if x is not None)
    return TTFTRow(
        load_mode=load_mode,
        prompt_len=prompt_len,
        kv_gib=kv_bytes / 2**30,
        recompute_ms=t_recompute * 1e3,
        reload_ms=statistics.median(x for x in reload if x is not None) * 1e3,
        reloaded_tokens=reloaded,
        prefill_tflops=prefill_flops(model, prompt_len) / t_recompute / 1e12,
        gpu_hit_ms=statistics.median(x for x in gpu_hit if x is not None) * 1e3,
        same_token=same,
        disk_ms=statistics.median(x for x in disk if x is not None) * 1e3 if disk else None,
        disk_tokens=from_disk,
        max_logprob_diff=worst,
        near_ties=ties,
    )


def profile_reload(engine: LLMEngine, prompt_len: int, rng: random.Random, trace: str) -> None:
    """One more recompute of a ``prompt_len`` prompt, then its reload and a GPU hit of it, each
    under ``torch.profiler``: prints the ops that took the most device and host time, writes
    Chrome traces to ``trace`` (``.reload`` / ``.gpu-hit`` before the suffix)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    tokens = [rng.randrange(engine.model_config.vocab_size) for _ in range(prompt_len)]
    _run(engine, tokens)
    _drop_gpu_cache(engine)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    key = "cuda_time_total" if len(activities) > 1 else "cpu_time_total"
    stem, dot, suffix = trace.rpartition(".")
    for name in ("reload", "gpu-hit"):
        with profile(activities=activities) as prof:
            out = _run(engine, tokens)
        prof.export_chrome_trace(f"{stem}.{name}{dot}{suffix}" if dot else f"{trace}.{name}")
        ttft_ms = (out.ttft or 0) * 1e3
        print(f"{name} of {prompt_len} tokens under the profiler: TTFT {ttft_ms:.1f} ms")
        print(prof.key_averages().table(sort_by=key, row_limit=12))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    _drop_gpu_cache(engine)


def measure_decode(
    engine: LLMEngine, prompt_len: int, new_tokens: int, rng: random.Random
) -> float:
    """Batch-1 decode tokens/s after a ``prompt_len`` prefill (first token excluded)."""
    vocab = engine.model_config.vocab_size
    tokens = [rng.randrange(vocab) for _ in range(prompt_len)]
    engine.add_request(tokens, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    first_at: float | None = None
    produced = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first_at is None and out.token_ids:
                first_at = time.perf_counter()
            produced = len(out.token_ids)
    elapsed = time.perf_counter() - (first_at or time.perf_counter())
    engine.drain(timeout_s=120)
    return (produced - 1) / elapsed if elapsed > 0 else 0.0


COLUMNS = (
    *("load mode", "prompt tokens", "KV GiB", "TTFT recompute ms", "prefill TFLOP/s"),
    "TTFT reload ms",
    *("tokens from CPU", "speedup", "first token (max dlogprob)", "TTFT GPU hit ms"),
)


DISK_COLUMNS = ("TTFT disk ms", "tokens from disk", "disk speedup")


def report(args: argparse.Namespace, result: TTFTResult) -> harness.Report:
    title = (
        f"TTFT recompute vs CPU-tier reload: {args.model} on {args.device}, median of "
        f"{args.repeats}; engine built in {result.init_s:.1f} s"
    )
    disk = bool(args.disk_tier)
    out = harness.Report("ttft", title, (*COLUMNS, *DISK_COLUMNS) if disk else COLUMNS)
    for r in result.rows:
        cells = [r.load_mode, f"{r.prompt_len:,}", f"{r.kv_gib:.3f}", f"{r.recompute_ms:.1f}"]
        cells += [f"{r.prefill_tflops:.1f}", f"{r.reload_ms:.1f}", f"{r.reloaded_tokens:,}"]
        verdict = ("near tie" if r.near_ties else "same") if r.same_token else "NO"
        cells += [f"{r.speedup:.1f}x", f"{verdict} ({r.max_logprob_diff:.1e})"]
        cells += [f"{r.gpu_hit_ms:.1f}"]
        if disk and r.disk_ms is not None:
            cells += [
                f"{r.disk_ms:.1f}",
                f"{r.disk_tokens:,}",
                f"{r.recompute_ms / r.disk_ms:.1f}x",
            ]
        out.add(cells, {**r._asdict(), "speedup": r.speedup})
    if result.decode_tokens_per_s is not None:
        shortest = min(args.prompt_lens)
        out.notes.append(
            f"decode, batch 1 after a {shortest}-token prompt: "
            f"{result.decode_tokens_per_s:.1f} tokens/s"
        )
    return out


def run(args: argparse.Namespace) -> TTFTResult:
    rng = random.Random(0)
    rows: list[TTFTRow] = []
    decode = None
    init_s = 0.0
    for mode in args.load_modes:  # an engine per mode, one after the other (GPU memory)
        start = time.perf_counter()
        with build_engine(args, max(args.prompt_lens), mode) as engine:
            init_s = max(init_s, time.perf_counter() - start)
            vocab = engine.model_config.vocab_size
            # warm-up at the shortest measured length: the kernels a hit of that length runs
            # (long-context attention), the allocator, both copy directions, the load path
            warm = [rng.randrange(vocab) for _ in range(min(args.prompt_lens))]
            for _ in range(2):
                _run(engine, warm)
                _run(engine, warm)  # a GPU hit
                _drop_gpu_cache(engine)
                _run(engine, warm)  # a reload
                _drop_gpu_cache(engine)
            rows += [measure(engine, args, n, rng, mode) for n in args.prompt_lens]
            if args.profile:
                profile_reload(engine, max(args.prompt_lens), rng, f"{args.profile}.{mode}.json")
            if args.decode_tokens and decode is None:
                decode = measure_decode(engine, min(args.prompt_lens), args.decode_tokens, rng)
    return TTFTResult(rows, decode, init_s)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    harness.emit([report(args, result)], args)
    return 0 if all(r.same_token for r in result.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
