"""Training speed switches, exact resume, signals, the token cache and multi-process training.

References: a single-process run is the reference for the 2-process (DDP, FSDP2) runs;
an uninterrupted run is the reference for resume; torch.optim.AdamW's plain loop is the
reference for the fused and foreach kernels; the tokenizer's own encode for the token cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bardlm.config import ModelConfig
from bardlm.errors import BardlmError
from bardlm.tokenizers import CharTokenizer
from bardlm.train import STATE_FILE, TrainConfig, Trainer, make_optimizer
from bardlm.train.data import token_ids

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from ddp_worker import TEXT, tiny_run  # noqa: E402


def make_trainer(out: Path, **train: object) -> Trainer:
    """A 2-layer char model with dropout 0.2, so resuming must restore the RNG too."""
    tok = CharTokenizer.train(TEXT)
    mc = ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32,
                     dropout=0.2)
    tc = TrainConfig(**{**dict(batch_size=4, grad_accum=2, max_iters=8, eval_interval=3,
                               eval_batches=2, warmup_iters=2), **train})
    return Trainer(mc, tc, tok, TEXT, out, progress=False, log=lambda m: None)


def record(trainer: Trainer) -> list[float]:
    losses: list[float] = []
    step = trainer.train_step
    trainer.train_step = lambda sync=True: losses.append(step(sync)) or losses[-1]
    return losses


def test_exact_resume_matches_straight_run(tmp_path: Path) -> None:
    """4 steps + resume + 4 steps == 8 straight steps: losses and weights to 1e-6 (fp32)."""
    straight = make_trainer(tmp_path / "a")
    ref = record(straight)
    ref_final = straight.fit()
    first = make_trainer(tmp_path / "b")
    got = record(first)
    first.fit(until=4)  # 4 is not an eval step (3, 6): the stop itself must save everything
    second = make_trainer(tmp_path / "b")
    second.resume()
    assert second.step == 4
    rest = record(second)
    final = second.fit()
    got += rest
    assert len(got) == len(ref) == 8
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    for (name, p), q in zip(straight.model.named_parameters(), second.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    assert abs(final["val_loss_full"] - ref_final["val_loss_full"]) < 1e-6
    # The dropout RNG matters: without restoring it the resumed losses differ.
    third = make_trainer(tmp_path / "c")
    third.fit(until=4)
    fourth = make_trainer(tmp_path / "c")
    fourth.resume()
    fourth.history = []
    torch.manual_seed(12345)
    other = record(fourth)
    fourth.fit()
    assert max(abs(a - b) for a, b in zip(other, ref[4:])) > 1e-4


def test_sigterm_saves_and_resumes_exactly(tmp_path: Path) -> None:
    """A SIGTERM mid-run saves at the next step boundary; resuming continues exactly."""
    straight = make_trainer(tmp_path / "ref")
    ref = record(straight)
    straight.fit()
    t = make_trainer(tmp_path / "b")
    got = record(t)
    step = t.train_step

    def step_then_signal(sync: bool = True) -> float:
        loss = step(sync)
        if t.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer, not fatal
        return loss

    t.train_step = step_then_signal
    with pytest.raises(BardlmError, match="interrupted at step 5.*--resume"):
        t.fit()
    assert json.loads((tmp_path / "b" / STATE_FILE).read_text())["step"] == 5
    resumed = make_trainer(tmp_path / "b")
    resumed.resume()
    rest = record(resumed)
    resumed.fit()
    got += rest
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    t = make_trainer(tmp_path / "a")
    forward = t.loop.forward.forward

    def poisoned(x: torch.Tensor, y: torch.Tensor):  # noqa: ANN202
        logits, loss = forward(x, y)
        return logits, loss * float("nan") if t.step == 4 else loss

    t.loop.forward.forward = poisoned
    with pytest.raises(BardlmError, match="loss became nan at step 4.*last good checkpoint"):
        t.fit()
    state = json.loads((tmp_path / "a" / STATE_FILE).read_text())
    assert state["step"] == 3  # the eval-step checkpoint, untouched
    resumed = make_trainer(tmp_path / "a")
    resumed.resume()  # and it is loadable
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


def test_two_processes_match_one(tmp_path: Path) -> None:
    """torchrun, 2 processes on gloo: DDP and FSDP2 (stopped at step 3 and resumed) give the
    losses of one process with the same global batch (3 x 2 ranks x 2 accumulation), also with
    activation checkpointing and a chunked loss (issue 28)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "ddp_worker.py"), str(tmp_path / "runs"), str(tmp_path / "losses.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "losses.json").read_text())
    assert got["world"] == 2
    _, ref = tiny_run(str(tmp_path / "single"), batch_size=6)
    assert len(ref) == 6
    np.testing.assert_allclose(got["ddp"], ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["fsdp"], ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["ddp_ckpt"], ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["fsdp_ckpt"], ref, rtol=0, atol=1e-5)
    assert ref[-1] < ref[0] - 0.05  # it trained: the comparison is not between constants
    # Only rank 0 wrote: one metrics line per eval step plus the final line, no duplicates.
    rows = (tmp_path / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [3, 6, 6]


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_adamw_kernels_match_plain_loop(impl: str) -> None:
    """The fused and foreach AdamW kernels make the reference (per-parameter loop) update."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    twin.load_state_dict(model.state_dict())
    opt = make_optimizer(model, TrainConfig(optimizer=impl, lr=1e-2))
    decay = [p for p in twin.parameters() if p.dim() >= 2]
    rest = [p for p in twin.parameters() if p.dim() < 2]
    ref = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.99), foreach=False)
    for _ in range(5):
        x = torch.randn(32, 8)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with pytest.raises(BardlmError, match="optimizer must be one of"):
        TrainConfig(optimizer="sgd")


def test_bf16_autocast_trains_close_to_fp32(tmp_path: Path) -> None:
    """bf16 autocast follows the fp32 loss curve closely (bf16 has ~3 significant digits)."""
    fp32 = make_trainer(tmp_path / "a", max_iters=4, eval_interval=4)
    bf16 = make_trainer(tmp_path / "b", max_iters=4, eval_interval=4, dtype="bf16")
    a, b = record(fp32), record(bf16)
    fp32.fit(until=4)
    bf16.fit(until=4)
    np.testing.assert_allclose(b, a, rtol=0, atol=0.03)
    assert a != b  # autocast really ran in bf16


def test_fsdp_without_torchrun_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BardlmError, match="torchrun"):
        make_trainer(tmp_path, fsdp=True)


def test_token_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Encoded once into a memmap in $XDG_CACHE_HOME/bardlm/tokens, never beside the corpus (bug
    14: hidden .tokens.npy files used to appear in the user's data folder); a changed corpus or
    tokenizer gets a new file."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tokens = tmp_path / "cache" / "bardlm" / "tokens"
    corpus = tmp_path / "data" / "c.txt"
    corpus.parent.mkdir()
    corpus.write_text(TEXT)
    tok = CharTokenizer.train(TEXT)
    ids = token_ids(corpus, TEXT, tok)
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    np.testing.assert_array_equal(ids, tok.encode(TEXT))
    assert len(list(tokens.glob("c.txt.*.tokens.npy"))) == 1
    assert isinstance(token_ids(corpus, TEXT, tok), np.memmap)  # a hit: still one file
    assert len(list(tokens.glob("c.txt.*.tokens.npy"))) == 1
    # The corpus changes -> new ids in a new file.
    text2 = TEXT[::-1]
    corpus.write_text(text2)
    np.testing.assert_array_equal(token_ids(corpus, text2, tok), tok.encode(text2))
    # Another tokenizer (same characters, another order) -> other ids.
    tok2 = CharTokenizer(tok.chars[::-1])
    np.testing.assert_array_equal(token_ids(corpus, text2, tok2), tok2.encode(text2))
    assert len(list(tokens.glob("c.txt.*.tokens.npy"))) == 3
    # Nothing was ever written beside the corpus, not even a temporary file.
    assert sorted(p.name for p in corpus.parent.iterdir()) == ["c.txt"]


def test_token_cache_unwritable_means_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache folder that cannot be created (here XDG_CACHE_HOME is a file, which stops root
    too): training still gets its ids, just not memory-mapped, and the corpus folder stays
    untouched."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    corpus = tmp_path / "data" / "c.txt"
    corpus.parent.mkdir()
    corpus.write_text(TEXT)
    tok = CharTokenizer.train(TEXT)
    ids = token_ids(corpus, TEXT, tok)
    assert not isinstance(ids, np.memmap)
    np.testing.assert_array_equal(ids, tok.encode(TEXT))
    assert sorted(p.name for p in corpus.parent.iterdir()) == ["c.txt"]


def test_muon_resumes_exactly_and_steps_like_torch_muon(tmp_path: Path) -> None:
    """optimizer=muon: 4 + resume + 4 steps == 8 straight steps, and its matrix update is
    torch.optim.Muon's (the reference) while the other parameters take AdamW's."""
    straight = make_trainer(tmp_path / "a", optimizer="muon")
    ref = record(straight)
    straight.fit()
    first = make_trainer(tmp_path / "b", optimizer="muon")
    got = record(first)
    first.fit(until=4)
    second = make_trainer(tmp_path / "b", optimizer="muon")
    second.resume()
    got += record_fit(second)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    for (name, p), q in zip(straight.model.named_parameters(), second.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)

    torch.manual_seed(0)
    model = make_trainer(tmp_path / "c").model
    twin = make_trainer(tmp_path / "d").model
    twin.load_state_dict(model.state_dict())
    model.eval(), twin.eval()  # no dropout: both see the same forward pass
    opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-2))
    hidden = [p for n, p in twin.named_parameters() if ".h." in f".{n}" and p.dim() == 2]
    ref_muon = torch.optim.Muon(hidden, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    x = torch.randint(0, model.config.vocab_size, (4, 16))
    for m, o in ((model, opt), (twin, ref_muon)):
        m(x, x)[1].backward()
        o.step()
    moved = 0
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if ".h." in f".{name}" and p.dim() == 2:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
            moved += 1
    assert moved == 8  # 2 layers x (c_attn, c_proj, c_fc, c_proj)
    with pytest.raises(BardlmError, match="muon"):
        TrainConfig(optimizer="muon", fsdp=True)


def record_fit(trainer: Trainer) -> list[float]:
    losses = record(trainer)
    trainer.fit()
    return losses


def test_fsdp_builds_on_meta_then_each_rank_its_shard(tmp_path: Path) -> None:
    """Under FSDP the model is built on the meta device (no rank ever holds all of it); the
    shards are materialised by `distributed.Parallel` and filled by `init_weights`, which gives the
    weights of GPT(cfg) under the same seed (checked on one process: meta -> to_empty -> init)."""
    from types import SimpleNamespace

    from bardlm.nn.model import GPT

    tok = CharTokenizer.train(TEXT)
    mc = ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32)
    fake = SimpleNamespace(cfg=TrainConfig(fsdp=True), device=torch.device("cpu"))
    torch.manual_seed(7)
    model = Trainer._build(fake, mc)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    torch.manual_seed(7)
    ref = GPT(mc)
    assert model.lm_head.weight is model.transformer.wte.weight
    for (name, p), q in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(p, q), name


def test_compile_switch_builds_a_compiled_step(tmp_path: Path) -> None:
    """compile=true gives the loop a compiled forward (a compiled module has no truth value:
    `forward or model` used to raise "GPT does not support len()")."""
    trainer = make_trainer(tmp_path, compile=True)
    assert isinstance(trainer.loop.forward, torch._dynamo.eval_frame.OptimizedModule)


def test_model_flops_per_token_match_torch_flop_counter() -> None:
    """6N + 12 L d T (PaLM's count, behind MFU and flops_per_sec) against the FLOPs PyTorch's
    own counter sees in one forward and backward (matmuls and attention; norms are not counted;
    the attention written out, since the counter does not see the CPU's fused SDPA kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bardlm.nn.model import GPT
    from bardlm.train.speed import flops_per_token

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=64, bias=False,
                            attn_impl="explicit"))
    x, y = torch.randint(0, 96, (2, 32)), torch.randint(0, 96, (2, 32))
    with FlopCounterMode(display=False) as counter:
        model(x, y)[1].backward()
    measured = counter.get_total_flops() / x.numel()
    assert flops_per_token(model) == pytest.approx(measured, rel=0.01)
