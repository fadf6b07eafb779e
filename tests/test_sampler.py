"""Every sampler option against `transformers`' logits processors, plus stop strings and seeds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from bardlm import GPT, ModelConfig
from bardlm.infer.generate import generate, generate_text, interactive
from bardlm.infer.sampling import apply_repetition_penalty, filter_logits, sample
from bardlm.tokenizers import CharTokenizer

V = 50


def _logits(seed: int, batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, V, generator=g) * 3


def _kept(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, V))
def test_top_k_matches_transformers(seed: int, k: int) -> None:
    x = _logits(seed)
    ref = TopKLogitsWarper(top_k=k)(None, x.clone())
    assert torch.equal(_kept(filter_logits(x, top_k=k)), _kept(ref))
    assert _kept(filter_logits(x, top_k=k)).sum(-1).tolist() == [k] * 3


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), p=st.floats(0.05, 0.99))
def test_top_p_keeps_the_smallest_set_reaching_p(seed: int, p: float) -> None:
    x = _logits(seed)
    kept = _kept(filter_logits(x, top_p=p))
    assert torch.equal(kept, _kept(TopPLogitsWarper(top_p=p)(None, x.clone())))
    probs = x.softmax(-1)
    for b in range(x.shape[0]):  # the definition, row by row: sorted, minimal, reaching p
        order = probs[b].argsort(descending=True)
        n = int(kept[b].sum())
        assert set(order[:n].tolist()) == set(kept[b].nonzero().flatten().tolist())
        assert probs[b, order[:n]].sum() >= p - 1e-6
        assert probs[b, order[: n - 1]].sum() < p


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.floats(0.01, 1.0))
def test_min_p_matches_transformers(seed: int, m: float) -> None:
    x = _logits(seed)
    kept = _kept(filter_logits(x, min_p=m))
    assert torch.equal(kept, _kept(MinPLogitsWarper(min_p=m)(None, x.clone())))
    probs = x.softmax(-1)
    assert torch.equal(kept, probs >= m * probs.max(-1, keepdim=True).values)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), penalty=st.floats(0.5, 3.0))
def test_repetition_penalty_matches_transformers(seed: int, penalty: float) -> None:
    x = _logits(seed)
    seen = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(seed))
    ref = RepetitionPenaltyLogitsProcessor(penalty=penalty)(seen, x.clone())
    torch.testing.assert_close(apply_repetition_penalty(x, seen, penalty), ref)
    untouched = torch.ones(3, V, dtype=torch.bool).scatter(-1, seen, False)
    assert torch.equal(apply_repetition_penalty(x, seen, penalty)[untouched], x[untouched])


def test_temperature_and_filters_sample_from_the_right_distribution() -> None:
    """With one generator, `sample` draws exactly what multinomial on the reference probs draws."""
    x = _logits(1, batch=2)
    t, k, p = 0.7, 20, 0.9
    ref = TopPLogitsWarper(top_p=p)(None, TopKLogitsWarper(top_k=k)(None, x.clone() / t))
    want = torch.multinomial(ref.softmax(-1), 1, generator=torch.Generator().manual_seed(5))
    got = sample(x, t, k, p, None, torch.Generator().manual_seed(5))
    assert torch.equal(got, want.squeeze(-1))
    assert torch.equal(sample(x, 0.0), x.argmax(-1))  # temperature 0 is greedy


def test_empirical_frequencies_follow_temperature() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(x, 2.0, generator=g) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=3).float() / 4000
    torch.testing.assert_close(freq, (x[0] / 2.0).softmax(-1), atol=0.03, rtol=0)


def _model(**kw) -> GPT:
    base = dict(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=32)
    return GPT(ModelConfig(**{**base, **kw})).eval()


def test_seed_token_limit_and_per_row_seeds() -> None:
    model = _model()
    idx = torch.randint(0, 17, (2, 4))
    a = generate(model, idx, 9, temperature=1.0, top_p=0.9, min_p=0.05, seed=3)
    assert a.shape == (2, 13) and torch.equal(a[:, :4], idx)
    assert torch.equal(a, generate(model, idx, 9, temperature=1.0, top_p=0.9, min_p=0.05, seed=3))
    # row b of a batch samples with seed + b: it equals a single-row run with that seed
    row1 = generate(model, idx[1:], 9, temperature=1.0, top_p=0.9, min_p=0.05, seed=4)
    assert torch.equal(a[1:], row1)


def test_stop_strings_end_generation_and_are_not_printed() -> None:
    tok = CharTokenizer.train("abcdefghijklmnopq")
    model = _model()
    full = generate_text(model, tok, "ab", max_new_tokens=14, temperature=0)
    assert len(full) == 14  # the token limit
    stops = [full[5:7], "zz-never"]
    pieces: list[str] = []
    out = generate_text(model, tok, "ab", max_new_tokens=14, temperature=0, stop=stops,
                        on_text=pieces.append)
    assert out == full[: full.find(stops[0])]
    assert "".join(pieces) == out


def test_interactive_keeps_going_after_a_bad_prompt(capsys: pytest.CaptureFixture) -> None:
    tok = CharTokenizer.train("abcdefghijklmnopq")
    model = _model()
    out: list[str] = []
    n = interactive(model, tok, ["ab\n", "\n", "aZ\n", "cd\n"], out.append, max_new_tokens=5,
                    temperature=0)
    assert n == 2
    want = [generate_text(model, tok, p, max_new_tokens=5, temperature=0) for p in ("ab", "cd")]
    assert "".join(out) == f"{want[0]}\n\n{want[1]}\n"
    assert "character 'Z'" in capsys.readouterr().err
