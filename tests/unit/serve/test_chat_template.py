"""Chat templates: the documented simple one, a checkpoint's own, and a clear error without."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvbridge.serve.chat_protocol import ChatMessage, ContentPart
from kvbridge.serve.chat_template import (
    CheckpointChatTemplate,
    MissingChatTemplate,
    SimpleChatTemplate,
    load_chat_template,
)
from kvbridge.serve.protocol import RequestError
from kvbridge.serve.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

CONVERSATION = [
    ChatMessage("system", "Be brief"),
    ChatMessage("user", [ContentPart("text", "hello "), ContentPart("text", "world")]),
]
# A minimal template in the usual shape: one line per message, the assistant turn opened.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
    "{% endif %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)


def test_simple_template_is_chatml_as_text_after_bos():
    tok = ByteTokenizer(bos_token_id=256)
    template = load_chat_template(tok)
    assert isinstance(template, SimpleChatTemplate)
    text = (
        "<|im_start|>system\nBe brief<|im_end|>\n"
        "<|im_start|>user\nhello world<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert SimpleChatTemplate.text(CONVERSATION) == text
    assert template.render(CONVERSATION) == [256, *text.encode()]


def _checkpoint(path: Path, chat_template: str | None) -> HFTokenizer:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["[UNK]", "<s>", "system", "user", "assistant", "tool", "Be", "brief", "hello",
             "world"]  # fmt: skip
    raw = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", bos_token="<s>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    return tok


def test_checkpoint_template_renders_without_adding_special_tokens(tmp_path: Path):
    tok = _checkpoint(tmp_path, TEMPLATE)
    template = load_chat_template(tok)
    assert isinstance(template, CheckpointChatTemplate)
    # system Be brief user hello world assistant
    assert template.render(CONVERSATION) == [2, 6, 7, 3, 8, 9, 4]


def test_template_errors_are_400_naming_messages(tmp_path: Path):
    template = load_chat_template(_checkpoint(tmp_path, TEMPLATE))
    with pytest.raises(RequestError, match="no tools") as info:
        template.render([ChatMessage("tool", "x")])
    assert (info.value.status, info.value.param) == (400, "messages")


def test_checkpoint_without_template_answers_400_naming_it(tmp_path: Path):
    template = load_chat_template(_checkpoint(tmp_path, None))
    assert isinstance(template, MissingChatTemplate)
    with pytest.raises(RequestError, match="has no chat template") as info:
        template.render(CONVERSATION)
    assert info.value.status == 400 and str(tmp_path) in info.value.message
