"""Engine step vs the bare model runner per decode step: ``python -m benchmarks.engine_overhead``.

One ``LLMEngine`` decodes ``--batch`` requests of ``--context`` prompt tokens; per step it times
``engine.step()`` and its parts (``schedule``, the worker's ``execute`` with sampling,
``update_from_output``), then the bare ``ModelRunner.execute`` plus ``sample`` on the same chunks
(the same-run baseline). ``--connector offload`` adds a SimpleCPUOffloadConnector;
``--profile`` prints the torch profiler's top ops of a few engine steps (host and device time).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kvbridge.config import TransferConfig
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.runner import SeqChunk
from kvbridge.engine.sampling import SamplingParams, sample


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--connector", choices=["none", "offload"], default="none")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    transfer = None
    if args.connector == "offload":
        transfer = TransferConfig(
            kv_connector="SimpleCPUOffloadConnector",
            kv_role="kv_both",
            kv_connector_extra_config={"num_cpu_blocks": 256},
        )
    block_size = 16
    blocks = args.batch * (-(-(args.context + args.steps * 3 + 8) // block_size)) + 64
    config = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=dtype,
        block_size=block_size,
        num_gpu_blocks=blocks,
        max_num_batched_tokens=max(8192, args.context),
        max_num_seqs=max(16, args.batch),
        kv_transfer_config=transfer,
    )
    t0 = time.perf_counter()
    eng = LLMEngine(config)
    init_s = time.perf_counter() - t0
    sp = SamplingParams(max_tokens=10**6, ignore_eos=True)
    for i in range(args.batch):
        eng.add_request([(7 * j + 3 * i) % 500 + 1 for j in range(args.context)], sp)
    while len(eng.scheduler.running) < args.batch or any(
        r.num_output_tokens < 2 for r in eng.scheduler.running
    ):
        eng.step()
    for _ in range(3):
        eng.step()
    step, sched_t, work_t, upd_t = [], [], [], []
    for _ in range(args.steps):
        step.append(_timed(eng.step, sync))
    for _ in range(args.steps):  # the same step, its parts timed apart
        sync()
        a = time.perf_counter()
        so = eng.scheduler.schedule()
        b = time.perf_counter()
        wo = eng.worker.execute(so)
        sync()
        c = time.perf_counter()
        eng.scheduler.update_from_output(so, wo)
        d = time.perf_counter()
        sched_t.append(b - a)
        work_t.append(c - b)
        upd_t.append(d - c)
    reqs = list(eng.scheduler.running)
    # each request's last computed token again (its slot exists; the next one's may not yet)
    chunks = [SeqChunk(r.request_id, [r.all_token_ids[r.num_computed_tokens - 1]],
                       r.num_computed_tokens - 1, eng.block_manager.block_ids(r.request_id), True)
              for r in reqs]  # fmt: skip

    def bare() -> None:
        logits = eng.runner.execute(chunks)
        sample(logits, [sp] * len(chunks), [None] * len(chunks))

    bare_t = [_timed(bare, sync) for _ in range(args.steps)]
    ms = {k: 1e3 * statistics.median(v) for k, v in
          (("step", step), ("schedule", sched_t), ("worker", work_t), ("update", upd_t),
           ("bare", bare_t))}  # fmt: skip
    print(f"{args.model} {dtype} on {args.device}, batch {args.batch}, context {args.context}, "
          f"connector {args.connector} (engine built in {init_s:.1f} s)")  # fmt: skip
    print(f"engine step {ms['step']:.3f} ms = schedule {ms['schedule']:.3f} + worker "
          f"{ms['worker']:.3f} + update {ms['update']:.3f}; bare runner + sample "
          f"{ms['bare']:.3f} ms; step / bare {ms['step'] / ms['bare']:.2f}")  # fmt: skip
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(10):
                eng.step()
            sync()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=50))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20,
                                        max_name_column_width=50))  # fmt: skip
    eng.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
