"""GGUF export of issue 34's families, read back by llama.cpp itself (llama-cpp-python; the
llama.cpp tests skip where it is not installed) and by the `gguf` package's GGUFReader:
Qwen3.5 (llama.cpp's qwen35) and the MoE hybrid (Qwen3-Next: qwen3next, and the same function as
qwen35moe). Small random-weight models; llama.cpp must give our logits at every position of a
prompt longer than one chunk (64 tokens) of the delta rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install gguf)")

from test_gguf import LLAMA_PROMPT, TEXT, logits  # noqa: E402

from bardlm import BardlmError, preset  # noqa: E402
from bardlm.io.gguf import write_gguf  # noqa: E402
from bardlm.nn.model import GPT  # noqa: E402
from bardlm.tokenizers import train_bpe  # noqa: E402


@pytest.fixture(scope="module")
def bpe():  # noqa: ANN201
    return train_bpe(TEXT, 300)


def hybrid(vocab: int, moe: bool = False):  # noqa: ANN201
    """Three gated delta rule layers to one gated attention layer (RoPE on 4 of 16 channels),
    2 key heads serving 4 value heads in the linear layers; MoE: 4 experts (top 2) beside a
    gated shared expert in every layer."""
    cfg = preset("qwen3.5-tiny", vocab_size=vocab, n_embd=64, n_head=4, n_kv_head=2, head_dim=16,
                 ffn_hidden=96, linear_k_heads=2, linear_v_heads=4, linear_k_head_dim=16,
                 linear_v_head_dim=16, tie_embeddings=False, block_size=128)
    if moe:
        cfg = cfg.replace(n_expert=4, n_expert_active=2, expert_hidden=32, shared_expert_hidden=48,
                          shared_expert_gate=True, ffn_layers=["moe"] * 4)
    return cfg


# family, the llama.cpp architecture written
CASES = {"qwen35": (False, None), "qwen3next": (True, None), "qwen35moe": (True, "qwen35moe")}


def random_model(cfg) -> GPT:  # noqa: ANN001
    """Weights scaled up so the logits are far from uniform, norm gains away from their start
    (a (1 + w) norm written without its + 1 would show), dt_bias away from 1."""
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(5.0)
            elif name.endswith("dt_bias"):
                p.normal_(0.0, 1.0)
            elif "norm" in name or "ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def llama_cpp_logits(path: Path, prompt: list[int]) -> torch.Tensor:
    """llama.cpp's logits (T, V) at every position of `prompt` (f32 weights and KV cache)."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python "
                            "builds llama.cpp from source, ~10 min on 2 cores)")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                          n_threads=2, seed=0, type_k=0, type_v=0, use_extra_bufts=False)
    llm.eval(prompt)
    return torch.tensor(np.array(llm.scores[: len(prompt)]), dtype=torch.float32)


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_computes_our_logits(tmp_path, bpe, case: str) -> None:  # noqa: ANN001
    moe, arch = CASES[case]
    model = random_model(hybrid(bpe.vocab_size, moe))
    path = tmp_path / "m.gguf"
    summary = write_gguf(model, bpe, path, "f32", arch=arch)
    assert summary["architecture"] == case
    prompt = bpe.encode(LLAMA_PROMPT * 4)[:80]  # two chunks of the delta rule
    assert len(prompt) == 80
    theirs = llama_cpp_logits(path, prompt)
    with torch.no_grad():
        ours = logits(model, torch.tensor([prompt]))[0]
    assert ours.std().item() > 0.5  # far from uniform: a wrong layout would not pass below
    # 1e-3: a RoPE section left unrotated (one pair of four) already gives 1e-2
    assert (ours - theirs).abs().max().item() <= 1e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("case", list(CASES))
def test_reader_names_shapes_metadata(tmp_path, bpe, case: str) -> None:  # noqa: ANN001
    moe, arch = CASES[case]
    cfg = hybrid(bpe.vocab_size, moe)
    model = random_model(cfg)
    write_gguf(model, bpe, tmp_path / "m.gguf", "q8_0", arch=arch)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[case.upper()]]}
    t = {x.name: x for x in reader.tensors}
    for name in t:  # every name is one llama.cpp's architecture declares
        base = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
        assert any(base == a.format(bid=i) for a in allowed for i in range(cfg.n_layer)), name
    linear = ["attn_qkv.weight", "attn_gate.weight", "ssm_conv1d.weight", "ssm_a", "ssm_dt.bias",
              "ssm_norm.weight", "ssm_out.weight"]
    linear += ["ssm_ba.weight"] if case == "qwen3next" else ["ssm_beta.weight", "ssm_alpha.weight"]
    attn = ["attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
            "attn_q_norm.weight", "attn_k_norm.weight"]
    ffn = (["ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight",
            "ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight",
            "ffn_gate_inp_shexp.weight"] if moe else ["ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"])
    want = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}" for i in range(4)
        for n in ["attn_norm.weight", "post_attention_norm.weight", *ffn, *(attn if i == 3 else linear)]}
    assert set(t) == want
    # shapes as llama.cpp creates them (GGUF lists the fastest dimension first)
    assert list(t["blk.0.ssm_conv1d.weight"].shape) == [4, 2 * 32 + 64]
    assert list(t["blk.0.attn_qkv.weight"].shape) == [64, 2 * 32 + 64]
    assert list(t["blk.3.attn_q.weight"].shape) == [64, 2 * 4 * 16]  # query and gate rows
    assert list(t["blk.0.ssm_a"].shape) == [4]
    if moe:
        assert list(t["blk.0.ffn_gate_exps.weight"].shape) == [64, 32, 4]
        assert list(t["blk.0.ffn_down_exps.weight"].shape) == [32, 64, 4]
        assert t["blk.0.ffn_gate_exps.weight"].tensor_type.name == "Q8_0"
    assert t["blk.0.ssm_conv1d.weight"].tensor_type.name == "F32"  # ggml's conv reads f32
    # values: A_log as -exp(A_log) (value heads tiled for qwen35*), (1 + w) norms as w + 1 but
    # the linear layers' gated norm as it is
    a_log = model.transformer.h[0].attn.A_log.detach()
    a = -a_log.exp()
    if case != "qwen3next":  # key head j % 2 serves value head j: ours 0, 0, 1, 1 -> 0, 1, 0, 1
        a = a[[0, 2, 1, 3]]
    np.testing.assert_allclose(np.asarray(t["blk.0.ssm_a"].data), a.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(t["blk.0.attn_norm.weight"].data),
                               model.transformer.h[0].ln_1.weight.detach().numpy() + 1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(t["blk.0.ssm_norm.weight"].data),
                               model.transformer.h[0].attn.norm.weight.detach().numpy(), rtol=1e-6)
    md = {k: f.contents() for k, f in reader.fields.items()}
    assert md["general.architecture"] == case
    assert md[f"{case}.ssm.conv_kernel"] == 4 and md[f"{case}.ssm.state_size"] == 16
    assert md[f"{case}.ssm.group_count"] == 2 and md[f"{case}.ssm.time_step_rank"] == 4
    assert md[f"{case}.ssm.inner_size"] == 64 and md[f"{case}.full_attention_interval"] == 4
    assert md[f"{case}.rope.dimension_count"] == 4  # a quarter of each 16-channel head
    if case != "qwen3next":
        assert md[f"{case}.rope.dimension_sections"] == [1, 1, 0, 0]
    if moe:
        assert [md[f"{case}.{k}"] for k in ("expert_count", "expert_used_count",
                "expert_feed_forward_length", "expert_shared_feed_forward_length")] == [4, 2, 32, 48]


@pytest.mark.parametrize("change, words", [
    (dict(linear_v_head_dim=8), "linear_k_head_dim != linear_v_head_dim"),
    (dict(attn_layers=["linear", "global", "linear", "global"], n_layer=4), None),  # every 2nd: fine
    (dict(attn_layers=["linear", "linear", "global", "global"]), "every n-th layer attention"),
])
def test_refuses_hybrids_llama_cpp_cannot_run(tmp_path, bpe, change, words) -> None:  # noqa: ANN001
    cfg = hybrid(bpe.vocab_size).replace(**change)
    if words is None:
        write_gguf(GPT(cfg), bpe, tmp_path / "m.gguf", "f32")
        assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["qwen35.full_attention_interval"].contents() == 2
        return
    with pytest.raises(BardlmError, match=words) as e:
        write_gguf(GPT(cfg), bpe, tmp_path / "m.gguf")
    assert "\n" not in str(e.value) and "GGUF" in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


def test_refuses_moe_hybrid_with_dense_layers_and_unknown_arch(tmp_path, bpe) -> None:  # noqa: ANN001
    cfg = hybrid(bpe.vocab_size, moe=True)
    with pytest.raises(BardlmError, match="dense FFN layers beside MoE ones"):
        write_gguf(GPT(cfg.replace(ffn_layers=["dense", "moe", "moe", "moe"])), bpe, tmp_path / "m.gguf")
    with pytest.raises(BardlmError, match="qwen3next or qwen35moe, not 'qwen35'"):
        write_gguf(GPT(cfg), bpe, tmp_path / "m.gguf", arch="qwen35")
    assert not (tmp_path / "m.gguf").exists()
