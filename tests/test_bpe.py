"""Byte-level BPE: the from-scratch trainer/encoder agrees with Hugging Face `tokenizers`, every
string round-trips, tokenizers save and load, and tiktoken fails cleanly when offline."""

from __future__ import annotations

import functools
import hashlib
import json

import pytest
from conftest import corpus as corpus_path
from hypothesis import given, settings
from hypothesis import strategies as st

from bardlm import tokenizers as toks
from bardlm.errors import BardlmError
from bardlm.io.checkpoint import save_tokenizer
from bardlm.tokenizers import bpe

pytest.importorskip("tokenizers")
pytest.importorskip("regex")

def corpus(name: str) -> str:
    """A corpus's text; skips (naming the file and where to get it) where it is absent."""
    return corpus_path(name).read_text(encoding="utf-8")


# Small fixed texts: 50 KB to train on, the next 30 KB held out.
@functools.cache
def tiny() -> tuple[str, str]:
    text = corpus("tiny_shakespeare.txt")
    return text[:50_000], text[50_000:80_000]


@functools.cache
def hf_tok(vocab_size: int = 1000) -> bpe.BPETokenizer:
    return bpe.train_bpe(tiny()[0], vocab_size=vocab_size)


@functools.cache
def scratch_merges(vocab_size: int = 1000) -> list[tuple[str, str]]:
    return bpe.train_bpe_scratch(tiny()[0], vocab_size=vocab_size)


# --- building blocks ---------------------------------------------------------------------------


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bpe.bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"
    # the id order (byte_alphabet) is the one GPT-2 and the HF trainer use: "!" is id 0
    assert bpe.byte_alphabet()[0] == "!" and len(bpe.byte_alphabet()) == 256


def test_pretokenize_gpt2_words():
    # a whitespace run gives its last space to the next word: "\n\n  x" -> "\n\n ", " x"
    words = ["Hello", " world", "'s", " 42", "!!", "\n\n ", " x"]
    assert bpe.pretokenize("Hello world's 42!!\n\n  x") == words
    assert "".join(bpe.pretokenize("any  text,\twith\u00a0ünïcödé 日本 ½")) == (
        "any  text,\twith\u00a0ünïcödé 日本 ½"
    )


def test_byte_symbols_round_trip():
    word = " héllo 日本"
    assert bpe.from_byte_symbols(bpe.to_byte_symbols(word)) == word
    assert bpe.to_byte_symbols(" é") == "ĠÃ©"


# --- the from-scratch trainer and encoder agree with Hugging Face ------------------------------


def test_scratch_trainer_learns_the_hf_merges():
    ours, theirs = scratch_merges(), hf_tok().merges()
    assert len(ours) == len(theirs) == 1000 - 256
    assert ours[:5] == [("Ġ", "t"), ("h", "e"), ("o", "u"), ("Ġ", "a"), ("Ġt", "he")]
    assert ours == theirs


def test_scratch_tokenizer_has_the_hf_vocabulary():
    scratch = bpe.ScratchBPETokenizer(scratch_merges())
    tok = hf_tok()
    assert scratch.vocab_size == tok.vocab_size == 1000
    assert scratch.tokens == [tok.token(i) for i in range(tok.vocab_size)]


def test_scratch_encoder_gives_the_hf_ids_on_held_out_text():
    held_out = tiny()[1]
    scratch = bpe.ScratchBPETokenizer(scratch_merges())
    ids = hf_tok().encode(held_out)
    assert scratch.encode(held_out) == ids
    assert scratch.decode(ids) == held_out
    assert len(ids) < len(held_out) / 2  # BPE compresses: fewer tokens than characters


def test_scratch_trainer_tie_break_and_early_stop():
    # "ab" and "cd" are equally frequent: the pair of smaller ids ("a","b") is merged first.
    # Then nothing is left to merge, so training stops below the requested vocab size.
    merges = bpe.train_bpe_scratch("ab cd ab cd", vocab_size=1000)
    assert merges == bpe.train_bpe("ab cd ab cd", vocab_size=1000).merges()
    assert merges[0] == ("a", "b")
    assert bpe.ScratchBPETokenizer(merges).vocab_size < 1000


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_scratch_encoder_matches_hf_on_any_text(text):
    assert bpe.ScratchBPETokenizer(hf_tok().merges()).encode(text) == hf_tok().encode(text)


# --- every string round-trips -----------------------------------------------------------------


def test_round_trip_complete_works():
    text = corpus("shakespeare_complete.txt")
    tok = bpe.train_bpe(text[:300_000], vocab_size=512)
    ids = tok.encode(text)  # long text: encoded in chunks, in parallel
    assert tok.decode(ids) == text
    assert len(text) / len(ids) > 1.5  # 512 tokens already compress
    # chunked encoding gives exactly the ids of encoding the text in one piece
    piece = text[1_000_000:1_400_000]
    assert tok.encode(piece) == tok.hf.encode(piece, add_special_tokens=False).ids


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text_hf(text):
    tok = hf_tok()
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text_scratch(text):
    tok = bpe.ScratchBPETokenizer(scratch_merges())
    assert tok.decode(tok.encode(text)) == text


def test_unseen_characters_fall_back_to_bytes():
    tok = hf_tok()
    text = "日本語 🙂 \x00"
    ids = tok.encode(text)
    assert all(i < 256 for i in ids)  # none of these bytes were merged in English training text
    assert tok.decode(ids) == text


# --- save / load ------------------------------------------------------------------------------


def test_save_load_bpe(tmp_path):
    tok = hf_tok()
    save_tokenizer(tok, tmp_path / "tok.json")
    data = json.loads((tmp_path / "tok.json").read_text(encoding="utf-8"))
    assert data["kind"] == "bpe" and data["tokenizer"]["model"]["type"] == "BPE"
    back = toks.load(tmp_path / "tok.json")
    assert isinstance(back, bpe.BPETokenizer)
    assert back.vocab_size == tok.vocab_size and back.merges() == tok.merges()
    held_out = tiny()[1][:5000]
    assert back.encode(held_out) == tok.encode(held_out)


def test_save_load_scratch(tmp_path):
    tok = bpe.ScratchBPETokenizer(scratch_merges(300))
    save_tokenizer(tok, tmp_path / "scratch.json")
    back = toks.load(tmp_path / "scratch.json")
    assert isinstance(back, bpe.ScratchBPETokenizer)
    assert back.merges == tok.merges and back.encode("Hello, world") == tok.encode("Hello, world")


def test_load_tokenizer_json_written_by_hf(tmp_path):
    tok = hf_tok()
    tok.hf.save(str(tmp_path / "tokenizer.json"))  # written by `tokenizers` itself
    for path in (tmp_path / "tokenizer.json", tmp_path):  # the file, or its folder
        back = toks.load(path)
        assert isinstance(back, toks.HFTokenizer) and back.kind == "hf"
        assert back.encode("To be, or not to be") == tok.encode("To be, or not to be")
    # an HFTokenizer saves as plain tokenizer.json, which loads again
    save_tokenizer(back, tmp_path / "again.json")
    again = toks.load(tmp_path / "again.json")
    assert again.to_dict() == back.to_dict()


def test_build_bpe_spec():
    tok = toks.build("bpe:300", tiny()[0])
    assert isinstance(tok, bpe.BPETokenizer) and tok.vocab_size == 300


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [0, 255, -1])
def test_vocab_size_below_bytes_is_an_error(vocab_size):
    with pytest.raises(BardlmError, match="256"):
        bpe.train_bpe("some text", vocab_size=vocab_size)
    with pytest.raises(BardlmError, match="256"):
        bpe.train_bpe_scratch("some text", vocab_size=vocab_size)


def test_user_errors_are_bardlm_errors(tmp_path):
    tok = hf_tok()
    with pytest.raises(BardlmError, match="empty"):
        bpe.train_bpe("", vocab_size=300)
    with pytest.raises(BardlmError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(BardlmError, match="outside the vocabulary"):
        bpe.ScratchBPETokenizer([]).decode([-1])
    with pytest.raises(BardlmError, match="surrogate"):
        tok.encode("bad \ud800 text")
    with pytest.raises(BardlmError, match="surrogate"):
        bpe.ScratchBPETokenizer([]).encode("bad \ud800 text")
    with pytest.raises(BardlmError, match="not a valid Hugging Face"):
        toks.HFTokenizer.from_json({"model": {"type": "nonsense"}, "pre_tokenizer": None})
    with pytest.raises(BardlmError, match="corrupt"):
        bpe.ScratchBPETokenizer([("ab", "c")])


def test_chars_per_token():
    bytes_only = bpe.ScratchBPETokenizer([])
    assert bpe.chars_per_token(bytes_only, "hello") == 1.0
    assert bpe.chars_per_token(bytes_only, "héllo") == 5 / 6  # é is two bytes
    assert bpe.chars_per_token(hf_tok(), tiny()[1]) > 2.0


# --- tiktoken: offline only, never downloads ----------------------------------------------------


def test_tiktoken_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(BardlmError, match="not cached") as e:
        toks.load_tiktoken("gpt2")
    assert "TIKTOKEN_CACHE_DIR" in str(e.value) and "\n" not in str(e.value)
    # a corrupt cached file would make tiktoken download again: refused the same way
    for url, _ in toks.tiktoken.TIKTOKEN_FILES["gpt2"]:
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_text("garbage")
    with pytest.raises(BardlmError, match="corrupt"):
        toks.load_tiktoken("gpt2")


def test_tiktoken_caching_disabled_or_unknown(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    with pytest.raises(BardlmError, match="TIKTOKEN_CACHE_DIR"):
        toks.load_tiktoken("gpt2")
    with pytest.raises(BardlmError, match="unknown tiktoken encoding"):
        toks.load_tiktoken("gpt5")
