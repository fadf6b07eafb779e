"""Fast dropout (dropout.py) against its definition and against F.dropout's contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bardlm import GPT, ModelConfig
from bardlm.errors import BardlmError
from bardlm.nn.attention import Attention, explicit_attention
from bardlm.nn.dropout import LEVELS, Dropout, dropout, keep_mask


def test_mask_is_the_16_bit_slices_of_the_drawn_words() -> None:
    """Rebuild the mask with numpy from the same 64-bit draws: 4 little-endian int16 per word."""
    n, p = 1_001, 0.3  # n not a multiple of 4: the last word is only partly used
    torch.manual_seed(5)
    keep, p_exact = keep_mask((7, 11, 13), p)
    torch.manual_seed(5)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None).numpy()
    s16 = words.view(np.int16)[:n].astype(np.int64)  # the same bytes, little-endian int16
    threshold = round(p * LEVELS)
    np.testing.assert_array_equal(keep.flatten().numpy(), s16 + 32768 >= threshold)
    assert p_exact == threshold / LEVELS and abs(p_exact - p) <= 0.5 / LEVELS


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_drop_rate_unbiased_and_independent(p: float) -> None:
    torch.manual_seed(0)
    n = 1 << 22
    x = torch.full((n,), 3.0)
    y = dropout(x, p)
    dropped = (y == 0).double()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.mean().item() - p) < 5 * sigma  # the rate
    assert abs(y.mean().item() - 3.0) < 3.0 * 5 * sigma / (1 - p)  # unbiased: E[y] = x
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 3.0 / (1 - round(p * LEVELS) / LEVELS)))
    # Neighbours (same 64-bit word, and across words) are dropped independently: P(both) = p^2.
    for lag in (1, 2, 3, 4, 5):
        both = (dropped[:-lag] * dropped[lag:]).mean().item()
        assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)


def test_matches_f_dropout_contract() -> None:
    x = torch.randn(4, 8, 16)
    assert dropout(x, 0.2, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    torch.manual_seed(1)
    ref = F.dropout(x, 0.2, training=True)
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.2, fast=False), ref)
    for bad in (-0.1, 1.5):
        with pytest.raises(BardlmError, match="must be in"):
            dropout(x, bad)


def test_gradient_is_the_same_mask() -> None:
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.25)
    g = torch.randn_like(y)
    y.backward(g)
    scale = y.detach() / x.detach()  # 0 where dropped, 1 / (1 - p') where kept
    torch.testing.assert_close(x.grad, g * scale)


def test_module_follows_train_and_eval() -> None:
    m = Dropout(0.5)
    x = torch.ones(1000)
    assert (m(x) == 0).any()
    m.eval()
    assert torch.equal(m(x), x)
    assert isinstance(m, torch.nn.Dropout) and "fast=True" in repr(m)


def test_attention_dropout_masks_the_softmax_weights() -> None:
    """explicit_attention with fast dropout = (softmax(QK^T/sqrt(d)) * mask / (1 - p')) V."""
    B, H, T, D, p = 2, 3, 9, 8, 0.2
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    torch.manual_seed(7)
    out = explicit_attention(q, k, v, causal, p, fast_dropout=True)
    torch.manual_seed(7)
    keep, p_exact = keep_mask((B, H, T, T), p)
    att = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~causal, -math.inf), -1)
    torch.testing.assert_close(out, (att * keep / (1 - p_exact)) @ v)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_attention_module_with_fast_dropout_is_causal_and_uses_the_formula(n_kv_head: int) -> None:
    """An SDPA-configured Attention, training on CPU, takes the written-out path with our mask:
    it equals explicit_attention on its own q, k, v with the same draws, and stays causal."""
    cfg = ModelConfig(vocab_size=11, block_size=16, n_layer=1, n_head=4, n_kv_head=n_kv_head,
                      n_embd=32, dropout=0.3)
    attn = Attention(cfg).train()
    attn.resid_dropout.p = 0.0  # isolate the attention-weight mask
    B, T, H, D = 2, 10, 4, 8
    x = torch.randn(B, T, 32)
    torch.manual_seed(3)
    y = attn(x)
    q, k, v = attn.c_attn(x).split([H * D, n_kv_head * D, n_kv_head * D], dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, n_kv_head, D).transpose(1, 2)
    v = v.view(B, T, n_kv_head, D).transpose(1, 2)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    torch.manual_seed(3)
    ref = explicit_attention(q, k, v, causal, 0.3, fast_dropout=True)
    torch.testing.assert_close(y, attn.c_proj(ref.transpose(1, 2).reshape(B, T, H * D)))
    x2 = x.clone()
    x2[:, -1] += 1.0  # a change at the last position must not reach earlier ones
    torch.manual_seed(3)
    torch.testing.assert_close(attn(x2)[:, :-1], y[:, :-1])


def test_model_trains_with_either_dropout_and_evaluates_the_same() -> None:
    cfg = dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.2)
    torch.manual_seed(0)
    fast = GPT(ModelConfig(**cfg))
    slow = GPT(ModelConfig(**cfg, fast_dropout=False))
    slow.load_state_dict(fast.state_dict())
    idx = torch.randint(0, 32, (4, 16))
    fast.eval(), slow.eval()
    torch.testing.assert_close(fast(idx, idx)[1], slow(idx, idx)[1])
    fast.train(), slow.train()
    losses = [m(idx, idx)[1] for m in (fast, slow)]
    assert all(torch.isfinite(loss) for loss in losses)
    assert not torch.allclose(*losses)  # different masks, both live
    losses[0].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters())


# p' = round(p * 65536) / 65536 is 1 for p within 2**-17 of 1: there is no 1 / (1 - p') to scale by.
@pytest.mark.parametrize("p", [1.0, 1.0 - 5e-6, 1.0 - 2**-18])
@pytest.mark.parametrize("fast", [True, False])
def test_drop_everything_gives_zeros_like_f_dropout(p: float, fast: bool) -> None:
    x = torch.randn(4, 33, requires_grad=True)
    y = dropout(x, p, fast=fast)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()  # still in the graph, with a zero gradient (as F.dropout(x, 1))
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(Dropout(p, fast)(x), torch.zeros_like(x))


@pytest.mark.parametrize("fast", [True, False])
def test_attention_dropout_of_everything_gives_zeros(fast: bool) -> None:
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    y = explicit_attention(q, k, v, None, 1.0 - 5e-6, fast_dropout=fast)
    assert torch.equal(y, torch.zeros_like(y))
