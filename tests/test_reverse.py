"""The reversal probe (bardlm.lab.reverse) and `bardlm reverse`.

Data and scoring are checked against plain-Python re-computations; the causal switch against a
perturbation test (a causal model's earlier logits cannot move when a later token changes); and a
reduced probe is trained both ways to show it passes with the mask and catches a model without it.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bardlm import GPT
from bardlm.cli import build_parser, main
from bardlm.errors import BardlmError
from bardlm.lab.reverse import (
    ReverseConfig,
    build_model,
    loss_floor,
    make_examples,
    position_accuracy,
    run_reverse,
    summarize,
    training_symbols,
)

# A reduced probe: 8 symbols, 5 per half, a few seconds of training on an idle 2-core CPU.
SMALL = dict(vocab=8, length=5, batch_size=32, eval_examples=400)


def test_examples_are_bos_sequence_sep_reversed() -> None:
    cfg = ReverseConfig(vocab=7, length=4, eval_examples=10)
    symbols = torch.randint(0, 7, (5, 4))
    ex = make_examples(symbols, cfg)
    assert ex.shape == (5, 2 * 4 + 2) and ex.dtype == torch.long
    for row, sym in zip(ex.tolist(), symbols.tolist()):
        assert row == [7] + sym + [8] + list(reversed(sym))  # BOS = V, SEP = V + 1


def test_training_never_sees_held_out_examples() -> None:
    # 2^10 sequences and 100 held out: a batch of 2000 plain draws would hit ~195 of them.
    cfg = ReverseConfig(vocab=2, length=10, batch_size=2000, eval_examples=100)
    gen = torch.Generator().manual_seed(0)
    held = {tuple(r) for r in torch.randint(0, 2, (100, 10), generator=gen).tolist()}
    raw = torch.randint(0, 2, (2000, 10), generator=torch.Generator().manual_seed(1))
    assert any(tuple(r) in held for r in raw.tolist())  # the guard below has work to do
    for _ in range(3):
        batch = training_symbols(cfg, gen, held)
        assert batch.shape == (2000, 10)
        assert not any(tuple(r) in held for r in batch.tolist())


class _Oracle(nn.Module):
    """Reads the whole input (no mask) and predicts: the mirrored symbol in the second half,
    symbol 0 in the first half, BOS at SEP (always wrong there)."""

    def __init__(self, cfg: ReverseConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        L, V = self.cfg.length, self.cfg.vocab + 2
        pred = torch.zeros_like(idx)
        pred[:, L] = self.cfg.bos
        # Input L + 1 + j is followed by x_{L-j}, which the first half holds at input L - j.
        for j in range(L):
            pred[:, L + 1 + j] = idx[:, L - j]
        return torch.nn.functional.one_hot(pred, V).float(), None


def test_position_accuracy_matches_plain_python() -> None:
    cfg = ReverseConfig(vocab=3, length=4, eval_examples=5)
    symbols = torch.randint(0, 3, (301, 4))
    acc = position_accuracy(_Oracle(cfg), make_examples(symbols, cfg), batch_size=64)
    rows = symbols.tolist()
    expected = [sum(r[i] == 0 for r in rows) / len(rows) for i in range(4)] + [0.0] + [1.0] * 4
    assert acc.shape == (2 * 4 + 1,)
    torch.testing.assert_close(acc, torch.tensor(expected), atol=1e-6, rtol=0)


def test_summarize_halves_and_verdicts() -> None:
    cfg = ReverseConfig(vocab=10, length=3, eval_examples=10)
    ok = summarize(torch.tensor([0.1, 0.12, 0.08, 1.0, 1.0, 0.99, 1.0]), cfg)
    assert ok["first_half"] == pytest.approx(0.1) and ok["second_half"] == pytest.approx(0.9966667, abs=1e-6)
    assert ok["separator"] == 1.0 and ok["chance"] == 0.1 and ok["verdict"] == "ok"
    assert ok["labels"] == ["x1", "x2", "x3", "SEP", "x3", "x2", "x1"]
    assert summarize(torch.tensor([0.3, 0.2, 0.1, 1.0, 1.0, 1.0, 1.0]), cfg)["verdict"] == "leak"
    assert summarize(torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 0.9, 1.0]), cfg)["verdict"] == "undertrained"
    # The causal floor: ln V on each of the L random targets, averaged over 2L + 1 targets.
    assert loss_floor(cfg) == pytest.approx(3 * torch.log(torch.tensor(10.0)).item() / 7)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_switch_is_real_and_local(causal: bool) -> None:
    cfg = ReverseConfig(**SMALL, causal=causal)
    model = build_model(cfg).eval()
    ex = make_examples(torch.randint(0, 8, (4, 5)), cfg)[:, :-1]  # (4, 11)
    with torch.no_grad():
        base = model(ex)[0]
        moved = []  # for each position p: how far logits before p move when token p changes
        for p in range(1, ex.shape[1]):
            changed = ex.clone()
            changed[:, p] = (changed[:, p] + 1) % 8
            moved.append((model(changed)[0][:, :p] - base[:, :p]).abs().max().item())
    if causal:
        assert max(moved) < 1e-5  # nothing before a change may see it
    else:
        assert min(moved) > 1e-4  # the debug model lets every position see the future
    # The switch touches only that instance: a GPT built afterwards is causal.
    assert all(blk.attn.causal for blk in GPT(cfg.model_config()).transformer.h)


def test_reduced_probe_passes_with_mask_and_catches_a_leak() -> None:
    good = run_reverse(ReverseConfig(**SMALL, steps=120, seed=1))
    assert good["second_half"] >= 0.99
    assert abs(good["first_half"] - good["chance"]) <= 0.05
    assert good["verdict"] == "ok"
    assert good["train_loss"] > good["loss_floor"] - 0.05  # a causal model cannot beat the floor

    leaky = run_reverse(ReverseConfig(**SMALL, steps=60, seed=1, causal=False))
    assert leaky["first_half"] > good["chance"] + 0.5
    assert leaky["verdict"] == "leak"
    assert leaky["train_loss"] < 0.5 * leaky["loss_floor"]


def test_cli_writes_json_and_png(tmp_path, capsys) -> None:
    out = tmp_path / "probe"
    argv = ["reverse", "--vocab", "6", "--length", "4", "--steps", "3", "--batch-size", "8",
            "--eval-examples", "50", "--seed", "3", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "reverse.json").read_text())
    assert len(result["accuracy"]) == 2 * 4 + 1 == len(result["labels"])
    assert result["chance"] == pytest.approx(1 / 6)
    assert result["first_half"] == pytest.approx(sum(result["accuracy"][:4]) / 4, abs=1e-5)
    assert result["second_half"] == pytest.approx(sum(result["accuracy"][5:]) / 4, abs=1e-5)
    assert result["config"]["causal"] is True and result["config"]["steps"] == 3
    assert (out / "reverse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "first half" in printed and "second half" in printed and "chance" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vocab", "1"], "vocab must be at least 2"),
        (["--vocab", "2", "--length", "3"], "too few to hold out"),
        (["--steps", "0"], "steps must be a positive integer"),
        (["--device", "nonsense"], "is not a device"),
    ],
)
def test_cli_bad_input_is_one_line_error(tmp_path, capsys, args, message) -> None:
    assert main(["reverse", *args, "--no-progress", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bardlm: error:") and message in err and "\n" not in err


def test_cli_out_is_a_file(tmp_path, capsys) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["reverse", "--steps", "1", "--no-progress", "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_config_rejects_bad_values() -> None:
    with pytest.raises(BardlmError, match="lr must be positive"):
        ReverseConfig(lr=0.0)


def test_cli_help_states_the_real_defaults() -> None:
    sub = build_parser()._subparsers._group_actions[0].choices["reverse"]
    helps = {a.dest: a.help for a in sub._actions}
    d = ReverseConfig()
    for name in ("vocab", "length", "steps", "batch_size", "eval_examples"):
        assert f"(default {getattr(d, name)})" in helps[name]
