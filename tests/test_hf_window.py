"""The sliding-window families against transformers: Mistral, Gemma 2, Gemma 3 (text), SmolLM3,
OLMo 3 (gpt-oss, with its experts, is in test_gpt_oss.py).

Each reference is a transformers model built from a small config with random weights (nothing
is downloaded), window 8: logits on a sequence four windows long, greedy decoding 64 tokens past
the window (our ring-buffer cache against transformers' sliding-window cache), and our export
loaded back by transformers. int8 and LoRA run on Gemma 3 and OLMo 3.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_checks import assert_export_round_trip, assert_same_logits  # noqa: E402

from bardlm import BardlmError  # noqa: E402
from bardlm.io.hf import config_from_hf, family_of, from_pretrained, save_pretrained  # noqa: E402
from bardlm.nn.cache import RingKVCache  # noqa: E402

V, W = 61, 8
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=W)


def mistral() -> torch.nn.Module:
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        **SMALL, num_hidden_layers=2, tie_word_embeddings=False, rope_theta=1000.0))


def gemma2() -> torch.nn.Module:
    # small caps so that tanh bends the logits of random weights
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **SMALL, num_hidden_layers=3, query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
        final_logit_softcapping=8.0, tie_word_embeddings=False,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]))


def gemma3() -> torch.nn.Module:
    rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **SMALL, num_hidden_layers=3, query_pre_attn_scalar=16, rope_parameters=rope,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"]))


def smollm3() -> torch.nn.Module:
    return transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(
        **SMALL, num_hidden_layers=3, no_rope_layers=[1, 0, 1], use_sliding_window=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def olmo3() -> torch.nn.Module:
    # OLMo 2's block with local layers; the global layer's RoPE scaled, the local ones' not
    rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
    return transformers.Olmo3ForCausalLM(transformers.Olmo3Config(
        **SMALL, num_hidden_layers=3, rope_parameters=rope, attention_bias=True,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        pad_token_id=0, eos_token_id=2))


CASES = {"mistral": mistral, "gemma2": gemma2, "gemma3_text": gemma3, "smollm3": smollm3,
         "olmo3": olmo3}


def randomise(model: torch.nn.Module, std: float = 0.08) -> None:
    """Norm gains away from their init (a swapped norm shows), biases away from 0, larger
    weights (varied greedy output instead of one repeated token)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.3)
            elif p.dim() == 2:
                p.normal_(0.0, std)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):  # noqa: ANN001, ANN201
    """(family, HF reference with eager attention, ours loaded from its directory, directory)."""
    torch.manual_seed(3)
    ref = CASES[request.param]()
    # OLMo's output norms add unit-scale sublayer outputs to the embeddings: with small
    # weights greedy decoding repeats one token, so OLMo 3 gets larger ones.
    randomise(ref, 0.3 if request.param == "olmo3" else 0.08)
    ref.config._attn_implementation = "eager"
    ref.eval()
    tmp = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(tmp / "hf")
    return request.param, ref, from_pretrained(tmp / "hf"), tmp


def test_config_is_read_per_layer(pair) -> None:  # noqa: ANN001
    family, _, ours, _ = pair
    cfg = ours.config
    assert family_of(cfg) == family and cfg.sliding_window == W
    want = {"mistral": ["local"] * 2, "gemma2": ["local", "global", "local"],
            "gemma3_text": ["local", "local", "global"], "smollm3": ["local", "global", "local"],
            "olmo3": ["local", "local", "global"]}
    assert cfg.attn_layers == want[family]
    assert cfg.rope_layers == ([True, False, True] if family == "smollm3" else [True] * cfg.n_layer)
    if family == "olmo3":  # OLMo 2's block; the local layers' RoPE has its own unscaled base
        assert (cfg.norm_placement, cfg.qk_norm_scope, cfg.attn_bias) == ("output", "proj", True)
        assert cfg.rope_local_theta == 100.0 and cfg.rope_scaling["rope_type"] == "linear"


def test_logits_match_transformers_over_four_windows(pair) -> None:  # noqa: ANN001
    _, ref, ours, _ = pair
    idx = torch.randint(0, V, (2, 4 * W), generator=torch.Generator().manual_seed(0))
    assert_same_logits(ref, ours, idx)


def test_greedy_with_ring_cache_matches_transformers_past_the_window(pair) -> None:  # noqa: ANN001
    _, ref, ours, _ = pair
    idx = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(1))
    n = W + 64
    ref.generation_config.eos_token_id = None
    want = ref.generate(idx, max_new_tokens=n, do_sample=False, pad_token_id=0,
                        attention_mask=torch.ones_like(idx))
    assert any(isinstance(c, RingKVCache) for c in ours.make_cache(1, 5 + n))
    got = ours.generate(idx, n, temperature=0.0)
    assert torch.equal(got, want)
    assert len(set(got[0, 5:].tolist())) > 5


def test_export_loads_in_transformers_with_equal_logits(pair) -> None:  # noqa: ANN001
    _, ref, ours, tmp = pair
    assert_export_round_trip(ref, ours, tmp / "back", torch.randint(0, V, (1, 3 * W)), same_tensors=False, attn_implementation="eager")


@pytest.mark.parametrize("family", ["gemma3_text", "olmo3"])
def test_int8_and_lora(tmp_path, family) -> None:  # noqa: ANN001
    import copy

    from bardlm.infer.quantize import quantize_model
    from bardlm.nn.lora import apply_lora, merge_lora

    torch.manual_seed(4)
    ref = CASES[family]()
    randomise(ref)
    ref.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    idx = torch.randint(0, V, (2, 3 * W))
    want = model(idx)[0]
    from bardlm.infer.layouts import prepare_for_inference

    fast = prepare_for_inference(copy.deepcopy(model), "fp32")  # what bardlm.load(dtype=...) runs
    torch.testing.assert_close(fast(idx)[0], want, atol=1e-4, rtol=1e-4)
    q = quantize_model(copy.deepcopy(model))
    err = (q(idx)[0].float() - want).abs()
    # bf16 activations alone are 3% off here (transformers' bf16 too), int8 weights add as much
    assert err.mean() < 0.1 * want.abs().mean()
    assert (q(idx)[0].argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    assert q.generate(idx[:1, :4], 2 * W, temperature=0.0).shape == (1, 4 + 2 * W)
    adapted = apply_lora(model, rank=2, alpha=4.0)
    assert any(n.endswith("attn.c_attn") for n in adapted)
    model.train()
    _, loss = model(idx, idx)
    loss.backward()
    assert model.transformer.h[0].attn.c_attn.lora_B.grad is not None
    model.eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
        before = model(idx)[0]
        torch.testing.assert_close(merge_lora(model)(idx)[0], before, atol=1e-4, rtol=1e-4)


def test_config_json_edge_cases() -> None:
    # an explicit null window is full attention, not Mistral's default of 4096
    assert config_from_hf({"model_type": "mistral", "sliding_window": None}).attn_layers == ["global"] * 32
    assert config_from_hf({"model_type": "mistral"}).sliding_window == 4096
    # OLMo 3 with transformers' defaults: three local layers of every four, one RoPE base
    olmo3 = config_from_hf({"model_type": "olmo3", "num_hidden_layers": 4})
    assert olmo3.attn_layers == ["local"] * 3 + ["global"] and olmo3.sliding_window == 4096
    assert olmo3.rope_theta == olmo3.rope_local_theta == 500000.0
    # Gemma 3 from a transformers 4 config.json: rope_local_base_freq and a layer pattern
    old = config_from_hf({"model_type": "gemma3_text", "num_hidden_layers": 6,
                          "rope_local_base_freq": 10000.0, "rope_theta": 1e6,
                          "sliding_window_pattern": 6, "final_logit_softcapping": None})
    assert old.attn_layers == ["local"] * 5 + ["global"] and old.rope_local_theta == 10000.0
    assert old.rope_theta == 1e6 and old.logit_softcap is None
    with pytest.raises(BardlmError, match="GeGLU"):
        config_from_hf({"model_type": "gemma2", "hidden_activation": "silu"})
    with pytest.raises(BardlmError, match="sliding-window attention is not supported for qwen3"):
        config_from_hf({"model_type": "qwen3", "use_sliding_window": True})


def test_export_refuses_what_the_family_cannot_express() -> None:
    from bardlm import GPT, preset

    assert family_of(preset("gemma3-tiny")) == family_of(preset("gemma-3-1b")) == "gemma3_text"
    for change, message in [(dict(sliding_window=8, qk_norm=True), "Mistral, SmolLM3 or Gemma"),
                            (dict(attn_softcap=5.0), "attn_softcap"),
                            (dict(embed_scale=True), "Gemma 2/3"),
                            (dict(attn_sinks=True), "attn_sinks"),
                            # OLMo 3's local layers never scale RoPE: ours would here
                            (dict(sliding_window=8, qk_norm=True, qk_norm_scope="proj",
                                  norm_placement="output", rope_scaling={"rope_type": "linear", "factor": 2.0}),
                             "OLMo 3 needs rope_local_theta")]:
        with pytest.raises(BardlmError, match=message):
            save_pretrained(GPT(preset("llama-tiny", **change)), "/nonexistent/never-written")
    # GGUF: not for these families yet, in one line (not a KeyError)
    from bardlm.io.gguf import check_exportable

    # Mistral is llama.cpp's granite_swa; its Gemma 2 always soft-caps (test_gguf.py runs both)
    assert check_exportable(preset("llama-tiny", sliding_window=8)) == "mistral"
    gemma2 = preset("gemma3-tiny", qk_norm=False, rope_local_theta=None, attn_layers=["local", "global"] * 2)
    with pytest.raises(BardlmError, match=r"llama.cpp's Gemma 2 cannot run this model \(no soft-caps"):
        check_exportable(gemma2)
    capped = gemma2.replace(attn_softcap=50.0, logit_softcap=30.0)
    assert check_exportable(capped) == "gemma2"
    for change, words in [(dict(tie_embeddings=False), "an untied output layer"),
                          (dict(attn_scale_dim=24.0), "attn_scale_dim other than 32"),
                          # 46 layers is Gemma 2 27B to llama.cpp: queries scaled by n_embd / n_head
                          (dict(n_layer=46, head_dim=16, attn_layers=["local", "global"] * 23),
                           "attn_scale_dim other than 32")]:
        with pytest.raises(BardlmError, match=f"llama.cpp's Gemma 2 cannot run this model \\({words}"):
            check_exportable(capped.replace(**change))
    assert check_exportable(capped.replace(n_layer=46, head_dim=16, attn_layers=["local", "global"] * 23,
                                           attn_scale_dim=32.0)) == "gemma2"
    # Gemma 3 is, in llama.cpp's fixed layout only (test_gguf.py runs it in llama.cpp)
    assert check_exportable(preset("gemma-3-1b")) == "gemma3_text"
    for change in (dict(), dict(n_layer=6, attn_layers=["local"] * 5 + ["global"], attn_scale_dim=24.0)):
        with pytest.raises(BardlmError, match=r"llama.cpp's Gemma 3 cannot run this model \((attn_layers|attn_scale_dim)"):
            check_exportable(preset("gemma3-tiny", **change))
    # OLMo 3 too (3 local : 1 global), with one RoPE base for both kinds
    olmo3 = dict(n_layer=4, sliding_window=8, attn_layers=["local"] * 3 + ["global"], qk_norm=True,
                 qk_norm_scope="proj", norm_placement="output")
    assert check_exportable(preset("llama-tiny", **olmo3, rope_local_theta=10000.0)) == "olmo3"
    with pytest.raises(BardlmError, match="llama.cpp's OLMo 3 cannot run this model \\(rope_local_theta"):
        check_exportable(preset("llama-tiny", **olmo3, rope_local_theta=100.0))


@pytest.mark.parametrize("extra", [{}, {"beta_fast": 16, "beta_slow": 2, "attention_factor": 1.3},
                                   {"mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False}])
def test_yarn_matches_transformers(tmp_path, extra) -> None:  # noqa: ANN001
    """YaRN RoPE: frequencies and the cos/sin factor against transformers' own function, and a
    Llama with YaRN read past its original context gives transformers' logits."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from bardlm.nn.position import rope_attention_factor, rope_inv_freq

    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
            "rope_theta": 10000.0, **extra}
    hf_cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      rope_parameters=dict(rope))
    want_inv, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    torch.testing.assert_close(rope_inv_freq(16, 10000.0, scaling), want_inv, atol=1e-7, rtol=1e-6)
    assert rope_attention_factor(scaling) == pytest.approx(want_factor)
    assert want_factor != 1.0
    torch.manual_seed(5)
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    randomise(ref)
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    idx = torch.randint(0, V, (1, 48))  # three times the original context
    with torch.no_grad():
        assert (ours(idx)[0] - ref(idx).logits).abs().max().item() < 1e-4
