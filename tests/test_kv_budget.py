"""The KV cache fits the machine (issue 26, defect 2): a token budget shared by the server's
slots, sized from the memory available; `--max-context`; refusals in one line; and static-shape
(compiled) steps that read only a bucketed prefix of the cache, not all of it."""

from __future__ import annotations

import math

import pytest
import torch

from bardlm import GPT, BardlmError, ModelConfig, preset
from bardlm.infer import budget
from bardlm.infer import generate as gen_mod
from bardlm.infer.budget import GiB, kv_bytes_per_token, plan_cache, read_length
from bardlm.infer.generate import generate, generate_text
from bardlm.serve import engine as engine_mod
from bardlm.serve.engine import Engine, Job, RequestError
from bardlm.tokenizers import CharTokenizer


def test_bytes_per_token_is_what_a_cache_holds() -> None:
    """Against real buffers: a GQA model's `make_cache`, per position (fp32 and bf16)."""
    cfg = ModelConfig(vocab_size=11, block_size=32, n_layer=3, n_head=4, n_kv_head=2, n_embd=32)
    model = GPT(cfg)
    cache = model.make_cache(2, 10)
    held = sum(c.nbytes() for c in cache) / (2 * 10)
    assert kv_bytes_per_token(cfg, 4) == held
    assert kv_bytes_per_token(cfg, 2) == held / 2


def test_qwen3_0_6b_starts_with_the_defaults_on_24_gib() -> None:
    """Full context for 8 slots would be 70 GiB; the default budget is half of 24 GiB, shared.
    The engine starts on a meta-device model of the real preset (nothing is allocated)."""
    cfg = preset("qwen3-0.6b")
    per_token = 2 * 28 * 8 * 128 * 4  # layers x KV heads x head size x fp32, keys and values
    assert 8 * cfg.block_size * per_token / GiB == 70.0  # what a context-long slot reserved
    fit = (12 * GiB) // (8 * per_token)  # 7,021 tokens a slot
    want = fit - fit % 256
    with torch.device("meta"):
        model = GPT(cfg)
    engine = Engine(model, CharTokenizer.train("abc"), max_batch=8, memory=24 * GiB)
    try:
        assert (engine.plan.slots, engine.context, engine.plan.bytes_per_token) == (8, want, per_token)
        assert engine.cache[0].k.shape == (8, 8, want, 128)
        assert engine.plan.describe() == (
            f"kv cache: 8 slots x {want:,} tokens = {8 * want:,} tokens, "
            f"{8 * want * per_token / GiB:.2f} GiB")
        assert engine.plan.nbytes <= 12 * GiB
        # What does not fit a slot is refused before it runs, naming the way out.
        with pytest.raises(RequestError, match="--max-context") as e:
            engine.check(Job("", want, prompt_ids=[1, 2]))
        assert e.value.param == "max_tokens"
        engine.check(Job("", want - 2, prompt_ids=[1, 2]))
    finally:
        engine.shutdown()


def test_max_context_and_refusals() -> None:
    cfg = preset("llama-3.2-1b")
    per_token = kv_bytes_per_token(cfg, 4)
    assert per_token == 2 * 16 * 8 * 64 * 4  # 64 KiB: 131,072 positions are 8 GiB a slot
    plan = plan_cache(cfg, 8, 4, 24 * GiB, max_context=4096)
    assert (plan.tokens, plan.total_tokens, plan.nbytes) == (4096, 32768, 32768 * per_token)
    with pytest.raises(BardlmError, match=r"does not fit in the 24.00 GiB available; pass "
                                          r"--max-context 49152 or less"):
        plan_cache(cfg, 8, 4, 24 * GiB, max_context=131072)
    with pytest.raises(BardlmError, match="smaller --max-batch"):
        plan_cache(cfg, 8, 4, 100 * 2**20)  # 100 MiB: not 256 positions a slot
    small = ModelConfig(vocab_size=11, block_size=32, n_layer=1, n_head=2, n_embd=8)
    assert plan_cache(small, 4, 4, 24 * GiB).tokens == 32  # the whole context when it fits
    with pytest.raises(BardlmError, match="learned positions end at the context length 32"):
        plan_cache(small, 4, 4, 24 * GiB, max_context=64)


def test_read_length_buckets() -> None:
    for cache_len in (1, 7, 96, 4096, 6912):
        lengths = [read_length(f, cache_len) for f in range(1, cache_len + 1)]
        assert len(set(lengths)) <= budget.READ_BUCKETS
        floor = math.ceil(cache_len / 2 ** (budget.READ_BUCKETS - 1))
        for f, n in zip(range(1, cache_len + 1), lengths):
            assert f <= n <= max(2 * f, floor) and n <= cache_len


def _recording(lengths: list[int], real_step):  # noqa: ANN001, ANN202
    """An eager stand-in for the compiled step that records how much cache each step reads."""
    def fake_decode_step(model, compile=False):  # noqa: ANN001, ANN202
        step = real_step(model, False)

        def record(ids, cache_pos, cache, mask, positions):  # noqa: ANN001, ANN202
            lengths.append(cache[0].max_len)
            return step(ids, cache_pos, cache, mask, positions)
        return record
    return fake_decode_step


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    lengths: list[int] = []
    fake = _recording(lengths, gen_mod.decode_step)
    monkeypatch.setattr(gen_mod, "decode_step", fake)
    monkeypatch.setattr(engine_mod, "decode_step", fake)
    return lengths


def test_compiled_steps_read_a_prefix_not_the_whole_cache(recorded: list[int]) -> None:
    """The static (compile=True) path of `generate` and of the server reads a bucket just
    longer than what is filled, with the same ids as the eager path."""
    torch.manual_seed(0)
    model = GPT(preset("qwen3-tiny", vocab_size=65, block_size=256)).eval()
    idx = torch.randint(0, 65, (2, 5))
    eager = generate(model, idx, 6, temperature=0)
    assert recorded == []  # eager: the caches' own int path, reading exactly the filled prefix
    recorded.clear()
    assert torch.equal(generate(model, idx, 6, temperature=0, compile=True), eager)
    # The cache is 11 long; the steps fill 6..10 of it and read 6 (the half) then 11.
    assert recorded == [6, 11, 11, 11, 11]
    recorded.clear()
    tok = CharTokenizer([chr(0x4E00 + i) for i in range(65)])
    engine = Engine(model, tok, max_queue=0, max_batch=2, compile=True)
    try:
        jobs = [Job("", 6, sampling={"temperature": 0.0}, prompt_ids=p) for p in idx.tolist()]
        for f in [engine.try_submit(j) for j in jobs]:
            f.result(60)
    finally:
        engine.shutdown()
    assert [j.ids for j in jobs] == eager[:, 5:].tolist()
    # Buckets of 256: 8, 16, ..., 256; the jobs fill 6..10 positions, so 8 then 16, never 256.
    assert recorded == [8, 8, 8, 16, 16] and engine.context == 256


def test_generate_max_context_lets_rope_pass_block_size() -> None:
    torch.manual_seed(0)
    model = GPT(preset("qwen3-tiny", vocab_size=65, block_size=16)).eval()
    tok = CharTokenizer([chr(0x4E00 + i) for i in range(65)])
    prompt = "".join(chr(0x4E00 + i) for i in range(20))
    with pytest.raises(BardlmError, match="longer than the context of 16"):
        generate_text(model, tok, prompt, max_new_tokens=3, temperature=0)
    got = generate_text(model, tok, prompt, max_new_tokens=3, temperature=0, max_context=32)
    ids = torch.tensor([tok.encode(prompt)])
    want = generate(model, ids, 3, temperature=0, max_context=32, use_cache=False)[0, 20:]
    assert tok.encode(got) == want.tolist()


def test_server_refuses_what_does_not_fit_a_slot_with_a_400() -> None:
    """`build_app(max_context=32)` on a context-96 model: slots of 32 positions, reported as
    max_model_len; a prompt + max_tokens past them is a 400 naming --max-context."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from bardlm.serve import build_app

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=65, block_size=96, n_layer=1, n_head=2, n_embd=16)).eval()
    tok = CharTokenizer([chr(0x4E00 + i) for i in range(65)])
    app = build_app(model, tok, model_name="m", max_batch=2, max_context=32, allowed_hosts=None)
    with TestClient(app) as client:
        assert app.state.engine.cache[0].k.shape[2] == 32
        assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 32
        prompt = "".join(chr(0x4E00 + i) for i in range(10))
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 23})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert "leaves room for 22" in r.json()["error"]["message"]
        assert "--max-context" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 22, "temperature": 0})
        assert r.status_code == 200, r.text
