"""KV cache, batched prompts, fast inference layers and greedy parity with transformers."""

from __future__ import annotations

import copy

import pytest
import torch

from bardlm import GPT, BardlmError, ModelConfig
from bardlm.infer.generate import generate, generate_batch
from bardlm.infer.layouts import FastLinear, pack_rows, prepare_for_inference


def _model(**kw) -> GPT:
    base = dict(vocab_size=23, block_size=16, n_layer=2, n_head=4, n_embd=32)
    torch.manual_seed(kw.pop("seed", 0))
    return GPT(ModelConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_cached_equals_uncached_past_the_context(pos: str) -> None:
    model = _model(pos=pos, n_kv_head=2)
    idx = torch.randint(0, 23, (2, 6))
    a = generate(model, idx, 30, temperature=0, use_cache=True)  # 36 > 16 positions
    b = generate(model, idx, 30, temperature=0, use_cache=False)
    assert a.shape == (2, 36) and torch.equal(a, b)


def test_cached_logits_equal_a_full_forward() -> None:
    model = _model(pos="rope")
    idx = torch.randint(0, 23, (1, 12))
    full, _ = model(idx)
    cache = model.make_cache(1, 16)
    model(idx[:, :5], cache=cache)
    steps = [model(idx[:, t : t + 1], start_pos=t, cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 5:], atol=1e-5, rtol=1e-5)


def test_rope_continues_past_block_size_up_to_max_context() -> None:
    model = _model(pos="rope")
    idx = torch.randint(0, 23, (1, 10))
    a = generate(model, idx, 30, temperature=0, max_context=40)
    b = generate(model, idx, 30, temperature=0, max_context=40, use_cache=False)
    assert torch.equal(a, b)
    # positions 16..39 really are used: the whole 40-token sequence in one pass gives the same ids
    logits, _ = model(a[:, :-1])
    assert torch.equal(logits[0, 9:].argmax(-1), a[0, 10:])
    with pytest.raises(BardlmError, match="needs a rope model"):
        generate(_model(pos="learned"), idx, 3, max_context=40)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_batched_prompts_of_different_lengths_equal_single_rows(pos: str) -> None:
    model = _model(pos=pos, n_kv_head=2)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 23, (n,), generator=g).tolist() for n in (3, 11, 7)]
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=10, seed=7),
               dict(temperature=0, repetition_penalty=1.5)):
        for use_cache in (True, False):
            # 12 new tokens: the longest row passes the context of 16, so the window slides
            batch = generate_batch(model, prompts, 12, use_cache=use_cache, **kw)
            for b, p in enumerate(prompts):
                one = dict(kw, seed=kw["seed"] + b) if "seed" in kw else kw
                alone = generate(model, torch.tensor([p]), 12, use_cache=use_cache, **one)
                assert batch[b] == alone[0, len(p):].tolist(), (kw, use_cache, b)


def test_gqa_cache_memory_is_n_kv_head_over_n_head() -> None:
    mha, gqa = _model(n_head=4), _model(n_head=4, n_kv_head=1)
    size = lambda m: sum(c.k.untyped_storage().nbytes() + c.v.untyped_storage().nbytes()  # noqa: E731
                         for c in m.make_cache(2, 16))
    assert size(gqa) / size(mha) == 1 / 4
    assert gqa.make_cache(2, 16)[0].k.shape == (2, 1, 16, 8)


def test_fast_linear_matches_nn_linear() -> None:
    lin = torch.nn.Linear(24, 40)
    fast = FastLinear.from_linear(lin, torch.float32)
    assert fast.weight_t.shape == (24, 40) and fast.weight_t.is_contiguous()
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(fast(x), lin(x), atol=1e-6, rtol=1e-5)


def test_packed_fast_linear_matches_and_gives_each_row_alone_the_batchs_result() -> None:
    """`pack_rows`: inputs of several rows go through oneDNN's kernel on packed weights,
    with nn.Linear's values (to rounding), and a row's result is the same, bit for bit, in a
    batch of 2 or of 16; a single row keeps x @ W^T."""
    lin = torch.nn.Linear(64, 200)
    fast = FastLinear.from_linear(lin, torch.float32)
    if pack_rows(torch.nn.Sequential(fast)) == 0:
        pytest.skip("this PyTorch has no oneDNN")
    assert fast.packed is not None
    x = torch.randn(16, 64)
    y = fast(x)
    torch.testing.assert_close(y, lin(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(fast(x[3:5]), y[3:5]) and torch.equal(fast(x[:9].view(3, 3, 64)).view(9, 200), y[:9])
    assert torch.equal(fast(x[:1]), torch.addmm(fast.bias, x[:1], fast.weight_t))


@pytest.mark.parametrize("style", [dict(pos="learned"), dict(pos="sinusoidal", tie_embeddings=False),
                                   dict(pos="rope", norm="rmsnorm", ffn="swiglu", bias=False)])
def test_prepared_fp32_and_bf16_match_the_training_model(style: dict) -> None:
    model = _model(**style)
    idx = torch.randint(0, 23, (2, 12))
    ref, _ = model(idx)
    fast = prepare_for_inference(copy.deepcopy(model), "fp32")
    assert not any(isinstance(m, torch.nn.Linear) for m in fast.modules())
    torch.testing.assert_close(fast(idx)[0], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(generate(fast, idx, 10, temperature=0), generate(model, idx, 10, temperature=0))
    bf16 = prepare_for_inference(copy.deepcopy(model), "bf16")
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    out = bf16(idx)[0].float()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    with pytest.raises(BardlmError, match="already prepared"):
        prepare_for_inference(bf16, "fp32")
    with pytest.raises(BardlmError, match="fp32, bf16, int8 or int4"):
        prepare_for_inference(model, "fp16")


def _copy_into_hf(model: GPT):  # noqa: ANN202
    """A transformers GPT-2 holding our weights, through the library's own bridge (hf.py)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from bardlm.io.hf import save_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        return AutoModelForCausalLM.from_pretrained(tmp).eval()


def test_greedy_ids_equal_transformers_generate() -> None:
    model = _model(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=64, bias=True)
    hf = _copy_into_hf(model)
    fast = prepare_for_inference(copy.deepcopy(model), "fp32")
    idx = torch.randint(0, 97, (1, 8))
    ours = generate(fast, idx, 40, temperature=0)
    ref = hf.generate(idx, max_new_tokens=40, do_sample=False, use_cache=True,
                      attention_mask=torch.ones_like(idx), pad_token_id=0)
    assert torch.equal(ours, ref)
    torch.testing.assert_close(fast(ours)[0], hf(ours).logits, atol=1e-4, rtol=1e-4)
