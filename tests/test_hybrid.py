"""Qwen3.5 (text, dense), Qwen3-Next and Qwen3.5-MoE (MoE with a shared expert) against `transformers`:
random-weight models built from small configs (nothing is downloaded), three gated delta rule
layers to one gated, partially rotary attention layer. They load into bardlm with equal fp32
logits over more than three chunks of the delta rule, greedy decoding with our cache (a fixed
state for the linear layers) gives transformers' 64 ids, our HF export loads back in transformers
with the same tensors and logits, and int8 runs."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402, I001
    Qwen3_5ForCausalLM,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

from hf_checks import assert_export_round_trip, assert_same_greedy, assert_same_logits  # noqa: E402

import bardlm  # noqa: E402
from bardlm import BardlmError, ModelConfig  # noqa: E402
from bardlm.infer.budget import kv_bytes_per_sequence, kv_bytes_per_token, state_bytes_per_sequence  # noqa: E402
from bardlm.infer.generate import generate_batch  # noqa: E402
from bardlm.infer.quantize import Int8Linear  # noqa: E402
from bardlm.io.gguf import check_exportable  # noqa: E402
from bardlm.io.hf import config_from_hf, family_of, from_pretrained  # noqa: E402
from bardlm.nn.cache import KVCache, StateCache  # noqa: E402
from bardlm.nn.model import GPT  # noqa: E402

V = 83
# 4 layers (3 linear, 1 attention); GQA 4/2 with head_dim 16 (RoPE on the first 4 channels);
# linear layers with 2 key heads serving 4 value heads.
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
             linear_value_head_dim=12, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def qwen3_5(tied: bool = False) -> Qwen3_5ForCausalLM:
    return Qwen3_5ForCausalLM(Qwen3_5TextConfig(**SMALL, tie_word_embeddings=tied))


def qwen3_next() -> Qwen3NextForCausalLM:
    return Qwen3NextForCausalLM(Qwen3NextConfig(
        **SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, mlp_only_layers=[1]))


def qwen3_5_moe() -> Qwen3_5MoeForCausalLM:
    """Qwen3.5's linear layers (four in_proj apart), Qwen3-Next's experts in every layer."""
    return Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(
        **SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48))


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights away from their start (a dropped (1 + w) or gain would not show otherwise),
    N(0, 1) routers so that tokens spread over every expert, dt_bias away from 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gate.weight"):  # a router (shared_expert_gate is not)
                p.normal_(0.0, 1.0)
            elif "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("dt_bias"):
                p.normal_(0.0, 1.0)
    return model.eval()


CASES = {"qwen3_5": lambda: qwen3_5(), "qwen3_5-tied": lambda: qwen3_5(tied=True),
         "qwen3_next": qwen3_next, "qwen3_5_moe": qwen3_5_moe}


@pytest.fixture(params=list(CASES), scope="module")
def pair(request, tmp_path_factory):  # noqa: ANN001, ANN201
    """(HF reference model, ours loaded from its save_pretrained directory, a scratch dir)."""
    torch.manual_seed(sum(map(ord, request.param)))
    ref = randomise(CASES[request.param]())
    tmp = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(tmp / "hf")
    return ref, from_pretrained(tmp / "hf"), tmp


def test_logits_match_transformers_over_three_chunks(pair) -> None:  # noqa: ANN001
    ref, ours, _ = pair
    idx = torch.randint(0, V, (2, 200))  # 3 chunks of 64 and 8 tokens
    assert_same_logits(ref, ours, idx)


def test_greedy_64_tokens_match_transformers(pair) -> None:  # noqa: ANN001
    """A 70-token prompt (a chunk and more) prefilled, then 64 tokens decoded one at a time: the
    linear layers carry their state in a StateCache, the attention layer keys in a KVCache."""
    ref, ours, _ = pair
    if ours.config.tie_embeddings:
        pytest.skip("decoding does not depend on the tying; the untied Qwen3.5 case decodes")
    idx = torch.randint(3, V, (2, 70))
    assert_same_greedy(ref, ours, idx)
    kinds = [type(c) for c in ours.make_cache(1, 100)]
    assert kinds == [StateCache, StateCache, StateCache, KVCache]


def test_export_loads_in_transformers_with_equal_logits(pair) -> None:  # noqa: ANN001
    ref, ours, tmp = pair
    assert_export_round_trip(ref, ours, tmp / "back", torch.randint(0, V, (2, 80)))


def test_qwen3_5_moe_stacked_experts_load(tmp_path) -> None:  # noqa: ANN001
    """A Qwen3.5-MoE checkpoint may hold each layer's experts as transformers does in memory,
    stacked in experts.gate_up_proj (E, 2F, C) and experts.down_proj (E, C, F), rather than
    numbered as save_pretrained writes them: both load to the same logits."""
    from safetensors.torch import save_file

    torch.manual_seed(11)
    ref = randomise(qwen3_5_moe())
    ref.save_pretrained(tmp_path)
    sd = ref.state_dict()
    assert sd["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 2 * 32, 64)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    idx = torch.randint(0, V, (1, 70))
    assert_same_logits(ref, from_pretrained(tmp_path), idx)


def test_int8_runs_close_to_fp32(pair) -> None:  # noqa: ANN001
    _, ours, tmp = pair
    q, _ = bardlm.load(tmp / "hf", dtype="int8")
    assert isinstance(q.transformer.h[0].attn.c_in, Int8Linear)  # a linear layer's projection
    assert isinstance(q.transformer.h[3].attn.c_attn, Int8Linear)  # the gated attention's
    idx = torch.randint(0, V, (1, 100))
    with torch.no_grad():
        want, got = ours(idx)[0], q(idx)[0].float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert q.generate(idx[:, :10], 8, temperature=0.0).shape == (1, 18)


def test_left_padded_batch_decodes_each_row_as_alone() -> None:
    """Padding enters neither a linear layer's conv nor its state: a batch of prompts of
    different lengths gives each row the tokens it gets alone."""
    torch.manual_seed(5)
    cfg = config_from_hf(Qwen3_5TextConfig(**SMALL).to_dict())
    model = GPT(cfg).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    batched = generate_batch(model, prompts, 12, temperature=0.0)
    for b, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), 12, temperature=0.0)
        assert batched[b] == alone[0, -12:].tolist()


def test_config_fields_on_import() -> None:
    """What the families fix beyond config.json: the parity tests above fail without each."""
    cfg = config_from_hf(Qwen3_5TextConfig(**SMALL).to_dict())
    assert cfg.attn_layers == ["linear", "linear", "linear", "global"]
    assert (cfg.attn_gate, cfg.qk_norm, cfg.norm_unit_offset, cfg.partial_rotary_factor) == (True, True, True, 0.25)
    assert (cfg.linear_k_heads, cfg.linear_v_heads, cfg.linear_k_head_dim, cfg.linear_v_head_dim) == (2, 4, 8, 12)
    assert family_of(cfg) == "qwen3_5_text"
    cfg = config_from_hf(qwen3_next().config.to_dict())
    assert cfg.ffn_layers == ["moe", "dense", "moe", "moe"] and cfg.shared_expert_hidden == 48
    assert family_of(cfg) == "qwen3_next"
    # Qwen3.5-MoE: no mlp_only_layers or norm_topk_prob (every layer MoE, top k renormalised);
    # a bardlm MoE hybrid without its family recorded goes to Qwen3-Next, as do ones it cannot hold
    moe = config_from_hf(qwen3_5_moe().config.to_dict())
    assert moe.ffn_layers == ["moe"] * 4 and moe.router_renorm and moe.shared_expert_hidden == 48
    assert (moe.n_expert, moe.n_expert_active, moe.expert_hidden) == (4, 2, 32)
    assert family_of(moe) == "qwen3_5_moe_text"
    assert family_of(moe.replace(extra={})) == "qwen3_next"
    assert family_of(moe.replace(ffn_layers=["dense", "moe", "moe", "moe"])) == "qwen3_next"
    assert family_of(moe.replace(router_renorm=False)) == "qwen3_next"
    # The fixed state: one sequence's linear layers hold the same bytes at any length.
    conv = (2 * 2 * 8 + 4 * 12) * 3
    assert cfg.linear_state_elements() == (3 * conv, 3 * 4 * 8 * 12)
    assert kv_bytes_per_token(cfg, 4) == 2 * 1 * 2 * 16 * 4  # the one attention layer
    assert state_bytes_per_sequence(cfg, 2) == 3 * conv * 2 + 3 * 4 * 8 * 12 * 4
    model = GPT(cfg)
    assert sum(c.nbytes() for c in model.make_cache(1, 100)) == \
        kv_bytes_per_sequence(cfg, 100, 4) + state_bytes_per_sequence(cfg, 4)
    assert cfg.layer_cache_lengths(1000) == [0, 0, 0, 1000]


def test_refusals() -> None:
    hf = Qwen3_5TextConfig(**SMALL).to_dict()
    with pytest.raises(BardlmError, match="layer_types must list linear_attention or full_attention"):
        config_from_hf({**hf, "layer_types": ["sliding_attention"] * 4})
    cfg = config_from_hf(hf)
    with pytest.raises(BardlmError, match="no GGUF export.*linear_k_head_dim != linear_v_head_dim"):
        check_exportable(cfg)  # SMALL's linear heads: keys of 8, values of 12 (test_gguf_2026.py)
    with pytest.raises(BardlmError, match="attn_gate=false"):
        family_of(cfg.replace(attn_gate=False))
    with pytest.raises(BardlmError, match="experts without a shared expert"):
        family_of(cfg.replace(n_expert=4, expert_hidden=16))
    base = ModelConfig(vocab_size=V, n_layer=2, n_head=4, n_embd=32, norm="rmsnorm", ffn="swiglu",
                       pos="rope", bias=False)
    with pytest.raises(BardlmError, match="partial_rotary_factor"):
        base.replace(head_dim=6, partial_rotary_factor=0.5)  # 3 rotated channels: odd


def test_info_prints_the_fixed_state(capsys) -> None:  # noqa: ANN001
    from bardlm.cli import main
    from bardlm.config import preset

    assert main(["info", "--preset", "qwen3.5-tiny"]) == 0
    out = capsys.readouterr().out
    cfg = preset("qwen3.5-tiny")
    assert f"KV cache per token fp32 / bf16                 {kv_bytes_per_token(cfg, 4):,} B" in out
    assert f"fixed state per sequence fp32 / bf16           {state_bytes_per_sequence(cfg, 4):,} B" in out
    assert "3 linear layers hold no positions" in out
    assert family_of(cfg) == "qwen3_5_text"  # the preset exports to transformers


def test_info_at_32k_shows_a_third_of_the_dense_cache_at_most(capsys) -> None:  # noqa: ANN001
    """`bardlm info` at a 32k context: qwen3.5-tiny (3 linear layers to 1 attention layer) holds at
    most a third of the cache of the same model with every layer attention (the same attention
    shape). The printed bytes (keys and values at full context + fixed state) are those of the
    caches the model allocates (`make_cache`)."""
    import re

    from bardlm.cli import main
    from bardlm.config import preset

    def info_bytes(*sets: str) -> int:
        assert main(["info", "--preset", "qwen3.5-tiny", "--set", "block_size=32768",
                     *[a for kv in sets for a in ("--set", kv)]]) == 0
        out = capsys.readouterr().out
        kv = re.search(r"KV cache of one sequence at full context fp32\s+([\d,]+) B", out)
        state = re.search(r"fixed state per sequence fp32 / bf16\s+([\d,]+) B", out)
        return sum(int(m.group(1).replace(",", "")) for m in (kv, state) if m)

    def allocated(**over) -> int:  # noqa: ANN003
        model = GPT(preset("qwen3.5-tiny", block_size=32768, **over))
        return sum(c.nbytes() for c in model.make_cache(1, 32768))

    dense_layers = ["global"] * 4
    hybrid, dense = info_bytes(), info_bytes(f"attn_layers={dense_layers}".replace("'", '"'))
    assert hybrid == allocated() and dense == allocated(attn_layers=dense_layers)
    assert 3 * hybrid <= dense, (hybrid, dense)


def test_compiled_decode_step_with_a_state_cache_equals_eager() -> None:
    """The torch.compile'd static step (tensor start_pos) reads and writes the StateCache as
    the eager loop does: the same tokens."""
    from bardlm.config import preset
    from bardlm.infer.generate import generate

    torch.manual_seed(0)
    model = GPT(preset("qwen3.5-tiny", n_layer=2, attn_layers=["linear", "global"])).eval()
    idx = torch.randint(0, 65, (2, 5))
    eager = generate(model, idx, 12, temperature=0)
    assert generate(model, idx, 12, temperature=0, compile=True).equal(eager)


@pytest.mark.parametrize("make", ["qwen3_5", "qwen3_next"])
def test_lora_finetune_of_a_hybrid_directory(tmp_path, make) -> None:  # noqa: ANN001
    """`finetune --lora-rank` on a Qwen3.5 / Qwen3-Next directory, the delta-rule layers' input
    projection (`c_in`) among the targets: training runs through the chunked delta rule, the
    adapter loads merged, and every targeted projection of both layer kinds has moved."""
    import json

    from bardlm.cli import main
    from bardlm.tokenizers import CharTokenizer

    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,;:!?<>|/ABCDEFGHIJKLMNOPQRSTUVWXYZ\n")
    torch.manual_seed(7)
    ref = randomise(CASES[make]())
    ref.resize_token_embeddings(tok.vocab_size)
    ref.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "bardlm_tokenizer.json").write_text(json.dumps(tok.to_dict()))
    chat = tmp_path / "chat.jsonl"
    turn = [{"role": "user", "content": "soft"}, {"role": "assistant", "content": "light"}]
    chat.write_text("".join(json.dumps({"messages": turn}) + "\n" for _ in range(8)))
    out = tmp_path / "adapter"
    assert main(["finetune", "--init-from", str(tmp_path / "hf"), "--data", str(chat), "--out", str(out),
                 "--max-iters", "2", "--set", "batch_size=2", "--lora-rank", "2", "--lora-targets",
                 "c_attn", "c_proj", "c_in", "--no-progress"]) == 0
    tuned, _ = bardlm.load(out)
    base, _ = bardlm.load(tmp_path / "hf")
    moved = {name for (name, p), q in zip(tuned.named_parameters(), base.parameters())
             if not torch.equal(p, q)}
    kinds = base.config.attn_layers
    for i, kind in enumerate(kinds):
        for proj in (("c_in", "c_proj") if kind == "linear" else ("c_attn", "c_proj")):
            assert f"transformer.h.{i}.attn.{proj}.weight" in moved, (i, kind, proj)
    assert set(kinds) == {"linear", "global"}  # both layer kinds were checked
    idx = torch.randint(0, tok.vocab_size, (1, 20))
    with torch.no_grad():
        assert tuned.generate(idx, 8, temperature=0).shape == (1, 28)
