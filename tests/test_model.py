import pytest
import torch

from bardlm import GPT, BardlmError, ModelConfig, preset

GPT2_COUNTS = {
    "gpt2-124m": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", list(GPT2_COUNTS))
def test_gpt2_preset_parameter_counts(name: str) -> None:
    with torch.device("meta"):  # shapes only: never allocate XL
        model = GPT(preset(name))
    assert model.num_params() == GPT2_COUNTS[name]


def test_gpt2_shapes() -> None:
    cfg = preset("gpt2-124m")
    assert (cfg.vocab_size, cfg.block_size, cfg.bias, cfg.tie_embeddings) == (50257, 1024, True, True)


def _small(**kw) -> ModelConfig:
    base = dict(vocab_size=23, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return ModelConfig(**{**base, **kw})


STYLES = {
    "gpt2-learned": {},
    "sinusoidal": dict(pos="sinusoidal"),
    "llama": dict(pos="rope", norm="rmsnorm", ffn="swiglu", n_kv_head=2, bias=False, tie_embeddings=False),
    "qwen3": dict(pos="rope", norm="rmsnorm", ffn="swiglu", n_kv_head=1, head_dim=16, qk_norm=True, bias=False),
    "post-norm-relu": dict(norm_placement="post", ffn="relu"),
    "explicit": dict(attn_impl="explicit"),
}


@pytest.mark.parametrize("style", list(STYLES))
def test_causality(style: str) -> None:
    """Changing the token at position t never changes the logits at positions < t."""
    model = GPT(_small(**STYLES[style])).eval()
    idx = torch.randint(0, 23, (2, 16))
    base, _ = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 23
        logits, _ = model(changed)
        torch.testing.assert_close(logits[:, :t], base[:, :t], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logits[:, t:], base[:, t:])


def test_weight_tying() -> None:
    tied, untied = GPT(_small()), GPT(_small(tie_embeddings=False))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.num_params() - tied.num_params() == 23 * 32


def test_loss_is_cross_entropy_and_ignores_minus_one() -> None:
    model = GPT(_small())
    idx, tgt = torch.randint(0, 23, (2, 8)), torch.randint(0, 23, (2, 8))
    logits, loss = model(idx, tgt)
    assert logits.shape == (2, 8, 23)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.view(-1, 23), tgt.view(-1)))
    tgt[:, :4] = -1
    _, masked = model(idx, tgt)
    torch.testing.assert_close(masked, torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 23), tgt[:, 4:].reshape(-1)))


def test_input_longer_than_context_is_a_clear_error() -> None:
    with pytest.raises(BardlmError, match="context length"):
        GPT(_small())(torch.zeros(1, 17, dtype=torch.long))


def test_initial_loss_is_near_uniform() -> None:
    model = GPT(_small())
    _, loss = model(torch.randint(0, 23, (4, 16)), torch.randint(0, 23, (4, 16)))
    assert abs(loss.item() - torch.log(torch.tensor(23.0)).item()) < 0.3


def test_residual_projection_init_is_scaled() -> None:
    model = GPT(_small(n_layer=8))
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / 4) < 0.002  # 0.02 / sqrt(2 * 8)


@pytest.mark.parametrize("pos", ["rope", "sinusoidal"])
def test_position_tables_stay_fp32_through_to_and_meta(pos: str) -> None:
    """`.to(bf16)` must not cast the position tables (a bf16 RoPE angle at position 1,000 is
    off by ~0.18 rad), and a model built on meta then `to_empty` must hold real tables."""
    cfg = _small(pos=pos, block_size=1024, rope_theta=10000.0)
    ref = GPT(cfg)
    name = "rope_inv_freq" if pos == "rope" else "pos_table"
    want = getattr(ref, name)
    with torch.device("meta"):
        meta = GPT(cfg)
    for model in (GPT(cfg).to(torch.bfloat16), meta.to_empty(device="cpu")):
        got = getattr(model, name)
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        if pos == "rope":  # the angle at position 1,000 of every frequency
            torch.testing.assert_close(1000 * got, 1000 * want, atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(got[1000], want[1000], atol=1e-6, rtol=0)
    assert next(GPT(cfg).to(torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_init_is_gpt2_and_a_function_of_the_seed_alone() -> None:
    """N(0, 0.02) matrices, zero biases, unit gains; each parameter drawn from its own generator
    (the seed taken once from the global RNG, plus its name), so the values do not depend on
    what else the RNG did, and a model materialised from meta gets the same weights."""
    torch.manual_seed(1)
    a = GPT(_small(n_layer=2))
    torch.manual_seed(1)
    with torch.device("meta"):
        b = GPT(_small(n_layer=2))
    b.to_empty(device="cpu")
    b.init_weights()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
        if name.endswith("bias"):
            assert (p == 0).all(), name
        elif "ln" in name:
            assert (p == 1).all(), name
    assert abs(a.transformer.wte.weight.std().item() - 0.02) < 0.002
    c_attn, c_fc = a.transformer.h[0].attn.c_attn.weight, a.transformer.h[0].mlp.c_fc.weight
    assert not torch.equal(c_attn[:32], c_fc[:32])  # different names, different draws


@pytest.mark.parametrize("pos", ["none", "rope", "learned", "sinusoidal"])
def test_one_context_check_with_or_without_the_cache(pos: str) -> None:
    """Only a position table ends at block_size: without one a pass of 20 tokens on a context of
    16 runs, and equals the cached path token by token; with one both paths refuse it."""
    model = GPT(ModelConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16, pos=pos)).eval()
    idx = torch.randint(0, 23, (2, 20), generator=torch.Generator().manual_seed(0))
    cache = model.make_cache(2, 20)
    if pos in ("learned", "sinusoidal"):
        with pytest.raises(BardlmError, match="context length 16"):
            model(idx)
        with pytest.raises(BardlmError, match="context length 16"):
            model(idx, cache=cache)
        return
    full, _ = model(idx)
    steps = [model(idx[:, :12], cache=cache)[0]]
    steps += [model(idx[:, t:t + 1], start_pos=t, cache=cache)[0] for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
