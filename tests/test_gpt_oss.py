"""gpt-oss against `transformers`' GptOss: a random-weight model built from a small config (nothing
is downloaded), window 8, with every gpt-oss piece away from its initial value (biases, sinks,
router bias) and expert weights large enough that the SwiGLU clamps bite. Logits on a sequence
four windows long, greedy decoding 64 tokens past the window with our ring-buffer cache, our
export loaded back by transformers with the same tensors, the training loss with the router's
auxiliary loss, int8, LoRA, and the `gpt-oss-tiny` preset."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_checks import assert_export_round_trip, assert_same_logits  # noqa: E402
from transformers import GptOssConfig, GptOssForCausalLM  # noqa: E402

import bardlm  # noqa: E402
from bardlm import GPT, BardlmError, preset  # noqa: E402
from bardlm.cli import main  # noqa: E402
from bardlm.infer.quantize import Int8Linear  # noqa: E402
from bardlm.io.hf import config_from_hf, family_of, from_pretrained  # noqa: E402
from bardlm.nn.cache import RingKVCache  # noqa: E402
from bardlm.nn.feedforward import clamped_swiglu  # noqa: E402
from bardlm.tokenizers import CharTokenizer  # noqa: E402

V, W, LIMIT = 61, 8, 7.0
YARN = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        "original_max_position_embeddings": 16, "rope_theta": 1000.0}


def gpt_oss(vocab: int = V, **changes) -> GptOssForCausalLM:  # noqa: ANN003
    """Two layers (sliding, full), GQA 4/2, 4 experts top 2, YaRN; eager attention (sinks)."""
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
               num_experts_per_tok=2, max_position_embeddings=256, sliding_window=W,
               swiglu_limit=LIMIT, rope_parameters=dict(YARN), pad_token_id=0, eos_token_id=2)
    model = GptOssForCausalLM(GptOssConfig(**{**cfg, **changes}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(("bias", "sinks")):  # all start at 0 in transformers
                p.normal_(0.0, 0.5)
            elif "router" in name:
                p.normal_(0.0, 1.0)  # tokens spread over every expert
            elif "experts" in name:
                p.normal_(0.0, 0.6)  # gate/up values past the limit: the clamps bite
            else:
                p.normal_(0.0, 0.15)
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):  # noqa: ANN001, ANN201
    """(HF reference, ours loaded from its save_pretrained directory, a scratch directory)."""
    torch.manual_seed(7)
    ref = gpt_oss()
    tmp = tmp_path_factory.mktemp("gpt_oss")
    ref.save_pretrained(tmp / "hf")
    return ref, from_pretrained(tmp / "hf"), tmp


def test_config_is_read_as_gpt_oss(pair) -> None:  # noqa: ANN001
    _, ours, _ = pair
    cfg = ours.config
    assert family_of(cfg) == "gpt_oss"
    assert (cfg.attn_layers, cfg.sliding_window) == (["local", "global"], W)
    assert (cfg.ffn, cfg.swiglu_alpha, cfg.swiglu_limit) == ("swiglu_clamped", 1.702, LIMIT)
    assert cfg.attn_sinks and cfg.router_bias and cfg.router_renorm and cfg.bias and cfg.qkv_bias
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.ffn_layers == ["moe", "moe"]
    assert (cfg.n_expert, cfg.n_expert_active, cfg.expert_hidden) == (4, 2, 32)


def test_clamped_swiglu_equals_transformers_gate() -> None:
    """Our gated unit on split (gate, up) equals GptOssExperts' on the interleaved layout, and
    the clamps and the + 1 matter on these values."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    experts = GptOssExperts(GptOssConfig(hidden_size=8, intermediate_size=8, num_local_experts=1))
    gate_up = torch.randn(5, 16) * 10
    want = experts._apply_gate(gate_up)
    gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    got = clamped_swiglu(gate, up, 1.702, 7.0)
    torch.testing.assert_close(got, want)
    plain = up * gate * torch.sigmoid(1.702 * gate)
    assert (plain - want).abs().max() > 1.0


def test_logits_match_transformers_over_four_windows(pair) -> None:  # noqa: ANN001
    ref, ours, _ = pair
    idx = torch.randint(0, V, (2, 4 * W), generator=torch.Generator().manual_seed(0))
    assert_same_logits(ref, ours, idx)
    # The clamps are reached: a model without them (limit far away) gives other logits.
    loose = GPT(ours.config.replace(swiglu_limit=1e4)).eval()
    loose.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (loose(idx)[0] - ours(idx)[0]).abs().max().item() > 1e-2


def test_greedy_with_ring_cache_matches_transformers_past_the_window(pair) -> None:  # noqa: ANN001
    ref, ours, _ = pair
    idx = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    n = W + 64
    ref.generation_config.eos_token_id = None
    want = ref.generate(idx, max_new_tokens=n, do_sample=False, pad_token_id=0,
                        attention_mask=torch.ones_like(idx))
    assert any(isinstance(c, RingKVCache) for c in ours.make_cache(2, 5 + n))
    got = ours.generate(idx, n, temperature=0.0)
    assert torch.equal(got, want)
    assert len(set(got[0, 5:].tolist())) > 5


def test_export_loads_in_transformers_with_equal_tensors_and_logits(pair) -> None:  # noqa: ANN001
    ref, ours, tmp = pair
    assert_export_round_trip(ref, ours, tmp / "back", torch.randint(0, V, (1, 3 * W)))


def test_training_loss_equals_transformers_with_router_aux_loss(tmp_path) -> None:  # noqa: ANN001
    """Cross-entropy + coef * load-balancing loss over the router logits (bias included)."""
    torch.manual_seed(8)
    ref = gpt_oss(router_aux_loss_coef=0.3, output_router_logits=True)
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).train()
    ref.train()
    idx = torch.randint(0, V, (2, 12))
    out = ref(idx, labels=idx)
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -1)], dim=1)  # HF shifts labels itself
    _, loss = ours(idx, targets)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)
    assert out.aux_loss * 0.3 > 1e-3  # the aux term is in both


def test_import_refusals_and_defaults() -> None:
    hf = gpt_oss().config.to_dict()
    quantized = {**hf, "quantization_config": {"quant_method": "mxfp4"}}
    with pytest.raises(BardlmError, match="quantized gpt-oss weights \\(mxfp4\\) are not supported") as err:
        config_from_hf(quantized)
    assert "\n" not in str(err.value)
    # A config.json with only the architecture: transformers' defaults (gpt-oss's YaRN, every
    # other layer local, 128-key windows).
    cfg = config_from_hf({"model_type": "gpt_oss", "num_hidden_layers": 4})
    assert cfg.attn_layers == ["local", "global"] * 2 and cfg.sliding_window == 128
    assert cfg.rope_theta == 150000.0 and cfg.rope_scaling["factor"] == 32.0
    # An older config.json: rope_scaling and rope_theta at the top level.
    old = config_from_hf({"model_type": "gpt_oss", "rope_theta": 5e4, "rope_scaling": {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512}})
    assert old.rope_theta == 5e4 and old.rope_scaling["factor"] == 8.0


def test_export_refuses_half_a_gpt_oss() -> None:
    oss = preset("gpt-oss-tiny")
    assert family_of(oss) == "gpt_oss"
    for change, message in [(dict(router_bias=False), "router_bias=false"),
                            (dict(ffn="swiglu"), "ffn=swiglu"),
                            (dict(ffn_layers=["dense", "moe", "moe", "moe"]), "dense FFN layers"),
                            (dict(qk_norm=True), "qk_norm=true")]:
        with pytest.raises(BardlmError, match=message):
            family_of(oss.replace(**change))
    with pytest.raises(BardlmError, match="attn_sinks"):
        family_of(preset("llama-tiny", attn_sinks=True))
    from bardlm.io.gguf import check_exportable

    # GGUF (test_gguf.py runs it in llama.cpp), in llama.cpp's layout only
    assert check_exportable(oss) == "gpt_oss"
    for change, message in [(dict(attn_layers=["global", "local"] * 2), "attn_layers other than"),
                            (dict(swiglu_limit=5.0), "swiglu_alpha/swiglu_limit")]:
        with pytest.raises(BardlmError, match=f"llama.cpp's gpt-oss cannot run .*{message}"):
            check_exportable(oss.replace(**change))


def test_int8_and_lora_finetune_from_the_cli(tmp_path, capsys) -> None:  # noqa: ANN001
    """`--dtype int8` quantizes the experts (biases kept) but not the router; `finetune
    --lora-rank` trains adapters on a gpt-oss directory and the adapter loads."""
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,;:!?<>|/ABCDEFGHIJKLMNOPQRSTUVWXYZ\n")
    torch.manual_seed(9)
    gpt_oss(vocab=tok.vocab_size).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "bardlm_tokenizer.json").write_text(json.dumps(tok.to_dict()))
    fp32, _ = bardlm.load(tmp_path / "hf")
    q, _ = bardlm.load(tmp_path / "hf", dtype="int8")
    moe = q.transformer.h[0].mlp
    assert type(moe.router) is torch.nn.Linear and moe.router.bias is not None
    assert isinstance(moe.experts[0].c_fc, Int8Linear) and moe.experts[0].c_fc.bias is not None
    idx = torch.randint(0, tok.vocab_size, (1, 3 * W))
    with torch.no_grad():
        want, got = fp32(idx)[0], q(idx)[0].float()
    assert (got - want).abs().mean() < 0.1 * want.abs().mean()
    assert main(["generate", "--ckpt", str(tmp_path / "hf"), "--dtype", "int8", "--prompt", "to be",
                 "--max-new-tokens", "12", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("to be")
    chat = tmp_path / "chat.jsonl"
    turn = [{"role": "user", "content": "soft"}, {"role": "assistant", "content": "light"}]
    chat.write_text("".join(json.dumps({"messages": turn}) + "\n" for _ in range(8)))
    out = tmp_path / "adapter"
    assert main(["finetune", "--init-from", str(tmp_path / "hf"), "--data", str(chat), "--out", str(out),
                 "--max-iters", "2", "--set", "batch_size=2", "--lora-rank", "2", "--no-progress"]) == 0
    tuned, _ = bardlm.load(out)
    with torch.no_grad():
        assert tuned(idx)[0].shape == want.shape


def test_gpt_oss_tiny_trains_and_exports(tmp_path) -> None:  # noqa: ANN001
    """Two steps of the preset lower nothing in particular but run the whole path: sinks,
    windows, clamped experts, router bias and aux losses under backward; the run exports."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question.\n" * 200)
    out = tmp_path / "run"
    assert main(["train", "--preset", "gpt-oss-tiny", "--data", str(corpus), "--out", str(out),
                 "--max-iters", "2", "--set", "batch_size=2", "--set", "eval_batches=1",
                 "--no-progress"]) == 0
    model, _ = bardlm.load(out)
    assert model.transformer.h[0].mlp.router.bias.abs().sum() > 0  # trained from zero
    assert main(["export", "--ckpt", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        assert (again(idx).logits - model(idx)[0]).abs().max().item() < 1e-4


def test_server_batches_gpt_oss_as_generate_does() -> None:
    """The continuous-batching engine (chunked prefills into ring caches, experts grouped over the
    batch) gives each request the text `generate` gives it alone."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import string

    from bardlm.infer.generate import generate_text
    from bardlm.serve import Engine, Job

    tok = CharTokenizer(sorted(set(string.ascii_letters + " .,")))
    torch.manual_seed(10)
    model = GPT(preset("gpt-oss-tiny", vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")) or "router" in name:
                p.normal_(0.0, 0.5)
            elif p.dim() == 2:  # varied greedy text, not one repeated character
                p.normal_(0.0, 0.3)
    text = "But soft what light through yonder window breaks"
    prompts = [(text[:3], 30), (text[:30], 20), (text[:11], 40), (text[5:9], 25)]
    engine = Engine(model, tok, max_queue=4, max_batch=3, prefill_chunk=12)
    try:
        with engine._lock:
            jobs = [Job(p, n, sampling={"temperature": 0.0}) for p, n in prompts]
            futures = [engine.try_submit(j) for j in jobs]
        for f in futures:
            f.result(120)
    finally:
        engine.shutdown()
    assert [j.text for j in jobs] == [generate_text(model, tok, p, n, temperature=0)
                                      for p, n in prompts]
    assert len(set(jobs[2].text)) > 5  # not one repeated character
