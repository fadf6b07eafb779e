"""Finetuning: `bardlm train --init-from`, `bardlm finetune` (full and LoRA, resume, merge),
`bardlm chat`, and the small version of the assistant demonstration (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bardlm import GPT, ModelConfig
from bardlm.cli import main
from bardlm.errors import BardlmError
from bardlm.infer.chat import ChatSession, builtin_template
from bardlm.io.checkpoint import read_config, save_checkpoint
from bardlm.io.load import kind_of, load
from bardlm.io.metadata import template_for
from bardlm.lab.assistant import shout_task, write_jsonl
from bardlm.tokenizers import CharTokenizer

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :\n.,!?'"))


@pytest.fixture(autouse=True)
def _one_thread():  # noqa: ANN202
    """Tiny models on a shared machine: one thread is several times faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def base_ckpt(path: Path, **kw) -> Path:  # noqa: ANN003
    torch.manual_seed(0)
    tok = CharTokenizer(CHARS)
    cfg = ModelConfig(**{"vocab_size": tok.vocab_size, "block_size": 64, "n_layer": 2, "n_head": 2,
                         "n_embd": 32, "bias": False, **kw})
    return save_checkpoint(path, GPT(cfg), tok, {"preset": None})


def chat_data(path: Path, n: int = 40) -> Path:
    return write_jsonl(shout_task(n, 0, letters="abcd", lengths=(2, 3)), path)


# train --init-from ----------------------------------------------------------------------------
def test_train_init_from_takes_weights_shape_and_tokenizer(tmp_path: Path) -> None:
    base = base_ckpt(tmp_path / "base")
    text = tmp_path / "t.txt"
    text.write_text("hello world, this is a small text. " * 200)
    from bardlm.train.trainer import Trainer, init_config

    cfg, tok = init_config(base, None, {"dropout": 0.1}, None)
    trainer = Trainer(cfg, __import__("bardlm").TrainConfig(max_iters=2, batch_size=4, eval_interval=1,
                                                            eval_batches=1),
                      tok, text.read_text(), tmp_path / "run", progress=False, log=lambda m: None,
                      keep_vocab=True)
    trainer.init_from(base)
    src, _ = load(base)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), trainer.model.state_dict().values()))
    assert trainer.step == 0 and not trainer.optimizer.state  # fresh optimizer and schedule
    rc = main(["train", "--init-from", str(base), "--data", str(text), "--out", str(tmp_path / "cli"),
               "--max-iters", "2", "--set", "batch_size=4", "--set", "eval_interval=1", "--no-progress"])
    assert rc == 0
    meta = read_config(tmp_path / "cli")
    assert meta["model"] == read_config(base)["model"] and meta["init_from"] == str(base.resolve())
    moved, _ = load(tmp_path / "cli")
    assert not torch.equal(moved.transformer.wte.weight, src.transformer.wte.weight)


@pytest.mark.parametrize("argv, message", [
    (["--set", "n_layer=4"], "--set gives n_layer=4 but --init-from"),
    (["--preset", "char-tiny"], "--preset char-tiny gives"),
    (["--tokenizer", "bpe:300"], "drop --tokenizer"),
])
def test_train_init_from_conflicts_are_one_line_errors(tmp_path: Path, capsys, argv, message) -> None:  # noqa: ANN001
    base = base_ckpt(tmp_path / "base")
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 100)
    rc = main(["train", "--init-from", str(base), "--data", str(text), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1


def test_train_init_from_hf_gpt2(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from bardlm.tokenizers import train_bpe

    text = "the quick brown fox jumps over the lazy dog. " * 100
    tok = train_bpe(text, 300)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32,
                                                              n_layer=1, n_head=2))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(tok.hf.to_str())
    (tmp_path / "t.txt").write_text(text)
    rc = main(["train", "--init-from", str(tmp_path / "hf"), "--data", str(tmp_path / "t.txt"),
               "--out", str(tmp_path / "run"), "--max-iters", "2", "--set", "batch_size=2",
               "--no-progress"])
    assert rc == 0
    assert read_config(tmp_path / "run")["model"]["block_size"] == 32


# finetune -------------------------------------------------------------------------------------
def test_finetune_resume_continues_exactly(tmp_path: Path) -> None:
    base, data = base_ckpt(tmp_path / "base"), chat_data(tmp_path / "chat.jsonl")
    common = ["finetune", "--init-from", str(base), "--data", str(data), "--max-iters", "4",
              "--set", "eval_interval=2", "--set", "batch_size=4"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--max-iters", "2"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--resume"]) == 0
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r["val_loss"] for r in a] == [r["val_loss"] for r in b]
    assert read_config(tmp_path / "a")["chat_template"]["kind"] == "plain"
    with pytest.raises(SystemExit):
        main([*common, "--out", str(tmp_path / "a"), "--lora-rank"])


def test_finetune_lora_saves_adapter_alone_and_merges(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    base, data = base_ckpt(tmp_path / "base"), chat_data(tmp_path / "chat.jsonl")
    out = tmp_path / "lora"
    rc = main(["finetune", "--init-from", str(base), "--data", str(data), "--out", str(out),
               "--max-iters", "3", "--set", "eval_interval=3", "--set", "batch_size=4", "--set", "lr=1e-2",
               "--lora-rank", "2", "--lora-targets", "c_attn", "c_fc", "--merge"])
    captured = capsys.readouterr()
    assert rc == 0 and "trainable parameters: " in captured.err
    final = json.loads(captured.out)
    assert final["trainable_params"] < 0.1 * final["total_params"]
    assert kind_of(out) == "adapter"
    adapter_bytes = (out / "model.safetensors").stat().st_size
    assert adapter_bytes < 0.2 * (base / "model.safetensors").stat().st_size
    unmerged = __import__("bardlm.io.adapter", fromlist=["x"]).load_adapter(out, merge=False)[0]
    merged, _ = load(out / "merged")
    via_load, _ = load(out)
    idx = torch.randint(0, len(CHARS), (2, 20))
    ref = unmerged(idx)[0]
    assert (merged(idx)[0] - ref).abs().max() < 1e-5
    assert (via_load(idx)[0] - ref).abs().max() < 1e-5
    base_model, _ = load(base)
    assert (base_model(idx)[0] - ref).abs().max() > 1e-4  # the adapter changed something
    assert main(["merge", "--adapter", str(out), "--out", str(tmp_path / "m2")]) == 0
    assert (load(tmp_path / "m2")[0](idx)[0] - ref).abs().max() < 1e-5


def test_finetune_bpe_model_gains_special_tokens(tmp_path: Path) -> None:
    from bardlm.tokenizers import train_bpe

    tok = train_bpe("shout abc ABC shout dd DD " * 50, 280)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / "base", model, tok)
    data = chat_data(tmp_path / "chat.jsonl", 10)
    assert main(["finetune", "--init-from", str(tmp_path / "base"), "--data", str(data), "--out",
                 str(tmp_path / "ft"), "--max-iters", "1", "--set", "batch_size=2"]) == 0
    model, tok2 = load(tmp_path / "ft")
    assert tok2.vocab_size == tok.vocab_size + 4 == model.config.vocab_size
    assert template_for(tmp_path / "ft", tok2).end == "<|end|>"


# chat -----------------------------------------------------------------------------------------
def test_chat_cli_with_piped_stdin(tmp_path: Path) -> None:
    base = base_ckpt(tmp_path / "base")
    lines = "shout ab\nshout cd\n/reset\n/system be loud\nshout ab\n"
    run = subprocess.run([sys.executable, "-m", "bardlm", "chat", "--ckpt", str(base), "--temperature", "0",
                          "--max-new-tokens", "12"], input=lines, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    replies = run.stdout.split("\n")
    model, tok = load(base)
    template = template_for(base, tok)
    session = ChatSession(model, tok, template, max_new_tokens=12, temperature=0.0)
    first = session.reply("shout ab")
    second = session.reply("shout cd")  # with the first exchange in its history
    fresh = ChatSession(model, tok, template, system="be loud", max_new_tokens=12, temperature=0.0)
    third = fresh.reply("shout ab")
    assert run.stdout == f"{first}\n{second}\n{third}\n", replies
    assert "history cleared" in run.stderr


def test_chat_fits_a_small_context(tmp_path: Path) -> None:
    """A 64-token model with the default 200 new tokens: replies are cut where the context ends,
    old turns make room, and a message that cannot fit is one clear error."""
    model, tok = load(base_ckpt(tmp_path / "base"))
    session = ChatSession(model, tok, builtin_template(tok), temperature=0.0)  # max_new_tokens=200
    for text in ("shout ab", "shout cd", "shout abcd"):
        reply = session.reply(text)
        ids = tok.encode(session.template.render(session.messages(), add_generation_prompt=False))
        assert len(ids) <= 64 + 2, (len(ids), reply)  # + the end of turn the template appends
        assert session.history[-2]["content"] == text and session.history[-1]["content"] == reply
    assert len(session.history) == 2  # earlier turns were dropped to leave the reply room
    with pytest.raises(BardlmError, match="context is 64; send a shorter message"):
        session.reply("x" * 70)
    assert session.history[-2]["content"] == "shout abcd"  # the refused message is not kept


def test_chat_reply_stops_at_end_of_turn() -> None:
    """A model that has learnt to write "X\\n\\n" stops there: the end of the turn is not shown."""
    tok = CharTokenizer(CHARS)
    template = builtin_template(tok)

    class Scripted(torch.nn.Module):  # always says "OK\n\nUSER..." in turn
        config = ModelConfig(vocab_size=len(CHARS), block_size=64, n_layer=1, n_head=1, n_embd=8)

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.script = tok.encode("OK\n\nUSER:\nmore")

        def forward(self, idx, *a, **k):  # noqa: ANN001, ANN002, ANN003
            n = getattr(self, "n", 0)
            self.n = n + 1
            logits = torch.zeros(idx.shape[0], 1, len(CHARS))
            logits[..., self.script[min(n, len(self.script) - 1)]] = 10.0
            return logits, None

        def make_cache(self, *a, **k):  # noqa: ANN002, ANN003
            return None

    model = Scripted()
    session = ChatSession(model, tok, template, max_new_tokens=10, temperature=0.0, use_cache=False)
    assert session.reply("hi") == "OK"
    assert session.history[-1] == {"role": "assistant", "content": "OK"}


# the demonstration, small -----------------------------------------------------------------------
@pytest.mark.slow
def test_assistant_demo_small(tmp_path: Path, tiny_text: str) -> None:
    """Pretrain briefly on Shakespeare, then teach "shout w" -> "W" on a 4-letter alphabet.
    Before: never right. After full finetuning: right on held-out words. LoRA (under 10% of
    the parameters) reaches 1.00 on a base pretrained for 1,000 steps (bench/assistant.py,
    docs/benchmarks.md); on this 60-step base (frozen embeddings still near their small
    initial norm, the likely cause) it does not get there, so here only its held-out loss is
    required to fall."""
    from bardlm.lab.assistant import run_assistant_demo

    model = dict(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=64, bias=False)
    pre = dict(max_iters=60, batch_size=16, lr=3e-3, warmup_iters=10, eval_interval=60, eval_batches=1)
    full = dict(max_iters=400, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_iters=10, eval_interval=400,
                weight_decay=0.0)
    lora = dict(full, max_iters=100, eval_interval=100, lr=1e-2, min_lr=1e-3)
    r = run_assistant_demo(tmp_path, tiny_text[:200_000], model, pre, full, lora, lora_rank=4,
                           n_train=200, n_test=40, letters="abcd", lengths=(3, 4), log=lambda m: None)
    print(json.dumps(r))
    assert r["before"] == 0.0
    assert r["full"] >= 0.9, r
    assert r["lora_trainable"] < 0.1 * r["lora_total"]
    assert r["lora_val_loss"] < 0.8 * r["lora_val_loss_start"], r


def test_lora_resume_and_bad_rank(tmp_path: Path) -> None:
    base, data = base_ckpt(tmp_path / "base"), chat_data(tmp_path / "chat.jsonl")
    common = ["finetune", "--init-from", str(base), "--data", str(data), "--set", "eval_interval=2",
              "--set", "batch_size=4", "--lora-rank", "2"]
    assert main([*common, "--out", str(tmp_path / "a"), "--max-iters", "4"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--max-iters", "2"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--max-iters", "4", "--resume"]) == 0
    rows = lambda d: [json.loads(x)["train_loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    with pytest.raises(BardlmError):
        from bardlm.nn.lora import apply_lora

        apply_lora(load(base)[0], 0, 1.0)


# Token-weighted accumulation, several processes, metrics (issue 26 items 4, 5, 9) -------------
def uneven_chat(path: Path, n: int = 24) -> Path:
    """Conversations whose answers are 1 to 8 letters long: micro-batches of unequal target counts."""
    return write_jsonl(shout_task(n, 1, letters="abcd", lengths=(1, 8)), path)


def step_grads(ft) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The gradients one training step applies (the optimizer's step is skipped)."""
    grads: dict[str, torch.Tensor] = {}
    ft.loop.optimizer.step = lambda *a, **k: grads.update(
        {n: p.grad.clone() for n, p in ft.model.named_parameters() if p.grad is not None})
    ft.loop.train_step(ft._batch)
    return grads


def test_accumulation_equals_one_larger_batch(tmp_path: Path) -> None:
    """grad_accum=3 of 2 conversations gives the gradients of one batch of 6 (a mean over all its
    target tokens), though the micro-batches hold unequal numbers of target tokens and padding."""
    from bardlm.config import TrainConfig
    from bardlm.train.sft import Finetuner

    base, data = base_ckpt(tmp_path / "base"), uneven_chat(tmp_path / "chat.jsonl")
    runs = {}
    for name, (bs, accum) in {"accum": (2, 3), "one": (6, 1)}.items():
        cfg = TrainConfig(batch_size=bs, grad_accum=accum, max_iters=1, grad_clip=0.0, val_fraction=0.2)
        runs[name] = Finetuner(base, data, tmp_path / name, cfg, log=lambda m: None)
    ft = runs["accum"]
    counts = [int((ft.batches.batch(0, m, 2, 3)[1] >= 0).sum()) for m in range(3)]
    assert len(set(counts)) > 1, counts  # the case that equal weights get wrong
    got, ref = step_grads(runs["accum"]), step_grads(runs["one"])
    assert got.keys() == ref.keys() and len(got) > 0
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-6, msg=n)


def test_validation_is_a_mean_over_target_tokens(tmp_path: Path) -> None:
    """The held-out loss is the mean over every target token, whatever the batch size: the sum of
    each conversation's own loss x its targets, over all targets."""
    from bardlm.config import TrainConfig
    from bardlm.train.sft import Finetuner

    base, data = base_ckpt(tmp_path / "base"), uneven_chat(tmp_path / "chat.jsonl")
    ft = Finetuner(base, data, tmp_path / "o", TrainConfig(batch_size=3, val_fraction=0.5), log=lambda m: None)
    total = n = 0.0
    with torch.no_grad():
        for row in ft.val_rows:  # one conversation at a time: no padding, no batch means
            x, y = row[0, :-1][None], row[1, :-1][None]
            k = int((y >= 0).sum())
            total, n = total + ft.model(x, y)[1].item() * k, n + k
    assert len({int((r[1] >= 0).sum()) for r in ft.val_rows}) > 1
    assert ft.val_loss() == pytest.approx(total / n, rel=1e-6)


def test_two_process_finetune_matches_one(tmp_path: Path) -> None:
    """torchrun, 2 processes on gloo: full finetuning with DDP and with FSDP2, and LoRA with DDP,
    give the losses of one process with the same global batch (2 x 2 ranks x 2 accumulation)."""
    import os

    from sft_worker import RUNS, tiny_finetune

    base, data = base_ckpt(tmp_path / "base"), uneven_chat(tmp_path / "chat.jsonl", 30)
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tests.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tests / "sft_worker.py"), str(base), str(data), str(tmp_path / "runs"), str(tmp_path / "got.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "got.json").read_text())
    for name, kw in RUNS.items():  # the reference: one process, no FSDP (it needs several)
        _, ref = tiny_finetune(str(base), str(data), str(tmp_path / f"one-{name}"), batch_size=4, lora=kw["lora"])
        assert got[name]["world"] == 2 and len(ref) == 4
        np.testing.assert_allclose(got[name]["losses"], ref, rtol=0, atol=1e-5, err_msg=name)
        assert ref[-1] < ref[0]  # it trained: the comparison is not between constants
        rows = got[name]["metrics"]
        assert [r["step"] for r in rows] == [2, 4]  # rank 0 alone wrote
        refrows = [json.loads(r) for r in (tmp_path / f"one-{name}" / "metrics.jsonl").read_text().splitlines()]
        np.testing.assert_allclose([r["val_loss"] for r in rows], [r["val_loss"] for r in refrows], atol=1e-5)
        np.testing.assert_allclose([r["grad_norm"] for r in rows], [r["grad_norm"] for r in refrows], rtol=1e-4)


def test_finetune_metrics_carry_grad_norm_and_throughput(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """metrics.jsonl rows hold the gradient norm (before clipping) and tokens/s with FLOP/s (or
    MFU where the device's peak is known); --no-progress gives log lines, no bar."""
    base, data = base_ckpt(tmp_path / "base"), chat_data(tmp_path / "chat.jsonl")
    rc = main(["finetune", "--init-from", str(base), "--data", str(data), "--out", str(tmp_path / "o"),
               "--max-iters", "2", "--set", "eval_interval=1", "--set", "batch_size=4", "--no-progress"])
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["grad_norm"] > 0 and np.isfinite(r["grad_norm"])
        assert r["tokens_per_sec"] > 0 and r["flops_per_sec"] > 0 and "mfu" not in r  # a CPU: no peak
    err = capsys.readouterr().err
    assert "grad norm" in err and "GFLOP/s" in err and "finetune:" not in err  # no bar


@pytest.mark.parametrize("command, label", [("finetune", "finetune:"), ("prepare", "prepare:"), ("eval", "eval:")])
def test_progress_bar_on_a_terminal_unless_no_progress(tmp_path: Path, capsys, monkeypatch, command, label) -> None:  # noqa: ANN001
    """finetune, prepare and eval draw a bar on stderr when it is a terminal; --no-progress, or a
    stderr that is not a terminal (a log file, a pipe), gives none."""
    base = base_ckpt(tmp_path / "base")
    text = tmp_path / "t.txt"
    text.write_text("shout abc. " * 200)
    argv = {"finetune": ["finetune", "--init-from", str(base), "--data", str(chat_data(tmp_path / "c.jsonl")),
                         "--max-iters", "2", "--set", "eval_interval=1", "--set", "batch_size=4"],
            "prepare": ["prepare", "--data", str(text), "--tokenizer", "char", "--workers", "1"],
            "eval": ["eval", "--ckpt", str(base), "--data", str(text)]}[command]
    runs = {"tty": (True, []), "flag": (True, ["--no-progress"]), "pipe": (False, [])}
    for name, (tty, extra) in runs.items():
        out = [] if command == "eval" else ["--out", str(tmp_path / name)]
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        assert main([*argv, *out, *extra]) == 0
        err = capsys.readouterr().err
        assert (label in err) == (name == "tty"), (name, err[-500:])
        if command == "finetune":  # without a bar, log lines say what the bar would
            assert ("step 2: train" in err) == (name != "tty")


def test_finetune_compiles_when_asked(tmp_path: Path) -> None:
    """compile=true puts the training forward through torch.compile, as in pretraining (the
    compiled step itself is exercised by the pretraining tests; compiling here would be slow)."""
    from bardlm.config import TrainConfig
    from bardlm.train.sft import Finetuner

    base, data = base_ckpt(tmp_path / "base"), chat_data(tmp_path / "chat.jsonl")
    ft = Finetuner(base, data, tmp_path / "o", TrainConfig(compile=True), log=lambda m: None)
    assert ft.loop.forward == ft.step_loss  # which trains through parallel.forward
    assert isinstance(ft.parallel.forward, torch._dynamo.eval_frame.OptimizedModule)
    assert ft.parallel.forward._orig_mod is ft.model
