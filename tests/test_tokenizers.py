import re

import pytest
from conftest import corpus
from hypothesis import given
from hypothesis import strategies as st

from bardlm import BardlmError
from bardlm.io.checkpoint import save_tokenizer as save
from bardlm.tokenizers import CharTokenizer, WordTokenizer, load, split_words

SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def test_char_round_trip_and_sorted_vocab() -> None:
    tok = CharTokenizer.train(SAMPLE)
    assert tok.chars == sorted(set(SAMPLE))
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE


def test_char_unknown_names_character_and_position() -> None:
    tok = CharTokenizer.train("abc ")
    with pytest.raises(BardlmError, match=r"character 'Z' at position 4"):
        tok.encode("abc Z")


@given(st.text(alphabet="abc \n", max_size=50))
def test_char_round_trip_property(text: str) -> None:
    tok = CharTokenizer.train("abc \n")
    assert tok.decode(tok.encode(text)) == text


def test_word_split_is_regex_word_boundaries() -> None:
    assert split_words("Hear me, speak!") == [t for t in re.split(r"\b", "Hear me, speak!") if t]
    assert split_words("Hear me, speak!") == ["Hear", " ", "me", ", ", "speak", "!"]


def test_word_round_trip_and_unk() -> None:
    tok = WordTokenizer.train(SAMPLE)
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.encode("speak zebra")[-1] == 0  # <unk>
    with pytest.raises(BardlmError, match="'zebra'"):
        tok.encode("speak zebra", strict=True)
    rare = WordTokenizer.train(SAMPLE, min_count=2)
    assert "speak" in rare.stoi and "Before" not in rare.stoi


def test_word_counts_on_complete_works() -> None:
    text = corpus("shakespeare_complete.txt").read_text(encoding="utf-8")
    words = split_words(text)
    assert len(words) == 1_928_821
    tok = WordTokenizer.train(text)
    assert tok.vocab_size == 29_704 + 1  # + <unk>
    assert tok.decode(tok.encode(text)) == text


def test_save_load_every_kind(tmp_path) -> None:
    for tok in (CharTokenizer.train(SAMPLE), WordTokenizer.train(SAMPLE)):
        save(tok, tmp_path / f"{tok.kind}.json")
        back = load(tmp_path / f"{tok.kind}.json")
        assert type(back) is type(tok) and back.encode(SAMPLE) == tok.encode(SAMPLE)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(BardlmError, match="not found"):
        load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(BardlmError, match="not valid JSON"):
        load(tmp_path / "bad.json")
