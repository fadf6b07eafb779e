"""The encoder-decoder Transformer of "Attention Is All You Need" (`model.py`), built from the
same blocks as the GPT, and its synthetic tasks (`tasks.py`)."""

from .model import (
    BOS,
    EOS,
    PAD,
    EncoderDecoder,
    Seq2SeqConfig,
    beam_search,
    greedy_decode,
    load_seq2seq,
    save_seq2seq,
)

__all__ = ["BOS", "EOS", "PAD", "EncoderDecoder", "Seq2SeqConfig", "beam_search", "greedy_decode",
           "load_seq2seq", "save_seq2seq"]
