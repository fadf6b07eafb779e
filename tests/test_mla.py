"""DeepSeek-V3's multi-head latent attention (nn/mla.py), its latent cache and its routing
(nn/moe.py), against `transformers`' DeepseekV3Attention and DeepseekV3MoE built from small
configs with random weights (nothing is downloaded); the absorbed decode form against the expanded
one."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_checks import assert_export_round_trip, assert_same_greedy, assert_same_logits  # noqa: E402
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3Attention,
    DeepseekV3MoE,
    DeepseekV3RotaryEmbedding,
)

import bardlm  # noqa: E402
from bardlm import BardlmError, ModelConfig  # noqa: E402
from bardlm.infer.quantize import Int8Linear  # noqa: E402
from bardlm.io.gguf import check_exportable  # noqa: E402
from bardlm.io.hf import family_of, from_pretrained, save_pretrained  # noqa: E402
from bardlm.nn.cache import LatentCache  # noqa: E402
from bardlm.nn.mla import LatentAttention  # noqa: E402
from bardlm.nn.model import GPT  # noqa: E402
from bardlm.nn.moe import MoE  # noqa: E402

V = 83
# 4 heads, latent 16, RoPE key 8, no-RoPE query/key part 16, values 12 (all different: a swapped
# split would not line up).
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "mscale": 0.9, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}
ATTN_NAMES = {"q_proj": "q_proj", "q_a_proj": "q_a_proj", "q_a_layernorm": "q_a_norm",
              "q_b_proj": "q_b_proj", "kv_a_proj_with_mqa": "kv_a_proj",
              "kv_a_layernorm": "kv_a_norm", "kv_b_proj": "kv_b_proj", "o_proj": "c_proj"}


def hf_config(q_lora_rank: int | None = 24, interleave: bool = True, rope=None) -> DeepseekV3Config:  # noqa: ANN001
    rope = rope or {"rope_type": "default", "rope_theta": 10000.0}
    return DeepseekV3Config(vocab_size=V, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                            q_lora_rank=q_lora_rank, rope_interleave=interleave, max_position_embeddings=128,
                            rope_parameters={"rope_theta": 10000.0, **rope}, attn_implementation="eager",
                            **MLA)


def our_config(hf: DeepseekV3Config, **over) -> ModelConfig:  # noqa: ANN003
    rope = dict(hf.rope_parameters)
    theta, kind = rope.pop("rope_theta"), rope.get("rope_type")
    fields = dict(vocab_size=V, block_size=128, n_layer=2, n_head=4, n_embd=64, pos="rope", norm="rmsnorm",
                  ffn="swiglu", bias=False, norm_eps=1e-6, rope_theta=theta,
                  rope_scaling=rope if kind != "default" else None, attn_type="mla",
                  q_lora_rank=hf.q_lora_rank, rope_interleave=hf.rope_interleave, **MLA)
    return ModelConfig(**{**fields, **over})


def randomised(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return module.eval()


def attention_pair(hf: DeepseekV3Config) -> tuple[DeepseekV3Attention, GPT]:
    """(transformers' attention layer, a GPT of ours whose layer 0 holds the same weights)."""
    ref = randomised(DeepseekV3Attention(hf, layer_idx=0))
    ours = GPT(our_config(hf)).eval()
    attn = ours.transformer.h[0].attn
    sd = {ATTN_NAMES[name.rpartition(".")[0]] + ".weight": p for name, p in ref.named_parameters()}
    attn.load_state_dict(sd)
    return ref, ours


@pytest.mark.parametrize("q_lora_rank,interleave,rope", [
    (24, True, None), (None, True, None), (24, False, None), (24, True, YARN)],
    ids=["low-rank-q", "full-q", "rotate-half", "yarn"])
def test_latent_attention_matches_transformers(q_lora_rank, interleave, rope) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    hf = hf_config(q_lora_rank, interleave, rope)
    ref, ours = attention_pair(hf)
    B, T = 2, 40
    x = torch.randn(B, T, 64)
    positions = torch.arange(T)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        cos_sin = DeepseekV3RotaryEmbedding(hf)(x, positions[None])
        want, _ = ref(x, cos_sin, causal)
        got = ours.transformer.h[0].attn(x, ours.rope(positions))
    assert (got - want).abs().max().item() < 1e-4
    assert want.abs().max().item() > 0.1  # not a trivially small output


def test_yarn_sharpens_the_softmax_by_mscale_squared() -> None:
    """DeepSeek's softmax scale 1/sqrt(24) * (0.1 * 0.8 * ln 4 + 1)^2 (yarn_apply_mscale)."""
    attn = LatentAttention(our_config(hf_config(rope=YARN)))
    assert attn.scale == pytest.approx(24 ** -0.5 * (0.1 * 0.8 * torch.log(torch.tensor(4.0)).item() + 1) ** 2)


def test_cache_holds_only_the_latent_and_rope_key_and_decodes_as_the_full_pass() -> None:
    torch.manual_seed(1)
    model = GPT(our_config(hf_config())).eval()
    cache = model.make_cache(2, 32)
    assert all(isinstance(c, LatentCache) for c in cache)
    assert cache[0].k.shape == (2, 1, 32, 16) and cache[0].v.shape == (2, 1, 32, 8)
    assert sum(c.nbytes() for c in cache) == 2 * 32 * model.config.n_layer * (16 + 8) * 4
    assert model.config.cache_width() == 16 + 8
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        steps = [model(idx[:, :12], cache=cache)[0]]
        steps += [model(idx[:, t:t + 1], cache=cache, start_pos=t)[0] for t in range(12, 20)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5


def decode_logits(model: GPT, idx: torch.Tensor, absorb: str, static: bool = False) -> torch.Tensor:
    """Logits (B, T, V) of a prefill of idx's first half then one cached step per token, with
    the decode form `absorb` ("never": expanded, "always": absorbed), start_pos an int or, with
    `static`, a tensor of cache indices (the static step)."""
    for block in model.transformer.h:
        block.attn.absorb = absorb
    B, T = idx.shape
    cache = model.make_cache(B, T + 8)
    with torch.no_grad():
        out = [model(idx[:, : T // 2], cache=cache)[0]]
        for t in range(T // 2, T):
            pos = torch.tensor([t]) if static else t
            out.append(model(idx[:, t:t + 1], cache=cache, start_pos=pos)[0])
    return torch.cat(out, 1).float()


@pytest.mark.parametrize("static", [False, True], ids=["int-start-pos", "tensor-start-pos"])
def test_absorbed_decode_equals_the_expanded_form(static) -> None:  # noqa: ANN001
    """Decoding with kv_b absorbed into the query and the output gives the expanded form's
    logits, with the int start_pos (eager) and with cache indices (the static step)."""
    torch.manual_seed(2)
    model = GPT(our_config(hf_config())).eval()
    idx = torch.randint(0, V, (2, 16))
    expanded, absorbed = decode_logits(model, idx, "never", static), decode_logits(model, idx, "always", static)
    assert (absorbed - expanded).abs().max().item() < 1e-5
    assert (expanded[:, 1:] - expanded[:, :-1]).abs().max().item() > 1e-2


@pytest.mark.parametrize("fields,message", [
    (dict(kv_lora_rank=None), "attn_type=mla needs kv_lora_rank"),
    (dict(n_kv_head=2), "n_kv_head must equal n_head"),
    (dict(pos="learned"), "does not combine with pos other than rope"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
     "supports rope_scaling yarn"),
    (dict(attn_type="mha"), "only apply to latent attention"),
])
def test_mla_config_refusals(fields, message) -> None:  # noqa: ANN001
    with pytest.raises(BardlmError, match=message) as err:
        our_config(hf_config(), **fields)
    assert "\n" not in str(err.value)


def moe_pair(renorm: bool, groups: int = 4, topk_groups: int = 2) -> tuple[DeepseekV3MoE, MoE]:
    """(transformers' DeepSeek-V3 MoE block with a random router and correction bias, ours with
    the same weights): 8 experts in `groups` groups, top 3, a shared expert, scale 2.5."""
    hf = DeepseekV3Config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8,
                          num_experts_per_tok=3, n_group=groups, topk_group=topk_groups, n_shared_experts=2,
                          routed_scaling_factor=2.5, norm_topk_prob=renorm)
    ref = randomised(DeepseekV3MoE(hf))
    with torch.no_grad():
        ref.gate.weight.normal_(0.0, 1.0)
        ref.gate.e_score_correction_bias.normal_(0.0, 0.5)  # big enough to change choices
    cfg = ModelConfig(n_layer=1, n_head=4, n_embd=64, ffn="swiglu", norm="rmsnorm", pos="rope", bias=False,
                      n_expert=8, n_expert_active=3, expert_hidden=32, shared_expert_hidden=64,
                      shared_expert_gate=False, router_score="sigmoid", router_groups=groups,
                      router_topk_groups=topk_groups, routed_scale=2.5, router_renorm=renorm)
    ours = MoE(cfg).eval()
    e = ref.experts
    sd = {"router.weight": ref.gate.weight, "correction_bias": ref.gate.e_score_correction_bias,
          "shared.c_fc.weight": torch.cat([ref.shared_experts.gate_proj.weight, ref.shared_experts.up_proj.weight]),
          "shared.c_proj.weight": ref.shared_experts.down_proj.weight}
    for i in range(8):
        sd[f"experts.{i}.c_fc.weight"] = e.gate_up_proj[i]  # rows [gate | up], as ours
        sd[f"experts.{i}.c_proj.weight"] = e.down_proj[i]
    ours.load_state_dict(sd)
    return ref, ours


@pytest.mark.parametrize("renorm,groups,topk_groups", [(True, 4, 2), (False, 4, 2), (True, 1, 1)],
                         ids=["renorm-groups", "raw-groups", "renorm-one-group"])
def test_deepseek_routing_matches_transformers(renorm, groups, topk_groups) -> None:  # noqa: ANN001
    """Sigmoid scores, the correction bias (choice only), group-limited top-k, norm_topk_prob,
    routed_scaling_factor and an ungated shared expert: equal to transformers' block, with many
    tokens (the grouped path) and one (the decode path)."""
    torch.manual_seed(3)
    ref, ours = moe_pair(renorm, groups, topk_groups)
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        want = ref(x)
        assert (ours(x) - want).abs().max().item() < 1e-4
        assert (ours(x[:1, :1]) - want[:1, :1]).abs().max().item() < 1e-4
        # The correction bias and the group limit both change which experts run.
        _, _, chosen = ours.route(x.view(-1, 64))
        ours.correction_bias.zero_()
        _, _, unbiased = ours.route(x.view(-1, 64))
        assert not torch.equal(chosen.sort(-1).values, unbiased.sort(-1).values)


def test_group_limit_keeps_experts_inside_the_best_groups() -> None:
    torch.manual_seed(4)
    _, ours = moe_pair(True)
    _, _, experts = ours.route(torch.randn(200, 64))
    groups = experts // 2  # 8 experts in 4 groups of 2
    assert all(len(set(row.tolist())) <= 2 for row in groups)  # at most topk_group=2 groups
    assert len(set(groups.flatten().tolist())) == 4  # yet every group is used by some token


@pytest.mark.parametrize("fields,message", [
    (dict(router_groups=3), "router_groups must divide n_expert"),
    (dict(router_groups=8, router_topk_groups=2), "needs >= 2 experts"),
    (dict(router_groups=4, router_topk_groups=1, n_expert_active=3), "raise router_topk_groups"),
    (dict(router_aux_loss_coef=0.01), "router_score=sigmoid set router_aux_loss_coef=0"),
    (dict(correction_bias_rate=0.001, router_score="softmax"), "correction_bias_rate moves the correction bias"),
])
def test_routing_config_refusals(fields, message) -> None:  # noqa: ANN001
    base = dict(n_layer=1, n_head=4, n_embd=64, ffn="swiglu", pos="rope", n_expert=8, n_expert_active=2,
                router_score="sigmoid")
    with pytest.raises(BardlmError, match=message) as err:
        ModelConfig(**{**base, **fields})
    assert "\n" not in str(err.value)


# Whole models ---------------------------------------------------------------------------------
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3,
             n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
             max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, **MLA)
CASES = {
    "low-rank-q": dict(q_lora_rank=24),
    "full-q-yarn-raw-topk-tied": dict(q_lora_rank=None, norm_topk_prob=False, tie_word_embeddings=True,
                                      rope_parameters={"rope_theta": 1e4, **YARN}),
    "rotate-half-attention-bias": dict(q_lora_rank=24, rope_interleave=False, attention_bias=True),
}


def deepseek(**over) -> DeepseekV3ForCausalLM:  # noqa: ANN003
    """A random DeepSeek-V3: norms away from 1, biases away from 0, N(0, 1) routers and a
    correction bias that changes choices (HF starts them at 1, 0, N(0, 0.02) and 0)."""
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**SMALL, **over}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(params=list(CASES), scope="module")
def pair(request, tmp_path_factory):  # noqa: ANN001, ANN201
    """(transformers' DeepSeek-V3, ours loaded from its save_pretrained directory, a scratch dir)."""
    torch.manual_seed(sum(map(ord, request.param)))
    ref = deepseek(**CASES[request.param])
    tmp = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(tmp / "hf")
    return ref, from_pretrained(tmp / "hf"), tmp


def test_logits_match_transformers(pair) -> None:  # noqa: ANN001
    ref, ours, _ = pair
    assert ours.config.attn_type == "mla" and ours.config.ffn_layers == ["dense", "moe", "moe"]
    idx = torch.randint(0, V, (2, 48))
    assert_same_logits(ref, ours, idx)


def test_greedy_64_tokens_with_the_latent_cache_match_transformers(pair) -> None:  # noqa: ANN001
    """Our decode steps run the absorbed form over the latent cache; transformers' expand."""
    ref, ours, _ = pair
    idx = torch.randint(0, V, (2, 5))
    assert_same_greedy(ref, ours, idx)


def test_export_loads_in_transformers_with_equal_logits(pair) -> None:  # noqa: ANN001
    ref, ours, tmp = pair
    assert_export_round_trip(ref, ours, tmp / "back", torch.randint(0, V, (2, 24)))


def test_int8_runs_and_decodes_close_to_fp32(tmp_path) -> None:  # noqa: ANN001
    """int8 weights (routers kept float), the absorbed decode reading kv_b dequantized."""
    torch.manual_seed(5)
    deepseek(q_lora_rank=24).save_pretrained(tmp_path)
    fp32, _ = bardlm.load(tmp_path)
    q, _ = bardlm.load(tmp_path, dtype="int8")
    assert isinstance(q.transformer.h[1].attn.kv_b_proj, Int8Linear)
    assert type(q.transformer.h[1].mlp.router) is torch.nn.Linear
    idx = torch.randint(0, V, (1, 20))
    with torch.no_grad():
        want, got = fp32(idx)[0], q(idx)[0].float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert q.generate(idx, 8, temperature=0.0).shape == (1, 28)


def test_multi_token_prediction_layers_are_skipped_and_gguf_checks(tmp_path) -> None:  # noqa: ANN001
    """A real DeepSeek-V3 checkpoint carries its MTP module as layer n_layer: it loads without
    it, and exports to GGUF (llama.cpp's deepseek2: tests/test_gguf_2026.py) unless it has what
    llama.cpp lacks (attention biases), refused in one line."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(6)
    deepseek().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg = from_pretrained(tmp_path).config
    assert family_of(cfg) == "deepseek_v3"
    assert check_exportable(cfg) == "deepseek_v3"
    with pytest.raises(BardlmError, match="no GGUF export.*deepseek2.*attention biases") as err:
        check_exportable(cfg.replace(attn_bias=True, qkv_bias=True))
    assert "\n" not in str(err.value)


def test_mla_tiny_trains_from_the_cli_decodes_and_exports(tmp_path, capsys) -> None:  # noqa: ANN001
    """`bardlm train --preset mla-tiny` runs (a few steps on a small corpus: the loss falls), its
    checkpoint decodes over latent caches, `bardlm info` reports the latent cache, and `export
    --format hf` writes a DeepSeek-V3 transformers loads with equal logits."""
    import json

    from bardlm.cli import main
    from bardlm.io.checkpoint import load_checkpoint

    corpus_file = tmp_path / "romeo.txt"
    corpus_file.write_text("But soft, what light through yonder window breaks? It is the east, "
                           "and Juliet is the sun. Arise, fair sun, and kill the envious moon.\n" * 40)
    out = tmp_path / "mla"
    assert main(["train", "--preset", "mla-tiny", "--data", str(corpus_file), "--out", str(out),
                 "--max-iters", "8", "--set", "eval_interval=4", "--set", "eval_batches=1",
                 "--set", "batch_size=4", "--set", "lr=0.003", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert losses[-1] < losses[0]
    model, _, _ = load_checkpoint(out)
    assert all(isinstance(c, LatentCache) for c in model.make_cache(1, 64))
    # Auxiliary-loss-free balancing moved the correction biases by 0.001 a step (8 steps).
    biases = torch.stack([b.mlp.correction_bias for b in model.transformer.h[1:]])
    assert biases.abs().max().item() > 0 and biases.abs().max().item() <= 8 * 0.001 + 1e-6
    assert model.generate(torch.tensor([[1, 2, 3]]), 40, temperature=0).shape == (1, 43)
    capsys.readouterr()
    assert main(["info", "--ckpt", str(out)]) == 0
    info = capsys.readouterr().out
    assert "kv_lora_rank 32 + qk_rope_head_dim 16 = 48 values per token per layer" in info
    assert f"{4 * 48 * 4:,} B / {4 * 48 * 2:,} B" in info  # 4 layers x 48 values, fp32 / bf16
    assert main(["export", "--ckpt", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(again) is DeepseekV3ForCausalLM and again.config.first_k_dense_replace == 1
    idx = torch.randint(0, model.config.vocab_size, (2, 30))
    with torch.no_grad():
        assert (again(idx).logits - model.eval()(idx)[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("fields,message", [
    (dict(router_score="softmax", correction_bias_rate=0.0), "router_score=softmax \\(DeepSeek-V3 routes with sigmoid scores\\)"),
    (dict(shared_expert_gate=True), "a gated shared expert or none"),
    (dict(ffn_layers=["moe", "dense", "moe", "moe"]), "MoE layers before dense ones"),
    (dict(expert_hidden=48), "not a multiple of expert_hidden"),
])
def test_export_refuses_what_deepseek_v3_cannot_express(fields, message) -> None:  # noqa: ANN001
    from bardlm.config import preset

    assert family_of(preset("mla-tiny")) == "deepseek_v3"
    with pytest.raises(BardlmError, match=message) as err:
        family_of(preset("mla-tiny", **fields))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("swap,tol", [("lora", 1e-5), ("fp32-layouts", 1e-5), ("bf16", 0.03), ("int4", 0.03)])
def test_absorbed_decode_reads_kv_b_through_every_layer_swap(swap, tol) -> None:  # noqa: ANN001
    """The absorbed form needs kv_b's matrix: it is read from a LoRA adapter (base + B A), the
    transposed fp32 layout, bf16 weights and int4 codes, and decodes as the expanded form does
    (to rounding: a share `tol` of the largest logit)."""
    from bardlm.infer.layouts import prepare_for_inference
    from bardlm.nn.lora import apply_lora

    torch.manual_seed(7)
    model = GPT(our_config(hf_config())).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    if swap == "lora":
        apply_lora(model, 4, 8.0, targets=("kv_b_proj",))
        with torch.no_grad():
            for block in model.transformer.h:  # a nonzero update: B starts at 0
                block.attn.kv_b_proj.lora_B.normal_(0.0, 0.3)
    else:
        prepare_for_inference(model, swap.removesuffix("-layouts"))
    kinds = {"lora": "LoRALinear", "fp32-layouts": "FastLinear", "bf16": "Linear", "int4": "Int4Linear"}
    assert type(model.transformer.h[0].attn.kv_b_proj).__name__ == kinds[swap]
    idx = torch.randint(0, V, (2, 16))
    expanded, absorbed = decode_logits(model, idx, "never"), decode_logits(model, idx, "always")
    assert (absorbed - expanded).abs().max().item() < tol * expanded.abs().max().item()
    if swap == "lora":  # the adapter does change the model
        from bardlm.nn.lora import adapters_off

        with adapters_off(model):
            assert not torch.allclose(decode_logits(model, idx, "always"), absorbed)


def test_continuous_batching_over_latent_caches_equals_single_requests() -> None:
    """The server's engine keeps one latent-cache row per slot: six requests of different
    lengths through two slots (prefilled in chunks, decoded together, slots reused when a
    request ends) give the tokens each gives alone."""
    pytest.importorskip("fastapi", reason="the server needs fastapi")
    from bardlm.infer.generate import generate_text
    from bardlm.serve import Engine, Job
    from bardlm.tokenizers import CharTokenizer

    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ROMEO:,.?!\n")
    torch.manual_seed(8)
    model = GPT(our_config(hf_config(), vocab_size=tok.vocab_size, block_size=96)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    assert all(isinstance(c, LatentCache) for c in model.make_cache(2, 96))
    texts = ["ROMEO: but soft", "a", "what light through yonder window", "it is the east", "hi", "juliet"]
    engine = Engine(model, tok, max_queue=8, max_batch=2, prefill_chunk=5)
    try:
        jobs = [Job(t, 12, sampling={"temperature": 0.0}) for t in texts]
        futures = [engine.try_submit(j) for j in jobs]
        for f in futures:
            f.result(120)
    finally:
        engine.shutdown()
    assert [j.text for j in jobs] == [generate_text(model, tok, t, 12, temperature=0) for t in texts]
    assert len({j.text for j in jobs}) > 1


def test_int8_generate_and_lora_finetune_from_the_cli(tmp_path, capsys) -> None:  # noqa: ANN001
    """`generate --dtype int8` on a DeepSeek-V3 directory, and `finetune --lora-rank` with
    adapters on the latent projections (kv_b_proj: read by the absorbed decode through the
    adapter); the adapter loads and decodes."""
    import json

    from bardlm.cli import main
    from bardlm.tokenizers import CharTokenizer

    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,;:!?<>|/ABCDEFGHIJKLMNOPQRSTUVWXYZ\n")
    torch.manual_seed(9)
    deepseek(vocab_size=tok.vocab_size).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "bardlm_tokenizer.json").write_text(json.dumps(tok.to_dict()))
    assert main(["generate", "--ckpt", str(tmp_path / "hf"), "--dtype", "int8", "--prompt", "to be",
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("to be")
    chat = tmp_path / "chat.jsonl"
    turn = [{"role": "user", "content": "soft"}, {"role": "assistant", "content": "light"}]
    chat.write_text("".join(json.dumps({"messages": turn}) + "\n" for _ in range(8)))
    out = tmp_path / "adapter"
    assert main(["finetune", "--init-from", str(tmp_path / "hf"), "--data", str(chat), "--out", str(out),
                 "--max-iters", "2", "--set", "batch_size=2", "--lora-rank", "2", "--lora-targets",
                 "q_b_proj", "kv_a_proj", "kv_b_proj", "c_proj", "--no-progress"]) == 0
    tuned, _ = bardlm.load(out)
    base, _ = bardlm.load(tmp_path / "hf")
    idx = torch.randint(0, tok.vocab_size, (1, 12))
    with torch.no_grad():
        assert not torch.allclose(tuned(idx)[0], base(idx)[0])  # the adapters trained
    assert tuned.generate(idx, 6, temperature=0.0).shape == (1, 18)


def test_a_model_built_on_meta_starts_with_a_zero_correction_bias() -> None:
    """FSDP builds on meta, allocates (uninitialised memory) and calls init_weights: the
    router's correction bias, a buffer, is zeroed there too."""
    from bardlm.config import preset

    with torch.device("meta"):
        model = GPT(preset("mla-tiny"))
    model.to_empty(device="cpu")
    for block in model.transformer.h[1:]:
        block.mlp.correction_bias.fill_(float("nan"))
    model.init_weights()
    assert all(torch.equal(b.mlp.correction_bias, torch.zeros(8)) for b in model.transformer.h[1:])


def test_a_dense_mla_model_exports_to_deepseek_v3_without_experts(tmp_path) -> None:  # noqa: ANN001
    """No MoE layer: written with first_k_dense_replace = n_layer, so transformers builds none."""
    torch.manual_seed(10)
    model = GPT(our_config(hf_config())).eval()
    save_pretrained(model, tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.first_k_dense_replace == 2
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        assert (again(idx).logits - model(idx)[0]).abs().max().item() < 1e-4


def test_balancing_moves_the_bias_toward_the_less_chosen_experts() -> None:
    """After a training forward, `balance_routers` moves each bias by rate * sign(mean load -
    load) (DeepSeek-V3, eq. of section 2.1.2) and clears the counts; eval forwards count nothing."""
    from bardlm.nn.moe import balance_routers

    torch.manual_seed(11)
    cfg = ModelConfig(n_layer=1, n_head=4, n_embd=64, ffn="swiglu", pos="rope", bias=False, n_expert=8,
                      n_expert_active=2, expert_hidden=16, router_score="sigmoid", correction_bias_rate=0.01)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.correction_bias.copy_(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]))  # expert 0 always chosen
    moe.eval()(torch.randn(1, 64, 64))
    assert moe.load is None
    moe.train()(torch.randn(1, 64, 64))
    load = moe.load.float()
    assert load.sum() == 64 * 2 and load[0] == 64
    balance_routers(moe)
    want = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]) + 0.01 * torch.sign(load.mean() - load)
    assert torch.allclose(moe.correction_bias, want) and moe.correction_bias[0] < 1.0
    assert moe.load is None
