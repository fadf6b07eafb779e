"""Sliding-window (local) attention, NoPE layers and the ring-buffer KV cache.

References: the mask against its definition written as loops; a one-layer windowed model
against the same model reading only the window; cached decoding against the uncached pass
(which re-reads everything); the server engine against single-request generation.
"""

from __future__ import annotations

import string

import pytest
import torch

from bardlm import GPT, ModelConfig
from bardlm.infer.budget import kv_bytes_per_sequence, plan_cache
from bardlm.infer.generate import generate, generate_batch
from bardlm.nn.attention import attention_mask
from bardlm.nn.cache import KVCache, RingKVCache

W = 8


def windowed(n_layer: int = 3, **over) -> GPT:  # noqa: ANN003
    """A small rope model: local, global, local (NoPE in the middle), window 8, scaled-up weights
    so greedy output varies."""
    kw = dict(vocab_size=40, block_size=256, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=32,
              pos="rope", norm="rmsnorm", ffn="swiglu", bias=False, sliding_window=W,
              attn_layers=["local", "global", "local"][:n_layer], rope_local_theta=500.0,
              rope_layers=[True, False, True][:n_layer])
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**kw, **over})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.4)
    return model


def test_attention_mask_is_its_definition() -> None:
    q = torch.tensor([[3, 4, 9], [0, 7, 8]])
    k = torch.tensor([[-1, 0, 2, 3, 4, 9], [5, 6, 7, 8, 0, 1]])
    got = attention_mask(q, k, window=3)
    for b in range(2):
        for i in range(3):
            for j in range(6):
                want = 0 <= k[b, j] <= q[b, i] and k[b, j] > q[b, i] - 3
                assert bool(got[b, 0, i, j]) == want
    assert attention_mask(torch.arange(5), torch.arange(5)).equal(torch.ones(5, 5).tril().bool())


def test_one_local_layer_reads_only_its_window() -> None:
    """A query's output depends on its last W tokens only: with relative (rotary) positions, the
    full sequence's logits at t equal those of the window ending at t alone."""
    model = windowed(n_layer=1)
    idx = torch.randint(0, 40, (1, 3 * W + 5))
    with torch.no_grad():
        full, _ = model(idx)
        for t in (W - 1, W, 2 * W + 3, idx.shape[1] - 1):
            alone, _ = model(idx[:, t - W + 1: t + 1])
            torch.testing.assert_close(full[0, t], alone[0, -1], atol=1e-5, rtol=1e-5)
        # and a global model gives different logits past the window
        wide, _ = windowed(n_layer=1, attn_layers=["global"])(idx)
    assert not torch.allclose(full[0, -1], wide[0, -1], atol=1e-3)


def test_local_layers_keep_a_ring_of_the_window() -> None:
    model = windowed()
    cache = model.make_cache(2, 100)
    assert [type(c) for c in cache] == [RingKVCache, KVCache, RingKVCache]
    assert [c.k.shape[2] for c in cache] == [W, 100, W]
    assert sum(c.nbytes() for c in cache) == 2 * kv_bytes_per_sequence(model.config, 100, 4)
    # a window longer than the cache: a plain cache of the cache's length
    assert [c.k.shape[2] for c in model.make_cache(1, 6)] == [6, 6, 6]


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
@pytest.mark.parametrize("n_prompt", [3, 2 * W + 3])
def test_cached_greedy_equals_uncached_far_past_the_window(impl: str, n_prompt: int) -> None:
    model = windowed(attn_impl=impl)
    idx = torch.randint(0, 40, (2, n_prompt), generator=torch.Generator().manual_seed(n_prompt))
    cached = generate(model, idx, 8 * W, temperature=0)
    uncached = generate(model, idx, 8 * W, temperature=0, use_cache=False)
    assert cached.equal(uncached)
    assert len(set(cached[0, n_prompt:].tolist())) > 3  # varied output, not one repeated id


def test_padded_batch_past_the_window_equals_each_row_alone() -> None:
    model = windowed()
    prompts = [[1, 2, 3], list(range(5, 5 + 2 * W + 1)), [7]]
    got = generate_batch(model, prompts, 5 * W, temperature=0)
    for p, row in zip(prompts, got):
        assert row == generate(model, torch.tensor([p]), 5 * W, temperature=0)[0, len(p):].tolist()


def test_window_slides_past_the_cache() -> None:
    """Generation past the cache re-reads the last `max_context` tokens: cache and no cache agree."""
    model = windowed()
    idx = torch.randint(0, 40, (1, 5))
    a = generate(model, idx, 50, temperature=0, max_context=24)
    assert a.equal(generate(model, idx, 50, temperature=0, max_context=24, use_cache=False))


def test_chunked_static_prefill_into_a_ring_equals_one_pass() -> None:
    """The server's path: chunks (some longer than the window) written at cache indices into
    rows of a ring cache, other rows' padding parked at the last index, equal one full pass."""
    model = windowed()
    L = 40
    seq = torch.randint(0, 40, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, _ = model(seq)
        cache = model.make_cache(3, L)
        # row 2 held a shorter sequence before: its slots 3..5 are stale when this one reaches
        # indices 3..5, and must stay hidden
        model(torch.randint(0, 40, (1, 6)), start_pos=torch.arange(6),
              cache=[c.rows([2], 6) for c in cache])
        got, done = [], 0
        for n in (3, 12, 1, 14):  # 12 and 14 > W
            T = 14
            ids = torch.zeros(2, T, dtype=torch.long)
            pos = torch.full((2, T), L - 1)  # row 0: padding only (a slot-mate's parked pads)
            ids[1, T - n:] = seq[0, done:done + n]
            pos[1, T - n:] = torch.arange(done, done + n)
            logits, _ = model(ids, start_pos=pos, cache=[c.rows([0, 2], done + n) for c in cache])
            got.append(logits[1, T - n:])
            done += n
    torch.testing.assert_close(torch.cat(got), want[0], atol=1e-4, rtol=1e-4)


def test_budget_counts_the_window_not_the_context() -> None:
    """A slot of a local/global model costs the global layers' length plus the local layers'
    window, and the planner fits more positions per slot than a global model's."""
    model = windowed()
    cfg = model.config
    per_layer = 2 * cfg.n_kv_head * cfg.head_dim * 4
    assert kv_bytes_per_sequence(cfg, 200, 4) == (200 + 2 * W) * per_layer
    budget = 4 * (100 + 2 * W) * per_layer
    plan = plan_cache(cfg, 4, 4, budget, max_context=100)
    assert plan.nbytes == budget == 4 * sum(c.nbytes() for c in model.make_cache(1, 100))
    with pytest.raises(Exception, match="--max-context 100 or less"):
        plan_cache(cfg, 4, 4, budget, max_context=101)


def test_engine_serves_a_windowed_model_as_generate_does() -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from bardlm.infer.generate import generate_text
    from bardlm.serve import Engine, Job
    from bardlm.tokenizers import CharTokenizer

    tok = CharTokenizer(sorted(set(string.ascii_letters + " .,")))
    model = windowed(vocab_size=tok.vocab_size, block_size=64)
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


def test_info_and_server_hold_a_gemma3_sequence_as_global_length_plus_local_window(capsys) -> None:  # noqa: ANN001
    """Gemma 3 1B's layout (4 global, 22 local layers of window 512) at a 32k context: one
    sequence's cache is the global layers' 32,768 positions plus the local layers' 512, in
    `bardlm info`, in `make_cache` and in the server's plan."""
    from bardlm import preset
    from bardlm.cli import main

    cfg = preset("gemma-3-1b")
    per_position = 2 * cfg.n_kv_head * cfg.head_dim * 4  # one layer's fp32 key + value
    assert (cfg.attn_layers.count("global"), cfg.attn_layers.count("local")) == (4, 22)
    want = (4 * 32768 + 22 * 512) * per_position
    assert main(["info", "--preset", "gemma-3-1b"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "one sequence" in line)
    assert f"{want:,} B" in row and "4 global layers x 32,768 + 22 local layers x 512" in row
    # the same layout at toy widths: real buffers
    small = preset("gemma-3-1b", vocab_size=64, n_embd=32, n_head=2, head_dim=8, ffn_hidden=32)
    with torch.device("meta"):
        model = GPT(small)
    held = sum(c.nbytes() for c in model.make_cache(1, 32768))
    assert held == (4 * 32768 + 22 * 512) * 2 * 1 * 8 * 4
    assert plan_cache(small, 1, 4, 2**40, max_context=32768).slot_bytes == held


def test_attention_sinks_take_their_share_of_the_softmax() -> None:
    """Sinks: a per-head logit in the denominator. Reference: the weights exp(s_j) /
    (sum_j exp(s_j) + exp(sink_h)), written with exp directly; a sink of -inf is no sink."""
    from bardlm.nn.attention import explicit_attention

    torch.manual_seed(2)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    sinks = torch.randn(4)
    mask = torch.ones(5, 5).tril().bool()
    got = explicit_attention(q, k, v, mask, sinks=sinks)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    e = torch.exp(q @ kk.transpose(-2, -1) / 8**0.5) * mask
    w = e / (e.sum(-1, keepdim=True) + torch.exp(sinks).view(1, 4, 1, 1))
    torch.testing.assert_close(got, w @ vv, atol=1e-5, rtol=1e-5)
    none = explicit_attention(q, k, v, mask, sinks=torch.full((4,), float("-inf")))
    torch.testing.assert_close(none, explicit_attention(q, k, v, mask), atol=1e-6, rtol=1e-6)


def test_sinks_and_caps_decode_with_the_cache_as_without() -> None:
    model = windowed(attn_sinks=True, attn_softcap=3.0, logit_softcap=5.0, attn_scale_dim=20.0)
    assert model.transformer.h[0].attn.impl == "explicit"
    with torch.no_grad():
        for blk in model.transformer.h:
            blk.attn.sinks.normal_(0.0, 1.0)
    idx = torch.randint(0, 40, (1, 4))
    assert generate(model, idx, 4 * W, temperature=0).equal(
        generate(model, idx, 4 * W, temperature=0, use_cache=False))


def test_compiled_decode_step_with_a_ring_cache_equals_eager() -> None:
    """The torch.compile'd static step (`generate(compile=True)`) over a ring cache, past the
    window: the same tokens as the eager loop. (One local layer: every cache is a ring, whose
    shapes never change, so the step compiles once.)"""
    model = windowed(n_layer=1)
    idx = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(3))
    eager = generate(model, idx, 3 * W, temperature=0)
    assert generate(model, idx, 3 * W, temperature=0, compile=True).equal(eager)


def test_gemma3_tiny_trains_from_the_cli(tmp_path) -> None:  # noqa: ANN001
    """`bardlm train --preset gemma3-tiny` runs (a few steps on a small corpus: the loss falls)
    and its checkpoint generates with the ring cache."""
    import json

    from bardlm.cli import main
    from bardlm.io.checkpoint import load_checkpoint

    corpus_file = tmp_path / "romeo.txt"
    corpus_file.write_text("But soft, what light through yonder window breaks? It is the east, "
                           "and Juliet is the sun. Arise, fair sun, and kill the envious moon.\n" * 40)
    out = tmp_path / "g3"
    assert main(["train", "--preset", "gemma3-tiny", "--data", str(corpus_file), "--out", str(out),
                 "--max-iters", "8", "--set", "eval_interval=4", "--set", "eval_batches=1",
                 "--set", "batch_size=4", "--set", "lr=0.003", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert losses[-1] < losses[0]
    model, _, _ = load_checkpoint(out)
    assert model.config.attn_layers == ["local", "local", "local", "global"]
    assert any(isinstance(c, RingKVCache) for c in model.make_cache(1, 64))
    assert model.generate(torch.tensor([[1, 2, 3]]), 40, temperature=0).shape == (1, 43)
