"""``kvbridge bench engine``: prefill and decode tokens/s of the reference model runner.

Runs ``ModelRunner`` directly (no scheduler): a batch of random prompts prefilled in one step,
then greedy decode steps of one token per sequence. Batch 1 is the same-run baseline.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from typing import NamedTuple

import torch

from kvbridge.bench import harness
from kvbridge.engine.loader import read_hf_config
from kvbridge.engine.model_config import NAMED_CONFIGS, get_model_config
from kvbridge.engine.runner import ModelRunner, SeqChunk
from kvbridge.engine.sampling import SamplingParams, sample

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BenchRow(NamedTuple):
    phase: str
    batch: int
    tokens_per_step: int
    ms_per_step: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / (self.ms_per_step / 1e3)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser("kvbridge bench engine", __doc__)
    p.add_argument("--model", default="tiny", help=f"named config ({', '.join(NAMED_CONFIGS)})")
    p.add_argument("--checkpoint", default=None, help="HF safetensors dir (overrides --model)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default=None,
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed prefill runs (best is shown)")
    args = p.parse_args(argv)
    harness.positive(p, args, "prompt_len", "batch", "decode_steps", "block_size", "repeats")
    return args


def run_bench(
    runner: ModelRunner, *, batch: int, prompt_len: int, decode_steps: int, repeats: int
) -> list[BenchRow]:
    """Time one batched prefill (best of ``repeats``) and ``decode_steps`` greedy steps."""
    cfg, bs = runner.model_config, runner.block_size
    per_seq = -(-(prompt_len + decode_steps) // bs)
    rng = random.Random(0)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(prompt_len)] for _ in range(batch)]
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    device = runner.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    prefill = [SeqChunk(f"r{i}", p, 0, t, True) for i, (p, t) in enumerate(zip(prompts, tables))]
    greedy = [SamplingParams()] * batch
    runner.execute(prefill)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        next_ids = sample(runner.execute(prefill), greedy, [None] * batch)
        best = min(best, time.perf_counter() - t0)
    sync()
    t0 = time.perf_counter()
    for step in range(decode_steps):
        chunks = [
            SeqChunk(f"r{i}", [tok], prompt_len + step, tables[i], True)
            for i, tok in enumerate(next_ids)
        ]
        next_ids = sample(runner.execute(chunks), greedy, [None] * batch)
    decode_s = time.perf_counter() - t0
    return [
        BenchRow("prefill", batch, batch * prompt_len, best * 1e3),
        BenchRow("decode", batch, batch, decode_s * 1e3 / decode_steps),
    ]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available on this machine")
        return 2
    dtype = _DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    config = read_hf_config(args.checkpoint) if args.checkpoint else get_model_config(args.model)
    per_seq = -(-(args.prompt_len + args.decode_steps) // args.block_size)
    runner = ModelRunner(
        config,
        num_blocks=per_seq * args.batch,
        block_size=args.block_size,
        device=device,
        dtype=dtype,
        checkpoint=args.checkpoint,
    )
    rows: list[BenchRow] = []
    for batch in sorted({1, args.batch}):
        rows += run_bench(
            runner,
            batch=batch,
            prompt_len=args.prompt_len,
            decode_steps=args.decode_steps,
            repeats=args.repeats,
        )
    rows.sort(key=lambda r: (r.phase != "prefill", r.batch))
    name = args.checkpoint or args.model
    title = (
        f"engine: {name} ({config.num_parameters() / 1e6:.1f}M params), "
        f"{device} {str(dtype).removeprefix('torch.')}, prompt {args.prompt_len}, "
        f"{args.decode_steps} decode steps, torch threads {torch.get_num_threads()}"
    )
    columns = ("phase", "batch", "tokens/step", "ms/step", "tokens/s")
    report = harness.Report("engine", title, columns)
    for r in rows:
        cells = [r.phase, str(r.batch), str(r.tokens_per_step), f"{r.ms_per_step:.2f}"]
        data = {**r._asdict(), "tokens_per_s": r.tokens_per_s}
        report.add([*cells, f"{r.tokens_per_s:,.0f}"], data)
    harness.emit([report], args)
    return 0
