import json

import pytest
import torch

from bardlm import GPT, BardlmError, ModelConfig
from bardlm.io.checkpoint import load_checkpoint, save_checkpoint
from bardlm.tokenizers import CharTokenizer, WordTokenizer


def _saved(tmp_path, **kw):
    cfg = ModelConfig(**{**dict(vocab_size=6, block_size=8, n_layer=1, n_head=2, n_embd=16), **kw})
    model = GPT(cfg)
    save_checkpoint(tmp_path, model, CharTokenizer.train("abcdef"))
    return model


@pytest.mark.parametrize("kw", [{}, dict(pos="rope", norm="rmsnorm", tie_embeddings=False), dict(pos="sinusoidal")])
def test_round_trip(tmp_path, kw) -> None:
    model = _saved(tmp_path, **kw)
    back, tok, _ = load_checkpoint(tmp_path)
    idx = torch.randint(0, 6, (2, 8))
    torch.testing.assert_close(back(idx)[0], model.eval()(idx)[0])
    if model.config.tie_embeddings:
        assert back.lm_head.weight is back.transformer.wte.weight
    assert tok.vocab_size == 6


def test_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(BardlmError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    _saved(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BardlmError, match="truncated"):
        load_checkpoint(tmp_path)
    weights.unlink()
    with pytest.raises(BardlmError, match="missing"):
        load_checkpoint(tmp_path)


def test_config_that_does_not_match_tensors(tmp_path) -> None:
    _saved(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["n_embd"] = 32
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(BardlmError, match="different models"):
        load_checkpoint(tmp_path)


def test_tokenizer_from_another_run(tmp_path) -> None:
    _saved(tmp_path)
    from bardlm.io.checkpoint import save_tokenizer as save

    save(WordTokenizer.train("one two three four five six seven"), tmp_path / "tokenizer.json")
    with pytest.raises(BardlmError, match="another run"):
        load_checkpoint(tmp_path)


def test_pickle_is_refused_never_unpickled(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(BardlmError, match="pickle"):
        load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_honour_the_umask(tmp_path, umask, monkeypatch) -> None:
    """Files of a save get 0666 & ~umask, as `open` gives, not mkstemp's 0600 (issue 26 item 3):
    a checkpoint must be readable by a server running as another account."""
    import os
    import stat

    from bardlm.train.data import token_ids

    old = os.umask(umask)
    try:
        _saved(tmp_path / "ckpt")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        corpus = tmp_path / "c.txt"
        corpus.write_text("abcabc")
        token_ids(corpus, "abcabc", CharTokenizer.train("abc"))
    finally:
        os.umask(old)
    files = [*(tmp_path / "ckpt").iterdir(), *(tmp_path / "cache").rglob("*.npy")]
    assert len(files) >= 3
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name
