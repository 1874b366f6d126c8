"""Text from token ids, as an answer grows: incremental detokenisation and each token's own bytes.

``extend_text`` turns the tokens a round emitted into text without decoding the whole answer again (the
engine did that every round before: O(n^2) in the answer's length, under the tokenizer lock that encoding
shares). It decodes a small window: the tokens since the last emitted text plus a few tokens of context
before them, so tokenizers whose pieces depend on their neighbours (SentencePiece's leading space, byte
tokens that form one UTF-8 character together) give the same text as one decode of everything. Text that
ends in an unfinished character (U+FFFD) is held back until the next token completes it, or until the
answer ends.

``token_bytes`` gives each token's own bytes (OpenAI's ``logprobs.content[].bytes``), read from the
tokenizer's vocabulary rather than re-encoded from decoded text, which is lossy for a token that holds
part of a character.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Sequence

CONTEXT_TOKENS = 6  # tokens of already-emitted text decoded in front of the new ones


def extend_text(decode: Callable[[list[int]], str], ids: Sequence[int], prefix: int, read: int,
                final: bool) -> tuple[str, int, int]:
    """The text ``ids[read:]`` adds to the text of ``ids[:read]``.

    ids: every output token so far; ``ids[prefix:read]`` is the context window (already text). Returns
    (new text, new prefix, new read). With ``final`` an unfinished trailing character is emitted as
    decoding everything would (U+FFFD) instead of waiting for a token that will not come."""
    if read >= len(ids):
        return "", prefix, read
    before = decode(list(ids[prefix:read]))
    after = decode(list(ids[prefix:]))
    if not after.startswith(before):  # a tokenizer whose window text is not a prefix: fall back to exactness
        whole_before = decode(list(ids[:read]))
        whole = decode(list(ids))
        if final or not whole.endswith("\ufffd"):
            return whole[len(whole_before):], max(0, len(ids) - CONTEXT_TOKENS), len(ids)
        return "", prefix, read
    if after.endswith("\ufffd") and not final:
        return "", prefix, read
    return after[len(before):], max(prefix, len(ids) - CONTEXT_TOKENS), len(ids)


# ---------------------------------------------------------------------- a token's bytes
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character that stands for each byte -> the byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece's byte-fallback pieces


class TokenBytes:
    """Each token id's bytes, from the tokenizer's vocabulary: byte-level BPE pieces (Qwen, Llama 3, GPT-2)
    through the byte alphabet, SentencePiece pieces (``▁`` for a space, ``<0xNN>`` byte fallback), and the
    decoded text for tokenizers without pieces (a tokenizer only ``decode`` works with)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._pieces = getattr(tokenizer, "convert_ids_to_tokens", None)
        self._decoder = _byte_decoder()
        self._byte_level = self._detect_byte_level()
        self.of = lru_cache(maxsize=65536)(self._of)

    def _detect_byte_level(self) -> bool:
        if self._pieces is None:
            return False
        try:
            pieces = self._pieces(list(self.tokenizer.encode(" a\n", add_special_tokens=False)))
        except Exception:  # noqa: BLE001 -- an unusual tokenizer: use the decoded text
            return False
        joined = "".join(p for p in pieces if isinstance(p, str))
        return "Ġ" in joined or "Ċ" in joined

    def _of(self, token_id: int) -> bytes:
        piece = self._pieces([token_id])[0] if self._pieces is not None else None
        if isinstance(piece, str):
            if self._byte_level and all(c in self._decoder for c in piece):
                return bytes(self._decoder[c] for c in piece)
            m = _BYTE_TOKEN.match(piece)
            if m:
                return bytes([int(m.group(1), 16)])
            if "▁" in piece:
                return piece.replace("▁", " ").encode("utf-8")
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def __call__(self, ids: Sequence[int]) -> list[bytes]:
        return [self.of(int(t)) for t in ids]
