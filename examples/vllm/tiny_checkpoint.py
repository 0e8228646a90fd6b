"""Write a tiny random-weight Llama checkpoint that ``vllm serve`` loads, offline.

Usage: ``python examples/vllm/tiny_checkpoint.py OUT_DIR [--seed N]``

The model (2 layers, hidden 256, 4 query / 2 KV heads, vocab 512, bf16) answers noise, but it
exercises every KV path of a real one in seconds on a CPU. The tokenizer is built here too: a
byte-level BPE over exactly the model's 512 ids (256 byte tokens, 3 special tokens, merges
learned from a fixed text), with a plain chat template, so text prompts and chat requests work
without the Hugging Face hub (``HF_HUB_OFFLINE=1``). Same seed, same weights and tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: LlamaConfig's pad/bos/eos defaults
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# The BPE merges are learned from this text (repeated); any fixed text gives a fixed tokenizer.
CORPUS = """\
A paged KV cache keeps the keys and values of every prompt token in fixed-size blocks. The
prefill engine computes the prompt once; the decode engine reads those blocks over the network
and generates the answer token by token. Blocks that fall out of the accelerator's prefix cache
can be offloaded to host memory and loaded back later, which is much faster than computing the
prompt again. The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor
jugs. Explain KV cache offloading in one sentence. What is a KV cache? Tell me a story about a
robot who learns to paint, then summarise it in three words. 0123456789 + - * / = ( ) [ ] { }
"""


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 8, trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} ids, expected {VOCAB_SIZE}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


# The model's shape; tests/vllm builds the same one (``variant="tests"``).
MODEL_SHAPE: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
EXAMPLE_CONFIG: dict[str, Any] = {
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    # 5x transformers' default: peaked logits, so greedy choices are not near-ties that
    # rounding noise flips (tests compare outputs token by token and by logprob)
    "initializer_range": 0.1,
    "dtype": "bfloat16",
}


def build_model(seed: int, variant: str = "example"):  # -> transformers.LlamaForCausalLM
    """The tiny Llama with ``seed``'s weights. ``variant="tests"`` is tests/vllm's checkpoint:
    the same shape with LlamaConfig's defaults otherwise (initializer_range 0.02, no pad id,
    so other weights); a vLLM offload test's tolerance was tuned on those weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if variant not in ("example", "tests"):
        raise ValueError(f"variant {variant!r}: 'example' or 'tests'")
    config = LlamaConfig(**MODEL_SHAPE, **(EXAMPLE_CONFIG if variant == "example" else {}))
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    build_model(args.seed).save_pretrained(args.out_dir)
    build_tokenizer().save_pretrained(args.out_dir)
    print(f"wrote a tiny random-weight Llama and its tokenizer to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
