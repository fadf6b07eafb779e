import pytest
import torch
from torch import nn

from bardlm.config import ModelConfig
from bardlm.nn.attention import Attention
from bardlm.nn.cache import KVCache


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=11, block_size=32, n_layer=1, n_head=4, n_embd=32)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_sdpa_path_equals_explicit_formula(n_kv_head: int) -> None:
    explicit = Attention(_cfg(n_kv_head=n_kv_head, attn_impl="explicit")).eval()
    fast = Attention(_cfg(n_kv_head=n_kv_head, attn_impl="sdpa")).eval()
    fast.load_state_dict(explicit.state_dict())
    x = torch.randn(2, 13, 32)
    torch.testing.assert_close(fast(x), explicit(x), atol=1e-5, rtol=1e-5)
    pad = torch.ones(2, 1, 1, 13, dtype=torch.bool)
    pad[0, ..., :3] = False  # row 0 hides its first 3 keys (left padding)
    torch.testing.assert_close(fast(x, mask=pad)[:, 3:], explicit(x, mask=pad)[:, 3:], atol=1e-5, rtol=1e-5)


def test_matches_torch_multihead_attention() -> None:
    """Our causal MHA against nn.MultiheadAttention with the same weights."""
    ours = Attention(_cfg(attn_impl="explicit")).eval()
    ref = nn.MultiheadAttention(32, 4, bias=True, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.c_attn.weight)  # rows [q | k | v] in both
        ref.in_proj_bias.copy_(ours.c_attn.bias)
        ref.out_proj.weight.copy_(ours.c_proj.weight)
        ref.out_proj.bias.copy_(ours.c_proj.bias)
    x = torch.randn(3, 10, 32)
    causal = torch.ones(10, 10, dtype=torch.bool).triu(1)  # True = may NOT attend, in torch's API
    want, _ = ref(x, x, x, attn_mask=causal, need_weights=False)
    torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads() -> None:
    gqa = Attention(_cfg(n_kv_head=2)).eval()
    mha = Attention(_cfg()).eval()
    hd, q_dim = 8, 32
    w, b = gqa.c_attn.weight, gqa.c_attn.bias
    k_w, v_w = w[q_dim : q_dim + 16].view(2, hd, 32), w[q_dim + 16 :].view(2, hd, 32)
    k_b, v_b = b[q_dim : q_dim + 16].view(2, hd), b[q_dim + 16 :].view(2, hd)
    with torch.no_grad():  # KV head j serves query heads 2j and 2j + 1
        mha.c_attn.weight.copy_(torch.cat([w[:q_dim], k_w.repeat_interleave(2, 0).reshape(32, 32),
                                           v_w.repeat_interleave(2, 0).reshape(32, 32)]))
        mha.c_attn.bias.copy_(torch.cat([b[:q_dim], k_b.repeat_interleave(2, 0).reshape(32),
                                         v_b.repeat_interleave(2, 0).reshape(32)]))
        mha.c_proj.load_state_dict(gqa.c_proj.state_dict())
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_cache_prefill_then_steps_equals_full_pass(impl: str) -> None:
    attn = Attention(_cfg(n_kv_head=2, attn_impl=impl)).eval()
    x = torch.randn(2, 12, 32)
    full = attn(x)
    cache = KVCache(2, 16, 2, 8)
    out = [attn(x[:, :5], cache=cache, start_pos=0)]
    out.append(attn(x[:, 5:9], cache=cache, start_pos=5))  # a chunk after a prefix: offset mask
    out += [attn(x[:, t : t + 1], cache=cache, start_pos=t) for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)


def test_cross_attention_shapes_and_no_causal_mask() -> None:
    attn = Attention(_cfg(), causal=False).eval()
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    y = attn(x, kv_source=memory)
    assert y.shape == (2, 5, 32)
    memory2 = memory.clone()
    memory2[:, -1] += 1.0  # the last source position is visible to every query
    assert not torch.allclose(attn(x, kv_source=memory2)[:, 0], y[:, 0])


def test_dropout_only_in_training() -> None:
    attn = Attention(_cfg(dropout=0.5))
    x = torch.randn(1, 6, 32)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn(x))


def test_qk_norm_follows_fused_ops() -> None:
    fused = Attention(_cfg(n_kv_head=2, qk_norm=True, fused_ops=True)).eval()
    plain = Attention(_cfg(n_kv_head=2, qk_norm=True, fused_ops=False)).eval()
    assert fused.q_norm.fused and fused.k_norm.fused
    assert not plain.q_norm.fused and not plain.k_norm.fused
    with torch.no_grad():
        fused.q_norm.weight.uniform_(0.5, 1.5)  # non-trivial gains, the same in both
        fused.k_norm.weight.uniform_(0.5, 1.5)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 7, 32) * 3
    torch.testing.assert_close(fused(x), plain(x), atol=1e-6, rtol=1e-6)


def test_cross_attention_calls_a_swapped_projection() -> None:
    """Cross-attention goes through the `c_attn` module, not its `.weight`: a LoRA adapter on
    it computes what its merged weights do, and an INT8 swap its dequantized weights do."""
    from bardlm.infer.quantize import Int8Linear, dequantize
    from bardlm.nn.lora import LoRALinear

    attn = Attention(_cfg(), causal=False).eval()
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    lora = LoRALinear(attn.c_attn, rank=4, alpha=8.0)
    with torch.no_grad():
        lora.lora_B.normal_()  # a non-zero update (B starts at zero)
        merged = nn.Linear(32, attn.c_attn.out_features)
        merged.weight.copy_(attn.c_attn.weight + lora.delta())
        merged.bias.copy_(attn.c_attn.bias)
    attn.c_attn = merged
    want = attn(x, kv_source=memory)
    attn.c_attn = lora
    torch.testing.assert_close(attn(x, kv_source=memory), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(x, kv_source=attn.project_kv(memory)), want, atol=1e-5, rtol=1e-5)

    q8 = Int8Linear.from_linear(merged)
    with torch.no_grad():
        merged.weight.copy_(dequantize(q8.weight, q8.scales))
        merged.bias.copy_(q8.bias.float())
    attn.c_attn = merged
    want_kv = attn.project_kv(memory.bfloat16().float())
    attn.c_attn = q8
    for got, ref in zip(attn.project_kv(memory), want_kv):
        torch.testing.assert_close(got.float(), ref, atol=0.05, rtol=0.02)
