"""The benchmark scripts run end to end on tiny shapes and end with the JSON line they promise.

They time nothing here (speed belongs to the benchmarks themselves); this only keeps them working.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bardlm.config import ModelConfig
from bardlm.nn.model import GPT

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> dict:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_decode_bench_smoke() -> None:
    res = run_bench("bench/decode.py", "--preset", "qwen3-tiny", "--tokens", "8", "--runs", "1",
                    "--skip", "nocache")
    assert set(res["tokens_per_sec"]) == {"fp32_cache", "hf_fp32", "bf16", "int8", "int4_g32",
                                          "int4_g128", "fp32_repeat", "fp32_ngram",
                                          "int4_repeat", "int4_ngram"}
    assert res["greedy_ids_equal_hf"] is True
    assert set(res["kernel_ceiling_vs_hf"]) == {"fp32_cache", "bf16", "int8", "int4_g32", "int4_g128"}
    assert 0.2 < res["int8_bytes_ratio"] < 0.5
    assert res["ngram_ids_equal_plain"] == {"fp32": True, "int4": True}
    assert res["int4_g32_vs_int8"] > 0 and res["ngram_vs_plain_fp32"] > 0


def test_decode_bench_vs_llama_cpp_says_why_it_skips() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        res = run_bench("bench/decode.py", "--preset", "qwen3-tiny", "--tokens", "4", "--runs", "1",
                        "--skip", "nocache", "--skip", "hf", "--skip", "bf16", "--skip", "int4",
                        "--skip", "spec", "--vs-llama-cpp")
        assert "llama-cpp-python is not installed" in res["llama_cpp"]["skipped"]
        return
    import pytest

    pytest.skip("llama-cpp-python is installed: the full comparison is bench/decode.py's own run")


def test_decode_bench_draft_pair_smoke(tmp_path: Path) -> None:
    """--draft-pair on two tiny char models (the shipped corpus's characters): the interleaved
    rounds' JSON, speculative ids equal to plain greedy's."""
    import torch

    from bardlm import GPT, preset
    from bardlm.io.checkpoint import save_checkpoint
    from bardlm.tokenizers import CharTokenizer
    from bardlm.train.data import load_corpus

    tok = CharTokenizer.train(load_corpus("tiny-shakespeare")[0])
    torch.manual_seed(0)
    for name, layers in (("target", 2), ("draft", 1)):
        save_checkpoint(tmp_path / name, GPT(preset("char-tiny", vocab_size=tok.vocab_size,
                                                    n_layer=layers)), tok, {})
    res = run_bench("bench/decode.py", "--draft-pair", str(tmp_path / "target"), str(tmp_path / "draft"),
                    "--prompt", "16", "--tokens", "8", "--runs", "2", "--threads", "1")
    assert set(res["tokens_per_sec"]) == {"plain", "draft", "ngram"}
    assert len(res["speedup_per_round"]["draft"]) == 2 and res["speedup_median"]["draft"] > 0
    assert res["ids_equal_plain"] == {"draft": True, "ngram": True}
    assert 0 <= res["acceptance"]["draft"] <= 1 and len(res["load_average"]) == 3


def test_draft_pair_bench_smoke(tmp_path: Path) -> None:
    """bench/draft_pair.py end to end at a toy size (eager: its target compiles by default),
    and bench/decode.py reads the pair it wrote."""
    res = run_bench("bench/draft_pair.py", "--out", str(tmp_path), "--data", "tiny-shakespeare", "--vocab", "300",
                    "--target-iters", "2", "--draft-iters", "2", "--prompts", "64", "--new", "64",
                    "--target-layers", "1", "--target-width", "64", "--no-compile", "--threads", "1")
    assert res["target"] == str(tmp_path / "target") and res["draft"] == str(tmp_path / "draft")
    assert res["target_params"] > 0 and res["draft_params"] > 0 and 0 <= res["draft_agreement"] <= 1
    assert json.loads((tmp_path / "pair.json").read_text()) == {"data": "tiny-shakespeare"}
    timed = run_bench("bench/decode.py", "--draft-pair", res["target"], res["draft"], "--prompt", "16",
                      "--tokens", "8", "--runs", "1", "--threads", "1")
    assert timed["ids_equal_plain"] == {"draft": True, "ngram": True}


def test_verify_pass_bench_smoke() -> None:
    res = run_bench("bench/verify_pass.py", "--preset", "char-tiny", "--rounds", "2", "--threads", "1")
    steps = res["threads_1"]["verify_in_steps"]
    assert set(steps) == {"dense", "packed"} and all(v > 0 for v in steps.values())


def test_dropout_bench_smoke() -> None:
    res = run_bench("bench/dropout.py", "--batch", "1", "--reps", "1")
    assert len(res["results"]) == 8  # 2 dtypes x 2 tensors x (forward, forward+backward)
    assert all(r["fast_ms"] > 0 and r["torch_ms"] > 0 for r in res["results"].values())


def test_step_in_backward_bench_smoke() -> None:
    res = run_bench("bench/step_in_backward.py", "--layers", "2", "--steps", "1")
    assert res["parameters"] == sum(1 for _ in GPT(ModelConfig(vocab_size=65, block_size=32, n_layer=2,
                                                                n_head=2, n_embd=32)).parameters())
    assert all(res[opt]["normal_ms"] > 0 and res[opt]["in_backward_ms"] > 0 for opt in ("foreach", "fused"))


def test_train_bench_smoke() -> None:
    res = run_bench("bench/train.py", "--shapes", "baby", "--modes", "eager_fp32", "eager_bf16",
                    "--steps", "1", "--warmup", "1")
    modes = res["results"]["baby"]
    assert set(modes) == {"eager_fp32", "eager_bf16"} and modes["eager_fp32"]["speedup"] == 1.0
    assert all(m["tokens_per_sec"] > 0 and 0 < m["mfu"] < 1 for m in modes.values())


def test_prepare_bench_smoke() -> None:
    # The corpus shipped with bardlm: the complete works may be absent, and must not download.
    res = run_bench("bench/prepare.py", "--mb", "0.2", "--vocab", "300", "--raw-mb", "0.2",
                    "--corpus", "tiny-shakespeare")
    row = res["hf_bpe"]
    assert row["prepare"]["tokens"] > 0 and row["prepare"]["peak_rss_mb"] > 0
    assert row["raw"]["mb_s"] > 0 and row["ratio"] > 0
    assert "tiktoken_gpt2" in res  # measured, or a note saying why not


def test_serve_bench_smoke() -> None:
    res = run_bench("bench/serve.py", "--preset", "qwen3-tiny", "--clients", "2", "--requests", "1",
                    "--tokens", "4", "--prompt", "8", "--no-anchor")
    (row,) = res["results"]["bardlm"]
    assert row["clients"] == 2 and row["requests"] == 2 and row["tokens"] == 8
    assert {"tokens_per_sec", "ttft_p50_ms", "ttft_p99_ms", "token_p50_ms", "token_p99_ms"} <= set(row)
    assert res["anchor"] == "not run (--no-anchor)"


def test_serve_engine_bench_smoke() -> None:
    res = run_bench("bench/serve_engine.py", "--preset", "qwen3-tiny", "--clients", "1", "2",
                    "--requests", "1", "--tokens", "3", "--prompt", "8", "--rounds", "1")
    assert set(res["levels"]) == {"1", "2"}
    assert all(r["tokens_per_sec"] > 0 and r["step_ms"] >= r["forward_ms"] > 0
               for r in res["levels"].values())


def test_norm_speed_bench_smoke() -> None:
    res = run_bench("bench/norm_speed.py", "--rounds", "1", "--steps", "1", "--batch", "2",
                    "--context", "8", "--n-embd", "16")
    assert set(res["ms_per_step"]) == {"layernorm", "rmsnorm"} and res["ratio_median"] > 0
    assert res["meaningful"] == (res["load"] < 1.0)


def test_gpu_bench_smoke() -> None:
    """bench/gpu.py's every section on the CPU with tiny shapes, so the GPU check cannot rot."""
    res = run_bench("bench/gpu.py", "--device", "cpu", "--tiny")
    sections = ("parity", "recipe", "throughput", "decode", "serve")
    assert not [s for s in sections if "error" in res[s]], {s: res[s].get("error") for s in sections}
    assert res["device"]["device"] == "cpu" and res["tiny"] is True
    assert res["parity"]["ok"] is True and set(res["parity"]) >= {"gpt2", "llama", "qwen3"}
    assert res["recipe"]["steps"] == 4 and len(res["recipe"]["curve"]) == 2
    assert res["throughput"]["tokens_per_sec"] > 0 and res["throughput"]["step_waits_for_gpu"] is None
    assert res["decode"]["fp32_ids_equal_hf"] is True and res["decode"]["fp32"] > 0
    assert res["serve"]["requests"] == 4 and res["serve"]["tokens"] == 16
    assert set(res["memory_mib"]) == set(sections) and all(v > 0 for v in res["memory_mib"].values())
    assert set(res["goals"]) == {"recipe_1.4697_within_60s", "mfu_bf16_at_least_40pct",
                                 "decode_at_least_1.5x_hf"}


def test_gpu_bench_refuses_a_missing_device_in_one_line() -> None:
    out = subprocess.run([sys.executable, "bench/gpu.py", "--device", "cuda:7"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and out.stderr.strip().startswith("bench/gpu.py: --device cuda:7")
    assert len(out.stderr.strip().splitlines()) == 1


def test_moe_bench_smoke() -> None:
    res = run_bench("bench/moe.py", "--tiny", "--mode", "eager")  # compiling would take minutes
    assert set(res["tokens_per_sec"]) == {"ours", "hf", "dense"} and res["mode"] == "eager"
    assert res["greedy_ids_equal_hf"] is True and res["aux_loss"]["equal"] is True
    # The dense control runs as many parameters per token as the MoE (but for the routers).
    assert 0 < res["params"]["moe_active"] - res["params"]["dense"] < 0.05 * res["params"]["dense"]


def test_moe_layer_bench_smoke() -> None:
    res = run_bench("bench/moe_layer.py", "--quick", "--threads", "1")
    assert set(res["us_per_call"]) == {"loop", "stacked", "stacked_compiled", "gather_bmm",
                                       "ids_compiled"}
    assert max(res["max_diff"].values()) < 1e-5  # every way computes the loop's mixture


def test_hybrid_bench_smoke() -> None:
    res = run_bench("bench/hybrid.py", "--quick")
    assert set(res["tokens_per_sec"]) == {"hybrid", "dense", "hf"}
    assert res["greedy_ids_equal_hf"] is True  # transformers reads the same weights
    # The hybrid holds a quarter of the dense model's keys and values, plus its fixed state.
    cache = res["cache_fp32"]
    assert 4 * cache["hybrid"]["kv_bytes"] == cache["dense"]["kv_bytes"]
    assert cache["hybrid"]["state_bytes"] > 0 == cache["dense"]["state_bytes"]
