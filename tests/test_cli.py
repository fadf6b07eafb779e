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


# Issue 32 ------------------------------------------------------------------------------------
CHAT = [{"role": "user", "content": "soft"}, {"role": "assistant", "content": "light"}]


def _base(corpus_file, out, *sets: str) -> None:  # noqa: ANN001
    """A 1-step model with room for a short conversation (context 64)."""
    assert main(["train", "--data", str(corpus_file), "--out", str(out), "--max-iters", "1", *TINY,
                 "--set", "block_size=64", *sets]) == 0


def _chat_file(tmp_path):  # noqa: ANN001, ANN202
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(8)))
    return path


def _sigterm_at(monkeypatch, cls, step: int) -> None:  # noqa: ANN001
    """Make `cls.train_step` send this process SIGTERM after optimizer step `step`."""
    import os
    import signal

    real = cls.train_step

    def step_then_term(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        loss = real(self, *a, **kw)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(cls, "train_step", step_then_term)


@pytest.mark.parametrize("verb", ["train", "finetune"])
def test_sigterm_is_a_note_and_its_resume_command_works(verb, tmp_path, corpus_file, capsys, monkeypatch) -> None:
    """SIGTERM saves and says how to go on, as a note (exit 130, no "error:"); the command it
    prints, run as printed, finishes the run."""
    import shlex

    from bardlm.train.loop import Loop

    out = tmp_path / "run with space"
    if verb == "train":
        argv = ["train", "--data", str(corpus_file), "--out", str(out), "--max-iters", "6", *TINY]
    else:
        base = tmp_path / "base"
        _base(corpus_file, base)
        argv = ["finetune", "--init-from", str(base), "--data", str(_chat_file(tmp_path)), "--out", str(out),
                "--max-iters", "6", "--set", "batch_size=2", "--set", "eval_interval=3", "--lora-rank", "2"]
    _sigterm_at(monkeypatch, Loop, 2)
    capsys.readouterr()
    assert main(argv) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("bardlm: interrupted at step 2; checkpoint saved, continue with: bardlm ")
    assert "error" not in last
    monkeypatch.undo()
    command = shlex.split(last.split("continue with: ", 1)[1])
    assert main(command[1:]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 6


def test_quantize_and_merge_refuse_a_run_and_overwrite_replaces_it_whole(tmp_path, corpus_file, capsys) -> None:
    """`quantize --out RUN` used to replace RUN's weights and leave its optimizer, so that
    `train --resume` died with KeyError: now it is refused, and --overwrite drops the run's
    optimizer, state and metrics with the old model."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus_file), "--out", str(run), "--max-iters", "3", *TINY]) == 0
    other = tmp_path / "other"
    assert main(["train", "--data", str(corpus_file), "--out", str(other), "--max-iters", "1", *TINY]) == 0
    before = (run / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["quantize", "--ckpt", str(other), "--out", str(run)]) == 2
    assert "already holds a model; pass --overwrite" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == before
    assert main(["quantize", "--ckpt", str(other), "--out", str(run), "--overwrite"]) == 0
    assert not [n for n in ("optimizer.safetensors", "trainer_state.json", "metrics.jsonl") if (run / n).exists()]
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bardlm: error: ") and "holds a model but no training state" in err


def test_merge_with_another_base_says_so(tmp_path, corpus_file, capsys) -> None:
    """An adapter merged onto a base of another shape names the mismatch (it used to say "the
    vocabulary can only grow")."""
    base, other = tmp_path / "base", tmp_path / "other"
    _base(corpus_file, base)
    _base(corpus_file, other, "--set", "n_embd=48")
    adapter = tmp_path / "adapter"
    assert main(["finetune", "--init-from", str(base), "--data", str(_chat_file(tmp_path)), "--out", str(adapter),
                 "--max-iters", "1", "--set", "batch_size=2", "--lora-rank", "2"]) == 0
    capsys.readouterr()
    assert main(["merge", "--adapter", str(adapter), "--base", str(other), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{other} is not the base of adapter {adapter}: its n_embd is 48, the adapter's base had 32" in err
    assert main(["merge", "--adapter", str(adapter), "--base", str(base), "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()  # a merged model has no training state to resume (it was a KeyError)
    assert main(["train", "--resume", "--out", str(tmp_path / "m"), "--no-progress"]) == 2
    assert "holds a model but no training state" in capsys.readouterr().err


def test_eval_reads_gzip_like_train(tmp_path, corpus_file, capsys) -> None:
    """`eval --data x.txt.gz` scores the decompressed text, exactly as the plain file."""
    import gzip

    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus_file), "--out", str(run), "--max-iters", "1", *TINY]) == 0
    gz = tmp_path / "romeo.txt.gz"
    gz.write_bytes(gzip.compress(corpus_file.read_bytes()))
    capsys.readouterr()
    results = []
    for data in (corpus_file, gz):
        assert main(["eval", "--ckpt", str(run), "--data", str(data), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["bytes"] == len(TEXT.encode()) and results[0]["tokens"] > 0
    assert {k: v for k, v in results[1].items() if k != "data"} == {k: v for k, v in results[0].items() if k != "data"}


def test_a_reader_that_stops_early_gets_no_error(tmp_path, corpus_file) -> None:
    """`bardlm generate ... | head`: once the reader closes the pipe, the command stops quietly
    with the shell's code for a broken pipe (141), not "error: Broken pipe; check the path"."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus_file), "--out", str(out), "--max-iters", "1", *TINY]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "bardlm", "generate", "--ckpt", str(out), "--prompt",
                             "ROMEO:", "--max-new-tokens", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(8)  # the first words arrive, then the reader goes away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""
