"""Byte tokenizer, streaming text deltas, and the checkpoint-tokenizer fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbridge.serve.tokenizer import ByteTokenizer, IncrementalDecoder, load_tokenizer


def test_bytes_round_trip_with_bos():
    tok = ByteTokenizer(bos_token_id=256)
    ids = tok.encode("añb €")
    assert ids[0] == 256 and len(ids) == 1 + len("añb €".encode())
    assert tok.decode(ids) == "añb €"


def test_decode_skips_ids_that_are_not_bytes():
    tok = ByteTokenizer(offset=3)
    assert tok.encode("A") == [ord("A") + 3]
    assert tok.decode([0, 1, 2, ord("h") + 3, 400, ord("i") + 3]) == "hi"


def test_incremental_decoder_holds_back_a_split_character():
    tok = ByteTokenizer()
    a, b = "é".encode()
    dec = IncrementalDecoder(tok)
    assert dec.add([ord("x")], final=False) == "x"
    assert dec.add([a], final=False) == ""  # half a character: wait
    assert dec.add([b], final=False) == "é"
    assert dec.add([a], final=True) == "\ufffd"  # the request ended mid-character


def test_checkpoint_without_tokenizer_files_uses_bytes(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert load_tokenizer(str(tmp_path), bos_token_id=1).name == "bytes"
    assert load_tokenizer("tiny").encode("a") == [97]


def test_checkpoint_with_tokenizer_files_uses_them(tmp_path: Path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    raw = tokenizers.Tokenizer(model)
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    fast.save_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert tok.name == f"hf:{tmp_path.name}"
    assert tok.encode("hello world") == [1, 2]
    assert tok.decode([2, 1]) == "world hello"
