"""Mixture of experts (nn/moe.py): routing and grouped dispatch against a dense reference and
transformers' Qwen2-MoE block, the auxiliary losses against transformers' training loss, the
per-layer layout, int8 (router kept float) and LoRA on expert weights."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from bardlm import BardlmError
from bardlm.config import ModelConfig, preset
from bardlm.infer.quantize import Int8Linear, quantize_model
from bardlm.io.checkpoint import load_checkpoint, save_checkpoint
from bardlm.io.load import quantize_checkpoint
from bardlm.nn.lora import apply_lora, merge_lora
from bardlm.nn.model import GPT
from bardlm.nn.moe import MoE, active_params, load_balancing_loss, router_z_loss
from bardlm.tokenizers import CharTokenizer

V = 61


def moe_config(**overrides) -> ModelConfig:  # noqa: ANN003
    base = dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                ffn="swiglu", norm="rmsnorm", pos="rope", bias=False, ffn_hidden=48,
                n_expert=4, n_expert_active=2, expert_hidden=16, ffn_layers=["dense", "moe"])
    return ModelConfig(**{**base, **overrides})


def spread_routers(model: torch.nn.Module) -> None:
    """N(0, 1) router weights: tokens reach every expert (the 0.02 init routes near-uniformly)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                m.router.weight.normal_(0.0, 1.0)


def dense_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, mixed with the top-k weights written out: (N, C) -> (N, C)."""
    probs = F.softmax(moe.router(x), dim=-1)
    top, idx = probs.topk(moe.top_k, dim=-1)
    if moe.renorm:
        top = top / top.sum(-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(1, idx, top)  # (N, E), zero off the top k
    outs = torch.stack([expert(x) for expert in moe.experts], dim=1)  # (N, E, C)
    return (gates.unsqueeze(-1) * outs).sum(1)


@pytest.mark.parametrize("renorm", [True, False])
def test_grouped_dispatch_equals_dense_mixture(renorm: bool) -> None:
    torch.manual_seed(0)
    moe = MoE(moe_config(router_renorm=renorm, n_expert=6, n_expert_active=3)).eval()
    torch.nn.init.normal_(moe.router.weight)
    x = torch.randn(5, 7, 32)
    got = moe(x)
    want = dense_reference(moe, x.view(-1, 32)).view_as(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # The reference can tell renormalised from raw weights apart.
    moe.renorm = not renorm
    assert (dense_reference(moe, x.view(-1, 32)).view_as(x) - got).abs().max() > 1e-3


@pytest.mark.parametrize("shared", [0, 24])
def test_one_token_path_equals_dense_mixture(shared: int) -> None:
    """Decoding one token skips the grouping (MoE._one_token); it must mix the same experts."""
    torch.manual_seed(9)
    moe = MoE(moe_config(n_expert=6, n_expert_active=3, shared_expert_hidden=shared)).eval()
    torch.nn.init.normal_(moe.router.weight)
    for _ in range(5):
        x = torch.randn(1, 1, 32)
        want = dense_reference(moe, x.view(1, 32))
        if shared:
            want = want + torch.sigmoid(moe.shared_gate(x.view(1, 32))) * moe.shared(x.view(1, 32))
        torch.testing.assert_close(moe(x).view(1, 32), want, atol=1e-6, rtol=1e-5)


def test_shared_expert_matches_transformers_qwen2_moe_block() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(1)
    hf_cfg = transformers.Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, num_experts=4,
                                         num_experts_per_tok=2, norm_topk_prob=False)
    ref = Qwen2MoeSparseMoeBlock(hf_cfg).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = MoE(moe_config(shared_expert_hidden=24, router_renorm=False)).eval()
    with torch.no_grad():
        ours.router.weight.copy_(ref.gate.weight)
        for e, expert in enumerate(ours.experts):  # HF: gate_up_proj (E, 2I, C), down (E, C, I)
            expert.c_fc.weight.copy_(ref.experts.gate_up_proj[e])
            expert.c_proj.weight.copy_(ref.experts.down_proj[e])
        se = ref.shared_expert
        ours.shared.c_fc.weight.copy_(torch.cat([se.gate_proj.weight, se.up_proj.weight]))
        ours.shared.c_proj.weight.copy_(se.down_proj.weight)
        ours.shared_gate.weight.copy_(ref.shared_expert_gate.weight)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)
        ours.shared_gate.weight.zero_()  # the gate matters: sigmoid(0) = 1/2 changes the output
        assert (ours(x) - want).abs().max() > 1e-3


def test_decode_runs_only_the_chosen_experts_and_a_batch_each_expert_once() -> None:
    torch.manual_seed(2)
    moe = MoE(moe_config(n_expert=8, n_expert_active=2)).eval()
    torch.nn.init.normal_(moe.router.weight)
    calls: list[tuple[int, int]] = []  # (expert, rows it ran on)
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, inp, out, e=e: calls.append((e, inp[0].shape[0])))
    x = torch.randn(1, 1, 32)
    moe(x)
    chosen = moe.route(x.view(1, 32))[2][0].tolist()
    assert sorted(e for e, _ in calls) == sorted(chosen) and all(n == 1 for _, n in calls)
    calls.clear()
    x = torch.randn(4, 16, 32)  # 64 tokens, 128 (token, expert) pairs
    moe(x)
    experts = [e for e, _ in calls]
    assert len(experts) == len(set(experts)) == 8  # each expert once, on all of its tokens
    assert sum(n for _, n in calls) == 64 * 2


def test_load_balancing_loss_equals_transformers() -> None:
    pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    torch.manual_seed(3)
    layers = [torch.randn(37, 8) * 2 for _ in range(3)]
    want = load_balancing_loss_func(tuple(layers), num_experts=8, top_k=3)
    got = load_balancing_loss(layers, 8, 3)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    # Pooled over layers, not averaged per layer: the two differ on these logits.
    per_layer = sum(load_balancing_loss([x], 8, 3) for x in layers) / 3
    assert (per_layer - want).abs() > 1e-4


def test_z_loss_is_mean_squared_logsumexp() -> None:
    layers = [torch.tensor([[0.0, 0.0], [1.0, 3.0]]), torch.tensor([[2.0, -1.0]])]
    lse = [torch.log(torch.tensor(2.0)), torch.log(torch.exp(torch.tensor(1.0)) + torch.exp(torch.tensor(3.0))),
           torch.log(torch.exp(torch.tensor(2.0)) + torch.exp(torch.tensor(-1.0)))]
    want = sum(v**2 for v in lse) / 3
    torch.testing.assert_close(router_z_loss(layers), want)


def test_training_loss_equals_transformers_with_router_aux_loss(tmp_path) -> None:  # noqa: ANN001
    """bardlm's training-mode loss of a Qwen3-MoE model (cross-entropy + coef * load-balancing
    loss over all MoE layers) is transformers' loss with output_router_logits=True."""
    transformers = pytest.importorskip("transformers")
    from bardlm.io.hf import from_pretrained

    torch.manual_seed(4)
    ref = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
        router_aux_loss_coef=0.3, output_router_logits=True))
    for name, p in ref.named_parameters():
        if name.endswith(".gate.weight"):
            torch.nn.init.normal_(p)
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).train()
    assert ours.config.ffn_layers == ["moe", "dense", "moe"] and ours.config.router_aux_loss_coef == 0.3
    ref.train()
    idx = torch.randint(0, V, (2, 12))
    out = ref(idx, labels=idx)
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -1)], dim=1)  # HF shifts labels itself
    _, loss = ours(idx, targets)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)
    assert (out.loss - out.aux_loss * 0.3 - loss).abs() > 1e-3  # the aux term is in both
    ours.eval()  # evaluation reports cross-entropy only
    torch.testing.assert_close(ours(idx, targets)[1], out.loss - 0.3 * out.aux_loss, atol=1e-5, rtol=1e-5)


def test_z_loss_and_aux_loss_weighted_by_config() -> None:
    torch.manual_seed(5)
    model = GPT(moe_config(router_aux_loss_coef=0.0, router_z_loss_coef=0.0, dropout=0.0))
    idx = torch.randint(0, V, (2, 10))
    logits = []  # the router's output, as the model computes it
    hook = model.transformer.h[1].mlp.router.register_forward_hook(lambda m, i, out: logits.append(out))
    _, plain = model(idx, idx)
    hook.remove()
    for aux, z in [(0.5, 0.0), (0.0, 0.25), (0.5, 0.25)]:
        m = copy.deepcopy(model)
        m.config = m.config.replace(router_aux_loss_coef=aux, router_z_loss_coef=z)
        _, loss = m(idx, idx)
        want = plain + aux * load_balancing_loss(logits, 4, 2) + z * router_z_loss(logits)
        torch.testing.assert_close(loss, want)
    loss.backward()  # the router learns from the auxiliary losses
    assert m.transformer.h[1].mlp.router.weight.grad.abs().sum() > 0


def test_per_layer_layout_and_config_errors() -> None:
    cfg = moe_config(ffn_layers=None)
    assert cfg.ffn_layers == ["moe", "moe"] and cfg.expert_hidden == 16
    assert cfg.replace(n_layer=3).ffn_layers == ["moe"] * 3  # derived: follows n_layer
    assert ModelConfig(n_layer=2).ffn_layers == ["dense", "dense"]
    model = GPT(moe_config())
    assert not isinstance(model.transformer.h[0].mlp, MoE) and isinstance(model.transformer.h[1].mlp, MoE)
    assert model.transformer.h[1].mlp.experts[0].c_fc.weight.shape == (32, 32)  # 2 * expert_hidden
    bad = [(dict(ffn_layers=["moe"]), "ffn_layers must list"),
           (dict(ffn_layers=["dense", "sparse"]), "ffn_layers must list"),
           (dict(n_expert=0), "n_expert is 0"),
           (dict(n_expert_active=5), "n_expert_active must be in"),
           (dict(ffn="gelu"), "needs ffn=swiglu"),
           (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef must be >= 0"),
           (dict(share_layers=True), "cannot mix dense and moe")]
    for change, message in bad:
        with pytest.raises(BardlmError, match=message):
            moe_config(**change)


def test_int8_keeps_the_router_float_and_round_trips(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(6)
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,;:!?ABCDEFGHIJ")
    model = GPT(moe_config(vocab_size=tok.vocab_size, n_embd=64, head_dim=16)).eval()
    spread_routers(model)
    q = quantize_model(copy.deepcopy(model))
    moe = q.transformer.h[1].mlp
    assert type(moe.router) is torch.nn.Linear and moe.router.weight.is_floating_point()
    assert isinstance(moe.experts[0].c_fc, Int8Linear) and isinstance(moe.experts[3].c_proj, Int8Linear)
    idx = torch.randint(0, tok.vocab_size, (2, 16))
    ref = model(idx)[0]
    assert (q(idx)[0].float() - ref).abs().max() < 0.05 * ref.abs().max()
    save_checkpoint(tmp_path / "fp32", model, tok, {})
    quantize_checkpoint(tmp_path / "fp32", tmp_path / "int8")
    loaded, _, _ = load_checkpoint(tmp_path / "int8")
    assert type(loaded.transformer.h[1].mlp.router) is torch.nn.Linear
    assert torch.equal(loaded(idx)[0], q(idx)[0])


def test_lora_adapts_expert_weights_but_not_the_router() -> None:
    torch.manual_seed(7)
    model = GPT(moe_config())
    spread_routers(model)
    adapted = apply_lora(model, rank=2, alpha=4.0)
    assert "transformer.h.1.mlp.experts.3.c_fc" in adapted and not any("router" in n for n in adapted)
    idx = torch.randint(0, V, (2, 10))
    _, loss = model(idx, idx)
    loss.backward()
    lora_b = model.transformer.h[1].mlp.experts[0].c_fc.lora_B
    assert lora_b.grad is not None and model.transformer.h[1].mlp.router.weight.grad is None
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
        model.eval()
        before = model(idx)[0]
        merged = merge_lora(model)
        torch.testing.assert_close(merged(idx)[0], before, atol=1e-5, rtol=1e-5)


def test_active_parameters_in_info(capsys) -> None:  # noqa: ANN001
    from bardlm.cli import main

    dense = GPT(preset("qwen3-tiny")).num_params()
    moe = GPT(preset("moe-tiny"))
    # moe-tiny: 2 of 4 experts of width 172 per MoE layer = one dense FFN of width 344.
    assert active_params(moe) == dense + 3 * 128 * 4  # plus the 3 routers (128 x 4 each)
    assert main(["info", "--preset", "moe-tiny"]) == 0
    assert f"{active_params(moe):,} parameters active per token" in capsys.readouterr().out


def test_training_flops_count_only_the_active_experts() -> None:
    from bardlm.train.speed import flops_per_token

    dense, moe = GPT(preset("qwen3-tiny")), GPT(preset("moe-tiny"))
    # As many FFN weights per token (the routers aside): the same 6N training FLOPs.
    assert flops_per_token(moe) - flops_per_token(dense) == 6 * 3 * 128 * 4
    assert moe.num_params() > 1.5 * dense.num_params()  # while holding half again as many weights


def test_moe_tiny_preset_generates_with_cache() -> None:
    torch.manual_seed(8)
    model = GPT(preset("moe-tiny")).eval()
    spread_routers(model)
    idx = torch.randint(0, 65, (2, 5))
    cached = model.generate(idx, 12, temperature=0.0)
    full = model.generate(idx, 12, temperature=0.0, use_cache=False)
    assert torch.equal(cached, full)
    # Prompts of different lengths in one left-padded batch: each row as if alone (the padding
    # rows pass through the experts too, and must not disturb the others).
    from bardlm.infer.generate import generate_batch

    prompts = [idx[0].tolist(), idx[1, :2].tolist()]
    batched = generate_batch(model, prompts, 8, temperature=0.0)
    alone = [model.generate(torch.tensor([p]), 8, temperature=0.0)[0, len(p):].tolist() for p in prompts]
    assert batched == alone


def test_export_refuses_moe_models_without_an_equivalent() -> None:
    from bardlm.io.gguf import check_exportable
    from bardlm.io.hf import family_of

    assert family_of(preset("moe-tiny")) == "qwen3_moe"
    assert family_of(moe_config(ffn_layers=None)) == "mixtral"  # no QK-norm, every layer MoE
    assert family_of(moe_config(shared_expert_hidden=8, qkv_bias=True)) == "qwen2_moe"
    with pytest.raises(BardlmError, match="no QK-norm with a shared expert"):
        family_of(moe_config(qk_norm=True, shared_expert_hidden=8))
    with pytest.raises(BardlmError, match="no q/k/v biases without a shared expert"):
        family_of(moe_config(qk_norm=True, qkv_bias=True))
    with pytest.raises(BardlmError, match="every layer MoE and router_renorm=true"):
        family_of(moe_config())  # Mixtral has no dense layers
    # GGUF: llama.cpp's qwen3moe routes every layer (test_gguf.py runs the all-MoE layout)
    with pytest.raises(BardlmError, match=r"llama.cpp's qwen3moe cannot run .* \(dense FFN layers"):
        check_exportable(preset("moe-tiny"))
    assert check_exportable(preset("moe-tiny", ffn_layers=None)) == "qwen3_moe"


# The stacked decode path (MoE._few_tokens_stacked: what a compiled decode step runs) -------------
STACKED_KINDS = {
    "softmax_renorm": dict(router_renorm=True),
    "softmax_raw_shared": dict(router_renorm=False, shared_expert_hidden=24),
    "sigmoid_groups": dict(router_score="sigmoid", n_expert=8, router_groups=4, router_topk_groups=2,
                           routed_scale=2.5, shared_expert_hidden=24, shared_expert_gate=False),
    "gpt_oss_clamped_biases": dict(ffn="swiglu_clamped", bias=True, router_bias=True,
                                   swiglu_alpha=1.702, swiglu_limit=7.0),
}


def stacked_moe(kind: str, seed: int = 11) -> MoE:
    """An eval-mode MoE of `kind` with every parameter (biases and the sigmoid router's
    correction bias too) drawn large, so a term left out moves the output."""
    torch.manual_seed(seed)
    moe = MoE(moe_config(**STACKED_KINDS[kind])).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.5)
        if moe.sigmoid:
            moe.correction_bias.normal_(0.0, 0.5)
    return moe


@pytest.mark.parametrize("kind", list(STACKED_KINDS))
@pytest.mark.parametrize("n", [1, 3])
@torch.no_grad()
def test_stacked_path_equals_the_expert_loop(kind: str, n: int) -> None:
    """The stacked path (the chosen rows of the stacked weights, multiply + sum) mixes what the per-expert loop
    does: `_one_token` for one token, `_grouped` (held to an every-expert reference above) for
    a few; softmax and sigmoid routing, renormalised or not, shared experts, gpt-oss's clamped
    unit with biases."""
    moe = stacked_moe(kind)
    assert moe.stack_experts()
    for _ in range(4):
        x = torch.randn(n, 32)
        _, weights, experts = moe.route(x)
        want = moe._one_token(x, weights[0], experts[0]) if n == 1 else moe._grouped(x, weights, experts)
        torch.testing.assert_close(moe._few_tokens_stacked(x, weights, experts), want, atol=1e-5, rtol=1e-5)
    if moe.stacked.fc_bias is not None:  # the biases are read: zeroing the stacked ones shows
        moe.stacked.fc_bias.zero_()
        assert (moe._few_tokens_stacked(x, weights, experts) - want).abs().max() > 1e-3


@torch.no_grad()
def test_stacking_makes_the_expert_weights_views_and_restacks_replaced_ones() -> None:
    moe = stacked_moe("gpt_oss_clamped_biases")
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    assert moe.stack_experts()
    st = moe.stacked
    assert st.fc.shape == (4, 32, 32) and st.proj.shape == (4, 32, 16) and st.fc_bias.shape == (4, 32)
    for e, expert in enumerate(moe.experts):  # no second copy: each parameter lives in the stack
        assert expert.c_fc.weight.data_ptr() == st.fc[e].data_ptr()
        assert expert.c_proj.bias.data_ptr() == st.proj_bias[e].data_ptr()
    after = moe.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    moe.experts[2].c_proj.weight.add_(1.0)  # an in-place update (an optimizer step) is the stack's
    assert torch.equal(st.proj[2], moe.experts[2].c_proj.weight)
    assert moe.stack_experts() and moe.stacked is st  # still fresh: kept
    clone = copy.deepcopy(moe)  # the copy's parameters are apart: it keeps no stale stack
    assert clone.stacked is None and torch.equal(clone.experts[2].c_proj.weight, st.proj[2])
    moe.to(torch.float64)  # new parameter tensors: stacked anew, from them
    assert moe.stack_experts() and moe.stacked is not st and moe.stacked.fc.dtype == torch.float64
    assert moe.experts[3].c_fc.weight.data_ptr() == moe.stacked.fc[3].data_ptr()


def test_lora_wrapped_or_quantized_experts_keep_the_loop() -> None:
    model = GPT(moe_config())
    apply_lora(model, rank=2, alpha=4.0)
    moe = model.transformer.h[1].mlp
    assert not moe.stack_experts() and moe.stacked is None
    q = quantize_model(GPT(moe_config()).eval())
    assert not q.transformer.h[1].mlp.stack_experts()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("BARDLM_TEST_COMPILE"),
                    reason="compiling takes ~20-40 s on 2 cores; set BARDLM_TEST_COMPILE=1")
@torch.no_grad()
def test_compiled_mixture_is_one_graph_and_reads_the_current_weights() -> None:
    """fullgraph=True fails on any graph break. The stacks are inputs of the graph, not
    constants: an in-place change of the weights, and a restack, show in the compiled output."""
    moe = stacked_moe("gpt_oss_clamped_biases")
    assert moe.stack_experts()
    fn = torch.compile(moe, fullgraph=True, dynamic=False)
    x = torch.randn(1, 2, 32)
    torch.testing.assert_close(fn(x), moe(x), atol=1e-5, rtol=1e-5)
    moe.experts[1].c_fc.weight.mul_(-2.0)
    moe.experts[2].c_fc.weight.mul_(-2.0)
    want = moe(x)
    torch.testing.assert_close(fn(x), want, atol=1e-5, rtol=1e-5)
    moe.to(torch.float64).to(torch.float32)  # fresh parameters: the old stack is stale
    for expert in moe.experts:
        expert.c_proj.weight.mul_(3.0)
    assert moe.stack_experts()
    torch.testing.assert_close(fn(x), moe(x), atol=1e-5, rtol=1e-5)
    assert (moe(x) - want).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("BARDLM_TEST_COMPILE"),
                    reason="compiling takes ~20-40 s on 2 cores; set BARDLM_TEST_COMPILE=1")
def test_compiled_decode_of_a_mixture_has_no_graph_break_and_the_eager_ids() -> None:
    from torch._dynamo.utils import counters

    from bardlm.infer.generate import generate_batch

    torch.manual_seed(12)
    model = GPT(moe_config(shared_expert_hidden=24)).eval()
    spread_routers(model)
    idx = torch.randint(0, V, (1, 5))
    eager = model.generate(idx, 10, temperature=0)
    counters.clear()
    assert torch.equal(model.generate(idx, 10, temperature=0, compile=True), eager)
    # A batch of padded rows (the server's static step: several tokens per MoE layer).
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    batch = generate_batch(model, prompts, 8, temperature=0)
    assert generate_batch(model, prompts, 8, temperature=0, compile=True) == batch
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert model.transformer.h[1].mlp.stacked is not None


def test_prepared_fp32_keeps_the_experts_stackable() -> None:
    """`prepare_for_inference(fp32)` transposes every linear layer but the experts', which the
    compiled step reads stacked; the prepared model computes the same logits."""
    from bardlm.infer.layouts import FastLinear, prepare_for_inference

    torch.manual_seed(13)
    model = GPT(moe_config(shared_expert_hidden=24)).eval()
    spread_routers(model)
    idx = torch.randint(0, V, (2, 9))
    ref = model(idx)[0]
    fast = prepare_for_inference(copy.deepcopy(model), "fp32")
    moe = fast.transformer.h[1].mlp
    assert isinstance(fast.transformer.h[1].attn.c_attn, FastLinear) and isinstance(moe.router, FastLinear)
    assert isinstance(moe.shared.c_fc, FastLinear)
    assert type(moe.experts[0].c_fc) is torch.nn.Linear and moe.stack_experts()
    torch.testing.assert_close(fast(idx)[0], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("BARDLM_TEST_COMPILE"),
                    reason="compiling takes ~20-40 s on 2 cores; set BARDLM_TEST_COMPILE=1")
def test_compiled_server_step_of_a_mixture_has_no_graph_break_and_the_eager_ids() -> None:
    """`bardlm serve --compile`'s engine (slots at different positions, one static step) on a
    MoE model: the ids of eager `generate`, with no graph break."""
    from torch._dynamo.utils import counters

    from bardlm.serve.engine import Engine, Job

    torch.manual_seed(14)
    model = GPT(moe_config()).eval()
    spread_routers(model)
    tok = CharTokenizer([chr(0x4E00 + i) for i in range(V)])
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    want = [model.generate(torch.tensor([p]), 8, temperature=0)[0, len(p):].tolist() for p in prompts]
    counters.clear()
    engine = Engine(model, tok, max_queue=3, max_batch=4, compile=True)
    try:
        jobs = [Job("", 8, sampling={"temperature": 0.0}, prompt_ids=p) for p in prompts]
        for f in [engine.try_submit(j) for j in jobs]:
            f.result(300)
    finally:
        engine.shutdown()
    assert [j.ids for j in jobs] == want
    assert not counters["graph_break"], dict(counters["graph_break"])
