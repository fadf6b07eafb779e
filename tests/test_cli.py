"""End-to-end runs of the `bardlm` command (in-process through `cli.main`)."""

import json

import pytest

from bardlm.cli import main

TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east.\n" * 40
TINY = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=16",
        "--set", "batch_size=4", "--set", "eval_interval=3", "--set", "eval_batches=2", "--no-progress"]


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "romeo.txt"
    path.write_text(TEXT)
    return path


def test_train_generate_resume(tmp_path, corpus_file, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus_file), "--out", str(out), "--max-iters", "6", *TINY]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 6 and summary["val_loss_full"] > 0
    assert main(["generate", "--ckpt", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20 + 1
    assert main(["train", "--resume", "--out", str(out), "--max-iters", "9", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 9


def test_word_tokenizer_run(tmp_path, corpus_file, capsys) -> None:
    out = tmp_path / "words"
    assert main(["train", "--data", str(corpus_file), "--tokenizer", "word", "--out", str(out), "--max-iters", "3", *TINY]) == 0
    assert json.loads((out / "tokenizer.json").read_text())["kind"] == "word"


def test_info(capsys) -> None:
    assert main(["info", "--preset", "gpt2-124m"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "163,037,184" in out  # tied, and head counted separately
    assert "KV cache per token fp32 / bf16" in out and "73,728 B" in out  # 2*12*768*4 bytes


def test_tokenizer_train_and_bpe_model(tmp_path, corpus_file, capsys) -> None:
    tok_file = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--data", str(corpus_file), "--vocab-size", "300", "--out", str(tok_file)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "bpe" and info["vocab_size"] <= 300 and info["chars_per_token"] > 1
    out = tmp_path / "bpe-run"
    assert main(["train", "--data", str(corpus_file), "--tokenizer", "bpe:300", "--out", str(out), "--max-iters", "3", *TINY]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["val_bpc_full"] > 0
    assert json.loads((out / "tokenizer.json").read_text())["kind"] == "bpe"
    assert main(["generate", "--ckpt", str(out), "--prompt", "ROMEO: café", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO: café")
