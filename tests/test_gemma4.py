"""Gemma 4 (text) against `transformers`: random-weight `Gemma4ForCausalLM` models built from small
configs (nothing is downloaded), with per-layer inputs, KV sharing, K = V on global layers, wider
global heads with proportional partial RoPE, the double-wide MLP and (in one case) the MoE block
beside the MLP. Each loads into bardlm with equal fp32 logits over three sliding windows and more,
greedy decoding with our cache (which holds only the unshared layers) gives transformers' 64 ids,
our HF export loads back in transformers with the same tensors and logits, and int8 runs."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_checks import assert_export_round_trip, assert_same_greedy, assert_same_logits  # noqa: E402
from transformers import Gemma4ForCausalLM, Gemma4TextConfig  # noqa: E402

import bardlm  # noqa: E402
from bardlm import BardlmError, ModelConfig  # noqa: E402
from bardlm.config import preset  # noqa: E402
from bardlm.infer.budget import kv_bytes_per_sequence, kv_bytes_per_token  # noqa: E402
from bardlm.infer.quantize import Int8Linear  # noqa: E402
from bardlm.io.gguf import check_exportable  # noqa: E402
from bardlm.io.hf import config_from_hf, from_pretrained, save_pretrained  # noqa: E402
from bardlm.nn.cache import RingKVCache  # noqa: E402
from bardlm.nn.model import GPT  # noqa: E402

V, WINDOW = 97, 8
# 6 layers: local, global, local, global (the KV sources), then 2 KV-shared (local, global).
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
             max_position_embeddings=256, sliding_window=WINDOW,
             layer_types=["sliding_attention", "full_attention"] * 3,
             hidden_size_per_layer_input=8, vocab_size_per_layer_input=V,
             num_kv_shared_layers=2, attention_k_eq_v=True, num_global_key_value_heads=1,
             use_double_wide_mlp=True, final_logit_softcapping=30.0,
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "proportional",
                                                 "partial_rotary_factor": 0.25, "rope_theta": 1e6}},
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)


def gemma4(**overrides) -> Gemma4ForCausalLM:  # noqa: ANN003
    return Gemma4ForCausalLM(Gemma4TextConfig(**{**SMALL, **overrides}))


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Norm gains, layer scalars and router scales away from 1 (transformers starts them there: a
    dropped or swapped one would not show), N(0, 1) routers so tokens spread over the experts."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.proj.weight"):
                p.normal_(0.0, 1.0)
            elif "norm" in name or name.endswith(("router.scale", "per_expert_scale")):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))
    return model.eval()


CASES = {"dense": {}, "moe": MOE}


@pytest.fixture(params=list(CASES), scope="module")
def pair(request, tmp_path_factory):  # noqa: ANN001, ANN201
    """(HF reference model, ours loaded from its save_pretrained directory, a scratch dir)."""
    torch.manual_seed(sum(map(ord, request.param)))
    ref = randomise(gemma4(**CASES[request.param]))
    tmp = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(tmp / "hf")
    return ref, from_pretrained(tmp / "hf"), tmp


def test_config_has_every_gemma4_trait(pair) -> None:  # noqa: ANN001
    """The parity tests below are only meaningful if each feature is on in the loaded model."""
    _, ours, _ = pair
    cfg = ours.config
    assert (cfg.kv_shared_layers, cfg.attn_k_eq_v, cfg.per_layer_input_dim) == (2, True, 8)
    assert (cfg.global_head_dim, cfg.global_n_kv_head, cfg.head_dim) == (32, 1, 16)
    assert cfg.rope_scaling == {"rope_type": "proportional", "partial_rotary_factor": 0.25}
    assert [cfg.kv_source(i) for i in range(6)] == [0, 1, 2, 3, 2, 3]
    assert [cfg.layer_ffn_hidden(i) for i in range(6)] == [96] * 4 + [192] * 2
    attn = ours.transformer.h[5].attn
    assert attn.kv_shared and attn.c_attn.out_features == 4 * 32  # queries only
    assert ours.transformer.h[1].attn.c_attn.out_features == 4 * 32 + 32  # q and k, no v


def test_logits_match_transformers_over_three_windows(pair) -> None:  # noqa: ANN001
    ref, ours, _ = pair
    idx = torch.randint(0, V, (2, 4 * WINDOW + 3))
    assert_same_logits(ref, ours, idx)


def test_greedy_64_tokens_match_transformers(pair) -> None:  # noqa: ANN001
    ref, ours, _ = pair
    idx = torch.randint(0, V, (2, 5))
    want = assert_same_greedy(ref, ours, idx)
    # One row alone: a MoE layer then decodes its single token without grouping (`_one_token`).
    assert torch.equal(ours.generate(idx[:1], 64, temperature=0.0), want[:1])


def test_export_loads_in_transformers_with_equal_logits(pair) -> None:  # noqa: ANN001
    ref, ours, tmp = pair
    assert_export_round_trip(ref, ours, tmp / "back", torch.randint(0, V, (2, 3 * WINDOW)))


def test_int8_runs_close_to_fp32(pair) -> None:  # noqa: ANN001
    _, ours, tmp = pair
    q, _ = bardlm.load(tmp / "hf", dtype="int8")
    assert isinstance(q.transformer.h[5].attn.c_attn, Int8Linear)
    idx = torch.randint(0, V, (1, 3 * WINDOW))
    with torch.no_grad():
        want, got = ours(idx)[0].flatten(), q(idx)[0].float().flatten()
    # bf16 activations alone move these small random logits by ~10% of their range (and flip
    # a few near-tied routing choices), as they move transformers' own bf16 run: so the check
    # is their direction, which unrelated logits (a wrong int8 weight) would not keep.
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.9
    assert q.generate(idx[:, :4], 8, temperature=0.0).shape == (1, 12)


def test_cache_holds_only_the_unshared_layers() -> None:
    """KV-shared layers own no cache; global layers hold global_n_kv_head x global_head_dim."""
    cfg = config_from_hf(Gemma4TextConfig(**SMALL).to_dict())
    model = GPT(cfg)
    cache = model.make_cache(1, 64)
    assert len(cache) == 4  # 6 layers, the last 2 shared
    assert [isinstance(c, RingKVCache) for c in cache] == [True, False, True, False]
    assert [tuple(c.k.shape[1::2]) for c in cache] == [(2, 16), (1, 32)] * 2
    assert kv_bytes_per_sequence(cfg, 64, 4) == sum(c.nbytes() for c in cache)
    assert kv_bytes_per_token(cfg, 4) == 2 * 4 * (2 * 2 * 16 + 2 * 1 * 32)


def test_gguf_export_checks() -> None:
    """Both models export to GGUF (llama.cpp's gemma4: tests/test_gguf_2026.py); KV-shared layers
    reading other layers than llama.cpp's are refused in one line."""
    for moe in ({}, MOE):
        assert check_exportable(config_from_hf(Gemma4TextConfig(**SMALL, **moe).to_dict())) == "gemma4_text"
    cfg = config_from_hf(Gemma4TextConfig(**{**SMALL, "num_kv_shared_layers": 3}).to_dict())
    with pytest.raises(BardlmError, match="no GGUF export: llama.cpp's Gemma 4.*KV-shared layers") as err:
        check_exportable(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("changes, message", [
    (dict(kv_shared_layers=6), "kv_shared_layers must be in"),
    (dict(kv_shared_layers=1, attn_layers=["local"] * 5 + ["global"], sliding_window=4),
     "KV-shared layers have global attention"),
    (dict(ffn_layers=["dense+moe"] * 6, n_expert=2, ffn="swiglu"), "norm_placement=sandwich"),
    (dict(double_wide_mlp=True), "double_wide_mlp widens a gated MLP"),
])
def test_config_refusals(changes, message) -> None:  # noqa: ANN001
    with pytest.raises(BardlmError, match=message) as err:
        ModelConfig(n_layer=6, n_head=4, n_embd=64, **changes)
    assert "\n" not in str(err.value)


def test_other_families_refuse_gemma4_options() -> None:
    cfg = preset("gemma3-tiny", v_norm=True)
    with pytest.raises(BardlmError, match="v_norm=true need Gemma 4"):
        save_pretrained(GPT(cfg), "/nonexistent")
    for change, message in [(dict(layer_scalar=False), "layer_scalar=false"),
                            (dict(attn_layers=["local", "local", "global", "local", "global", "local"]),
                             "a last layer that is not global"),
                            (dict(attn_k_eq_v=False), "without attn_k_eq_v")]:
        with pytest.raises(BardlmError, match=message):
            save_pretrained(GPT(preset("gemma4-tiny", **change)), "/nonexistent")


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters={**SMALL["rope_parameters"], "full_attention": {
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0}}), "global-layer RoPE type 'yarn'"),
    (dict(per_layer_config={"0": {"head_dim": 32}}), "per_layer_config must give every"),
    (dict(use_bidirectional_attention="all"), "use_bidirectional_attention is not supported"),
])
def test_hf_config_refusals(changes, message) -> None:  # noqa: ANN001
    hf = {**Gemma4TextConfig(**SMALL).to_dict(), **changes}
    with pytest.raises(BardlmError, match=message) as err:
        config_from_hf(hf)
    assert "\n" not in str(err.value)


def test_gemma4_tiny_trains_and_info_counts_the_shared_layers(tmp_path, capsys) -> None:  # noqa: ANN001
    """`bardlm train --preset gemma4-tiny` runs (the loss falls, the checkpoint generates with
    a cache of 4 layers for 6), and `bardlm info` prints the cache that `make_cache` allocates."""
    import json

    from bardlm.cli import main
    from bardlm.io.checkpoint import load_checkpoint

    corpus = tmp_path / "romeo.txt"
    corpus.write_text("But soft, what light through yonder window breaks? It is the east, "
                      "and Juliet is the sun. Arise, fair sun, and kill the envious moon.\n" * 40)
    out = tmp_path / "g4"
    assert main(["train", "--preset", "gemma4-tiny", "--data", str(corpus), "--out", str(out),
                 "--max-iters", "8", "--set", "eval_interval=4", "--set", "eval_batches=1",
                 "--set", "batch_size=4", "--set", "lr=0.003", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert losses[-1] < losses[0]
    model, _, _ = load_checkpoint(out)
    cache = model.make_cache(1, 64)
    assert len(cache) == 4 and model.config.n_layer == 6
    assert model.generate(torch.tensor([[1, 2, 3]]), 30, temperature=0).shape == (1, 33)
    capsys.readouterr()
    assert main(["info", "--preset", "gemma4-tiny"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("KV cache of one"))
    assert f"{sum(c.nbytes() for c in cache):,} B" in row
    assert "1 global layers x 64 + 3 local layers x 16 positions; 2 KV-shared layers hold none" in row


def test_serve_batches_gemma4_jobs_as_they_run_alone() -> None:
    """The server's engine (slots of one static cache, chunked prefill, rows at different
    positions) on a Gemma 4 block with KV sharing, K = V and per-layer inputs: each of 4
    concurrent greedy jobs gives the text `generate_text` gives it alone."""
    pytest.importorskip("fastapi")
    from bardlm.infer.generate import generate_text
    from bardlm.serve import Engine, Job
    from bardlm.tokenizers import CharTokenizer

    words = "ROMEO: But soft, what light through yonder window breaks? It is the east"
    tok = CharTokenizer.train(words)
    torch.manual_seed(7)
    model = GPT(preset("gemma4-tiny", vocab_size=tok.vocab_size)).eval()
    engine = Engine(model, tok, max_queue=4, max_batch=4, prefill_chunk=5)
    jobs = [Job(words[: 3 + 7 * i], 12 + 3 * i, sampling={"temperature": 0.0}) for i in range(4)]
    try:
        futures = [engine.try_submit(job) for job in jobs]
        for f in futures:
            f.result(120)
    finally:
        engine.shutdown()
    for job in jobs:
        assert job.text == generate_text(model, tok, job.prompt, job.max_tokens, temperature=0)


def test_lora_finetune_of_a_gemma4_directory(tmp_path) -> None:  # noqa: ANN001
    """`finetune --lora-rank` trains adapters on a Gemma 4 directory with the MoE block (the
    KV-shared layers' query-only c_attn included) and the adapter loads and runs."""
    import json

    from bardlm.cli import main
    from bardlm.tokenizers import CharTokenizer

    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,;:!?<>|/ABCDEFGHIJKLMNOPQRSTUVWXYZ\n")
    torch.manual_seed(5)
    ref = randomise(gemma4(**MOE, vocab_size=tok.vocab_size, vocab_size_per_layer_input=tok.vocab_size))
    ref.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "bardlm_tokenizer.json").write_text(json.dumps(tok.to_dict()))
    chat = tmp_path / "chat.jsonl"
    turn = [{"role": "user", "content": "soft"}, {"role": "assistant", "content": "light"}]
    chat.write_text("".join(json.dumps({"messages": turn}) + "\n" for _ in range(8)))
    out = tmp_path / "adapter"
    assert main(["finetune", "--init-from", str(tmp_path / "hf"), "--data", str(chat), "--out", str(out),
                 "--max-iters", "2", "--set", "batch_size=2", "--lora-rank", "2", "--no-progress"]) == 0
    tuned, _ = bardlm.load(out)
    base, _ = bardlm.load(tmp_path / "hf")
    idx = torch.randint(0, tok.vocab_size, (1, 20))
    with torch.no_grad():
        assert tuned(idx)[0].shape == base(idx)[0].shape == (1, 20, tok.vocab_size)
        assert not torch.equal(tuned(idx)[0], base(idx)[0])  # the adapter changed something


@pytest.mark.parametrize("changes", [dict(), dict(qk_norm=True, qk_norm_scope="proj")])
def test_kv_sharing_is_a_field_of_any_model(changes) -> None:  # noqa: ANN001
    """KV sharing outside Gemma 4 (a Llama block, with or without QK-norm over the projections):
    the shared layers have query rows only, the cache holds the other layers, and cached greedy
    decoding equals the uncached pass."""
    torch.manual_seed(3)
    model = GPT(preset("llama-tiny", kv_shared_layers=2, **changes)).eval()
    assert [b.attn.c_attn.out_features for b in model.transformer.h] == [256] * 2 + [128] * 2
    assert len(model.make_cache(1, 64)) == 2
    idx = torch.randint(0, 65, (2, 5))
    assert model.generate(idx, 20, temperature=0).equal(model.generate(idx, 20, temperature=0, use_cache=False))
