"""Checks shared by the tests that hold a bardlm model against a `transformers` one."""

from __future__ import annotations

import torch


def assert_same_logits(ref, ours, idx: torch.Tensor, tol: float = 1e-4) -> None:  # noqa: ANN001
    """Our logits for idx (B, T) equal transformers' `ref(idx).logits` (B, T, V) to `tol`, and
    those logits differ across positions by far more than `tol`, so the check can fail."""
    with torch.no_grad():
        want = ref(idx).logits
        got, _ = ours(idx)
    assert got.shape == want.shape and want.shape[:2] == idx.shape
    assert (got - want).abs().max().item() < tol
    assert (want[:, 1:] - want[:, :-1]).abs().max().item() > 1e-2


def assert_same_greedy(ref, ours, idx: torch.Tensor, n: int = 64) -> torch.Tensor:  # noqa: ANN001
    """Greedy decoding of n tokens after idx (B, T): ours (our cache) gives transformers' ids,
    never stopping at an EOS. Returns transformers' ids (B, T + n)."""
    ref.generation_config.eos_token_id = None  # greedy all the way: no early stop at EOS
    want = ref.generate(idx, max_new_tokens=n, do_sample=False, pad_token_id=0,
                        attention_mask=torch.ones_like(idx))
    got = ours.generate(idx, n, temperature=0.0)
    assert got.shape == want.shape == (idx.shape[0], idx.shape[1] + n)
    assert torch.equal(got, want)
    return want


def assert_export_round_trip(ref, ours, out, idx: torch.Tensor, same_tensors: bool = True,  # noqa: ANN001
                             **load_kwargs) -> None:
    """Our export of `ours` to the folder `out` loads in transformers as `ref`'s class, with
    tensors equal to `ref`'s (same_tensors) and logits on idx (B, T) equal to ours to 1e-4; and
    bardlm reads the folder back with the same config. `load_kwargs` go to `from_pretrained`."""
    from transformers import AutoModelForCausalLM

    from bardlm.io.hf import from_pretrained, save_pretrained

    save_pretrained(ours, out)
    again = AutoModelForCausalLM.from_pretrained(out, **load_kwargs).eval()
    assert type(again) is type(ref)
    if same_tensors:
        ref_sd, again_sd = ref.state_dict(), again.state_dict()
        assert ref_sd.keys() == again_sd.keys()
        assert all(torch.equal(ref_sd[k], again_sd[k]) for k in ref_sd)
    with torch.no_grad():
        assert (again(idx).logits - ours(idx)[0]).abs().max().item() < 1e-4
    assert from_pretrained(out).config == ours.config
