"""Speculative decoding: greedy output identical to plain greedy decoding (both drafters), and
sampled output distributed as the model's own (chi-square over many seeded draws)."""

from __future__ import annotations

import copy

import pytest
import torch
from spec_helpers import chi2_pvalue, perturbed

from bardlm import GPT, BardlmError, ModelConfig, cli, preset
from bardlm.infer.generate import generate
from bardlm.infer.layouts import can_pack_rows, pack_rows, prepare_for_inference
from bardlm.infer.speculative import (
    PromptLookup,
    accept_reject,
    generate_speculative,
    stream_speculative,
    target_probs,
)
from bardlm.io.checkpoint import save_checkpoint
from bardlm.tokenizers import CharTokenizer


@pytest.fixture(autouse=True)
def one_thread():  # noqa: ANN201
    """Tiny models: thread start-up costs more than the work (30x slower on a loaded 2-core
    machine with 2 threads); one thread, restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int, vocab: int = 24, **kw) -> GPT:
    torch.manual_seed(seed)
    base = dict(vocab_size=vocab, block_size=96, n_layer=2, n_head=2, n_embd=32, bias=False)
    return GPT(ModelConfig(**{**base, **kw})).eval()



# Greedy: identical to plain decoding ---------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_prompt_lookup_equals_plain_greedy(k: int) -> None:
    model = _model(0)
    accepted = 0
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, 24, (1, 10), generator=g).repeat(1, 3)  # repeats itself
        plain = generate(model, prompt, 40, temperature=0)
        stats: dict = {}
        spec = torch.cat([prompt, torch.stack(list(stream_speculative(
            model, prompt, 40, draft="ngram", draft_tokens=k, temperature=0, stats=stats)), 1)], 1)
        assert torch.equal(spec, plain)
        accepted += stats["accepted"]
        assert stats["rounds"] < 40 or stats["accepted"] == 0
    assert accepted > 0  # guesses were kept: the accept path ran, not only the fallback


@pytest.mark.parametrize("k", [2, 5])
def test_greedy_draft_model_equals_plain_greedy(k: int) -> None:
    model = _model(1)
    for draft, must_accept in ((perturbed(model, 0.02, 0), True), (_model(2), False),
                               (GPT(preset("llama-tiny", vocab_size=24, n_layer=1, n_embd=32,
                                           ffn_hidden=64, block_size=96)).eval(), False)):
        prompt = torch.randint(0, 24, (1, 7), generator=torch.Generator().manual_seed(k))
        stats: dict = {}
        spec = generate_speculative(model, prompt, 30, draft=draft, draft_tokens=k,
                                    temperature=0, stats=stats)
        assert torch.equal(spec, generate(model, prompt, 30, temperature=0))
        if must_accept:
            assert stats["accepted"] > 0.5 * stats["drafted"], stats


def test_eos_length_and_one_token_prompt() -> None:
    model = _model(3)
    prompt = torch.tensor([[5]])
    plain = generate(model, prompt, 25, temperature=0)
    eos = int(plain[0, 12])  # a token greedy decoding emits: generation stops at its first use
    first = next(i for i in range(1, 26) if int(plain[0, i]) == eos)
    spec = generate_speculative(model, prompt, 25, draft="ngram", temperature=0, eos_ids=[eos])
    assert torch.equal(spec, plain[:, : first + 1])
    assert generate_speculative(model, prompt, 3, draft=_model(4), temperature=0).shape == (1, 4)


def test_prompt_lookup_proposes_the_latest_continuation() -> None:
    lookup = PromptLookup()
    seq = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert lookup.propose(seq, 3, None) == ([7, 8, 5], None)  # the latest match of [1, 2, 3]
    assert lookup.propose([4, 5, 6], 3, None) == ([], None)  # nothing repeats: no guess
    assert lookup.propose([4, 6, 4], 2, None) == ([6, 4], None)  # a 1-gram match


def test_refusals() -> None:
    model = _model(0)
    two = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(BardlmError, match="one sequence at a time"):
        generate_speculative(model, two, 4)
    one = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(BardlmError, match="repetition-penalty"):
        generate_speculative(model, one, 4, repetition_penalty=1.2)
    with pytest.raises(BardlmError, match="does not slide the context"):
        generate_speculative(model, one, 200)
    with pytest.raises(BardlmError, match="share the tokenizer"):
        generate_speculative(model, one, 4, draft=_model(1, vocab=30))
    with pytest.raises(BardlmError, match="draft-tokens"):
        generate_speculative(model, one, 4, draft_tokens=0)
    with pytest.raises(BardlmError, match="model directory or 'ngram'"):
        generate_speculative(model, one, 4, draft="bigram")


# Sampling: the model's distribution, exactly ------------------------------------------------
@pytest.mark.parametrize("point_mass", [False, True])
def test_accept_reject_rule_gives_p(point_mass: bool) -> None:
    """Each emitted token is distributed as p, whatever q is; dropping the residual rule (drawing
    from p after a rejection) would bias the first token away from the guess and fail this."""
    g = torch.Generator().manual_seed(0)
    V, K, N = 6, 3, 6000
    p = torch.softmax(torch.randn(K + 1, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(K, V, generator=g) * 1.5, -1)
    first = torch.zeros(V)
    second = torch.zeros(V)  # the second token when the first guess was kept
    for _ in range(N):
        if point_mass:
            drafts = [2, 4, 1]
            out = accept_reject(p, None, drafts, g)
        else:
            drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(K)]
            out = accept_reject(p, q, drafts, g)
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    assert chi2_pvalue(first, p[0]) > 1e-3
    assert chi2_pvalue(second, p[1]) > 1e-3


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_sampled_tokens_follow_the_model(draft: str) -> None:
    """The first two sampled tokens (a joint of V^2 cells), over many seeds, against the model's
    exact joint distribution p(t1) p(t2 | t1) under temperature 0.9 and top-k 6."""
    V, N = 8, 600
    model = _model(5, vocab=V)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)  # a peaked distribution, so guesses are often kept
    drafter = perturbed(model, 0.3, 1) if draft == "model" else "ngram"
    # The model leans to repeating 0 here, so prompt lookup's guesses (0, 0, 0) are often kept.
    prompt = torch.tensor([[0] * 8]) if draft == "ngram" else torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])
    kw = dict(temperature=0.9, top_k=6)
    with torch.no_grad():
        p1 = target_probs(model(prompt)[0][:, -1], top_p=None, min_p=None, **kw)[0]
        rows = torch.cat([prompt.repeat(V, 1), torch.arange(V)[:, None]], 1)
        p2 = target_probs(model(rows)[0][:, -1], top_p=None, min_p=None, **kw)
    joint = (p1[:, None] * p2).flatten()
    counts = torch.zeros(V * V)
    accepted = 0
    for seed in range(N):
        stats: dict = {}
        t1, t2 = (int(t) for t in stream_speculative(model, prompt, 2, draft=drafter,
                                                      draft_tokens=3, seed=seed, stats=stats, **kw))
        counts[t1 * V + t2] += 1
        accepted += stats["accepted"]
    assert accepted > N / 10  # guesses were kept often: the joint is not all from fallbacks
    assert chi2_pvalue(counts, joint) > 1e-3


def test_cli_generate_draft_matches_plain(tmp_path, capsys) -> None:
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m", GPT(preset("char-tiny", vocab_size=tok.vocab_size)), tok, {})
    save_checkpoint(tmp_path / "d", GPT(preset("char-tiny", vocab_size=tok.vocab_size,
                                               n_layer=1)), tok, {})
    other = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz!")
    save_checkpoint(tmp_path / "x", GPT(preset("char-tiny", vocab_size=other.vocab_size,
                                               n_layer=1)), other, {})
    gen = ["generate", "--ckpt", str(tmp_path / "m"), "--prompt", "abc abc abc", "--temperature",
           "0", "--max-new-tokens", "30"]
    assert cli.main(gen) == 0
    plain = capsys.readouterr().out
    for extra in (["--draft", "ngram"], ["--draft", str(tmp_path / "d"), "--draft-tokens", "3"]):
        assert cli.main([*gen, *extra]) == 0
        assert capsys.readouterr().out == plain
    assert cli.main([*gen, "--draft", str(tmp_path / "x")]) == 2
    assert "must share the tokenizer" in capsys.readouterr().err


def test_sliding_window_shorter_than_the_cache_is_refused() -> None:
    """A rejected guess's key overwrites, in a ring buffer, a key the next token still reads
    (greedy output differed from plain decoding before this refusal); within the window the
    ring is never used and speculation stays exact."""
    cfg = dict(vocab_size=24, attn_layers=["local"] * 2 + ["global"], n_layer=3)
    model = GPT(preset("gemma3-tiny", sliding_window=4, **cfg)).eval()
    prompt = torch.randint(0, 24, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(BardlmError, match=r"ring buffer \(4 positions\)"):
        generate_speculative(model, prompt, 20, draft="ngram", temperature=0)
    wide = GPT(preset("gemma3-tiny", sliding_window=40, **cfg)).eval()
    assert torch.equal(generate_speculative(wide, prompt, 20, draft="ngram", temperature=0),
                       generate(wide, prompt, 20, temperature=0))


@pytest.mark.skipif(not can_pack_rows(), reason="this torch has no oneDNN linear")
def test_fp32_verify_pass_reads_oneDNN_packed_weights() -> None:
    """Passes of several rows of an fp32 model go through the packed copy `pack_rows` makes
    (speculative decoding makes it): with the plain weight zeroed, a 5-row pass still gives the
    layer's output and a 1-row pass gives zeros; greedy speculation stays plain greedy's."""
    model = prepare_for_inference(_model(0), "fp32")
    plain = copy.deepcopy(model)
    lin = model.transformer.h[0].mlp.c_fc
    x = torch.randn(5, lin.in_features)
    want = lin(x)
    prompt = torch.randint(0, 24, (1, 8), generator=torch.Generator().manual_seed(1)).repeat(1, 3)
    spec = generate_speculative(model, prompt, 30, draft="ngram", temperature=0)
    assert torch.equal(spec, generate(plain, prompt, 30, temperature=0))
    assert lin.packed is not None and plain.transformer.h[0].mlp.c_fc.packed is None
    assert pack_rows(model) == 0  # once per layer
    with torch.no_grad():
        lin.weight_t.zero_()
    torch.testing.assert_close(lin(x), want, rtol=1e-4, atol=1e-5)
    assert torch.equal(lin(x[:1]), torch.zeros(1, lin.out_features))  # bias=False: 0 @ W
