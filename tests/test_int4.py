"""INT4 weight-only quantization: the group formula, the CPU kernel against a dequantized
reference, checkpoints (safetensors + config.json) and the CLI."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F

import bardlm
from bardlm import GPT, BardlmError, ModelConfig, cli, preset
from bardlm.infer.generate import generate
from bardlm.infer.int4 import (
    Int4Embedding,
    Int4Linear,
    dequantize,
    pack_nibbles,
    quantize_groups,
    quantize_model4,
    unpack_nibbles,
)
from bardlm.infer.quantize import weight_bytes
from bardlm.io.checkpoint import load_checkpoint, save_checkpoint
from bardlm.io.load import quantize_checkpoint
from bardlm.tokenizers import CharTokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz .,;:!?ABCDEFGH"


def _model(**kw) -> GPT:
    base = dict(vocab_size=40, block_size=32, n_layer=2, n_head=4, n_embd=64)
    return GPT(ModelConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("group", [32, 64])
def test_group_formula(group: int) -> None:
    w = torch.randn(8, 128) * torch.linspace(0.01, 3, 8)[:, None]
    codes, s = quantize_groups(w, group)
    assert codes.dtype == torch.uint8 and s.shape == (8, 128 // group) and s.dtype == torch.bfloat16
    g = w.view(8, -1, group)
    m = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)  # signed largest magnitude
    torch.testing.assert_close(s.float(), m / -8, rtol=2**-8, atol=0)
    deq = dequantize(pack_nibbles(codes), s).view(8, -1, group)
    # Each group's largest value sits exactly on code 0 (-8 d); the others are within half a
    # step, except those beyond the top code 7 d (clipped to it, as ggml's Q4_0 does).
    assert (codes.view(8, -1, group).gather(-1, g.abs().argmax(-1, keepdim=True)) == 0).all()
    d = s.float().unsqueeze(-1)
    steps = torch.where(g / d > 7.5, g / d - 7, torch.full_like(g, 0.5))
    assert ((deq - g).abs() <= steps * d.abs() * 1.02 + 1e-6).all()
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    zero_codes, _ = quantize_groups(torch.zeros(2, 32), 32)
    assert (zero_codes == 8).all()  # an all-zero group dequantizes to zeros


@pytest.mark.parametrize("shape,group", [((64, 96), 32), ((128, 40), 64), ((128, 65), 128),
                                         ((40, 48), 32), ((344, 16), 64)])
def test_int4_linear_matches_dequantized_reference(shape: tuple[int, int], group: int) -> None:
    """The kernel (output width padded to 16, input width to a multiple of G, where needed)
    computes x @ dequantized(W)^T."""
    k, n = shape
    lin = torch.nn.Linear(k, n)
    q = Int4Linear.from_linear(lin, group)
    codes, scales = quantize_groups(lin.weight, group)
    x = torch.randn(3, 5, k)
    ref = F.linear(x.bfloat16().float(), dequantize(pack_nibbles(codes), scales)[:, :k], lin.bias)
    out = q(x)
    assert out.shape == (3, 5, n) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.01 * ref.abs().max().item(), rtol=0)
    # The stored codes read back from the kernel's layout are the quantized ones, exactly.
    sd = q.state_dict()
    assert torch.equal(sd["weight"], pack_nibbles(codes)) and torch.equal(sd["scales"], scales)


def test_int4_group_size_is_checked() -> None:
    with pytest.raises(BardlmError, match="group-size must be one of"):
        quantize_model4(_model(), group_size=16)


def test_int4_embedding_rows_and_tied_head() -> None:
    emb = torch.nn.Embedding(30, 64)
    q = Int4Embedding.from_embedding(emb, 32)
    idx = torch.tensor([[0, 29, 5]])
    codes, s = quantize_groups(emb.weight, 32)
    assert torch.equal(q(idx).float(), dequantize(pack_nibbles(codes), s)[idx].bfloat16().float())
    model = _model()
    ref, _ = model(torch.arange(16)[None])
    q4 = quantize_model4(copy.deepcopy(model))
    assert q4.lm_head.state_dict()["weight"].equal(q4.transformer.wte.weight)  # one set of codes
    out, _ = q4(torch.arange(16)[None])
    assert (out.float() - ref).abs().max() < 0.15 * ref.abs().max()


@pytest.mark.parametrize("name,group", [("char-tiny", 32), ("llama-tiny", 64), ("qwen3-tiny", 128)])
def test_int4_checkpoint_round_trip(tmp_path, name: str, group: int) -> None:
    """A saved INT4 directory (safetensors + config.json) loads back to the same model."""
    tok = CharTokenizer.train(CHARS)
    torch.manual_seed(0)
    model = GPT(preset(name, vocab_size=tok.vocab_size, block_size=32, n_layer=2)).eval()
    save_checkpoint(tmp_path / "fp32", model, tok, {"step": 3})
    info = quantize_checkpoint(tmp_path / "fp32", tmp_path / "int4", bits=4, group_size=group)
    in_memory = quantize_model4(copy.deepcopy(model), group)
    assert info["int4_bytes"] == weight_bytes(in_memory) and info["group_size"] == group
    loaded, tok2, meta = load_checkpoint(tmp_path / "int4")
    assert meta["quantization"] == {"method": "int4-weight-only", "group_size": group,
                                    "embeddings": True}
    assert tok2 is not None
    stored = bardlm.io.checkpoint.load_tensors(tmp_path / "int4" / "model.safetensors")
    assert all(v.dtype in (torch.uint8, torch.bfloat16) for v in stored.values())
    idx = torch.randint(0, tok.vocab_size, (2, 12))
    assert torch.equal(loaded(idx)[0], in_memory(idx)[0])
    fast, _ = bardlm.load(tmp_path / "int4")
    assert fast.prepared == "int4"
    assert torch.equal(generate(fast, idx, 5, temperature=0), generate(in_memory, idx, 5, temperature=0))
    with pytest.raises(BardlmError, match="already quantized"):
        quantize_checkpoint(tmp_path / "int4", tmp_path / "again", bits=4)


def test_int4_checkpoint_without_embeddings_and_bad_group(tmp_path) -> None:
    tok = CharTokenizer.train(CHARS)
    model = _model(vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "fp32", model, tok, {})
    quantize_checkpoint(tmp_path / "fp32", tmp_path / "q", bits=4, embeddings=False)
    loaded, _, _ = load_checkpoint(tmp_path / "q")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.randint(0, tok.vocab_size, (1, 8))
    assert torch.equal(loaded(idx)[0], quantize_model4(copy.deepcopy(model), embeddings=False)(idx)[0])
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization"]["group_size"] = 48
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BardlmError, match="group size 48"):
        load_checkpoint(tmp_path / "q")
    with pytest.raises(BardlmError, match="--group-size applies to --bits 4"):
        quantize_checkpoint(tmp_path / "fp32", tmp_path / "x", bits=8, group_size=32)


def test_cli_quantize_bits4_and_dtype_int4(tmp_path, capsys) -> None:
    tok = CharTokenizer.train(CHARS)
    save_checkpoint(tmp_path / "fp32", _model(vocab_size=tok.vocab_size), tok, {})
    args = ["quantize", "--ckpt", str(tmp_path / "fp32"), "--out", str(tmp_path / "q4"), "--bits", "4"]
    assert cli.main([*args, "--group-size", "64"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bits"] == 4 and info["group_size"] == 64 and info["bytes_ratio"] < 0.2
    gen = ["generate", "--prompt", "abc", "--temperature", "0", "--max-new-tokens", "8"]
    outs = []
    for ckpt, dtype in (("q4", "fp32"), ("fp32", "int4")):
        assert cli.main([*gen, "--ckpt", str(tmp_path / ckpt), "--dtype", dtype]) == 0
        outs.append(capsys.readouterr().out)
        assert outs[-1].startswith("abc") and len(outs[-1]) == 3 + 8 + 1
    assert cli.main([*args, "--group-size", "48", "--overwrite"]) == 2
    assert "--group-size must be one of 32, 64, 128" in capsys.readouterr().err


def test_int4_off_the_cpu_is_one_line(tmp_path, monkeypatch) -> None:
    """The int4 kernel is aten's CPU one: asking for int4 on a GPU (found on a CUDA machine:
    a NotImplementedError traceback from the repacking op) is refused before any weight is
    read, for a float checkpoint with --dtype int4 and for an int4 checkpoint alike."""
    tok = CharTokenizer.train(CHARS)
    save_checkpoint(tmp_path / "fp32", _model(vocab_size=tok.vocab_size), tok, {})
    quantize_checkpoint(tmp_path / "fp32", tmp_path / "int4", bits=4)
    # This machine has no GPU: a device that is not the CPU stands in for one.
    loader = sys.modules["bardlm.io.load"]  # the module (bardlm.io.load is also the function)
    monkeypatch.setattr(loader, "resolve_device", lambda name: torch.device("meta"))
    for path, dtype in ((tmp_path / "fp32", "int4"), (tmp_path / "int4", None)):
        with pytest.raises(BardlmError, match="int4 weights run on the CPU only.*--dtype int8"):
            bardlm.load(path, dtype, "cuda")
