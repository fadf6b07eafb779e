"""`bardlm prepare` (train/prepare.py) and training from its folders (data.load_prepared)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bardlm.cli import main
from bardlm.config import ModelConfig
from bardlm.errors import BardlmError
from bardlm.tokenizers import load as load_tokenizer
from bardlm.tokenizers import train_bpe
from bardlm.train import TrainConfig, Trainer
from bardlm.train import data as D
from bardlm.train import prepare as P

TESTS = Path(__file__).resolve().parent
EOS = P.EOS_TOKEN


def doc(i: int) -> str:
    return "".join(f"Doc {i}, line {j}: the quick brown fox {i * j % 7} jumps.\n" for j in range(30))


def run(tmp_path: Path, sources, tokenizer: str = "char", name: str = "out", **kw) -> tuple[Path, dict]:
    out = tmp_path / name
    meta = P.prepare([str(s) for s in sources], tokenizer, out, log=lambda m: None, **kw)
    assert json.loads((out / "meta.json").read_text()) == meta
    return out, meta


def documents(out: Path) -> dict[str, list[str]]:
    """The text of each split, cut at the end-of-document tokens."""
    prep = D.load_prepared(out)
    tok = load_tokenizer(prep.tokenizer_path)
    eos = prep.meta["eos_id"]
    res = {}
    for name, split in (("train", prep.train), ("val", prep.val)):
        ids = split.ids[0 : len(split.ids)].tolist()
        docs, cur = [], []
        for i in ids:
            if i == eos:
                docs.append(tok.decode(cur))
                cur = []
            else:
                cur.append(i)
        res[name] = docs + ([tok.decode(cur)] if cur else [])
    return res


def test_every_source_kind(tmp_path: Path) -> None:
    """txt, txt.gz, jsonl, jsonl.gz, parquet and a folder searched recursively: one document per
    file, line or row, each followed by one end-of-document token."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    src = tmp_path / "src"
    (src / "deep" / "er").mkdir(parents=True)
    (src / "a.txt").write_text(doc(0))
    (src / "deep" / "b.txt.gz").write_bytes(gzip.compress(doc(1).encode()))
    (src / "deep" / "c.jsonl").write_text("".join(json.dumps({"text": doc(i), "id": i}) + "\n" for i in (2, 3)))
    with gzip.open(src / "deep" / "er" / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": doc(4)}) + "\n\n")  # blank lines are not documents
    pq.write_table(pa.table({"text": [doc(5), doc(6), doc(7)]}), src / "deep" / "er" / "e.parquet")
    (src / "notes.md").write_text("not a source")
    out, meta = run(tmp_path, [src], text_field="text", skip_bad=True)
    # d.jsonl.gz has no "text" field: with --skip-bad it is counted, not fatal
    assert meta["skipped"] == {"missing_field": 1, "empty": 1}
    assert meta["documents"] == 7 and meta["dtype"] == "uint16"
    docs = documents(out)
    assert sorted(docs["train"] + docs["val"]) == sorted(doc(i) for i in (0, 1, 2, 3, 5, 6, 7))
    assert meta["train_characters"] + meta["val_characters"] == sum(len(doc(i)) for i in (0, 1, 2, 3, 5, 6, 7))
    # the field is a flag: the gzipped JSONL alone, by its own field
    _, meta = run(tmp_path, [src / "deep" / "er" / "d.jsonl.gz"], name="body", text_field="body")
    assert meta["documents"] == 1


def test_document_separator(tmp_path: Path) -> None:
    """char, word and bpe tokenizers made here gain "<|endoftext|>" (the last id); a
    tokenizer.json that has an end token already keeps its vocabulary and reuses that id."""
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": doc(i)}) + "\n" for i in range(6)))
    for spec in ("char", "word", "bpe:300"):
        out, meta = run(tmp_path, [tmp_path / "c.jsonl"], spec, name=spec.replace(":", "_"))
        tok = load_tokenizer(out / "tokenizer.json")
        assert meta["eos_id"] == tok.vocab_size - 1 == meta["vocab_size"] - 1
        assert tok.decode([meta["eos_id"]]) == EOS
        ids = np.concatenate([D.load_prepared(out).train.ids[0 : meta["train_tokens"]],
                              D.load_prepared(out).val.ids[0 : meta["val_tokens"]]])
        assert (ids == meta["eos_id"]).sum() == 6
    hf = train_bpe(doc(0), 300)
    hf.hf.add_special_tokens(["</s>"])
    path = tmp_path / "hf.json"
    path.write_text(hf.hf.to_str())  # a plain Hugging Face tokenizer.json
    out, meta = run(tmp_path, [tmp_path / "c.jsonl"], str(path), name="hf")
    assert meta["eos_id"] == hf.hf.token_to_id("</s>") and meta["vocab_size"] == hf.vocab_size
    assert sorted(documents(out)["train"] + documents(out)["val"]) == sorted(doc(i) for i in range(6))


def test_bpe_is_trained_on_a_sample_of_a_large_corpus(tmp_path: Path) -> None:
    """Past --sample-mb, bpe:VOCAB learns from a random sample of pieces; every document is
    still encoded (byte-level BPE encodes any text)."""
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": doc(i)}) + "\n" for i in range(40)))
    logs: list[str] = []
    out = tmp_path / "out"
    P.prepare([tmp_path / "c.jsonl"], "bpe:300", out, sample_mb=0.02, log=logs.append)
    assert "sample of the text" in logs[0]
    assert sorted(documents(out)["train"] + documents(out)["val"]) == sorted(doc(i) for i in range(40))


def test_split_by_whole_documents(tmp_path: Path) -> None:
    """Validation takes whole documents, drawn from the seed: the same seed gives the same bytes,
    another seed another split. One document is split by position, like a text file."""
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": doc(i)}) + "\n" for i in range(60)))
    a, meta = run(tmp_path, [tmp_path / "c.jsonl"], name="a", val_fraction=0.2, seed=1)
    b, _ = run(tmp_path, [tmp_path / "c.jsonl"], name="b", val_fraction=0.2, seed=1)
    c, _ = run(tmp_path, [tmp_path / "c.jsonl"], name="c", val_fraction=0.2, seed=2)
    docs = documents(a)
    assert 0 < len(docs["val"]) < 60 and len(docs["train"]) + len(docs["val"]) == 60
    assert set(docs["val"]) <= {doc(i) for i in range(60)}  # whole documents only
    assert meta["val_documents"] == len(docs["val"])
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in os.listdir(a) if f != "meta.json")
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    assert documents(c)["val"] != docs["val"]
    # Few documents, none drawn: the last one validates, so training always has a split.
    (tmp_path / "two.jsonl").write_text(json.dumps({"text": doc(0)}) + "\n" + json.dumps({"text": doc(1)}) + "\n")
    two, meta = run(tmp_path, [tmp_path / "two.jsonl"], name="two", val_fraction=0.01)
    assert documents(two) == {"train": [doc(0)], "val": [doc(1)]} and meta["val_documents"] == 1
    (tmp_path / "one.txt").write_text(doc(0) * 4)
    one, meta = run(tmp_path, [tmp_path / "one.txt"], name="one", shard_tokens=1000)
    total = meta["tokens"]
    assert meta["documents"] == 1 and meta["val_tokens"] == int(total * 0.05)
    joined = documents(one)["train"][0] + documents(one)["val"][0]
    assert joined == doc(0) * 4  # the split by position cuts one text in two, nothing lost


def test_shards_read_as_one_array(tmp_path: Path) -> None:
    """Batches over many small shards (windows crossing shard ends) equal those over one array."""
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": doc(i)}) + "\n" for i in range(30)))
    small, _ = run(tmp_path, [tmp_path / "c.jsonl"], name="small", shard_tokens=997)
    big, meta = run(tmp_path, [tmp_path / "c.jsonl"], name="big")
    s, b = D.load_prepared(small), D.load_prepared(big)
    assert len(s.meta["shards"]) > 10 and len(b.meta["shards"]) == 2
    assert len(s.train.ids) == len(b.train.ids) == meta["train_tokens"]
    whole = np.asarray(b.train.ids[:])
    for lo, hi in ((0, 5), (990, 1010), (1993, 4000), (len(whole) - 3, len(whole))):
        assert np.array_equal(s.train.ids[lo:hi], whole[lo:hi])
    bs, bw = D.Batches(s.train.ids, 32, seed=3), D.Batches(whole, 32, seed=3)
    for step in (0, 7, 500):
        assert torch.equal(bs.batch(step, 4, rank=1, world=2)[0], bw.batch(step, 4, rank=1, world=2)[0])
    # validation windows of shards are read on demand, the rows of the array's
    ref = D.val_windows(np.asarray(b.val.ids[:]), 16)
    lazy = D.val_windows(s.val.ids, 16)
    assert len(lazy) == len(ref) and torch.equal(lazy[:], ref) and torch.equal(lazy[2:5], ref[2:5])
    assert torch.equal(lazy[torch.tensor([0, 3, len(ref) - 1])], ref[[0, 3, len(ref) - 1]])


BAD = {
    "bad_utf8": ("bad.txt", b"good text\n" * 10 + b"caf\xe9\n", "not UTF-8 (bad byte at offset 103)"),
    "bad_json": ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2: not JSON"),
    "missing_field": ("bad.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "bad.jsonl:2: no string field 'text'"),
    "empty": ("bad.txt", b" \n\n", "bad.txt: empty"),
    "unreadable": ("bad.txt.gz", gzip.compress(b"hello world\n" * 1000)[:-30], "bad.txt.gz: not valid gzip"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_is_one_line_or_skipped(tmp_path: Path, capsys, monkeypatch, kind: str) -> None:
    # Small blocks and pieces: a bad byte is found after good pieces of its file went out.
    monkeypatch.setattr(P, "BLOCK_BYTES", 16)
    monkeypatch.setattr(P, "PIECE_CHARS", 8)
    name, raw, message = BAD[kind]
    src = tmp_path / "src"
    src.mkdir()
    (src / name).write_bytes(raw)
    (src / "good.txt").write_text(doc(0) + doc(1))
    out = tmp_path / "out"
    assert main(["prepare", "--data", str(src), "--tokenizer", "char", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(src / name) in err and "--skip-bad" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and os.listdir(tmp_path) == ["src"]  # nothing half-written left
    assert main(["prepare", "--data", str(src), "--tokenizer", "char", "--out", str(out), "--skip-bad"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"] == {kind: 1}
    kept = documents(out)
    joined = "".join(kept["train"] + kept["val"])  # one document may be cut in two
    assert doc(0) + doc(1) in joined
    assert len(joined) == len(doc(0) + doc(1)) + (2 if kind in ("bad_json", "missing_field") else 0)
    if kind in ("bad_utf8", "unreadable"):  # the bad file was dropped whole, even after good blocks
        assert all("hello" not in d and "good text" not in d for d in kept["train"] + kept["val"])


def test_missing_source_and_unreadable_link(tmp_path: Path, capsys) -> None:
    assert main(["prepare", "--data", str(tmp_path / "nope"), "--tokenizer", "char", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    assert main(["prepare", "--data", str(tmp_path / "dangling.txt"), "--tokenizer", "char", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "dangling.txt: cannot read it" in err and len(err.strip().splitlines()) == 1


def test_interrupted_prepare_leaves_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    """An interrupt midway removes the temporary folder; a folder without meta.json (a prepare
    killed hard) is refused by train with one line."""
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": doc(i)}) + "\n" for i in range(30)))
    monkeypatch.setattr(P, "BATCH_CHARS", 2000)
    calls = []

    def encode(self, pieces):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return [np.asarray(self.tok.encode(p)) for p in pieces]

    monkeypatch.setattr(P.Encoder, "__call__", encode)
    with pytest.raises(KeyboardInterrupt):
        P.prepare([tmp_path / "c.jsonl"], "char", tmp_path / "out", workers=1, log=lambda m: None)
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]
    half = tmp_path / "half"
    half.mkdir()
    (half / "train_00000.bin").write_bytes(b"\0" * 100)
    assert main(["train", "--data", str(half), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "without meta.json" in err and len(err.strip().splitlines()) == 1


def tiny_trainer(out: Path, data: Path, **train) -> Trainer:
    prep = D.load_prepared(data)
    tok = load_tokenizer(prep.tokenizer_path)
    mc = ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    tc = TrainConfig(**{"batch_size": 4, "max_iters": 6, "eval_interval": 3, "eval_batches": 1,
                        "warmup_iters": 1, **train})
    return Trainer(mc, tc, tok, "", out, progress=False, log=lambda m: None, prepared=prep,
                   meta={"data": str(data), "data_fingerprint": prep.fingerprint()})


def losses_of(trainer: Trainer, until: int | None = None) -> list[float]:
    losses: list[float] = []
    step = trainer.train_step
    trainer.train_step = lambda sync=True: losses.append(step(sync)) or losses[-1]
    trainer.fit(until=until)
    return losses


def test_resume_restarts_at_the_exact_data_position(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": doc(i)}) + "\n" for i in range(30)))
    data, _ = run(tmp_path, [tmp_path / "c.jsonl"], name="data", shard_tokens=1500)
    whole = losses_of(tiny_trainer(tmp_path / "a", data))
    first = losses_of(tiny_trainer(tmp_path / "b", data), until=3)
    again = tiny_trainer(tmp_path / "b", data)
    again.resume()
    assert first + losses_of(again) == whole
    # prepared again differently: the step would point elsewhere, so resume refuses
    other, _ = run(tmp_path, [tmp_path / "c.jsonl"], name="data", shard_tokens=900, overwrite=True)
    with pytest.raises(BardlmError, match="not the one this run trained on"):
        tiny_trainer(tmp_path / "b", other).resume()


def test_train_cli_on_prepared_folder(tmp_path: Path, capsys) -> None:
    """prepare -> train -> resume through the command line; the folder's tokenizer is used and
    a conflicting --tokenizer is one line."""
    (tmp_path / "books").mkdir()
    for i in range(8):
        (tmp_path / "books" / f"book{i}.txt").write_text(doc(i) * 3)
    data = tmp_path / "data"
    assert main(["prepare", "--data", str(tmp_path / "books"), "--tokenizer", "bpe:300",
                 "--out", str(data), "--val-fraction", "0.25", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["documents"] == 8 and summary["val_tokens"] > 0
    common = ["--data", str(data), "--out", str(tmp_path / "run"), "--no-progress", "--set", "block_size=16",
              "--set", "n_layer=1", "--set", "n_embd=16", "--set", "n_head=2", "--set", "batch_size=4",
              "--set", "eval_interval=2", "--set", "eval_batches=1"]
    assert main(["train", *common, "--tokenizer", "char", "--max-iters", "2"]) == 2
    err = capsys.readouterr().err
    assert "conflicts with --data" in err and len(err.strip().splitlines()) == 1
    assert main(["train", *common, "--tokenizer", "bpe:300", "--max-iters", "2"]) == 0
    assert "tokenizer: bpe (301 tokens)" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--max-iters", "4", "--no-progress"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["step"] == 4 and np.isfinite(final["val_bpb_full"])
    saved = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    assert saved == json.loads((data / "tokenizer.json").read_text())


def test_two_processes_read_their_own_shard_windows(tmp_path: Path) -> None:
    """torchrun, 2 processes on gloo, over many small shards: the losses of one process with the
    same global batch (3 x 2 ranks x 2 accumulation), and each rank read different windows."""
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": doc(i)}) + "\n" for i in range(30)))
    data, _ = run(tmp_path, [tmp_path / "c.jsonl"], name="data", shard_tokens=700)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "shard_worker.py"), str(data), str(tmp_path / "runs"), str(tmp_path / "losses.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "losses.json").read_text())
    ref = losses_of(tiny_trainer(tmp_path / "one", data, batch_size=6, grad_accum=2))
    np.testing.assert_allclose(got["losses"], ref, rtol=0, atol=1e-5)
    assert got["first_rows"][0] != got["first_rows"][1]
