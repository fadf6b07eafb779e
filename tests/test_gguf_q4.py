"""GGUF Q4_0 export: ggml's block layout byte for byte (checked against the `gguf` package's
own quantizer), read back by gguf.quants and compared with bardlm's own int4 (G=32) weights, and
run by llama.cpp where llama-cpp-python is installed."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install gguf)")

from bardlm import preset  # noqa: E402
from bardlm.cli import main  # noqa: E402
from bardlm.infer.int4 import dequantize, pack_nibbles, quantize_groups, quantize_model4  # noqa: E402
from bardlm.io.checkpoint import save_checkpoint  # noqa: E402
from bardlm.io.gguf import dequantize_q4_0, quantize_q4_0, write_gguf  # noqa: E402
from bardlm.nn.model import GPT  # noqa: E402
from bardlm.tokenizers import train_bpe  # noqa: E402

Q4_0 = gguf.GGMLQuantizationType.Q4_0
TEXT = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak! " * 40


@pytest.fixture(scope="module")
def bpe():  # noqa: ANN201
    return train_bpe(TEXT, 300)


def test_q4_0_bytes_match_gguf_quants() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 96)).astype(np.float32) * 3
    x[1, :32] = 0  # an all-zero block: scale 0, codes 8
    x[2, 32:64] = np.linspace(-8, 8, 32)  # values landing on .5 after scaling; +8 clips to 15
    x[3, :32] = 1.0  # ties: the first largest value sets the sign
    x[3, 5] = -1.0
    ours = quantize_q4_0(x)
    theirs = gguf.quants.quantize(x, Q4_0)
    assert ours.shape == theirs.shape == (6, 3 * 18) and ours.dtype == np.uint8
    assert np.array_equal(ours, theirs)
    assert np.array_equal(dequantize_q4_0(ours), gguf.quants.dequantize(theirs, Q4_0))


def test_q4_0_equals_our_int4_group_32() -> None:
    """gguf's dequantization of our Q4_0 bytes is bardlm's int4 (G=32) dequantization, up to the
    scale's rounding (float16 there, bf16 here): the same codes almost everywhere, and where a
    value sits on a rounding boundary, one step apart at most."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.linspace(0.01, 2, 64)[:, None]
    theirs = gguf.quants.dequantize(quantize_q4_0(w.numpy()), Q4_0)
    codes, scales = quantize_groups(w, 32)
    ours = dequantize(pack_nibbles(codes), scales).numpy()
    step = np.repeat(np.abs(scales.float().numpy()), 32, axis=1)
    diff = np.abs(theirs - ours)
    assert (diff <= step * 1.02 + 1e-7).all()
    # The same code but for d's rounding (bf16 moves x / d by up to 8 * 2^-9 of a step, so
    # about 1.5% of values cross a rounding boundary).
    same = (diff <= step * 0.02 + 1e-7).mean()
    assert 0.97 <= same < 1.0, same


def test_write_gguf_q4_0_reads_back_as_our_int4(tmp_path, bpe) -> None:  # noqa: ANN001
    cfg = preset("char-tiny", vocab_size=bpe.vocab_size, n_layer=2, n_embd=64, bias=True,
                 block_size=128)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    write_gguf(model, bpe, tmp_path / "m.gguf", "q4_0")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    types = {t.tensor_type.name for n, t in tensors.items() if len(t.shape) == 2
             and not n.startswith("position_embd")}
    assert types == {"Q4_0"}
    md = {k: f.contents() for k, f in reader.fields.items()}
    assert md["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    q4 = quantize_model4(_copy(model), 32)
    pairs = {"blk.1.ffn_up.weight": q4.transformer.h[1].mlp.c_fc,
             "blk.0.attn_qkv.weight": q4.transformer.h[0].attn.c_attn,
             "token_embd.weight": q4.lm_head}
    for name, layer in pairs.items():
        t = tensors[name]
        theirs = gguf.quants.dequantize(np.asarray(t.data), Q4_0).reshape(layer.out_features, -1)
        codes, scales = layer._codes()
        ours = dequantize(pack_nibbles(codes), scales).numpy()
        step = np.repeat(np.abs(scales.float().numpy()), 32, axis=1)
        assert (np.abs(theirs - ours) <= step * 1.02 + 1e-7).all(), name


def _copy(model: GPT) -> GPT:
    return copy.deepcopy(model)


def test_cli_export_q4_0_and_int4_refusal(tmp_path, bpe, capsys) -> None:  # noqa: ANN001
    cfg = preset("char-tiny", vocab_size=bpe.vocab_size, n_layer=1, n_embd=64, block_size=64,
                 bias=True)
    save_checkpoint(tmp_path / "run", GPT(cfg), bpe, {"step": 1})
    out = tmp_path / "m.gguf"
    assert main(["export", "--ckpt", str(tmp_path / "run"), "--format", "gguf", "--out", str(out),
                 "--type", "q4_0"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["type"] == "q4_0" and out.stat().st_size == info["bytes"]
    assert main(["quantize", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "q4"),
                 "--bits", "4"]) == 0
    capsys.readouterr()
    assert main(["export", "--ckpt", str(tmp_path / "q4"), "--format", "gguf", "--out",
                 str(tmp_path / "x.gguf"), "--type", "q4_0"]) == 2
    assert "holds bardlm int4 weights; export the float checkpoint" in capsys.readouterr().err


def test_llama_cpp_runs_q4_0_like_our_int4(tmp_path, bpe) -> None:  # noqa: ANN001
    from test_gguf import LLAMA_PROMPT, llama_cpp_logits

    cfg = preset("char-tiny", vocab_size=bpe.vocab_size, n_layer=2, n_embd=64, bias=True,
                 block_size=128)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # far from uniform, so an argmax means something
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    path = tmp_path / "m.gguf"
    write_gguf(model, bpe, path, "q4_0")
    prompt = bpe.encode(LLAMA_PROMPT)[:24]
    theirs = llama_cpp_logits(path, prompt)
    with torch.no_grad():
        ours = quantize_model4(_copy(model), 32)(torch.tensor([prompt]))[0][0].float()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
