import json
import math

import pytest
import torch

from bardlm import BardlmError, ModelConfig
from bardlm.io.checkpoint import load_checkpoint
from bardlm.tokenizers import CharTokenizer
from bardlm.train import TrainConfig, Trainer, lr_at, make_optimizer, prepare_out

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 60)


def _trainer(out, **kw) -> Trainer:
    cfg = ModelConfig(vocab_size=1, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    tcfg = TrainConfig(**{**dict(batch_size=4, max_iters=12, eval_interval=4, eval_batches=2, warmup_iters=2, grad_accum=2), **kw})
    return Trainer(cfg, tcfg, CharTokenizer.train(TEXT), TEXT, out, progress=False, log=lambda m: None)


def test_lr_schedule_wsd_is_warmup_stable_then_linear_decay() -> None:
    """wsd: linear warm-up over 10 steps, lr until the last 20% of steps 10..110, then a
    straight line to min_lr at step 110 (each value written out, not recomputed by lr_at)."""
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0, cfg) == pytest.approx(1 / 11)
    assert [lr_at(s, cfg) for s in (10, 50, 89)] == [1.0, 1.0, 1.0]  # stable
    assert lr_at(90, cfg) == 1.0  # the decay's first step
    assert lr_at(100, cfg) == pytest.approx(0.55)  # half way down
    assert lr_at(109, cfg) == pytest.approx(1.0 - 0.9 * 19 / 20)
    assert lr_at(110, cfg) == lr_at(500, cfg) == 0.1
    steps = [lr_at(s, cfg) for s in range(90, 111)]
    assert all(b < a for a, b in zip(steps, steps[1:]))
    with pytest.raises(BardlmError, match="decay_fraction"):
        TrainConfig(schedule="wsd", decay_fraction=0.0)


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert lr_at(0, cfg) < lr_at(9, cfg) <= 1.0
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices(tmp_path) -> None:
    model = _trainer(tmp_path).model
    decay, no_decay = make_optimizer(model, TrainConfig()).param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] > 0
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0


def test_run_writes_all_files_and_learns(tmp_path) -> None:
    tr = _trainer(tmp_path, max_iters=40, eval_interval=20, lr=3e-3)
    final = tr.fit()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (tmp_path / name).is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "train_loss", "val_loss", "val_bpc", "lr", "tokens_per_sec", "peak_mem_gib", "elapsed_s"} <= set(rows[0])
    assert 0.05 < rows[0]["peak_mem_gib"] < 64  # this process's peak RSS, in GiB (not KiB or bytes)
    assert rows[-1]["final"] and rows[1]["val_loss"] < rows[0]["val_loss"] < math.log(tr.tokenizer.vocab_size)
    assert final["val_bpc_full"] == pytest.approx(final["val_loss_full"] / math.log(2), rel=0.05)
    model, tok, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 40 and tok.vocab_size == model.config.vocab_size


def test_exact_resume(tmp_path) -> None:
    straight = _trainer(tmp_path / "a")
    straight.fit()
    first = _trainer(tmp_path / "b")
    first.fit(until=6)
    second = _trainer(tmp_path / "b")
    second.resume()
    assert second.step == 6
    second.fit()
    for p, q in zip(straight.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    losses = lambda t: [r["train_loss"] for r in t.history]  # noqa: E731
    assert losses(straight) == pytest.approx(losses(second), abs=1e-6)


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path) -> None:
    tr = _trainer(tmp_path, max_iters=8)
    tr.fit(until=4)
    with torch.no_grad():
        tr.model.transformer.wte.weight.fill_(float("nan"))
    with pytest.raises(BardlmError, match="loss became nan at step 4"):
        tr.fit()
    model, _, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 4 and torch.isfinite(model.transformer.wte.weight).all()


def test_existing_run_is_protected(tmp_path) -> None:
    _trainer(tmp_path, max_iters=4).fit()
    with pytest.raises(BardlmError, match="--resume .*--overwrite"):
        prepare_out(tmp_path, resume=False, overwrite=False)
    with pytest.raises(BardlmError, match="no checkpoint to resume"):
        prepare_out(tmp_path / "fresh", resume=True, overwrite=False)
