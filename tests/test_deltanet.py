"""The gated delta rule (nn/deltanet.py): the chunked form equals the recurrent one (outputs and
gradients, over 1,000 tokens, with a state carried in), the recurrent form equals the rule
written out with explicit matrices, and the layer equals transformers' Qwen3.5 GatedDeltaNet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bardlm import ModelConfig
from bardlm.nn.cache import StateCache
from bardlm.nn.deltanet import GatedDeltaNet, chunked_delta_rule, l2_normalize, recurrent_delta_rule


def inputs(B: int = 2, H: int = 3, T: int = 1000, dk: int = 16, dv: int = 8, seed: int = 0):  # noqa: ANN201
    """q, k normalised; g from the layer's formula (decays from fast to slow); beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = l2_normalize(torch.randn(B, H, T, dk, generator=gen))
    k = l2_normalize(torch.randn(B, H, T, dk, generator=gen))
    v = torch.randn(B, H, T, dv, generator=gen)
    A = torch.empty(H).uniform_(0.01, 16, generator=gen)
    g = -A[None, :, None] * F.softplus(torch.randn(B, H, T, generator=gen) - 4)
    beta = torch.sigmoid(torch.randn(B, H, T, generator=gen))
    return q, k, v, g, beta


def test_chunked_equals_recurrent_over_1000_tokens() -> None:
    q, k, v, g, beta = inputs()
    state = torch.randn(2, 3, 16, 8) * 0.3
    o_rec, s_rec = recurrent_delta_rule(q, k, v, g, beta, state)
    o_chk, s_chk = chunked_delta_rule(q, k, v, g, beta, state)  # 1,000 = 15 chunks of 64 + 40
    assert o_rec.shape == o_chk.shape == (2, 3, 1000, 8)
    assert (o_rec - o_chk).abs().max().item() < 1e-5
    assert (s_rec - s_chk).abs().max().item() < 1e-5
    assert o_rec.abs().max().item() > 0.1  # not a vanishing output
    # Another chunk size computes the same (the chunk is only a way to compute it).
    o_16, _ = chunked_delta_rule(q, k, v, g, beta, state, chunk=16)
    assert (o_16 - o_rec).abs().max().item() < 1e-5


def test_chunked_gradients_equal_recurrent_gradients() -> None:
    leaves = [x.clone().requires_grad_() for x in (*inputs(B=1, H=2, T=1000, seed=1), torch.randn(1, 2, 16, 8))]
    grads = []
    for rule in (recurrent_delta_rule, chunked_delta_rule):
        for x in leaves:
            x.grad = None
        o, s = rule(*leaves)
        weight = torch.linspace(-1, 1, o.numel()).view_as(o)  # a loss that weighs every output
        ((o * weight).sum() + s.square().sum()).backward()
        grads.append([x.grad.clone() for x in leaves])
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state"), *grads):
        assert (a - b).abs().max().item() < 1e-4, name
        assert a.abs().max().item() > 1e-3, name  # every input gets a gradient


def test_recurrent_form_is_the_rule_written_out() -> None:
    """S_t = e^g S_{t-1}; S_t += beta k (v - S_t^T k)^T; o = S_t^T q / sqrt(d_k), matrices explicit."""
    q, k, v, g, beta = inputs(B=1, H=1, T=12, dk=4, dv=3)
    S = torch.zeros(4, 3)
    want = []
    for t in range(12):
        kt, vt, qt = k[0, 0, t][:, None], v[0, 0, t][:, None], q[0, 0, t][:, None]  # columns
        S = torch.exp(g[0, 0, t]) * S
        S = S + beta[0, 0, t] * kt @ (vt - S.T @ kt).T
        want.append((S.T @ qt / 2.0).squeeze(1))
    got, state = recurrent_delta_rule(q, k, v, g, beta)
    assert torch.allclose(got[0, 0], torch.stack(want), atol=1e-6)
    assert torch.allclose(state[0, 0], S, atol=1e-6)


def small_cfg(**kw) -> ModelConfig:  # noqa: ANN003
    base = dict(vocab_size=50, block_size=512, n_layer=1, n_head=4, n_embd=32, norm="rmsnorm",
                ffn="swiglu", pos="rope", bias=False, attn_layers=["linear"], linear_k_heads=2,
                linear_v_heads=4, linear_k_head_dim=8, linear_v_head_dim=6)
    return ModelConfig(**{**base, **kw})


def test_layer_step_by_step_with_the_state_cache_equals_one_pass() -> None:
    """A prefill of 150 tokens (chunked), then 30 decoded one at a time (recurrent, the conv
    and the state read from the cache), equals one pass over all 180."""
    torch.manual_seed(0)
    cfg = small_cfg()
    layer = GatedDeltaNet(cfg).eval()
    x = torch.randn(2, 180, 32)
    with torch.no_grad():
        whole = layer(x)
        cache = StateCache(2, 512, layer.conv_dim, 4, 4, 8, 6)
        parts = [layer(x[:, :150], cache=cache, start_pos=0)]
        for t in range(150, 180):
            parts.append(layer(x[:, t:t + 1], cache=cache, start_pos=torch.tensor([t])))
    assert (torch.cat(parts, 1) - whole).abs().max().item() < 1e-5
    assert cache.nbytes() == 2 * (layer.conv_dim * 3 * 4 + 4 * 8 * 6 * 4)
    # A pass starting at cache index 0 starts from zeros, whatever the cache held.
    with torch.no_grad():
        again = layer(x[:, :20], cache=cache, start_pos=torch.arange(20))
    assert (again - whole[:, :20]).abs().max().item() < 1e-5


def test_layer_equals_transformers_qwen3_5_gated_delta_net() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    hf_cfg = transformers.Qwen3_5TextConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=6, layer_types=["linear_attention"])
    torch.manual_seed(1)
    ref = Qwen3_5GatedDeltaNet(hf_cfg, 0).eval()
    with torch.no_grad():
        ref.norm.weight.normal_(1.0, 0.3)
        ref.dt_bias.normal_(0.0, 1.0)
    ours = GatedDeltaNet(small_cfg(norm_eps=hf_cfg.rms_norm_eps)).eval()
    with torch.no_grad():
        ours.c_in.weight.copy_(torch.cat([ref.in_proj_qkv.weight, ref.in_proj_z.weight,
                                          ref.in_proj_b.weight, ref.in_proj_a.weight]))
        ours.conv_weight.copy_(ref.conv1d.weight)
        for name in ("A_log", "dt_bias"):
            getattr(ours, name).copy_(getattr(ref, name))
        ours.norm.weight.copy_(ref.norm.weight)
        ours.c_proj.weight.copy_(ref.out_proj.weight)
        x = torch.randn(2, 200, 32)
        want, got = ref(x), ours(x)
    assert (want - got).abs().max().item() < 1e-5
    assert want.abs().max().item() > 1e-2
