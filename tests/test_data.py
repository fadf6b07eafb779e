import gzip

import conftest
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


def test_val_windows_keep_every_full_window() -> None:
    """len // (T + 1) windows fit: 5 tokens at T=4 are one window, 14 at T=4 two, 15 three."""
    ids = np.arange(15, dtype=np.int32)
    assert D.val_windows(ids[:5], 4).tolist() == [[0, 1, 2, 3, 4]]
    for n in (9, 10, 14, 15):
        w = D.val_windows(ids[:n], 4)
        assert len(w) == n // 5
        assert w.flatten().tolist() == list(range(len(w) * 5))  # from the start, none overlapping
    with pytest.raises(BardlmError, match="validation split"):
        D.val_windows(ids[:4], 4)


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


TINY_CHARS = 1_115_394  # characters of tiny Shakespeare (../shared/README.md)


def test_resolve_order(tmp_path, monkeypatch) -> None:
    env, cache = tmp_path / "env", tmp_path / "cache"
    (cache / "bardlm").mkdir(parents=True)
    env.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.chdir(tmp_path)
    (cache / "bardlm" / "shakespeare_complete.txt").write_text("cached")
    monkeypatch.setenv("BARDLM_DATA_DIR", str(env))
    assert D.resolve("shakespeare") == cache / "bardlm" / "shakespeare_complete.txt"
    (env / "shakespeare_complete.txt").write_text("env")
    assert D.resolve("shakespeare") == env / "shakespeare_complete.txt"
    assert D.resolve("my.txt") == D.Path("my.txt")
    # tiny-shakespeare: BARDLM_DATA_DIR, then the cache, then the copy shipped in the package.
    assert D.resolve("tiny-shakespeare") == D.EMBEDDED["tiny-shakespeare"]
    (cache / "bardlm" / "tiny_shakespeare.txt").write_text("cached")
    assert D.resolve("tiny-shakespeare") == cache / "bardlm" / "tiny_shakespeare.txt"
    (env / "tiny_shakespeare.txt").write_text("env")
    assert D.resolve("tiny-shakespeare") == env / "tiny_shakespeare.txt"


def test_offline_download_names_data_flag(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("BARDLM_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(D.CORPORA, "shakespeare", ("x.txt", "http://127.0.0.1:9/pg100.txt", True))
    with pytest.raises(BardlmError, match="--data PATH") as err:
        D.resolve("shakespeare")
    assert "\n" not in str(err.value)


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A machine without this repo's layout: no BARDLM_DATA_DIR, an empty cache, and a working
    directory whose parent holds a decoy `shared/data` (how this project's CI lays corpora out),
    which bardlm must not look at."""
    monkeypatch.delenv("BARDLM_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    decoys = tmp_path / "shared" / "data"
    decoys.mkdir(parents=True)
    for name in ("tiny_shakespeare.txt", "shakespeare_complete.txt"):
        (decoys / name).write_text("decoy\n")
    (tmp_path / "work" / "shared" / "data").mkdir(parents=True)  # and one inside the cwd
    (tmp_path / "work" / "shared" / "data" / "tiny_shakespeare.txt").write_text("decoy\n")
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


def test_default_corpus_is_embedded_tiny_shakespeare(elsewhere) -> None:
    """No --data: tiny Shakespeare from inside the package, on any machine, offline."""
    assert D.DEFAULT_CORPUS == "tiny-shakespeare"
    text, path = D.load_corpus(None)
    assert path == D.EMBEDDED["tiny-shakespeare"] and path.suffix == ".gz"
    assert len(text) == TINY_CHARS and text.startswith("First Citizen:\n")
    shared = conftest.data_dir() / "tiny_shakespeare.txt"
    if shared.is_file():  # the embedded copy is the shared file, byte for byte
        assert text == shared.read_text(encoding="utf-8")


def test_no_shared_data_lookup_from_cwd(elsewhere, monkeypatch) -> None:
    """The CI layout (`../shared/data` or `shared/data` beside the working directory) is not a
    corpus source: the complete works go to the download (failing offline), never to a decoy."""
    monkeypatch.setitem(D.CORPORA, "shakespeare",
                        ("shakespeare_complete.txt", "http://127.0.0.1:9/pg100.txt", True))
    with pytest.raises(BardlmError, match="could not download the shakespeare corpus"):
        D.resolve("shakespeare")
    assert D.resolve("tiny-shakespeare") == D.EMBEDDED["tiny-shakespeare"]


def test_train_without_data_uses_embedded_corpus(elsewhere, capsys) -> None:
    """`bardlm train --preset char-tiny --out runs/x` works from an empty folder, and caches its
    token ids under XDG_CACHE_HOME, nowhere else."""
    from bardlm.cli import main

    tiny = ["--set", "n_layer=1", "--set", "n_embd=16", "--set", "n_head=2", "--set",
            "block_size=256", "--set", "batch_size=2", "--set", "eval_batches=1"]
    assert main(["train", "--preset", "char-tiny", "--out", "runs/x", "--max-iters", "1",
                 "--no-progress", *tiny]) == 0
    out = capsys.readouterr()
    assert f"({TINY_CHARS:,} characters)" in out.err and "tiny_shakespeare.txt.gz" in out.err
    assert (elsewhere / "work" / "runs" / "x").is_dir()
    assert len(list((elsewhere / "cache" / "bardlm" / "tokens").glob("*.tokens.npy"))) == 1
    # Nothing new in the package's data folder (the embedded corpus sits alone there).
    assert sorted(p.name for p in D.EMBEDDED["tiny-shakespeare"].parent.iterdir()) == [
        "tiny_shakespeare.txt.gz"]


def test_gzipped_data_files(tmp_path) -> None:
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress("to be, café\n".encode()))
    assert D.read_text(tmp_path / "a.txt.gz") == "to be, café\n"
    (tmp_path / "b.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(BardlmError, match="not valid gzip"):
        D.read_text(tmp_path / "b.txt.gz")
