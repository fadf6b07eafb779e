"""The experiments of docs/concepts.md, in their quick form, so the docs' commands cannot rot."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import corpus

from bardlm import GPT
from bardlm.cli import main
from bardlm.config import preset
from bardlm.lab.experiments import (
    EXPERIMENTS,
    forward_shapes,
    lstm_matching,
    results_table,
    run_experiment,
    softmax_saturation,
)
from bardlm.nn import attention as attention_module


@pytest.fixture(scope="module")
def data_path() -> str:
    return str(corpus("tiny_shakespeare.txt"))


# window and hybrid: their own tests below (one quick run checks the figure and its numbers)
@pytest.mark.parametrize("name", [n for n in EXPERIMENTS
                                  if EXPERIMENTS[n].needs_data and n not in ("window", "hybrid")])
def test_experiment_quick_writes_json_and_figure(name: str, tmp_path, data_path: str) -> None:
    result = run_experiment(name, tmp_path, quick=True, data=data_path, log=lambda m: None)
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["experiment"] == name and saved["budget"]["steps"] == 8
    runs = result["runs"]
    assert len(runs) >= 2
    for run in runs.values():
        assert run["steps"] > 0 and run["params"] > 0
        assert [p["step"] for p in run["history"]] == sorted({p["step"] for p in run["history"]})
    # Every run with a normal model learns something in 8 steps from a uniform-ish start.
    first = next(iter(runs.values()))
    assert first["val_loss"] < first["history"][0]["val_loss"]
    assert first["val_loss"] < math.log(65) + 0.1


def test_lstm_is_the_same_size_as_the_transformer() -> None:
    gpt = GPT(preset("char-tiny"))
    lstm = lstm_matching(gpt.num_params(), 65, 4)
    n = sum(p.numel() for p in lstm.parameters())
    assert abs(n - gpt.num_params()) / gpt.num_params() < 0.02
    logits, loss = lstm(torch.randint(0, 65, (2, 9)), torch.randint(0, 65, (2, 9)))
    assert logits.shape == (2, 9, 65) and abs(loss.item() - math.log(65)) < 0.5


def test_softmax_saturates_without_the_scale() -> None:
    rows = softmax_saturation(dims=(4, 64, 1024))
    for r in rows:  # q.k of N(0, I_D) vectors has std sqrt(D); divided by sqrt(D) it has std 1
        assert abs(r["unscaled_logit_std"] / math.sqrt(r["d_k"]) - 1) < 0.15
        assert abs(r["scaled_logit_std"] - 1) < 0.15
    assert rows[-1]["unscaled_max_weight"] > 0.8 > rows[0]["unscaled_max_weight"]
    assert rows[-1]["unscaled_grad_norm"] < 0.5 * rows[-1]["scaled_grad_norm"]
    assert rows[-1]["scaled_entropy"] > 2 * rows[-1]["unscaled_entropy"]


@pytest.mark.parametrize("name", ["char-tiny", "llama-tiny", "qwen3-tiny"])
def test_forward_shapes_match_a_real_forward_pass(name: str, monkeypatch) -> None:
    """The documented shape table of each style is what the model really computes."""
    cfg = preset(name, attn_impl="explicit")
    model = GPT(cfg)
    seen: dict[str, tuple] = {}

    def record(key: str):  # noqa: ANN202
        def hook(_module, _inputs, output) -> None:  # noqa: ANN001
            seen.setdefault(key, tuple(output.shape))
        return hook

    block = model.transformer.h[0]
    model.transformer.wte.register_forward_hook(record("wte(idx)"))
    block.attn.c_attn.register_forward_hook(record("qkv"))
    block.mlp.c_fc.register_forward_hook(record("c_fc"))
    model.lm_head.register_forward_hook(record("logits"))
    real_attention = attention_module.explicit_attention

    def spy(q, k, v, *args):  # noqa: ANN001, ANN002, ANN202
        seen.setdefault("q", tuple(q.shape))
        seen.setdefault("k, v", tuple(k.shape))
        out = real_attention(q, k, v, *args)
        seen.setdefault("y", tuple(out.shape))
        return out

    monkeypatch.setattr(attention_module, "explicit_attention", spy)
    B, T = 3, 7
    model(torch.randint(0, cfg.vocab_size, (B, T)))
    table = {(step, tensor): shape for step, tensor, shape in forward_shapes(cfg, B, T)}
    by_tensor = {tensor: shape for (_, tensor), shape in table.items()}
    assert by_tensor["idx"] == (B, T)
    assert table[("wte(idx)", "x")] == seen["wte(idx)"]
    assert by_tensor["qkv"] == seen["qkv"]
    assert table[("split + view + transpose", "q")] == seen["q"]
    assert by_tensor["k, v"] == seen["k, v"]
    assert table[("att @ v", "y")] == seen["y"]
    ffn_key = "gate, up" if cfg.ffn == "swiglu" else "h"
    ffn_row = next(shape for (step, tensor), shape in table.items()
                   if step.startswith("c_fc") and tensor == ffn_key)
    assert ffn_row == seen["c_fc"]
    assert by_tensor["logits"] == seen["logits"]


def test_cli_experiment_shapes_and_bad_input(tmp_path, capsys) -> None:
    assert main(["experiment", "shapes", "--out", str(tmp_path)]) == 0
    tables = json.loads((tmp_path / "shapes.json").read_text())["tables"]
    assert "(B, 32, T, 64)" in tables["llama-3.2-1b"] and "(B, 8, T, 128)" in tables["qwen3-0.6b"]
    assert main(["experiment", "attention", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "--steps must be positive" in capsys.readouterr().err


def test_seeded_experiments_report_mean_spread_and_their_numbers(tmp_path, data_path: str) -> None:
    """Issue 22: `--seeds 2` trains every row twice (seeds 1337, 1338) and reports the mean and
    the sample standard deviation; gqa adds KV-cache bytes, tying matches parameters."""
    gqa = run_experiment("gqa", tmp_path, quick=True, data=data_path, seeds=2, log=lambda m: None)
    rows = list(gqa["runs"].values())
    assert [r["kv_bytes_per_token"] for r in rows] == [2 * 2 * kv * 4 * 4 for kv in (8, 4, 2, 1)]
    for r in rows:
        assert r["seeds"] == 2 and len(r["val_losses"]) == 2
        assert r["val_loss"] == pytest.approx(sum(r["val_losses"]) / 2)
        assert r["val_loss_std"] == pytest.approx(abs(r["val_losses"][0] - r["val_losses"][1]) / math.sqrt(2))
    assert rows[0]["val_losses"][0] != rows[0]["val_losses"][1]  # the seed changes the run
    tying = run_experiment("tying", tmp_path, quick=True, data=data_path, log=lambda m: None)
    tied, untied, matched = (r["params"] for r in tying["runs"].values())
    assert untied - tied == 65 * 32 and abs(matched - untied) <= 2 * 32 * 2
    assert "+-" not in results_table(tying) and "kv_bytes_per_token" in results_table(gqa)


def test_window_experiment_measures_the_cache_of_each_layer_kind(tmp_path, data_path: str) -> None:
    """The local/global model's cache is 5 windows + 1 full context against 6 full contexts
    (fp32 k and v, 2 heads of 16 at the quick budget), its loss is its own, and both decode."""
    result = run_experiment("window", tmp_path, quick=True, data=data_path, log=lambda m: None)
    assert (tmp_path / "window.png").stat().st_size > 1000
    full, local = result["runs"].values()
    per_position = 2 * 2 * 16 * 4 / 2**20  # k and v, n_kv_head 2, head_dim 16, fp32; in MiB
    assert full["kv_mib_at_64"] == pytest.approx(6 * 64 * per_position)
    assert local["kv_mib_at_64"] == pytest.approx((5 * 8 + 64) * per_position)
    assert full["params"] == local["params"] and full["val_loss"] != local["val_loss"]
    assert full["decode_tps_at_64"] > 0 and local["decode_tps_at_64"] > 0
    assert "kv_mib_at_64" in results_table(result)


def test_hybrid_experiment_measures_cache_state_and_speed(tmp_path, data_path: str) -> None:
    """Dense GQA and the 3:1 delta-rule hybrid train at equal parameters; the cache numbers are
    the arithmetic of each layer kind at the quick budget (n_embd 32, 2 heads of 16, 4 layers,
    fp32): GQA k + v of 1 KV head per layer, the hybrid's one attention layer, MLA's latent of
    32 + RoPE key of 8; the hybrid's 3 linear layers each hold conv inputs (q, k: 1 head, v: 2
    heads of 16) x 3 and 2 value heads' 16 x 16 state."""
    result = run_experiment("hybrid", tmp_path, quick=True, data=data_path, log=lambda m: None)
    assert (tmp_path / "hybrid.png").stat().st_size > 1000
    dense, hybrid, mla = result["runs"].values()
    assert abs(hybrid["params"] - dense["params"]) < 0.005 * dense["params"]
    assert hybrid["steps"] == dense["steps"] == 8 and hybrid["val_loss"] != dense["val_loss"]
    per_layer = 2 * 1 * 16 * 4
    assert (dense["cache_bytes_per_token"], hybrid["cache_bytes_per_token"]) == (4 * per_layer, per_layer)
    assert mla["cache_bytes_per_token"] == 4 * (32 + 8) * 4
    state = 3 * ((16 + 16 + 32) * 3 * 4 + 2 * 16 * 16 * 4)
    assert (dense["state_bytes_per_sequence"], hybrid["state_bytes_per_sequence"]) == (0, state)
    for row in (dense, hybrid, mla):  # what make_cache allocates = the arithmetic
        want = 64 * row["cache_bytes_per_token"] + row["state_bytes_per_sequence"]
        assert row["cache_mib_at_64"] == pytest.approx(want / 2**20)
        assert row["decode_tps_at_64"] > 0
    assert "untrained" in results_table(result)
