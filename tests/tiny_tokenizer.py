"""A character-level tokenizer over 64 symbols for the tiny random-weight models (vocabulary 64): enough of
the HF tokenizer interface (encode, decode, apply_chat_template, eos_token_id) for text and chat prompts
to reach the engine in server and library tests. The real tokenizer is exercised by the real-pair tests."""

from __future__ import annotations

SYMBOLS = "\n abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"()-_=+*/<>[]{}#@$%"
assert len(SYMBOLS) == 64, len(SYMBOLS)


class CharTokenizer:
    eos_token_id = None

    def __init__(self) -> None:
        self._ids = {c: i for i, c in enumerate(SYMBOLS)}

    def __len__(self) -> int:
        return len(SYMBOLS)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        text.encode("utf-8")  # as a byte-level tokenizer, text that is not valid Unicode (a lone surrogate) fails here
        return [self._ids.get(c, self._ids["?"]) for c in text.lower()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(SYMBOLS[int(i)] for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = True):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant: "
        return self.encode(text) if tokenize else text


def is_utf8(data: bytes) -> bool:
    """Whether ``data`` decodes as UTF-8 (tests of byte-level text handling)."""
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
