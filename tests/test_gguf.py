"""GGUF export (issue 21), checked by readers bardlm did not write: the `gguf` package's
GGUFReader and quantizer, `transformers`' GGUF loader, and llama.cpp itself (llama-cpp-python)
where it is installed. Small random-weight models for exactness, a briefly trained one for q8_0."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install gguf)")

from bardlm import BardlmError, preset  # noqa: E402
from bardlm.cli import main  # noqa: E402
from bardlm.io.checkpoint import save_checkpoint  # noqa: E402
from bardlm.io.gguf import (  # noqa: E402
    dequantize_q8_0,
    export_gguf,
    quantize_q8_0,
    read_metadata,
    write_gguf,
)
from bardlm.nn.model import GPT  # noqa: E402
from bardlm.tokenizers import CharTokenizer, train_bpe  # noqa: E402

TEXT = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak! " * 40

# YaRN over an original context of 256 (factor 8): the ramp between kept and interpolated
# frequencies runs from channel pair 0.2 to 3.2 of 8 (head_dim 16; 0.4 to 6.4 of 16 for Qwen3's
# 32), its ends rounded to whole pairs (0 to 4) as transformers' truncate=true and llama.cpp do.
YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256,
        "beta_fast": 32.0, "beta_slow": 1.0}


@pytest.fixture(scope="module")
def bpe():  # noqa: ANN201
    return train_bpe(TEXT, 300)


def configs(vocab: int) -> dict:
    """One small config per family, in shapes transformers' GGUF loader can read back: it ignores
    GPT-2's context_length (wpe stays 1024 rows) and Qwen3's key_length (head_dim stays 128)."""
    return {
        "gpt2": preset("char-tiny", vocab_size=vocab, n_layer=2, n_embd=64, bias=True,
                       block_size=1024),
        "llama": preset("llama-tiny", vocab_size=vocab, n_layer=2, n_embd=64, ffn_hidden=96),
        "qwen3": preset("qwen3-tiny", vocab_size=vocab, n_layer=2, n_embd=64, n_head=2,
                        n_kv_head=1, head_dim=128, ffn_hidden=96),
    }


def logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return (out[0] if isinstance(out, tuple) else out).float()


def random_model(cfg) -> GPT:  # noqa: ANN001
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.1)
    return model


# Q8_0 packing ------------------------------------------------------------------------------
def test_q8_0_bytes_match_gguf_quants() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 96)).astype(np.float32) * 3
    x[1, :32] = 0  # an all-zero block: scale 0, no division by zero
    x[2, 32:64] = np.linspace(-127, 127, 32)  # values landing on .5 after scaling
    ours = quantize_q8_0(x)
    theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    assert ours.shape == theirs.shape == (6, 3 * 34) and ours.dtype == np.uint8
    assert np.array_equal(ours, theirs)
    back = dequantize_q8_0(ours)
    assert np.array_equal(back, gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType.Q8_0))
    scale = np.abs(x.reshape(-1, 32)).max(1, keepdims=True) / 127
    # half a step of rounding, plus the float16 rounding of the scale (2^-11) times |q| <= 127
    assert (np.abs(back - x).reshape(-1, 32) <= scale * (0.5 + 127 * 2**-11) + 1e-6).all()


# The file, read by gguf's GGUFReader ----------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_reader_names_shapes_types_metadata(tmp_path, bpe, family, qtype) -> None:  # noqa: ANN001
    cfg = configs(bpe.vocab_size)[family]
    model = random_model(cfg)
    path = tmp_path / "m.gguf"
    write_gguf(model, bpe, path, qtype)
    reader = gguf.GGUFReader(str(path))
    arch = gguf.MODEL_ARCH[family.upper()]
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    names = {t.name: t for t in reader.tensors}
    for name in names:  # every name is one llama.cpp's arch declares
        base = name.rsplit(".", 1)[0]
        assert any(base == a.format(bid=i) for a in allowed for i in range(cfg.n_layer)), name
    assert ("output.weight" in names) == (not cfg.tie_embeddings)
    want = {"gpt2": 4 + 12 * cfg.n_layer, "llama": 3 + 9 * cfg.n_layer,
            "qwen3": 2 + 11 * cfg.n_layer}[family]
    assert len(names) == want
    # shapes: GGUF lists (in, out) for an (out, in) weight
    qkv = "blk.0.attn_qkv.weight" if family == "gpt2" else "blk.0.attn_k.weight"
    rows = 3 * cfg.n_embd if family == "gpt2" else cfg.n_kv_head * cfg.head_dim
    assert list(names[qkv].shape) == [cfg.n_embd, rows]
    assert list(names["token_embd.weight"].shape) == [cfg.n_embd, cfg.vocab_size]
    types = {t.tensor_type.name for n, t in names.items() if len(t.shape) == 2
             and not n.startswith("position_embd")}
    assert types == {{"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[qtype]}
    assert {t.tensor_type.name for t in names.values() if len(t.shape) == 1} == {"F32"}
    md = read_metadata(path)
    assert md["general.architecture"] == family
    assert md["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[qtype]
    assert md[f"{family}.context_length"] == cfg.block_size
    assert md[f"{family}.embedding_length"] == cfg.n_embd
    assert md[f"{family}.block_count"] == cfg.n_layer
    assert md[f"{family}.feed_forward_length"] == cfg.ffn_hidden
    assert md[f"{family}.attention.head_count"] == cfg.n_head
    if family != "gpt2":
        assert md[f"{family}.attention.head_count_kv"] == cfg.n_kv_head
        assert md[f"{family}.rope.freq_base"] == pytest.approx(cfg.rope_theta)
        assert md[f"{family}.rope.dimension_count"] == cfg.head_dim
        assert md[f"{family}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    else:
        assert md["gpt2.attention.layer_norm_epsilon"] == pytest.approx(cfg.norm_eps)
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt-2"
    assert len(md["tokenizer.ggml.tokens"]) == cfg.vocab_size == len(md["tokenizer.ggml.token_type"])
    assert md["tokenizer.ggml.merges"] == [" ".join(m) for m in bpe.merges()]
    assert md["tokenizer.ggml.add_bos_token"] is False
    # no special tokens in bardlm's BPE: EOS is the byte 0xFF, never in UTF-8 text, not ","
    assert md["tokenizer.ggml.tokens"][md["tokenizer.ggml.eos_token_id"]] == "ÿ"


def test_llama3_scaling_writes_rope_freqs(tmp_path, bpe) -> None:  # noqa: ANN001
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    cfg = configs(bpe.vocab_size)["llama"].replace(rope_scaling=scaling, rope_theta=500000.0)
    write_gguf(random_model(cfg), bpe, tmp_path / "m.gguf", "f32")
    freqs = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}["rope_freqs.weight"]
    hf_cfg = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
        rope_parameters={**scaling, "rope_theta": 500000.0})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    np.testing.assert_allclose(np.asarray(freqs.data), (plain / scaled.double()).numpy(), rtol=1e-5)


# transformers' GGUF loader ----------------------------------------------------------------
def hf_from_gguf(path):  # noqa: ANN001, ANN201
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers loads GGUF only with accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


@pytest.mark.parametrize("family", ["gpt2", "gpt2-untied", "llama", "qwen3"])
def test_transformers_reads_same_logits_and_tokens(tmp_path, bpe, family) -> None:  # noqa: ANN001
    family, _, untied = family.partition("-")
    cfg = configs(bpe.vocab_size)[family]
    cfg = cfg.replace(tie_embeddings=False) if untied else cfg
    model = random_model(cfg)
    write_gguf(model, bpe, tmp_path / "m.gguf", "f32")
    hf, hf_tok = hf_from_gguf(tmp_path / "m.gguf")
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                                 "qwen3": "Qwen3ForCausalLM"}[family]
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        diff = (logits(model, ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4
    text = "Speak, speak! Before we proceed... hear me: zebra 42"
    assert hf_tok(text, add_special_tokens=True)["input_ids"] == bpe.encode(text)
    assert hf_tok.decode(bpe.encode(text)) == text


def train_small(bpe, tiny_text: str, steps: int = 40) -> GPT:  # noqa: ANN001
    """A Llama-style model trained for a few seconds: peaked logits, unlike random weights."""
    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=bpe.vocab_size, n_layer=2, n_embd=64, ffn_hidden=160)
    model = GPT(cfg)
    ids = torch.tensor(bpe.encode(tiny_text[:60_000]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (16,))
        x = torch.stack([ids[s : s + 64] for s in starts])
        y = torch.stack([ids[s + 1 : s + 65] for s in starts])
        out = model(x, y)
        loss = out[1] if isinstance(out, tuple) else out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tiny_shakespeare):  # noqa: ANN001, ANN201
    bpe512 = train_bpe(tiny_shakespeare[:200_000], 512)
    return train_small(bpe512, tiny_shakespeare), bpe512


@pytest.fixture(scope="module")
def tiny_shakespeare() -> str:
    from conftest import corpus

    return corpus("tiny_shakespeare.txt").read_text(encoding="utf-8")


def test_q8_0_greedy_agrees_on_trained_model(tmp_path, trained, tiny_shakespeare) -> None:  # noqa: ANN001
    model, tok = trained
    write_gguf(model, tok, tmp_path / "m.gguf", "q8_0")
    hf, _ = hf_from_gguf(tmp_path / "m.gguf")
    ids = torch.tensor(tok.encode(tiny_shakespeare[-20_000:])[: 8 * 64]).view(8, 64)
    with torch.no_grad():
        ours, theirs = logits(model, ids), hf(ids).logits
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert agree >= 0.99, agree
    assert 0 < (ours - theirs).abs().max().item() < 0.5  # quantized: close, not equal


def test_hf_tokenizer_llama3_split_and_special_tokens(tmp_path) -> None:  # noqa: ANN001
    """A Hugging Face tokenizer.json in Llama 3's style (Split regex + ByteLevel, an
    <|end_of_text|> special token): llama.cpp's "llama-bpe" pre-tokenizer, EOS from the token."""
    from tokenizers import Regex, pre_tokenizers

    from bardlm.io.gguf import _LLAMA3_SPLIT
    from bardlm.tokenizers import HFTokenizer

    # digits: GPT-2's regex keeps " 123456" whole, Llama 3's cuts it " " "123" "456"
    hf_tok = train_bpe(TEXT + " 123456 don't" * 30, 300).hf
    hf_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf_tok.add_special_tokens(["<|end_of_text|>"])
    tok = HFTokenizer(hf_tok)
    cfg = configs(tok.vocab_size)["llama"]
    model = random_model(cfg)
    write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    md = read_metadata(tmp_path / "m.gguf")
    assert md["tokenizer.ggml.pre"] == "llama-bpe"
    eos = md["tokenizer.ggml.eos_token_id"]
    assert md["tokenizer.ggml.tokens"][eos] == "<|end_of_text|>"
    assert md["tokenizer.ggml.token_type"][eos] == gguf.TokenType.CONTROL
    assert md["tokenizer.ggml.add_bos_token"] is False
    _, their_tok = hf_from_gguf(tmp_path / "m.gguf")
    text = "Speak 12345 times, don't!\n\nAll:  speak<|end_of_text|>"
    assert their_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    # BOS/EOS facts the tokenizer carries (from tokenizer_config.json) win, add_bos included
    hf_tok.add_special_tokens(["<|begin_of_text|>", "<|eot_id|>"])
    tok = HFTokenizer(hf_tok)
    ids = [tok.hf.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")]
    tok.set_special_tokens(bos_id=ids[0], add_bos=True, eos_ids=(ids[1], ids[2]))
    write_gguf(random_model(configs(tok.vocab_size)["llama"]), tok, tmp_path / "b.gguf", "f32")
    md = read_metadata(tmp_path / "b.gguf")
    assert md["tokenizer.ggml.add_bos_token"] is True
    assert [md[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "eot")] == ids


# llama.cpp itself --------------------------------------------------------------------------
def test_llama_cpp_runs_the_file(tmp_path, trained, tiny_shakespeare) -> None:  # noqa: ANN001
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python "
                            "builds llama.cpp from source, ~10 min on 2 cores)")
    model, tok = trained
    prompt = tok.encode(tiny_shakespeare[-3000:])[:32]
    # f32: llama.cpp sums in its own order (and its own exp/rsqrt), so 1e-2, not transformers' 1e-4
    for qtype, tol in (("f32", 1e-2), ("q8_0", None)):
        path = tmp_path / f"m-{qtype}.gguf"
        write_gguf(model, tok, path, qtype)
        # f32 KV cache (type 0 = GGML_TYPE_F32): llama.cpp's default f16 cache would round keys
        kwargs = dict(model_path=str(path), n_ctx=64, logits_all=True, verbose=False,
                      n_threads=2, seed=0, type_k=0, type_v=0)
        try:  # AMX CPUs: llama.cpp's q8_0 repacking crashes on the first decode without this
            llm = llama_cpp.Llama(**kwargs, use_extra_bufts=False)
        except TypeError:
            warnings.warn("this llama-cpp-python has no use_extra_bufts: on AMX CPUs its q8_0 "
                          "repacking may crash", stacklevel=1)
            llm = llama_cpp.Llama(**kwargs)
        assert llm.tokenize(tiny_shakespeare[-3000:][:200].encode(), add_bos=False,
                            special=False)[:20] == tok.encode(tiny_shakespeare[-3000:][:200])[:20]
        llm.eval(prompt)
        theirs = torch.tensor(np.array(llm.scores[: len(prompt)]), dtype=torch.float32)
        with torch.no_grad():
            ours = logits(model, torch.tensor([prompt]))[0]
        agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
        if tol is not None:
            assert (ours - theirs).abs().max().item() <= tol
        assert agree >= 0.95, (qtype, agree)


# Refusals and the command line ------------------------------------------------------------
@pytest.mark.parametrize("change, words", [
    (dict(pos="sinusoidal"), "pos=sinusoidal"),
    (dict(norm_placement="post"), "norm_placement=post"),
    (dict(share_layers=True), "share_layers"),
    (dict(residual=False), "residual=false"),
    (dict(attn_score="cosine"), "attn_score=cosine"),
    (dict(rope_scaling={**YARN, "truncate": False}), r"llama.cpp's YaRN cannot run .* \(truncate=false"),
    (dict(rope_scaling={**YARN, "attention_factor": 1.5}), r"YaRN cannot run .* \(attention_factor"),
    (dict(n_layer=4, rope_layers=[True, False, True, True]), "skips RoPE in exactly every 4th layer"),
    (dict(n_layer=4, rope_layers=[True, True, True, False], sliding_window=8), "SmolLM3 has no sliding windows"),
])
def test_refuses_shapes_llama_cpp_cannot_run(tmp_path, bpe, change, words) -> None:  # noqa: ANN001
    cfg = configs(bpe.vocab_size)["llama"].replace(**change)
    with pytest.raises(BardlmError, match=words) as e:
        write_gguf(GPT(cfg), bpe, tmp_path / "m.gguf")
    assert "\n" not in str(e.value) and "GGUF" in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


def test_refuses_relu_gpt2_and_char_tokenizer(tmp_path, bpe) -> None:  # noqa: ANN001
    relu = configs(bpe.vocab_size)["gpt2"].replace(ffn="relu")
    with pytest.raises(BardlmError, match="GELU"):
        write_gguf(GPT(relu), bpe, tmp_path / "m.gguf")
    char = CharTokenizer.train(TEXT)
    cfg = configs(char.vocab_size)["llama"]
    with pytest.raises(BardlmError, match="'char' tokenizer.*bpe:N"):
        write_gguf(GPT(cfg), char, tmp_path / "m.gguf")


def test_cli_export_gguf_hf_and_convert(tmp_path, bpe, capsys) -> None:  # noqa: ANN001
    cfg = configs(bpe.vocab_size)["qwen3"]
    save_checkpoint(tmp_path / "run", random_model(cfg), bpe)
    out = tmp_path / "m.gguf"
    assert main(["export", "--ckpt", str(tmp_path / "run"), "--format", "gguf", "--out", str(out),
                 "--type", "q8_0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"] == "qwen3" and summary["type"] == "q8_0" and out.is_file()
    assert read_metadata(out)["general.name"] == "run"
    assert main(["export", "--ckpt", str(tmp_path / "run"), "--format", "gguf", "--out",
                 str(out)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(tmp_path / "run"), "--format", "hf", "--out",
                 str(tmp_path / "hf")]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "Qwen3ForCausalLM"
    assert (tmp_path / "hf" / "config.json").is_file()
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    capsys.readouterr()
    # the exported HF directory exports to GGUF too (any directory bardlm.load reads)
    summary = export_gguf(tmp_path / "hf", tmp_path / "from-hf.gguf", "f32")
    assert summary["architecture"] == "qwen3"
    a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "from-hf.gguf")).tensors}
    export_gguf(tmp_path / "run", tmp_path / "from-run.gguf", "f32")
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "from-run.gguf")).tensors}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


LLAMA_PROMPT = "ROMEO: the quick brown fox jumps over the lazy dog, and then"


def llama_cpp_logits(path: Path, prompt: list[int], n_ctx: int = 64) -> torch.Tensor:
    """llama.cpp's logits (T, V) at every position of `prompt` (at most n_ctx tokens, one
    batch), from the GGUF file `path` (the test skips, saying why, where llama-cpp-python is
    not installed)."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python "
                            "builds llama.cpp from source, ~10 min on 2 cores)")
    kwargs = dict(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                  n_threads=2, seed=0, type_k=0, type_v=0)
    try:
        llm = llama_cpp.Llama(**kwargs, use_extra_bufts=False)
    except TypeError:  # older llama-cpp-python
        llm = llama_cpp.Llama(**kwargs)
    llm.eval(prompt)
    return torch.tensor(np.array(llm.scores[: len(prompt)]), dtype=torch.float32)


def more_configs(vocab: int) -> dict:
    """Families only llama.cpp reads back here: Qwen2 (q/k/v biases, tied head), OLMo 2
    (norms on the sublayers' outputs, QK-norm over the projections, untied head), Gemma 3
    (llama.cpp's five local layers to one global, window 8 so the prompt spans three windows, a
    RoPE base per layer kind), OLMo 3 (OLMo 2 with three local layers to one global) and SmolLM3
    (no RoPE in the 4th layer)."""
    llama = configs(vocab)["llama"]
    return {"qwen2": llama.replace(qkv_bias=True, tie_embeddings=True),
            "olmo2": llama.replace(norm_placement="output", qk_norm=True, qk_norm_scope="proj"),
            "gemma3_text": preset("gemma3-tiny", vocab_size=vocab, n_layer=6, n_embd=64, ffn_hidden=96,
                                  sliding_window=8, attn_layers=["local"] * 5 + ["global"]),
            "olmo3": llama.replace(norm_placement="output", qk_norm=True, qk_norm_scope="proj", n_layer=4,
                                   sliding_window=8, attn_layers=["local"] * 3 + ["global"],
                                   rope_local_theta=llama.rope_theta),
            "smollm3": llama.replace(n_layer=4, rope_layers=[True, True, True, False]),
            **moe_and_gemma2_configs(vocab), **yarn_configs(vocab)}


def yarn_configs(vocab: int) -> dict:
    """Llama (llama.cpp's "normal" RoPE: permuted rows), Qwen3 and gpt-oss with YaRN."""
    return {"llama+yarn": configs(vocab)["llama"].replace(rope_scaling=YARN),
            "qwen3+yarn": preset("qwen3-tiny", vocab_size=vocab, n_layer=2, n_embd=64, rope_scaling=YARN),
            "gpt_oss+yarn": moe_and_gemma2_configs(vocab)["gpt_oss"].replace(rope_scaling=YARN)}


def moe_and_gemma2_configs(vocab: int) -> dict:
    """Mistral (a Llama block, window 8 in every layer), Gemma 2 (local and global layers
    alternating, window 8; both soft-caps low enough to
    bite on these scaled-up weights) and the mixtures of experts: 4 experts, top 2, each
    family's routing (renormalised top-k weights or not, as llama.cpp fixes it). Mixtral
    (llama.cpp's llama with experts: q/k rows permuted), Qwen3-MoE (QK-norm per head, GQA),
    Qwen2-MoE (a gated shared expert, q/k/v biases, tied head written twice), OLMoE (QK-norm
    over the projections) and gpt-oss (sinks, clamped SwiGLU experts with biases, a router bias,
    window 8 on every other layer, untied head)."""
    llama = configs(vocab)["llama"]
    moe = dict(n_expert=4, n_expert_active=2, expert_hidden=32)
    return {
        "mistral": llama.replace(sliding_window=8),  # every layer local: llama.cpp's granite_swa
        "gemma2": preset("gemma3-tiny", vocab_size=vocab, n_embd=64, n_head=4, head_dim=16, ffn_hidden=96,
                         qk_norm=False, rope_local_theta=None, rope_theta=10000.0, sliding_window=8,
                         attn_layers=["local", "global"] * 2, attn_softcap=20.0, logit_softcap=10.0),
        "mixtral": llama.replace(**moe),
        "qwen3_moe": preset("moe-tiny", vocab_size=vocab, n_layer=2, n_embd=64, n_head=4, head_dim=32,
                            ffn_layers=None, **moe),
        "qwen2_moe": llama.replace(**moe, shared_expert_hidden=48, router_renorm=False, qkv_bias=True,
                                   tie_embeddings=True),
        "olmoe": llama.replace(**moe, n_kv_head=4, qk_norm=True, qk_norm_scope="proj", router_renorm=False),
        "gpt_oss": preset("gpt-oss-tiny", vocab_size=vocab, n_embd=64, head_dim=16, ffn_hidden=32,
                          sliding_window=8, **moe),
    }


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_hf_directory_of_a_moe_exports_the_same_file(tmp_path, bpe, family) -> None:  # noqa: ANN001
    """A Hugging Face directory (Mixtral's w1/w3/w2 experts, Qwen2-MoE's shared expert,
    gpt-oss's experts stacked with gate and up interleaved) exports to the same GGUF tensors
    as the bardlm checkpoint it was written from: every expert lands in its place."""
    save_checkpoint(tmp_path / "run", random_model(moe_and_gemma2_configs(bpe.vocab_size)[family]), bpe)
    assert main(["export", "--ckpt", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    files = {}
    for src in ("run", "hf"):
        export_gguf(tmp_path / src, tmp_path / f"{src}.gguf", "f32")
        files[src] = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / f"{src}.gguf")).tensors}
    assert files["run"].keys() == files["hf"].keys() and "blk.1.ffn_up_exps.weight" in files["hf"]
    assert all(np.array_equal(files["run"][k], files["hf"][k]) for k in files["run"])


def test_mistral_is_granite_swa_windowed_in_every_layer(tmp_path, bpe) -> None:  # noqa: ANN001
    """Mistral as llama.cpp's granite_swa: every layer windowed, Granite's logit scale 1, and a
    sink per head at -1e30 (f32 under q8_0 too), which no softmax weight reaches."""
    cfg = moe_and_gemma2_configs(bpe.vocab_size)["mistral"]
    write_gguf(random_model(cfg), bpe, tmp_path / "m.gguf", "q8_0")
    md = read_metadata(tmp_path / "m.gguf")
    assert md["general.architecture"] == "granite_swa"
    assert md["granite_swa.attention.sliding_window"] == cfg.sliding_window
    assert md["granite_swa.attention.sliding_window_pattern"] == [True] * cfg.n_layer
    assert md["granite_swa.logit_scale"] == 1.0
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    for i in range(cfg.n_layer):
        sink = tensors[f"blk.{i}.attn_sinks.weight"]
        assert sink.tensor_type.name == "F32" and np.all(np.asarray(sink.data) == np.float32(-1e30))


@pytest.mark.parametrize("family", ["gemma2", "mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss"])
@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_reader_moe_and_gemma2_names_shapes_metadata(tmp_path, bpe, family, qtype) -> None:  # noqa: ANN001
    """The files GGUFReader reads: names llama.cpp's architecture declares, each layer's experts
    stacked in expert order ((E, F, C) = ne [C, F, E], as ours per expert), routers and biases
    kept f32 under q8_0, and the keys llama.cpp reads for experts, windows and soft-caps."""
    cfg = moe_and_gemma2_configs(bpe.vocab_size)[family]
    model = random_model(cfg)
    path = tmp_path / "m.gguf"
    write_gguf(model, bpe, path, qtype)
    md = read_metadata(path)
    arch = md["general.architecture"]
    assert arch == {"gemma2": "gemma2", "mixtral": "llama", "qwen3_moe": "qwen3moe",
                    "qwen2_moe": "qwen2moe", "olmoe": "olmoe", "gpt_oss": "gpt-oss"}[family]
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[
        {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]]}
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name in tensors:
        assert any(name.rsplit(".", 1)[0] == a.format(bid=i) for a in allowed for i in range(cfg.n_layer)), name
    sd = model.state_dict()
    if family == "gemma2":
        assert md["gemma2.attn_logit_softcapping"] == pytest.approx(cfg.attn_softcap)
        assert md["gemma2.final_logit_softcapping"] == pytest.approx(cfg.logit_softcap)
        assert md["gemma2.attention.sliding_window"] == cfg.sliding_window
        assert "output.weight" not in tensors  # llama.cpp's Gemma 2 reads the embedding
        norm = np.asarray(tensors["blk.1.post_ffw_norm.weight"].data)
        assert np.allclose(norm, sd["transformer.h.1.ln_2_post.weight"].numpy() + 1)  # (1 + w)
        return
    E, F, C = cfg.n_expert, cfg.expert_hidden, cfg.n_embd
    assert md[f"{arch}.expert_count"] == E and md[f"{arch}.expert_used_count"] == cfg.n_expert_active
    if family in ("mixtral", "olmoe"):  # their experts' width is llama.cpp's n_ff
        assert md[f"{arch}.feed_forward_length"] == F
    else:
        assert md[f"{arch}.expert_feed_forward_length"] == F
    if family == "qwen2_moe":
        assert md["qwen2moe.expert_shared_feed_forward_length"] == cfg.shared_expert_hidden
        assert list(tensors["blk.0.ffn_gate_inp_shexp.weight"].shape) == [C]
    if family == "gpt_oss":
        assert md["gpt-oss.attention.sliding_window"] == cfg.sliding_window
        assert list(tensors["blk.0.attn_sinks.weight"].shape) == [cfg.n_head]
        assert list(tensors["blk.1.ffn_down_exps.bias"].shape) == [C, E]
    # llama.cpp's qwen2moe, olmoe and gpt-oss read an output matrix even where ours is tied
    assert ("output.weight" in tensors) == (not cfg.tie_embeddings or family in ("qwen2_moe", "olmoe", "gpt_oss"))
    for kind, rows, cols in (("gate", F, C), ("up", F, C), ("down", C, F)):
        t = tensors[f"blk.1.ffn_{kind}_exps.weight"]
        assert list(t.shape) == [cols, rows, E]
        assert t.tensor_type.name == ("F32" if qtype == "f32" else "Q8_0")
        if qtype == "f32":  # expert e of the stack is our expert e
            mlp = "transformer.h.1.mlp.experts.{}."
            for e in range(E):
                ours = (sd[mlp.format(e) + "c_fc.weight"].split(F)[("gate", "up").index(kind)]
                        if kind != "down" else sd[mlp.format(e) + "c_proj.weight"])
                assert np.array_equal(np.asarray(t.data)[e], ours.numpy())
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"  # routers stay f32
    assert list(tensors["blk.1.ffn_gate_inp.weight"].shape) == [C, E]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3", "qwen2", "olmo2", "gemma3_text", "olmo3", "smollm3",
                                    "mistral", "gemma2", "mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss",
                                    "llama+yarn", "qwen3+yarn", "gpt_oss+yarn"])
def test_llama_cpp_computes_our_logits_for_each_family(tmp_path, bpe, family: str) -> None:  # noqa: ANN001
    """Every family's f32 file, run by llama.cpp itself: the same logits as ours (random weights
    scaled up so the distribution is far from uniform, and any layout error shows; biases and
    norm gains away from their initial values)."""
    torch.manual_seed(0)
    model = GPT({**configs(bpe.vocab_size), **more_configs(bpe.vocab_size)}[family]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(5.0)
            elif name.endswith(("bias", "sinks")):
                p.normal_(0.0, 0.5)
            elif "norm" in name or "ln_" in name:
                p.uniform_(0.5, 1.5)
    path = tmp_path / f"{family}.gguf"
    write_gguf(model, bpe, path, "f32")
    prompt = bpe.encode(LLAMA_PROMPT)[:24]
    theirs = llama_cpp_logits(path, prompt)
    with torch.no_grad():
        ours = logits(model, torch.tensor([prompt]))[0]
    assert ours.std().item() > 0.5  # far from uniform: a wrong layout would not pass below
    assert (ours - theirs).abs().max().item() <= 2e-2
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
