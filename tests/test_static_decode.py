"""The static-shape decode step: the cache written at an index tensor, attention over the whole
cache under a mask. Same logits as reading the sequence whole; rows at different positions in
one batch (the server's slots); the same step under bf16, INT8 and torch.compile."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from bardlm import GPT, preset
from bardlm.infer.layouts import prepare_for_inference
from bardlm.nn.cache import SlotView


def tiny(name: str) -> GPT:
    torch.manual_seed(0)
    return GPT(preset(name, vocab_size=65)).eval()


@pytest.mark.parametrize("name", ["char-tiny", "qwen3-tiny"])  # learned positions; RoPE + GQA
@torch.no_grad()
def test_index_written_cache_equals_whole_sequence(name: str) -> None:
    model = tiny(name)
    idx = torch.randint(0, 65, (2, 12))
    whole, _ = model(idx)
    cache = model.make_cache(2, 32)  # longer than needed: stale/empty keys must stay hidden
    parts = [model(idx[:, :5], start_pos=torch.arange(5), cache=cache)[0]]  # a prefill chunk
    for t in range(5, 12):
        parts.append(model(idx[:, t:t + 1], start_pos=torch.tensor([t]), cache=cache)[0])
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["char-tiny", "qwen3-tiny"])
@torch.no_grad()
def test_slots_at_different_positions_in_one_batch(name: str) -> None:
    """Two sequences in slots 3 and 1 of a 4-row cache, decoded together from positions 10
    and 6: each row's logits are those of its sequence read alone."""
    model = tiny(name)
    a, b = torch.randint(0, 65, (1, 10)), torch.randint(0, 65, (1, 6))
    cache = model.make_cache(4, 24)
    cache[0].k.normal_()  # garbage from an earlier request in every slot must not leak in
    for seq, slot in ((a, 3), (b, 1)):
        pos = torch.arange(seq.shape[1]).unsqueeze(0)
        model(seq, start_pos=pos, cache=[SlotView(c, [slot], seq.shape[1]) for c in cache])
    nxt = torch.tensor([[5], [7]])
    both, _ = model(nxt, start_pos=torch.tensor([[10], [6]]),
                    cache=[SlotView(c, [3, 1], 11) for c in cache])
    for row, seq in enumerate((a, b)):
        alone, _ = model(torch.cat([seq, nxt[row:row + 1]], 1))
        torch.testing.assert_close(both[row, -1], alone[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_inference_layouts_use_the_same_step(dtype: str) -> None:
    """generate (the static step) and the server's batched slots give the same greedy ids as
    reading the window whole, for each inference layout."""
    from bardlm.serve.engine import Engine, Job
    from bardlm.tokenizers import CharTokenizer

    model = prepare_for_inference(copy.deepcopy(tiny("char-tiny")), dtype)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    want = [model.generate(torch.tensor([p]), 12, temperature=0, use_cache=False)[0, len(p):].tolist()
            for p in prompts]
    got = [model.generate(torch.tensor([p]), 12, temperature=0)[0, len(p):].tolist() for p in prompts]
    assert got == want
    tok = CharTokenizer([chr(0x4E00 + i) for i in range(65)])
    engine = Engine(model, tok, max_queue=0, max_batch=3, prefill_chunk=4)
    try:
        jobs = [Job("", 12, sampling={"temperature": 0.0}, prompt_ids=p) for p in prompts]
        futures = [engine.try_submit(j) for j in jobs]
        for f in futures:
            f.result(60)
    finally:
        engine.shutdown()
    assert [j.ids for j in jobs] == want


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("BARDLM_TEST_COMPILE"),
                    reason="compiling takes ~20-40 s on 2 cores; set BARDLM_TEST_COMPILE=1")
def test_compiled_step_equals_eager() -> None:
    model = tiny("qwen3-tiny")
    idx = torch.randint(0, 65, (2, 6))
    eager = model.generate(idx, 10, temperature=0)
    assert torch.equal(model.generate(idx, 10, temperature=0, compile=True), eager)
    assert torch.equal(model.generate(idx, 10, temperature=0, compile=True), eager)  # reused


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("BARDLM_TEST_COMPILE"),
                    reason="compiling takes ~20-40 s on 2 cores; set BARDLM_TEST_COMPILE=1")
def test_compiled_engine_equals_eager() -> None:
    """The server's compiled step (all slots, a bucketed prefix of the cache) gives the eager ids."""
    from bardlm.serve.engine import Engine, Job
    from bardlm.tokenizers import CharTokenizer

    model = tiny("char-tiny")
    tok = CharTokenizer([chr(0x4E00 + i) for i in range(65)])
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    want = [model.generate(torch.tensor([p]), 8, temperature=0)[0, len(p):].tolist() for p in prompts]
    engine = Engine(model, tok, max_queue=3, max_batch=4, compile=True)
    try:
        jobs = [Job("", 8, sampling={"temperature": 0.0}, prompt_ids=p) for p in prompts]
        for f in [engine.try_submit(j) for j in jobs]:
            f.result(300)
    finally:
        engine.shutdown()
    assert [j.ids for j in jobs] == want
