"""INT8 weight-only quantization: the formula, the kernel, checkpoints, the CLI, and accuracy."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F

from bardlm import GPT, BardlmError, ModelConfig, cli, preset
from bardlm.infer.generate import generate
from bardlm.infer.layouts import prepare_for_inference
from bardlm.infer.quantize import (
    Int8Embedding,
    Int8Linear,
    dequantize,
    quantize_model,
    quantize_per_channel,
    weight_bytes,
)
from bardlm.io.checkpoint import load_checkpoint, save_checkpoint
from bardlm.io.load import quantize_checkpoint
from bardlm.tokenizers import CharTokenizer


def _model(**kw) -> GPT:
    base = dict(vocab_size=40, block_size=32, n_layer=2, n_head=4, n_embd=64)
    return GPT(ModelConfig(**{**base, **kw})).eval()


def test_per_channel_formula() -> None:
    w = torch.randn(24, 48) * torch.linspace(0.01, 3, 24)[:, None]  # rows of very different range
    w_q, s = quantize_per_channel(w)
    assert w_q.dtype == torch.int8 and s.shape == (24,)
    assert s.dtype == torch.bfloat16  # the dtype the kernel reads
    torch.testing.assert_close(s.float(), w.abs().amax(1) / 127, rtol=2**-8, atol=0)
    # Rounded against the stored bf16 scale, not the exact fp32 one (issue 16, bug 11).
    assert torch.equal(w_q, torch.round(w / s.float()[:, None]).to(torch.int8))
    assert w_q.abs().amax(1).tolist() == [127] * 24  # each row uses its full range
    assert ((dequantize(w_q, s) - w).abs() <= s.float()[:, None] / 2 + 1e-6).all()
    assert torch.equal(quantize_per_channel(torch.zeros(2, 16))[0], torch.zeros(2, 16, dtype=torch.int8))


@pytest.mark.parametrize("shape", [(64, 96), (48, 24)])  # kernel path; fallback (K % 16 != 0)
def test_int8_linear_matches_dequantized_reference(shape: tuple[int, int]) -> None:
    k, n = shape
    lin = torch.nn.Linear(k, n)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(3, 5, k)
    ref = F.linear(x, dequantize(q.weight, q.scales), lin.bias)  # fp32 reference
    out = q(x)
    assert out.shape == (3, 5, n) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.03 * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(out.float(), lin(x), atol=0.05 * ref.abs().max().item(), rtol=0)


def test_int8_embedding_rows() -> None:
    emb = torch.nn.Embedding(30, 32)
    q = Int8Embedding.from_embedding(emb)
    idx = torch.tensor([[0, 29, 5]])
    torch.testing.assert_close(q(idx).float(), emb(idx), atol=0.01 * emb.weight.abs().max().item(), rtol=0)


@pytest.mark.parametrize("embeddings", [True, False])
def test_quantized_model_and_tied_head(embeddings: bool) -> None:
    model = _model()
    idx = torch.randint(0, 40, (2, 16))
    ref, _ = model(idx)
    q = quantize_model(copy.deepcopy(model), embeddings=embeddings)
    if embeddings:  # the head and the embedding share one int8 matrix
        assert q.lm_head.weight is q.transformer.wte.weight and q.lm_head.weight.dtype == torch.int8
    else:
        assert q.transformer.wte.weight.dtype == torch.bfloat16
    out, _ = q(idx)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_quantize_checkpoint_round_trip(tmp_path) -> None:
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,;:!?ABCDEFGH")
    model = _model(vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "fp32", model, tok, {"step": 7})
    info = quantize_checkpoint(tmp_path / "fp32", tmp_path / "int8")
    assert info["bytes_ratio"] <= 0.30 and info["int8_bytes"] == weight_bytes(
        quantize_model(copy.deepcopy(model)))
    loaded, tok2, meta = load_checkpoint(tmp_path / "int8")
    assert meta["quantization"]["method"] == "int8-weight-only" and tok2 is not None
    floats = [t for t in list(loaded.parameters()) + list(loaded.buffers()) if t.is_floating_point()]
    assert all(t.dtype == torch.bfloat16 for t in floats if t.numel() > 64 * 2)  # no fp32 weights
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    in_memory = quantize_model(copy.deepcopy(model))
    idx = torch.randint(0, tok.vocab_size, (1, 10))
    assert torch.equal(loaded(idx)[0], in_memory(idx)[0])
    fast = prepare_for_inference(loaded, "int8")
    assert generate(fast, idx, 5, temperature=0).shape == (1, 15)
    with pytest.raises(BardlmError, match="already quantized"):
        quantize_checkpoint(tmp_path / "int8", tmp_path / "again")


def test_cli_quantize_generate_and_interactive(tmp_path, capsys, monkeypatch) -> None:
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,;:!?ABCDEFGH")
    save_checkpoint(tmp_path / "fp32", _model(vocab_size=tok.vocab_size), tok, {})
    assert cli.main(["quantize", "--ckpt", str(tmp_path / "fp32"), "--out", str(tmp_path / "q")]) == 0
    assert json.loads(capsys.readouterr().out)["bytes_ratio"] <= 0.30
    gen = ["generate", "--prompt", "abc", "--temperature", "0", "--max-new-tokens", "8"]
    for ckpt, dtype in (("fp32", "fp32"), ("fp32", "bf16"), ("q", "fp32")):
        assert cli.main([*gen, "--ckpt", str(tmp_path / ckpt), "--dtype", dtype]) == 0
        out = capsys.readouterr().out
        assert out.startswith("abc") and len(out) == 3 + 8 + 1
    monkeypatch.setattr("sys.stdin", io.StringIO("abc\nhello\n"))
    assert cli.main([*gen, "--ckpt", str(tmp_path / "fp32"), "-i"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 3 and len(lines[0]) == 8 and len(lines[1]) == 8
    assert cli.main(["quantize", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_int8_top1_agreement_on_shakespeare(tiny_text: str) -> None:
    """Train a small char model briefly; int8 must pick the fp32 model's next char >= 95%."""
    torch.manual_seed(0)
    tok = CharTokenizer.train(tiny_text)
    ids = torch.tensor(tok.encode(tiny_text), dtype=torch.long)
    split = int(0.9 * len(ids))
    train, val = ids[:split], ids[split:]
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4,
                            n_embd=64, bias=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        start = torch.randint(0, len(train) - 65, (16,))
        x = torch.stack([train[s : s + 64] for s in start])
        y = torch.stack([train[s + 1 : s + 65] for s in start])
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 2.6  # it has learnt something beyond unigram frequencies (~3.3)
    model.eval()
    x = val[: 64 * 16].view(16, 64)  # held-out text
    with torch.no_grad():
        ref = model(x)[0].argmax(-1)
        int8 = prepare_for_inference(copy.deepcopy(model), "int8")(x)[0].float().argmax(-1)
    agreement = (int8 == ref).float().mean().item()
    print(f"int8 top-1 agreement with fp32: {agreement:.4f} (final train loss {loss.item():.3f})")
    assert agreement >= 0.95, agreement


@pytest.mark.parametrize("name", ["llama-tiny", "qwen3-tiny"])
def test_int8_checkpoint_of_a_rotary_model_loads(tmp_path, name: str) -> None:
    """INT8 directories of RoPE models load (their position table is rebuilt in fp32, not left
    on the meta device) and compute what the in-memory quantized model computes."""
    import bardlm

    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,;:!?ABCDEFGH")
    torch.manual_seed(0)
    model = GPT(preset(name, vocab_size=tok.vocab_size, block_size=32, n_layer=2))
    save_checkpoint(tmp_path / "fp32", model, tok, {"step": 1})
    quantize_checkpoint(tmp_path / "fp32", tmp_path / "int8")
    assert bardlm.load(tmp_path / "int8")[0].prepared == "int8"
    loaded, _, _ = load_checkpoint(tmp_path / "int8")
    assert loaded.rope_inv_freq.dtype == torch.float32 and loaded.rope_inv_freq.device.type == "cpu"
    idx = torch.randint(0, tok.vocab_size, (2, 12))
    assert torch.equal(loaded(idx)[0], quantize_model(copy.deepcopy(model))(idx)[0])
