"""``kvbridge bench engine`` runs on CPU and prints prefill and decode rates."""

from __future__ import annotations

import pytest

from kvbridge.bench.engine import main, run_bench
from kvbridge.engine.model_config import NAMED_CONFIGS
from kvbridge.engine.runner import ModelRunner


def test_bench_prints_prefill_and_decode(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--prompt-len", "8", "--batch", "2", "--decode-steps", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "prefill" in out and "decode" in out and "tokens/s" in out


def test_run_bench_counts_tokens() -> None:
    runner = ModelRunner(NAMED_CONFIGS["tiny"], num_blocks=8, block_size=4)
    prefill, decode = run_bench(runner, batch=2, prompt_len=9, decode_steps=3, repeats=1)
    assert (prefill.phase, prefill.tokens_per_step) == ("prefill", 18)
    assert (decode.phase, decode.tokens_per_step) == ("decode", 2)
    assert prefill.tokens_per_s > 0 and decode.ms_per_step > 0


def test_bench_rejects_bad_flags() -> None:
    with pytest.raises(SystemExit):
        main(["--batch", "0"])
