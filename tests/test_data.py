import numpy as np
import pytest
import torch

from bardlm import BardlmError
from bardlm.train import data as D


def test_strip_gutenberg_keeps_only_the_book() -> None:
    raw = "Licence blah\n*** START OF THE PROJECT GUTENBERG EBOOK 100 ***\n\nTHE SONNETS\nxx\n*** END OF THE PROJECT GUTENBERG EBOOK 100 ***\nfooter\n"
    assert D.strip_gutenberg(raw) == "THE SONNETS\nxx\n"


def test_windows_never_overlap_within_an_epoch() -> None:
    ids = np.arange(1000, dtype=np.int32)
    b = D.Batches(ids, block_size=9, seed=3)
    starts = [int(b.window(s)[0]) for s in range(b.n_windows)]
    assert len(set(starts)) == b.n_windows
    starts.sort()
    assert all(nxt - cur >= 10 for cur, nxt in zip(starts, starts[1:]))  # 10 = block_size + 1
    x, y = b.batch(0, 4)
    assert x.shape == (4, 9) and torch.equal(x[:, 1:], y[:, :-1])


def test_epochs_reshuffle_and_are_deterministic() -> None:
    ids = np.arange(500, dtype=np.int32)
    a, b = D.Batches(ids, 9, seed=1), D.Batches(ids, 9, seed=1)
    n = a.n_windows
    first = [int(a.window(s)[0]) for s in range(n)]
    second = [int(a.window(s)[0]) for s in range(n, 2 * n)]
    assert first != second
    assert first == [int(b.window(s)[0]) for s in range(n)]


def test_ranks_split_the_global_batch() -> None:
    b = D.Batches(np.arange(5000, dtype=np.int32), 9, seed=0)
    x_full, _ = b.batch(3, 8)
    x0, _ = b.batch(3, 4, rank=0, world=2)
    x1, _ = b.batch(3, 4, rank=1, world=2)
    assert torch.equal(torch.cat([x0, x1]), x_full)


def test_split_has_no_overlap() -> None:
    ids = np.arange(100, dtype=np.int32)
    train, val = D.split_ids(ids, 100, 0.1)
    assert len(train.ids) == 90 and len(val.ids) == 10
    assert set(train.ids.tolist()).isdisjoint(val.ids.tolist())


def test_too_short_corpus_and_val_errors() -> None:
    with pytest.raises(BardlmError, match="fewer than one sequence"):
        D.Batches(np.arange(5, dtype=np.int32), 9)
    with pytest.raises(BardlmError, match="validation split"):
        D.val_windows(np.arange(5, dtype=np.int32), 9)


def test_read_text_errors(tmp_path) -> None:
    with pytest.raises(BardlmError, match="does not exist"):
        D.read_text(tmp_path / "nope.txt")
    with pytest.raises(BardlmError, match="is a directory"):
        D.read_text(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(BardlmError, match="empty"):
        D.read_text(tmp_path / "empty.txt")
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02abc")
    with pytest.raises(BardlmError, match="binary"):
        D.read_text(tmp_path / "bin.dat")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(BardlmError, match="not UTF-8"):
        D.read_text(tmp_path / "latin1.txt")


def test_resolve_order(tmp_path, monkeypatch) -> None:
    env, cache = tmp_path / "env", tmp_path / "cache"
    (cache / "bardlm").mkdir(parents=True)
    env.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.chdir(tmp_path)
    (cache / "bardlm" / "shakespeare_complete.txt").write_text("cached")
    monkeypatch.setenv("BARDLM_DATA_DIR", str(env))
    assert D.resolve(None) == cache / "bardlm" / "shakespeare_complete.txt"
    (env / "shakespeare_complete.txt").write_text("env")
    assert D.resolve(None) == env / "shakespeare_complete.txt"
    assert D.resolve("my.txt") == D.Path("my.txt")


def test_offline_download_names_data_flag(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("BARDLM_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(D.CORPORA, "shakespeare", ("x.txt", "http://127.0.0.1:9/pg100.txt", True))
    with pytest.raises(BardlmError, match="--data PATH"):
        D.resolve(None)
