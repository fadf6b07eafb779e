"""Training memory: activation checkpointing and the chunked loss compute what the plain path
computes (loss and gradients to 1e-5), with dropout, MoE, LoRA, bf16 autocast, compile and resume."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bardlm.config import TrainConfig, preset
from bardlm.nn.lora import apply_lora
from bardlm.nn.loss import chunked_cross_entropy, chunked_token_nll
from bardlm.nn.model import GPT
from bardlm.tokenizers import CharTokenizer
from bardlm.train import Trainer
from bardlm.train.logps import token_logps
from bardlm.train.memory import configure

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 60


def _data(n: int = 3, t: int = 24, v: int = 65, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(v, (n, t), generator=g)
    y = torch.randint(v, (n, t), generator=g)
    y[0, :5] = -1  # a prompt that does not count
    y[2, -3:] = -1  # padding
    return x, y


def test_chunked_cross_entropy_equals_f_cross_entropy() -> None:
    """Loss and both gradients against F.cross_entropy on the full logits, chunks that do not
    divide the tokens, ignored targets included."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 13, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(50, (2, 13), generator=g)
    y[0, :4] = -1
    ref = F.cross_entropy((h @ w.t()).view(-1, 50), y.view(-1), ignore_index=-1)
    ref_h, ref_w = torch.autograd.grad(3.0 * ref, (h, w))  # an upstream gradient other than 1
    for chunk in (1, 5, 26, 100):
        loss = chunked_cross_entropy(h, w, y, chunk)
        gh, gw = torch.autograd.grad(3.0 * loss, (h, w))
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gh, ref_h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, ref_w, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # evaluation: no gradient is worked out, the loss is the same
        torch.testing.assert_close(chunked_cross_entropy(h, w, y, 5), ref, atol=1e-5, rtol=1e-5)


def test_chunked_token_nll_equals_f_cross_entropy_per_token() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    y = torch.randint(40, (3, 7), generator=g)
    y[1, 2:] = -1
    up = torch.randn(3, 7, generator=g)  # per-token upstream gradients, as DPO/GRPO's are
    ref = F.cross_entropy((h @ w.t()).view(-1, 40), y.view(-1), ignore_index=-1, reduction="none").view(3, 7)
    ref_h, ref_w = torch.autograd.grad((ref * up).sum(), (h, w))
    nll = chunked_token_nll(h, w, y, 4)
    gh, gw = torch.autograd.grad((nll * up).sum(), (h, w))
    torch.testing.assert_close(nll, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, ref_w, atol=1e-5, rtol=1e-5)
    assert (nll[1, 2:] == 0).all()


def test_chunked_loss_through_a_quantized_head_a_block_of_rows_at_a_time(monkeypatch) -> None:
    """QLoRA's int8 head (its rows dequantized 7 at a time here): the loss, per-token NLL and
    hidden-state gradients of F.cross_entropy over the float head those codes stand for."""
    from bardlm.infer.quantize import Int8Linear, dequantize
    from bardlm.nn import loss as loss_mod

    monkeypatch.setattr(loss_mod, "VOCAB_BLOCK", 7)
    g = torch.Generator().manual_seed(2)
    head = Int8Linear.from_linear(torch.nn.Linear(16, 50, bias=False))
    head.frozen_base = True
    w = dequantize(head.weight, head.scales)
    h = torch.randn(2, 13, 16, generator=g, requires_grad=True)
    y = torch.randint(50, (2, 13), generator=g)
    y[0, :4] = -1
    up = torch.randn(2, 13, generator=g)
    ref = F.cross_entropy((h @ w.t()).view(-1, 50), y.view(-1), ignore_index=-1, reduction="none").view(2, 13)
    ref_mean = ref.sum() / (y >= 0).sum()
    for ours, theirs, weight in ((chunked_cross_entropy(h, head, y, 5), ref_mean, 3.0),
                                 (chunked_token_nll(h, head, y, 5), ref, up)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        gh, = torch.autograd.grad((ours * weight).sum(), h)
        ref_h, = torch.autograd.grad((theirs * weight).sum(), h, retain_graph=True)
        torch.testing.assert_close(gh, ref_h, atol=1e-5, rtol=1e-5)


def _loss_and_grads(model: GPT, x: torch.Tensor, y: torch.Tensor, seed: int = 3,
                    forward=None) -> tuple[float, dict[str, torch.Tensor]]:  # noqa: ANN001
    torch.manual_seed(seed)  # the same dropout masks in both paths
    model.zero_grad(set_to_none=True)
    _, loss = (forward if forward is not None else model)(x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def _assert_same(a: tuple[float, dict], b: tuple[float, dict], tol: float = 1e-5) -> None:
    assert a[0] == pytest.approx(b[0], abs=tol, rel=tol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("name", ["qwen3-tiny", "char-tiny", "moe-tiny"])
@pytest.mark.parametrize(("every", "chunk"), [(2, 0), (0, 7), (1, 7)])
def test_checkpointing_and_chunking_equal_the_plain_model(name: str, every: int, chunk: int) -> None:
    """Dropout on (the recomputed blocks must draw the same masks), MoE's router losses kept,
    every block or every 2nd checkpointed, the loss in chunks of 7 of 72 tokens."""
    torch.manual_seed(0)
    model = GPT(preset(name, dropout=0.1)).train()
    x, y = _data()
    plain = _loss_and_grads(model, x, y)
    configure(model, TrainConfig(checkpoint_activations=every > 0, checkpoint_every=max(every, 1), loss_chunk=chunk))
    _assert_same(_loss_and_grads(model, x, y), plain)


def test_checkpointing_and_chunking_with_lora() -> None:
    torch.manual_seed(0)
    model = GPT(preset("qwen3-tiny")).train()
    apply_lora(model, 4, 8.0)
    with torch.no_grad():  # B = 0 would hide a wrong gradient of A
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x, y = _data()
    plain = _loss_and_grads(model, x, y)
    assert all("lora_" in n for n in plain[1])
    configure(model, TrainConfig(checkpoint_activations=True, loss_chunk=5))
    _assert_same(_loss_and_grads(model, x, y), plain)


def test_checkpointing_and_chunking_under_bf16_autocast() -> None:
    """The same bf16 matmuls: equal to bf16's rounding of the chunk sizes' sums (not 1e-5)."""
    torch.manual_seed(0)
    model = GPT(preset("qwen3-tiny")).train()
    x, y = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _loss_and_grads(model, x, y)
        configure(model, TrainConfig(checkpoint_activations=True, loss_chunk=8))
        both = _loss_and_grads(model, x, y)
    _assert_same(both, plain, tol=2e-2)


def test_checkpointing_and_chunking_under_compile() -> None:
    torch.manual_seed(0)
    model = GPT(preset("qwen3-tiny")).train()
    x, y = _data()
    plain = _loss_and_grads(model, x, y)
    configure(model, TrainConfig(checkpoint_activations=True, loss_chunk=16))
    _assert_same(_loss_and_grads(model, x, y, forward=torch.compile(model, backend="aot_eager")), plain)


def test_token_logps_chunked_equal_plain_with_gradients() -> None:
    """DPO/GRPO's scoring: the per-token log-probabilities and their gradients."""
    torch.manual_seed(0)
    model = GPT(preset("qwen3-tiny")).train()
    chunked = copy.deepcopy(model)
    configure(chunked, TrainConfig(loss_chunk=5, checkpoint_activations=True))
    x, y = _data()
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    logits, _ = model(x)  # the reference: log_softmax of the full logits, gathered
    ref = F.log_softmax(logits.float(), -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y >= 0)
    (ref * up).sum().backward()
    ours = token_logps(chunked, x, y)
    (ours * up).sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for (n, p), q in zip(model.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=n)


def _trainer(out, **kw) -> Trainer:
    cfg = preset("qwen3-tiny", block_size=16, dropout=0.1)
    tcfg = TrainConfig(**{**dict(batch_size=4, max_iters=6, eval_interval=2, eval_batches=2, warmup_iters=1,
                                 grad_accum=2), **kw})
    return Trainer(cfg, tcfg, CharTokenizer.train(TEXT), TEXT, out, progress=False, log=lambda m: None)


def test_training_with_both_equals_plain_and_resumes_exactly(tmp_path) -> None:
    """Six steps (dropout on) with checkpointing every 2nd block and the loss in chunks: the
    losses (train and validation) and weights of the plain run; stopped at step 2 and resumed,
    the same again."""
    memory = dict(checkpoint_activations=True, checkpoint_every=2, loss_chunk=7)
    plain = _trainer(tmp_path / "plain")
    plain.fit()
    both = _trainer(tmp_path / "both", **memory)
    assert both.model.checkpoint_every == 2 and both.model.loss_chunk == 7
    both.fit(until=2)
    resumed = _trainer(tmp_path / "both", **memory)
    resumed.resume()
    resumed.fit()
    rows = lambda t: [r[k] for r in t.history for k in ("train_loss", "val_loss")]  # noqa: E731
    assert len(rows(resumed)) == 6
    assert rows(resumed) == pytest.approx(rows(plain), abs=1e-5)
    for p, q in zip(plain.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=0)


# The optimizer step in backward ----------------------------------------------------------------
def _steps(model: GPT, tcfg: TrainConfig, n: int = 3) -> tuple[list[float], list[float]]:
    """n optimizer steps of `model` on fixed batches: (losses, grad norms)."""
    from bardlm.train.loop import Loop

    loop = Loop(model, tcfg)
    losses, norms = [], []
    for step in range(n):
        x, y = _data(seed=step)
        losses.append(loop.train_step(lambda s, m, x=x, y=y: (x, y)))
        norms.append(loop.grad_norm)
    return losses, norms


@pytest.mark.parametrize("optimizer", ["foreach", "fused", "muon"])
@pytest.mark.parametrize("lora", [False, True])
def test_step_in_backward_equals_the_normal_step(optimizer: str, lora: bool) -> None:
    """Three steps updating each parameter during backward give the normal step's weights (to
    1e-6), optimizer state and logged gradient norms: tied embedding and head, checkpointing,
    chunked loss, the AdamW kernels and Muon, full or LoRA (frozen weights have no gradient)."""
    torch.manual_seed(0)
    base = GPT(preset("qwen3-tiny", dropout=0.0, tie_embeddings=True)).train()
    if lora:
        apply_lora(base, 4, 8.0)
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    memory = dict(checkpoint_activations=True, loss_chunk=7, grad_clip=0.0, optimizer=optimizer,
                  warmup_iters=1, max_iters=3, lr=1e-2)
    plain = _steps(models[0], TrainConfig(**memory))
    inside = _steps(models[1], TrainConfig(**memory, step_in_backward=True))
    assert inside[0] == pytest.approx(plain[0], abs=1e-6) and inside[1] == pytest.approx(plain[1], rel=1e-5)
    for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=n)
        assert q.grad is None, n  # freed as soon as it was used
    moved = [n for (n, p), q in zip(base.named_parameters(), models[1].parameters()) if not torch.equal(p, q)]
    assert moved and all("lora_" in n for n in moved) == lora


def test_step_in_backward_refuses_clipping_accumulation_and_applies_nothing_on_nan() -> None:
    from bardlm.errors import BardlmError
    from bardlm.train.loop import Diverged, Loop

    for bad in (dict(), dict(grad_clip=0.0, grad_accum=2)):
        with pytest.raises(BardlmError, match="step_in_backward .* set grad_clip=0 and grad_accum=1"):
            TrainConfig(step_in_backward=True, **bad)
    torch.manual_seed(0)
    model = GPT(preset("qwen3-tiny")).train()
    before = copy.deepcopy(model.state_dict())
    loop = Loop(model, TrainConfig(step_in_backward=True, grad_clip=0.0),
                forward=lambda x, y: (None, model(x, y)[1] * float("nan")))
    with pytest.raises(Diverged):
        loop.train_step(lambda s, m: _data())
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_training_with_step_in_backward_equals_plain_and_resumes_exactly(tmp_path) -> None:
    """Six Trainer steps updating in backward: the plain run's losses and weights; stopped at
    step 2 and resumed (the optimizer state saved and loaded as usual), the same again."""
    kw = dict(grad_clip=0.0, grad_accum=1, checkpoint_activations=True)
    plain = _trainer(tmp_path / "plain", **kw)
    plain.fit()
    inside = _trainer(tmp_path / "inside", **kw, step_in_backward=True)
    inside.fit(until=2)
    resumed = _trainer(tmp_path / "inside", **kw, step_in_backward=True)
    resumed.resume()
    resumed.fit()
    rows = lambda t: [r[k] for r in t.history for k in ("train_loss", "val_loss")]  # noqa: E731
    assert len(rows(resumed)) == 6
    assert rows(resumed) == pytest.approx(rows(plain), abs=1e-6)
    for p, q in zip(plain.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0)


FREED = """
import sys, threading, torch
from bardlm.train.memory import return_freed_memory
rss = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
ok = return_freed_memory() if sys.argv[1] == "1" else True
big = torch.ones(4 << 20)  # a 16 MiB block mapped and freed: glibc raises its threshold to 16 MiB
del big
base, pins = rss(), []

def work():  # a second thread allocates from its own malloc arena, as torch's workers may
    blocks = []
    for _ in range(100):
        blocks.append(torch.ones(1 << 20))  # 4 MiB each
        pins.append(torch.ones(1000))  # small tensors left alive between them
    blocks.clear()

t = threading.Thread(target=work)
t.start()
t.join()
print(ok, rss() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_return_freed_memory_gives_freed_tensors_back() -> None:
    """400 MiB of 4 MiB tensors allocated in a thread and freed: glibc keeps them resident;
    after `return_freed_memory` (what the training commands call first) they are gone."""
    def left(on: str) -> tuple[bool, float]:
        out = subprocess.run([sys.executable, "-c", FREED, on], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        ok, mib = out.stdout.split()
        return ok == "True", float(mib)

    ok, after = left("1")
    if not ok:
        pytest.skip("not glibc")
    assert after < 50, after
    assert left("0")[1] > 300  # the default allocator keeps them: the case is a real one


MEASURE = """
import json, sys, torch
from bardlm.config import preset
from bardlm.nn.lora import apply_lora
from bardlm.nn.model import GPT
from bardlm.train import TrainConfig
from bardlm.train.loop import Loop
from bardlm.train.memory import estimate
rank = int(sys.argv[1])
cfg = preset("qwen3-tiny", vocab_size=32000, n_embd=256, n_head=4, head_dim=64, ffn_hidden=768, block_size=512)
model = GPT(cfg).train()
if rank:
    apply_lora(model, rank, 2 * rank)
tcfg = TrainConfig(warmup_iters=0, max_iters=1)
loop, ids = Loop(model, tcfg), torch.randint(32000, (2, 513))
open("/proc/self/clear_refs", "w").write("5")  # the step's own peak, not building's
loop.train_step(lambda s, m: (ids[:, :-1], ids[:, 1:]))
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) * 1024
print(json.dumps([peak, estimate(cfg, tcfg, 2, 512, rank).first_step]))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resets the peak RSS through Linux's /proc")
@pytest.mark.parametrize("rank", [0, 8])
def test_estimate_is_within_15_percent_of_the_measured_peak(rank: int) -> None:
    """One step of a 4-layer model with a 32,000 vocabulary (the logits dominate, as in real
    models) in a fresh process, full and LoRA: `bardlm info --train`'s estimate vs the peak RSS."""
    out = subprocess.run([sys.executable, "-c", MEASURE, str(rank)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    peak, est = json.loads(out.stdout)
    assert abs(est / peak - 1) < 0.15, (peak, est)


def test_info_train_prints_the_parts_and_refuses_int8_without_lora(capsys) -> None:
    from bardlm.cli import main

    assert main(["info", "--preset", "qwen3-tiny", "--train", "--set", "batch_size=2",
                 "--set", "loss_chunk=16", "--set", "checkpoint_activations=true"]) == 0
    out = capsys.readouterr().out
    for part in ("weights", "gradients", "optimizer state", "activations", "logits", "estimated peak, first step"):
        assert part in out
    assert "checkpointing every 1, loss_chunk 16" in out
    assert main(["info", "--preset", "qwen3-tiny", "--train", "--base-dtype", "int8"]) == 2
    assert "--base-dtype int8 is a frozen base under LoRA" in capsys.readouterr().err


# QLoRA ---------------------------------------------------------------------------------------
def _adapters_randomized(model: GPT) -> GPT:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _int4_round_trip(w: torch.Tensor) -> torch.Tensor:
    """w through int4.py's group rule (G = 32) and back to float, by the rule's formula."""
    from bardlm.infer.int4 import quantize_groups

    codes, scales = quantize_groups(w, 32)
    d = scales.float().repeat_interleave(32, dim=-1)
    return ((codes.float() - 8) * d)[:, :w.shape[1]]


@pytest.mark.parametrize("bits,memory", [(8, {}), (8, dict(checkpoint_activations=True, loss_chunk=9)),
                                         (4, {}), (4, dict(checkpoint_activations=True, loss_chunk=9))])
def test_qlora_equals_lora_on_the_dequantized_base(bits: int, memory: dict) -> None:
    """LoRA over an int8 or int4 base computes what LoRA over the float weights those codes stand
    for computes (loss and adapter gradients to 1e-5); our LoRA equals peft's (test_lora.py)."""
    from bardlm.infer.int4 import Int4Linear
    from bardlm.infer.qlora import quantize_base
    from bardlm.infer.quantize import Int8Embedding, Int8Linear, dequantize, quantize_per_channel

    torch.manual_seed(0)
    # n_embd 80: not a multiple of the int4 group (32), so the padded columns are exercised too.
    base = GPT(preset("qwen3-tiny", n_embd=80, n_head=2, head_dim=32)).train()
    plain = copy.deepcopy(base)
    with torch.no_grad():  # the reference: float weights rounded through the codes
        for name, m in plain.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight.copy_(dequantize(*quantize_per_channel(m.weight)) if bits == 8
                               else _int4_round_trip(m.weight))
        wte = plain.transformer.wte.weight  # the embedding and tied head: int8, a scale per token
        wte.copy_(dequantize(*quantize_per_channel(wte)))
    quantize_base(base, f"int{bits}")
    assert isinstance(base.transformer.h[0].attn.c_attn, Int8Linear if bits == 8 else Int4Linear)
    assert isinstance(base.transformer.wte, Int8Embedding) and base.lm_head.weight is base.transformer.wte.weight
    for model in (base, plain):
        apply_lora(model, 4, 8.0)
        _adapters_randomized(model)
        configure(model, TrainConfig(**memory))
    x, y = _data()
    _assert_same(_loss_and_grads(base, x, y), _loss_and_grads(plain, x, y))


@pytest.mark.parametrize("base_dtype", ["int8", "int4"])
def test_qlora_keeps_no_dequantized_weight_for_backward(base_dtype: str) -> None:
    """Autograd saves no float copy of any layer's weight: each is dequantized when a matmul
    needs it (forward, then again in backward) and dropped."""
    from bardlm.infer.qlora import quantize_base

    torch.manual_seed(0)
    model = GPT(preset("qwen3-tiny")).train()
    quantize_base(model, base_dtype)
    apply_lora(model, 4, 8.0)
    shapes = {(m.base.out_features, m.base.in_features) for m in model.modules() if hasattr(m, "base")}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        _, loss = model(*_data())
    loss.backward()
    assert shapes and not [s for s, dt in saved if s in shapes and dt.is_floating_point]


@pytest.mark.parametrize("base_dtype", ["int8", "int4"])
def test_finetune_qlora_cli_trains_and_merges_into_the_float_base(tmp_path, capsys, base_dtype: str) -> None:
    from test_sft import CHARS, base_ckpt, chat_data

    from bardlm.cli import main
    from bardlm.io.adapter import load_adapter
    from bardlm.io.load import kind_of, load

    base, data = base_ckpt(tmp_path / "base"), chat_data(tmp_path / "chat.jsonl")
    out = tmp_path / "qlora"
    rc = main(["finetune", "--init-from", str(base), "--data", str(data), "--out", str(out), "--max-iters", "3",
               "--set", "eval_interval=3", "--set", "batch_size=4", "--set", "lr=1e-2",
               "--lora-rank", "2", "--base-dtype", base_dtype, "--set", "loss_chunk=16",
               "--set", "checkpoint_activations=true"])
    assert rc == 0, capsys.readouterr().err
    assert kind_of(out) == "adapter"
    assert main(["merge", "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load(tmp_path / "merged")
    unmerged = load_adapter(out, merge=False)[0]  # the adapters over the float base
    idx = torch.randint(0, len(CHARS), (2, 20))
    assert merged.transformer.h[0].attn.c_attn.weight.dtype == torch.float32
    assert (merged(idx)[0] - unmerged(idx)[0]).abs().max() < 1e-5
    assert (merged(idx)[0] - load(base)[0](idx)[0]).abs().max() > 1e-4  # the adapters learned
    assert main(["finetune", "--init-from", str(base), "--data", str(data), "--out", str(tmp_path / "x"),
                 "--base-dtype", "int8"]) == 2
    assert "--base-dtype need --lora-rank" in capsys.readouterr().err  # (tests/test_errors.py too)
