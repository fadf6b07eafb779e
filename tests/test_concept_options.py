"""The model options behind docs/concepts.md: attention scores, shared layers, residual=False,
norm="none". Each is checked against a computation written out independently here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bardlm import GPT
from bardlm.config import ModelConfig
from bardlm.errors import BardlmError
from bardlm.nn.attention import Attention, explicit_attention
from bardlm.nn.block import Block


def tiny(**kw) -> ModelConfig:  # noqa: ANN003
    base = dict(vocab_size=37, block_size=16, n_layer=3, n_head=4, n_kv_head=2, n_embd=32,
                bias=True, attn_impl="explicit")
    return ModelConfig(**{**base, **kw})


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every parameter (identity-initialised ones too), so nothing is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def reference_scores(kind: str, attn: Attention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """score[b, h, t, s] for one (query, key) pair at a time, from the definitions."""
    B, H, T, D = q.shape
    S = k.shape[2]
    out = torch.empty(B, H, T, S)
    for h in range(H):
        for t in range(T):
            for s in range(S):
                qv, kv = q[:, h, t], k[:, h, s]  # (B, D)
                if kind == "dot_unscaled":
                    out[:, h, t, s] = (qv * kv).sum(-1)
                elif kind == "additive":
                    out[:, h, t, s] = torch.tanh(qv + kv) @ attn.score.score_v[h]
                elif kind == "bilinear":
                    out[:, h, t, s] = ((qv @ attn.score.score_w[h]) * kv).sum(-1) / math.sqrt(D)
                elif kind == "cosine":
                    out[:, h, t, s] = attn.score.score_g[h] * F.cosine_similarity(qv, kv, dim=-1)
    return out


@pytest.mark.parametrize("kind", ["dot_unscaled", "additive", "bilinear", "cosine"])
def test_attention_scores_match_hand_computation(kind: str) -> None:
    cfg = tiny(attn_score=kind, attn_impl="sdpa")  # non-dot scores must fall back to explicit
    attn = Attention(cfg)
    assert attn.impl == "explicit"
    randomise(attn)
    x = torch.randn(2, 5, cfg.n_embd)
    y = attn(x)
    # Reference: project, repeat the KV heads (GQA), score pair by pair, causal softmax, mix V.
    q, k, v = F.linear(x, attn.c_attn.weight, attn.c_attn.bias).split([32, 16, 16], dim=-1)
    q = q.view(2, 5, 4, 8).transpose(1, 2)
    k = k.view(2, 5, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    v = v.view(2, 5, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    scores = reference_scores(kind, attn, q, k)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    ref = F.linear((weights @ v).transpose(1, 2).reshape(2, 5, 32), attn.c_proj.weight, attn.c_proj.bias)
    assert y.shape == ref.shape == (2, 5, 32)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_dot_unscaled_is_sdpa_with_scale_one() -> None:
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 4, 6, 16), torch.randn(2, 4, 6, 16)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    attn = Attention(tiny(attn_score="dot_unscaled", n_kv_head=4))
    ours = explicit_attention(q, k, v, mask, score=attn.score)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0))
    # ... and differs from the scaled one by more than noise: the scale matters at D = 16.
    scaled = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (ours - scaled).abs().max() > 1e-2


def test_bilinear_starts_as_scaled_dot_product() -> None:
    """W_h = I at initialisation, so a fresh bilinear model is numerically the dot model."""
    torch.manual_seed(0)
    dot = GPT(tiny(attn_impl="sdpa"))
    bil = GPT(tiny(attn_score="bilinear"))
    missing, unexpected = bil.load_state_dict(dot.state_dict(), strict=False)
    assert all("score_w" in m for m in missing) and not unexpected
    idx = torch.randint(0, 37, (2, 12))
    torch.testing.assert_close(bil(idx)[0], dot(idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["additive", "cosine", "bilinear"])
def test_scores_work_with_the_kv_cache(kind: str) -> None:
    """Prefill + one-token decode steps give the logits of one full forward pass."""
    model = GPT(tiny(attn_score=kind, pos="rope")).eval()
    randomise(model, 1)
    idx = torch.randint(0, 37, (2, 10))
    full, _ = model(idx)
    cache = model.make_cache(2, 16)
    steps = [model(idx[:, :6], cache=cache)[0]]
    steps += [model(idx[:, t : t + 1], cache=cache, start_pos=t)[0] for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_bad_attn_score_is_one_line_error() -> None:
    with pytest.raises(BardlmError, match="attn_score must be one of .*did you mean 'cosine'"):
        tiny(attn_score="cosin")


def test_share_layers_shares_parameters_and_sums_gradients() -> None:
    torch.manual_seed(0)
    shared = GPT(tiny(share_layers=True))
    separate = GPT(tiny())
    # One block's worth of parameters instead of n_layer.
    block = sum(p.numel() for p in shared.transformer.h[0].parameters())
    assert len(shared.transformer.h) == 1
    assert separate.num_params() - shared.num_params() == 2 * block
    # Copy the shared block into every layer of the separate model: same function...
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("transformer.h.")}
    for i in range(3):
        state.update({f"transformer.h.{i}.{k}": v for k, v in shared.transformer.h[0].state_dict().items()})
    separate.load_state_dict(state)
    idx, tgt = torch.randint(0, 37, (2, 12)), torch.randint(0, 37, (2, 12))
    loss_s, loss_p = shared(idx, tgt)[1], separate(idx, tgt)[1]
    torch.testing.assert_close(loss_s, loss_p)
    # ... and the shared weights' gradient is the sum of the per-layer gradients (chain rule).
    loss_s.backward()
    loss_p.backward()
    for name, p in shared.transformer.h[0].named_parameters():
        summed = sum(separate.transformer.h[i].get_parameter(name).grad for i in range(3))
        torch.testing.assert_close(p.grad, summed, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_residual_false_drops_the_skip_connections(placement: str) -> None:
    cfg = tiny(residual=False, norm_placement=placement, n_kv_head=4)
    block = Block(cfg)
    randomise(block, 2)
    with_skip = Block(tiny(norm_placement=placement, n_kv_head=4))
    with_skip.load_state_dict(block.state_dict())
    x = torch.randn(2, 7, 32)
    attn, mlp, ln_1, ln_2 = block.attn, block.mlp, block.ln_1, block.ln_2
    if placement == "pre":
        ref = mlp(ln_2(attn(ln_1(x))))
        ref_skip = (h := x + attn(ln_1(x))) + mlp(ln_2(h))
    else:
        ref = ln_2(mlp(ln_1(attn(x))))
        ref_skip = ln_2((h := ln_1(x + attn(x))) + mlp(h))
    torch.testing.assert_close(block(x), ref)
    torch.testing.assert_close(with_skip(x), ref_skip)
    assert (ref - ref_skip).abs().max() > 1e-2


def test_norm_none_has_no_norm_parameters_and_is_identity() -> None:
    model = GPT(tiny(norm="none"))
    assert not [n for n, _ in model.named_parameters() if "ln_" in n]
    x = torch.randn(3, 32)
    assert torch.equal(model.transformer.ln_f(x), x)


def test_new_options_round_trip_through_a_checkpoint(tmp_path) -> None:
    from bardlm.io.checkpoint import load_checkpoint, save_checkpoint

    model = GPT(tiny(attn_score="additive", share_layers=True, residual=False, norm="rmsnorm")).eval()
    randomise(model, 3)
    save_checkpoint(tmp_path, model)
    loaded, _, meta = load_checkpoint(tmp_path)
    assert meta["model"]["attn_score"] == "additive" and meta["model"]["share_layers"] is True
    idx = torch.randint(0, 37, (2, 9))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])
