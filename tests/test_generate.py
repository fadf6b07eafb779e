import pytest
import torch

from bardlm import GPT, BardlmError, ModelConfig
from bardlm.infer.generate import generate, generate_batch, generate_text, stream_ids
from bardlm.infer.sampling import apply_repetition_penalty, filter_logits, sample
from bardlm.tokenizers import CharTokenizer


def _model(**kw) -> GPT:
    base = dict(vocab_size=17, block_size=12, n_layer=2, n_head=2, n_embd=32)
    return GPT(ModelConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_cache_and_no_cache_give_identical_greedy_tokens(pos: str) -> None:
    model = _model(pos=pos, n_kv_head=1)
    idx = torch.randint(0, 17, (2, 5))
    # 20 new tokens on a context of 12: the window slides past the context length.
    a = generate(model, idx, 20, temperature=0, use_cache=True)
    b = generate(model, idx, 20, temperature=0, use_cache=False)
    assert a.shape == (2, 25) and torch.equal(a, b)


def test_seeded_sampling_is_reproducible() -> None:
    model = _model()
    idx = torch.zeros(1, 1, dtype=torch.long)
    a = generate(model, idx, 10, temperature=1.0, seed=3)
    assert torch.equal(a, generate(model, idx, 10, temperature=1.0, seed=3))


def test_top_k_keeps_k_largest() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True]]


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    keep = lambda p: torch.isfinite(filter_logits(probs.log(), top_p=p)).tolist()[0]  # noqa: E731
    assert keep(0.5) == [True, False, False, False]
    assert keep(0.6) == [True, True, False, False]
    assert keep(0.8) == [True, True, False, False]
    assert keep(0.81) == [True, True, True, False]
    assert keep(1.0) == [True, True, True, True]


def test_min_p_relative_to_top_token() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    keep = torch.isfinite(filter_logits(probs.log(), min_p=0.3)).tolist()[0]
    assert keep == [True, True, True, False]  # threshold 0.15


def test_repetition_penalty() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_sample_greedy_and_filtered() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert sample(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, temperature=5.0, top_k=1, generator=g).item() for _ in range(20)}
    assert draws == {1}


def test_bad_sampling_arguments() -> None:
    model = _model()
    idx = torch.zeros(1, 1, dtype=torch.long)
    for kw, match in [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=18), "top_k"),
    ]:
        with pytest.raises(BardlmError, match=match):
            generate(model, idx, 3, **kw)
    with pytest.raises(BardlmError, match="max_new_tokens"):
        generate(model, idx, 0)


def test_generate_text_stop_strings_are_not_printed() -> None:
    tok = CharTokenizer.train("abcdefghijklmnopq")
    model = _model()
    full = generate_text(model, tok, "ab", max_new_tokens=15, temperature=0)
    stop = full[3:5]
    pieces: list[str] = []
    out = generate_text(model, tok, "ab", max_new_tokens=15, temperature=0, stop=[stop], on_text=pieces.append)
    assert out == full[: full.find(stop)]
    assert "".join(pieces) == out and stop not in "".join(pieces)


def test_prompt_errors() -> None:
    tok = CharTokenizer.train("abcdefghijklmnopq")
    model = _model()
    with pytest.raises(BardlmError, match="empty"):
        generate_text(model, tok, "", max_new_tokens=3)
    with pytest.raises(BardlmError, match="longer than the context"):
        generate_text(model, tok, "a" * 13, max_new_tokens=3)
    with pytest.raises(BardlmError, match="character 'z'"):
        generate_text(model, tok, "az", max_new_tokens=3)


def test_generation_runs_in_eval_mode_and_restores_train_mode() -> None:
    model = _model(dropout=0.5)
    tok = CharTokenizer.train("abcdefghijklmnopq")
    idx = torch.randint(0, 17, (2, 4))
    want = generate(model.eval(), idx, 8, temperature=0)
    want_text = generate_text(model, tok, "abc", max_new_tokens=8, temperature=0)
    want_step = next(stream_ids(model, idx, 1, temperature=0))
    model.train()
    model.transformer.h[0].eval()  # a mixed state comes back as it was, module by module
    modes = [m.training for m in model.modules()]
    assert torch.equal(model.generate(idx, 8, temperature=0), want)
    assert torch.equal(generate(model, idx, 8, temperature=0), want)
    assert generate_text(model, tok, "abc", max_new_tokens=8, temperature=0) == want_text
    # A stream left open between tokens does not hold the model in eval mode either.
    stream = stream_ids(model, idx, 3, temperature=0)
    assert torch.equal(next(stream), want_step)
    assert [m.training for m in model.modules()] == modes
    list(stream)
    assert model.training and [m.training for m in model.modules()] == modes


def test_prefill_computes_logits_for_the_last_position_only() -> None:
    model = _model(pos="rope")
    idx = torch.randint(0, 17, (2, 6))
    # The reference: greedy decoding from full (B, T, V) logits, without a cache.
    ref = idx
    for _ in range(5):
        ref = torch.cat([ref, model(ref)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    shapes: list[tuple[int, ...]] = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        out_cached = generate(model, idx, 5, temperature=0, use_cache=True)
        out_uncached = generate(model, idx, 5, temperature=0, use_cache=False)
        generate_batch(model, [[1, 2, 3], [4, 5, 6, 7, 8]], 3, temperature=0)
    finally:
        hook.remove()
    assert torch.equal(out_cached, ref) and torch.equal(out_uncached, ref)
    assert shapes and all(s[:2] == (2, 1) for s in shapes)  # (B, 1, C), never (B, T, C)
    logits, _ = model(idx, logits_rows=2)
    torch.testing.assert_close(logits, model(idx)[0][:, -2:])


def test_logits_rows_with_targets_is_an_error() -> None:
    model = _model()
    idx = torch.randint(0, 17, (1, 6))
    with pytest.raises(BardlmError, match="logits_rows"):
        model(idx, targets=idx, logits_rows=1)
    with pytest.raises(BardlmError, match="logits_rows"):
        model(idx, logits_rows=0)
