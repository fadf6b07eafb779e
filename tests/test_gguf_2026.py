"""GGUF export of issue 34's families, read back by llama.cpp itself (llama-cpp-python; the
llama.cpp tests skip where it is not installed) and by the `gguf` package's GGUFReader:
Qwen3.5 (llama.cpp's qwen35), the MoE hybrid (Qwen3-Next: qwen3next, and the same function as
qwen35moe; a model imported from Qwen3.5-MoE: qwen35moe by default), DeepSeek-V3 (deepseek2) and Gemma 4 (gemma4). Small random-weight models; llama.cpp
must give our logits at every position of an 80-token prompt: more than one chunk (64 tokens)
of the delta rule, ten of Gemma 4's windows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install gguf)")

from test_gguf import LLAMA_PROMPT, TEXT, llama_cpp_logits, logits  # noqa: E402

from bardlm import BardlmError, preset  # noqa: E402
from bardlm.cli import main  # noqa: E402
from bardlm.io.checkpoint import save_checkpoint  # noqa: E402
from bardlm.io.gguf import export_gguf, write_gguf  # noqa: E402
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


def qwen3_5_moe(vocab: int):  # noqa: ANN201
    """The MoE hybrid as imported from Qwen3.5-MoE (its family recorded, as `config_from_hf` does)."""
    cfg = hybrid(vocab, moe=True)
    return cfg.replace(extra={**cfg.extra, "hf_family": "qwen3_5_moe_text"})


def mla(vocab: int, interleave: bool = True):  # noqa: ANN201
    """DeepSeek-V3: latent attention (low-rank q, a latent of 32 + 16 RoPE channels), the first
    FFN dense, then 8 experts in 4 groups (top 2 of the best 2 groups) beside a shared expert;
    RoPE channels paired as DeepSeek's checkpoints pair them, or rotate-half."""
    return preset("mla-tiny", vocab_size=vocab, n_embd=64, block_size=128, rope_interleave=interleave)


def gemma4(vocab: int, moe: bool = False):  # noqa: ANN201
    """Gemma 4 (text): local and global layers alternating (window 8: the prompt spans ten
    windows), the last two reading the keys and values of layers 2 and 3, global heads twice as
    wide with one KV head, K = V and proportional RoPE on a quarter of their channels, per-layer
    inputs of 8, double-wide MLPs in the shared layers, a final soft-cap; MoE: 4 experts (top 2)
    beside every MLP."""
    cfg = preset("gemma4-tiny", vocab_size=vocab, n_embd=64, head_dim=16, global_head_dim=32, ffn_hidden=96,
                 sliding_window=8, attn_layers=["local", "global"] * 3, kv_shared_layers=2,
                 per_layer_input_dim=8, logit_softcap=30.0, block_size=128)
    if moe:
        cfg = cfg.replace(n_expert=4, n_expert_active=2, expert_hidden=32, ffn_layers=["dense+moe"] * 6,
                          router_norm=True, router_renorm=True)
    return cfg


# case: (config, the architecture asked for (None: the default), the architecture written)
CASES = {"qwen35": (hybrid, None, "qwen35"),
         "qwen3next": (lambda v: hybrid(v, moe=True), None, "qwen3next"),
         "qwen35moe": (lambda v: hybrid(v, moe=True), "qwen35moe", "qwen35moe"),
         "qwen3_5_moe": (qwen3_5_moe, None, "qwen35moe"),
         "deepseek2": (mla, None, "deepseek2"),
         "deepseek2-rotate-half": (lambda v: mla(v, interleave=False), None, "deepseek2"),
         "gemma4": (gemma4, None, "gemma4"),
         "gemma4-moe": (lambda v: gemma4(v, moe=True), None, "gemma4")}
# llama.cpp's CPU GELU (Gemma's MLP and per-layer input gate) reads a table at float16 inputs:
# an error of ~1e-3 on each activation, which the x5 weights amplify to a few 1e-2 at a few
# positions (mean 2e-3). A misplaced tensor or scale shows as differences of order 1.
TOLERANCE = {"gemma4": 0.1, "gemma4-moe": 0.1}


def random_model(cfg) -> GPT:  # noqa: ANN001
    """Weights scaled up so the logits are far from uniform, norm gains away from their start
    (a (1 + w) norm written without its + 1 would show), dt_bias away from 1, DeepSeek's
    correction bias changing choices, Gemma 4's router and expert scales and layer scalars away
    from 1; routers N(0, 0.2): sigmoid scores that do not saturate to ties at 1.0, which
    llama.cpp and we would break differently."""
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0.0, 0.2)
            elif p.dim() == 2:
                p.mul_(5.0)
            elif name.endswith("dt_bias"):
                p.normal_(0.0, 1.0)
            elif "norm" in name or "ln_" in name or name.endswith(("router_scale", "expert_scale")):
                p.add_(0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("correction_bias"):
                b.normal_(0.0, 0.1)
            elif name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_computes_our_logits(tmp_path, bpe, case: str) -> None:  # noqa: ANN001
    config, arch, written = CASES[case]
    model = random_model(config(bpe.vocab_size))
    path = tmp_path / "m.gguf"
    summary = write_gguf(model, bpe, path, "f32", arch=arch)
    assert summary["architecture"] == written
    prompt = bpe.encode(LLAMA_PROMPT * 4)[:80]  # two chunks of the delta rule
    assert len(prompt) == 80
    theirs = llama_cpp_logits(path, prompt, n_ctx=128)
    with torch.no_grad():
        ours = logits(model, torch.tensor([prompt]))[0]
    assert ours.std().item() > 0.5  # far from uniform: a wrong layout would not pass below
    # 1e-3: a RoPE section left unrotated (one pair of four) already gives 1e-2
    assert (ours - theirs).abs().max().item() <= TOLERANCE.get(case, 1e-3)
    assert (ours - theirs).abs().mean().item() <= 5e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("case", ["qwen35", "qwen3next", "qwen35moe", "qwen3_5_moe"])
def test_reader_names_shapes_metadata(tmp_path, bpe, case: str) -> None:  # noqa: ANN001
    config, arch, written = CASES[case]
    moe = written != "qwen35"
    cfg = config(bpe.vocab_size)
    model = random_model(cfg)
    write_gguf(model, bpe, tmp_path / "m.gguf", "q8_0", arch=arch)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[written.upper()]]}
    t = {x.name: x for x in reader.tensors}
    for name in t:  # every name is one llama.cpp's architecture declares
        base = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
        assert any(base == a.format(bid=i) for a in allowed for i in range(cfg.n_layer)), name
    linear = ["attn_qkv.weight", "attn_gate.weight", "ssm_conv1d.weight", "ssm_a", "ssm_dt.bias",
              "ssm_norm.weight", "ssm_out.weight"]
    linear += ["ssm_ba.weight"] if written == "qwen3next" else ["ssm_beta.weight", "ssm_alpha.weight"]
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
    if written != "qwen3next":  # key head j % 2 serves value head j: ours 0, 0, 1, 1 -> 0, 1, 0, 1
        a = a[[0, 2, 1, 3]]
    np.testing.assert_allclose(np.asarray(t["blk.0.ssm_a"].data), a.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(t["blk.0.attn_norm.weight"].data),
                               model.transformer.h[0].ln_1.weight.detach().numpy() + 1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(t["blk.0.ssm_norm.weight"].data),
                               model.transformer.h[0].attn.norm.weight.detach().numpy(), rtol=1e-6)
    md = {k: f.contents() for k, f in reader.fields.items()}
    assert md["general.architecture"] == written
    assert md[f"{written}.ssm.conv_kernel"] == 4 and md[f"{written}.ssm.state_size"] == 16
    assert md[f"{written}.ssm.group_count"] == 2 and md[f"{written}.ssm.time_step_rank"] == 4
    assert md[f"{written}.ssm.inner_size"] == 64 and md[f"{written}.full_attention_interval"] == 4
    assert md[f"{written}.rope.dimension_count"] == 4  # a quarter of each 16-channel head
    if written != "qwen3next":
        assert md[f"{written}.rope.dimension_sections"] == [1, 1, 0, 0]
    if moe:
        assert [md[f"{written}.{k}"] for k in ("expert_count", "expert_used_count",
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


def test_mla_reader_names_shapes_metadata(tmp_path, bpe) -> None:  # noqa: ANN001
    """DeepSeek-V3 as llama.cpp's deepseek2: kv_b_proj split into attn_k_b (the key rows of each
    head transposed: the query is multiplied into the latent space) and attn_v_b; MQA over the
    latents in the metadata; DeepSeek's routing keys."""
    cfg = mla(bpe.vocab_size)
    model = random_model(cfg)
    write_gguf(model, bpe, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.DEEPSEEK2]}
    t = {x.name: x for x in reader.tensors}
    for name in t:
        assert any(name.rsplit(".", 1)[0] == a.format(bid=i) for a in allowed for i in range(cfg.n_layer)), name
    attn = ["attn_norm", "attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv_a_mqa", "attn_kv_a_norm",
            "attn_k_b", "attn_v_b", "attn_output", "ffn_norm"]
    moe = ["ffn_gate_inp", "exp_probs_b", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
           "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"]
    want = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.{'bias' if n == 'exp_probs_b' else 'weight'}" for i in range(4)
        for n in attn + (["ffn_gate", "ffn_up", "ffn_down"] if i == 0 else moe)}
    assert set(t) == want
    H, dn, dv, r = cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    assert list(t["blk.1.attn_k_b.weight"].shape) == [dn, r, H]
    assert list(t["blk.1.attn_v_b.weight"].shape) == [r, dv, H]
    kv_b = model.transformer.h[1].attn.kv_b_proj.weight.detach().reshape(H, dn + dv, r)
    np.testing.assert_array_equal(np.asarray(t["blk.1.attn_k_b.weight"].data), kv_b[:, :dn].transpose(1, 2).numpy())
    np.testing.assert_array_equal(np.asarray(t["blk.1.attn_v_b.weight"].data), kv_b[:, dn:].numpy())
    md = {k: f.contents() for k, f in reader.fields.items()}
    assert md["general.architecture"] == "deepseek2"
    assert md["deepseek2.attention.head_count_kv"] == 1
    assert md["deepseek2.attention.key_length"] == r + cfg.qk_rope_head_dim
    assert md["deepseek2.attention.value_length"] == r
    assert md["deepseek2.attention.key_length_mla"] == dn + cfg.qk_rope_head_dim
    assert md["deepseek2.attention.value_length_mla"] == dv
    assert md["deepseek2.attention.q_lora_rank"] == cfg.q_lora_rank
    assert md["deepseek2.attention.kv_lora_rank"] == r
    assert md["deepseek2.rope.dimension_count"] == cfg.qk_rope_head_dim
    assert md["deepseek2.leading_dense_block_count"] == 1
    assert md["deepseek2.expert_shared_count"] == 1 and md["deepseek2.expert_gating_func"] == 2
    assert [md[f"deepseek2.{k}"] for k in ("expert_count", "expert_used_count", "expert_group_count",
                                            "expert_group_used_count")] == [8, 2, 4, 2]
    assert md["deepseek2.expert_weights_scale"] == pytest.approx(cfg.routed_scale)


@pytest.mark.parametrize("change, words", [
    (dict(q_lora_rank=None), "a full-rank query"),
    (dict(ffn_layers=["dense"] * 4), "no mixture-of-experts layer"),
])
def test_refuses_mla_llama_cpp_cannot_run(tmp_path, bpe, change, words) -> None:  # noqa: ANN001
    with pytest.raises(BardlmError, match=f"no GGUF export: llama.cpp's DeepSeek-V3.*{words}") as e:
        write_gguf(GPT(mla(bpe.vocab_size).replace(**change)), bpe, tmp_path / "m.gguf")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


def test_gemma4_reader_names_shapes_metadata(tmp_path, bpe) -> None:  # noqa: ANN001
    """Gemma 4 as llama.cpp's gemma4: no k/v projection in the KV-shared layers, no v_proj where
    K = V, per-layer input tables, rope_freqs stopping the unrotated pairs of global heads, per
    layer KV heads and MLP widths."""
    cfg = gemma4(bpe.vocab_size)
    model = random_model(cfg)
    write_gguf(model, bpe, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GEMMA4]}
    t = {x.name: x for x in reader.tensors}
    for name in t:
        assert any(name.rsplit(".", 1)[0] == a.format(bid=i) for a in allowed for i in range(cfg.n_layer)), name
    assert {n for n in t if ".attn_k." in n} == {f"blk.{i}.attn_k.weight" for i in range(4)}
    assert {n for n in t if ".attn_v." in n} == {"blk.0.attn_v.weight", "blk.2.attn_v.weight"}  # local
    assert list(t["per_layer_token_embd.weight"].shape) == [8 * 6, cfg.vocab_size]
    assert list(t["per_layer_model_proj.weight"].shape) == [64, 8 * 6]
    assert list(t["blk.0.inp_gate.weight"].shape) == [64, 8] and list(t["blk.0.proj.weight"].shape) == [8, 64]
    assert list(t["blk.5.ffn_up.weight"].shape) == [64, 2 * 96]  # double-wide in a shared layer
    np.testing.assert_array_equal(np.asarray(t["rope_freqs.weight"].data), np.float32([1.0] * 4 + [1e30] * 12))
    scalar = model.transformer.h[3].layer_scalar.detach().numpy()
    np.testing.assert_array_equal(np.asarray(t["blk.3.layer_output_scale.weight"].data), scalar)
    md = {k: f.contents() for k, f in reader.fields.items()}
    assert md["general.architecture"] == "gemma4"
    assert md["gemma4.attention.sliding_window_pattern"] == [True, False] * 3
    assert md["gemma4.attention.head_count_kv"] == [2, 1] * 3
    assert md["gemma4.feed_forward_length"] == [96] * 4 + [192] * 2
    assert (md["gemma4.attention.key_length"], md["gemma4.attention.key_length_swa"]) == (32, 16)
    assert (md["gemma4.rope.dimension_count"], md["gemma4.rope.dimension_count_swa"]) == (32, 16)
    assert md["gemma4.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert md["gemma4.rope.freq_base_swa"] == pytest.approx(cfg.rope_local_theta)
    assert md["gemma4.attention.shared_kv_layers"] == 2 and md["gemma4.attention.sliding_window"] == 8
    assert md["gemma4.embedding_length_per_layer_input"] == 8
    assert md["gemma4.final_logit_softcapping"] == pytest.approx(30.0)


def test_refuses_gemma4_llama_cpp_cannot_run(tmp_path, bpe) -> None:  # noqa: ANN001
    """gemma4-tiny's layout (local, local, global, local, then two shared layers) shares the keys
    of layers 3 and 2, where llama.cpp's shared layers read the last unshared layer but one
    (local) and the last (global)."""
    cfg = preset("gemma4-tiny", vocab_size=bpe.vocab_size)
    with pytest.raises(BardlmError, match="no GGUF export: llama.cpp's Gemma 4.*KV-shared layers") as e:
        write_gguf(GPT(cfg), bpe, tmp_path / "m.gguf")
    assert "\n" not in str(e.value) and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("case", ["qwen35", "qwen3next", "qwen3_5_moe", "deepseek2", "gemma4"])
def test_cli_export_and_hf_directory_give_the_same_file(tmp_path, bpe, case: str, capsys) -> None:  # noqa: ANN001
    """`bardlm export --format gguf` of a bardlm run, and `export_gguf` of the Hugging Face
    directory it exports (how a model imported from the Hub is exported): the same tensors."""
    config, _, written = CASES[case]
    save_checkpoint(tmp_path / "run", random_model(config(bpe.vocab_size)), bpe)
    out = tmp_path / "run.gguf"
    assert main(["export", "--ckpt", str(tmp_path / "run"), "--format", "gguf", "--out", str(out), "--type", "f32"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == written
    assert main(["export", "--ckpt", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    export_gguf(tmp_path / "hf", tmp_path / "hf.gguf", "f32")
    a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tmp_path / "hf.gguf")).tensors}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
