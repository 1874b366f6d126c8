"""Incremental detokenisation (``cascade.detokenize.extend_text``) equals one decode of everything, token by
token and in rounds of any size, for a byte-level BPE tokenizer (the default pair's, Qwen2.5) and a
SentencePiece one with byte fallback (Llama 2 / Mistral style); each token's bytes (``TokenBytes``) join
into the text's UTF-8. The engine's text equals a full decode, and a round decodes a window, not the answer."""

from __future__ import annotations

import json
import random

import pytest

from cascade import SamplingParams
from cascade.detokenize import CONTEXT_TOKENS, TokenBytes, extend_text

from test_engine import PROMPTS, make_cascade
from tiny_tokenizer import is_utf8

TEXT = ("def is_prime(n):\n    # prüfe Teiler — 素数 ✓ 🙂\n    return all(n % d for d in range(2, n))\n"
        "Ünïcödé, ça va? naïve café; 日本語のテキスト and emoji 🚀🚀 done.\n")


def _qwen_tokenizer():
    from cascade.library import load_tokenizer
    from cascade.models.resolve import resolve_model
    from cascade.weights import DEFAULT_PAIR

    try:
        return load_tokenizer(resolve_model(DEFAULT_PAIR[0].name))
    except (FileNotFoundError, ValueError):
        pytest.skip("the default pair is not fetched (cascade fetch-models)")


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join([TEXT.replace("🙂", "").replace("🚀", "")] * 20 + ["the quick brown fox jumps over the lazy dog"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "sp"), vocab_size=400, byte_fallback=True,
                                   character_coverage=0.98, model_type="bpe", minloglevel=2, bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    (root / "sp.model").rename(tok_dir / "tokenizer.model")
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "legacy": False}))
    return AutoTokenizer.from_pretrained(str(tok_dir))


def _decode(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def _incremental(decode, ids, step_sizes):
    text, prefix, read, done = "", 0, 0, 0
    for n in step_sizes:
        done = min(len(ids), done + n)
        added, prefix, read = extend_text(decode, ids[:done], prefix, read, final=done == len(ids))
        text += added
        assert read - prefix <= CONTEXT_TOKENS + n  # a window, never the whole answer
    return text


@pytest.mark.parametrize("which", ["qwen", "sentencepiece"])
def test_incremental_text_equals_one_decode(which, sentencepiece_tokenizer):
    tok = _qwen_tokenizer() if which == "qwen" else sentencepiece_tokenizer
    ids = list(tok.encode(TEXT, add_special_tokens=False))
    decode = _decode(tok)
    whole = decode(ids)
    assert _incremental(decode, ids, [1] * len(ids)) == whole
    rng = random.Random(0)
    for _ in range(5):
        assert _incremental(decode, ids, [rng.randint(1, 6) for _ in range(len(ids))]) == whole
    # random ids still equal the one decode once final: for byte-level BPE any ids (unfinished characters
    # everywhere); for SentencePiece, ids of whole pieces (byte-fallback soup that never forms UTF-8 has no
    # one right text: a decode of part of it places its replacement characters differently)
    vocab = min(len(tok), 5000)
    pieces = tok.convert_ids_to_tokens(list(range(vocab)))
    usable = [i for i in range(3, vocab) if which == "qwen" or not pieces[i].startswith("<0x")]
    junk = [rng.choice(usable) for _ in range(200)]
    assert _incremental(decode, junk, [rng.randint(1, 4) for _ in range(200)]) == decode(junk)


def test_an_unfinished_character_waits_for_the_token_that_completes_it():
    pieces = {1: b"a", 2: b"\xe2\x9c", 3: b"\x93", 4: b"b"}  # U+2713 split over tokens 2 and 3
    decode = lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")  # noqa: E731
    added, prefix, read = extend_text(decode, [1, 2], 0, 0, final=False)
    assert added == "" and read == 0  # "a\ufffd" is held back whole (nothing is split off a character)
    added, prefix, read = extend_text(decode, [1, 2, 3], prefix, read, final=False)
    assert added == "a✓" and read == 3
    added, _, _ = extend_text(decode, [1, 2, 3, 4, 2], prefix, read, final=True)
    assert added == "b\ufffd"  # final: as one decode gives it


@pytest.mark.parametrize("which", ["qwen", "sentencepiece"])
def test_token_bytes_join_into_the_texts_utf8(which, sentencepiece_tokenizer):
    tok = _qwen_tokenizer() if which == "qwen" else sentencepiece_tokenizer
    text = TEXT if which == "qwen" else TEXT.replace("🙂", "").replace("🚀", "")
    ids = list(tok.encode(text, add_special_tokens=False))
    pieces = TokenBytes(tok)(ids)
    joined = b"".join(pieces)
    if which == "qwen":
        assert joined.decode("utf-8") == text
    else:  # SentencePiece: the first piece's bytes keep the dummy-prefix space that decoding drops
        assert joined.decode("utf-8") == " " + tok.decode(ids)
    # a token holding part of a character has raw bytes, not the re-encoded replacement character
    partial = [p for p in pieces if not is_utf8(p)]
    assert partial and all(b"\xef\xbf\xbd" not in p for p in partial)




def test_the_engines_text_equals_a_full_decode_and_decodes_windows(tiny_pair_dirs):
    from tiny_tokenizer import CharTokenizer

    tok = CharTokenizer()
    calls: list[int] = []

    def decode(ids):
        calls.append(len(ids))
        return tok.decode(ids)

    c = make_cascade(tiny_pair_dirs, max_rows=4, max_len=256, detokenize=decode)
    out = c.generate(PROMPTS, SamplingParams(max_tokens=120), policy="chow(alpha=0.3)")
    for r in out:
        assert r.text == tok.decode(r.token_ids) and len(r.token_ids) == 120
    assert max(calls) <= CONTEXT_TOKENS + 17  # a window (context + one round's tokens), never a 120-token answer
