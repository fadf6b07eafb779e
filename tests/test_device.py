"""--device: one resolution for every verb, and the CUDA switches' CPU-testable branches.

No GPU here: what needs one is reached by faking what torch reports (`torch.cuda.is_available`,
the autocast dtype), so that each branch's choice is checked; the kernels themselves run only
where a GPU is lent (bench/gpu.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bardlm.cli import build_parser, main
from bardlm.config import ModelConfig, TrainConfig
from bardlm.errors import BardlmError
from bardlm.infer import device as dev
from bardlm.infer.device import resolve_device, to_device
from bardlm.nn import dropout as dropout_mod
from bardlm.nn.model import GPT
from bardlm.tokenizers import CharTokenizer
from bardlm.train import loop as loop_mod
from bardlm.train.loop import Loop
from bardlm.train.optim import adamw_kernel, make_optimizer
from bardlm.train.state import check_plan
from bardlm.train.trainer import Trainer

# Every verb that runs a model; the others (prepare, info, convert, export, quantize, merge,
# tokenizer) only move files and run on the CPU.
MODEL_VERBS = ("train", "generate", "reverse", "seq2seq", "experiment", "eval", "lm-eval", "serve",
               "finetune", "chat")
TEXT = "To be, or not to be, that is the question. " * 40


def fake_machine(monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool, gpus: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus if cuda else 0)
    monkeypatch.setattr(dev, "mps_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"),
                                                 (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected) -> None:
    fake_machine(monkeypatch, cuda, mps)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device(None) == torch.device(expected)


@pytest.mark.parametrize("name, built, message", [
    ("bogus", None, "'bogus' is not a device"),
    ("cuda", None, "this PyTorch build has no CUDA"),  # a CPU-only wheel
    ("cuda:0", "12.8", r"no CUDA GPU is visible; use --device cpu \(or auto\)"),  # a CUDA wheel
    ("mps", None, r"MPS backend \(Apple silicon\) is not available"),
    ("meta", None, r"bardlm runs on cpu, cuda \(NVIDIA or ROCm\) or mps"),
])
def test_a_device_this_machine_lacks_is_one_line(monkeypatch, name, built, message) -> None:
    fake_machine(monkeypatch, cuda=False, mps=False)
    monkeypatch.setattr(torch.version, "cuda", built)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(BardlmError, match=message) as e:
        resolve_device(name)
    assert "\n" not in str(e.value)


def test_a_missing_gpu_index_names_the_ones_there(monkeypatch) -> None:
    fake_machine(monkeypatch, cuda=True, mps=False, gpus=2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(BardlmError, match="2 CUDA device.*cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_every_model_verb_takes_device_auto_by_default() -> None:
    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "command").choices
    for verb in MODEL_VERBS:
        option = next((a for a in verbs[verb]._actions if "--device" in a.option_strings), None)
        assert option is not None and option.default == "auto", verb


@pytest.mark.parametrize("verb", ["train", "generate", "serve", "finetune", "seq2seq"])
def test_cli_refuses_a_missing_device_before_doing_anything(tmp_path, capsys, verb) -> None:
    """Resolved in `main` once: one line, exit 2, and no run directory made."""
    required = {"train": ["--out", str(tmp_path / "run")], "generate": ["--ckpt", str(tmp_path)],
                "serve": ["--ckpt", str(tmp_path)], "seq2seq": ["--task", "copy", "--out", str(tmp_path / "run")],
                "finetune": ["--init-from", str(tmp_path), "--data", "x.jsonl", "--out", str(tmp_path / "run")]}
    assert main([verb, *required[verb], "--device", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bardlm: error: --device 'bogus' is not a device") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_cpu_transfers_and_tf32_are_untouched() -> None:
    t = torch.arange(6)
    assert to_device(t, torch.device("cpu")) is t  # no pinned copy off CUDA
    before = torch.backends.cuda.matmul.allow_tf32
    dev.enable_tf32(torch.device("cpu"))
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_auto_optimizer_is_fused_on_cuda_and_foreach_on_cpu() -> None:
    assert adamw_kernel("auto", torch.device("cuda", 0)) == "fused"
    assert adamw_kernel("auto", torch.device("cpu")) == "foreach"
    assert adamw_kernel("loop", torch.device("cuda")) == "loop"
    opt = make_optimizer(torch.nn.Linear(3, 3), TrainConfig())
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


def test_resume_may_change_the_adamw_kernel_but_not_to_muon() -> None:
    saved = TrainConfig(optimizer="foreach").to_dict()
    assert check_plan(saved, TrainConfig(optimizer="auto"), 1, 1, log=lambda m: None).optimizer == "auto"
    with pytest.raises(BardlmError, match="optimizer was 'adamw'.*now 'muon'"):
        check_plan(saved, TrainConfig(optimizer="muon"), 1, 1, log=lambda m: None)


def test_fast_dropout_mask_is_a_cpu_path_only(monkeypatch) -> None:
    """Off the CPU dropout is F.dropout (a GPU draws its floats at memory speed)."""
    def no_mask(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the fast mask was drawn off the CPU")

    monkeypatch.setattr(dropout_mod, "keep_mask", no_mask)
    assert dropout_mod.dropout(torch.ones(4, 8, device="meta"), 0.3, fast=True).shape == (4, 8)
    with pytest.raises(AssertionError, match="fast mask"):  # the CPU still uses it
        dropout_mod.dropout(torch.ones(4, 8), 0.3, fast=True)


def _tiny_loop(dtype: str = "fp32") -> tuple[GPT, Loop]:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    cfg = TrainConfig(batch_size=2, max_iters=5, warmup_iters=0, lr=1e-2, dtype=dtype)
    return model, Loop(model, cfg)


def _batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    w = torch.randint(0, 11, (2, 9), generator=g)
    return w[:, :-1], w[:, 1:]


def test_fp16_autocast_gets_a_gradient_scaler(monkeypatch) -> None:
    """A GPU without bf16 trains in fp16 with a GradScaler: run that branch on the CPU."""
    assert _tiny_loop("bf16")[1].scaler is None  # bf16 (and fp32) need no scaler
    monkeypatch.setattr(loop_mod, "amp_dtype", lambda cfg, device: torch.float16)
    model, lp = _tiny_loop("bf16")
    assert lp.scaler is not None
    before = [p.detach().clone() for p in model.parameters()]
    losses = [lp.train_step(_batch) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    # With scale 2**16 the first fp16 step may overflow and be skipped; by step 3 one has landed.
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert lp.scaler.get_scale() <= 2.0**16


def test_bf16_falls_back_to_fp16_only_on_a_cuda_gpu_without_bf16(monkeypatch) -> None:
    cfg = TrainConfig(dtype="bf16")
    assert loop_mod.amp_dtype(cfg, "cpu") == torch.bfloat16
    assert loop_mod.amp_dtype(TrainConfig(), "cuda") is None  # fp32: no autocast at all
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert loop_mod.amp_dtype(cfg, "cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert loop_mod.amp_dtype(cfg, "cuda") == torch.bfloat16


def test_unsynced_steps_train_the_same_and_read_the_loss_only_at_log_points(tmp_path: Path) -> None:
    """sync_every > 1 (the GPU cadence): the same weights and logged losses as syncing every
    step, and the loss is read (`reduce`) only at the synced steps."""
    def run(out: Path, sync_every: int) -> tuple[Trainer, list[int]]:
        tok = CharTokenizer.train(TEXT)
        mc = ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
        tc = TrainConfig(batch_size=4, max_iters=7, eval_interval=5, eval_batches=1, warmup_iters=1)
        tr = Trainer(mc, tc, tok, TEXT, out, progress=False, log=lambda m: None)
        tr.sync_every = sync_every
        read_at: list[int] = []
        reduce = tr.loop.reduce
        tr.loop.reduce = lambda loss: read_at.append(tr.loop.step + 1) or reduce(loss)
        tr.fit()
        return tr, read_at

    every, read_every = run(tmp_path / "a", 1)
    lazy, read_lazy = run(tmp_path / "b", 3)
    assert read_every == list(range(1, 8))
    assert read_lazy == [3, 5, 6, 7]  # multiples of 3, the evaluation at 5, the last step
    assert [h["train_loss"] for h in lazy.history] == [h["train_loss"] for h in every.history]
    assert all(h["tokens_per_sec"] > 0 for h in lazy.history)
    for a, b in zip(every.model.parameters(), lazy.model.parameters()):
        assert torch.equal(a, b)
