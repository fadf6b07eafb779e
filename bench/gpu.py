"""Check a GPU machine in under 10 minutes: parity, the char-5min recipe, MFU, decode, serving.

One script for the day a GPU is lent (issue 31). Each section runs on `--device` (default auto:
cuda, then mps, then cpu) and reports figures; a section that fails records its one-line error
and the rest still run. The last line is JSON: {"device": {...}, "parity": {...}, "recipe":
{...}, "throughput": {...}, "decode": {...}, "serve": {...}, "goals": {...}, "wall_s": ...}.

  parity      bardlm vs transformers logits on the device, GPT-2 / Llama / Qwen3 built from
              configs with random weights: fp32 (TF32 off) max |dlogit| <= 1e-3, and bf16
              mean |dlogit| / mean |logit| <= 0.02.
  recipe      the char-5min recipe (Muon, bf16, compile) on tiny Shakespeare with a GPU's batch
              (64) and step budget, on nanoGPT's model shape (6 x 384, dropout 0.2): seconds
              (compilation included) until the validation loss reaches nanoGPT's published
              shakespeare_char 1.4697 (~3 minutes on one A100), and the final loss.
  throughput  nanoGPT's shakespeare_char shape (6 x 384, context 256, batch 64) in bf16 +
              torch.compile: tokens/s and MFU against the GPU's spec bf16 peak (and a measured
              matmul peak); whether a training step ever waits for the GPU (CUDA sync debug mode).
  decode      B=1 greedy decode, gpt2-124m shape, bardlm vs transformers' generate on the
              device (fp32 and bf16; bardlm's compiled static-cache step too), same ids.
  serve       `bardlm serve` on the device, 64 concurrent streaming clients.
  memory      peak device memory (CPU: peak RSS) of each section, in MiB.

Goals on an H100/H200-class GPU (issue 31): recipe <= 60 s to 1.4697, MFU >= 40% in bf16,
B=1 decode >= 1.5x transformers.

    PYTHONPATH=src python bench/gpu.py                       # on the GPU machine
    PYTHONPATH=src python bench/gpu.py --device cpu --tiny   # tiny shapes: the test suite's run
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench scripts
from decode import peak_rss, reset_peak_rss, to_hf  # noqa: E402
from hf_parity import reference  # noqa: E402
from train import SHAPES, flops_per_token, matmul_peak  # noqa: E402

import bardlm  # noqa: E402
from bardlm.config import TRAIN_PRESETS, ModelConfig, TrainConfig, preset  # noqa: E402
from bardlm.errors import BardlmError  # noqa: E402
from bardlm.infer.device import resolve_device  # noqa: E402
from bardlm.infer.layouts import prepare_for_inference  # noqa: E402
from bardlm.nn.model import GPT  # noqa: E402
from bardlm.tokenizers import CharTokenizer  # noqa: E402
from bardlm.train import Trainer  # noqa: E402
from bardlm.train.data import load_corpus  # noqa: E402

NANOGPT_CHAR_LOSS = 1.4697  # nanoGPT README: shakespeare_char, ~3 minutes on one A100
FP32_TOL, BF16_REL_TOL = 1e-3, 0.02
# The recipe's model on a GPU: char-5min's recipe (Muon, bf16, compile) on nanoGPT's
# shakespeare_char shape (6 x 384, 6 heads) with its dropout 0.2; --recipe-set overrides.
GPU_RECIPE_MODEL = dict(n_layer=6, n_head=6, n_kv_head=6, n_embd=384, ffn_hidden=1024, dropout=0.2)
# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s (SXM parts).
SPEC_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_mib(device: torch.device) -> float:
    """Peak device memory since `reset_memory` (CUDA allocator), else the process's peak RSS."""
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    return round(peak / 2**20, 1)


def device_info(device: torch.device, tiny: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "hip": torch.version.hip}
    n = 256 if tiny else 8192
    info["measured_bf16_tflops"] = round(matmul_peak(torch.bfloat16, n, 3, str(device)) / 1e3, 6)
    info["spec_bf16_tflops"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
        info["spec_bf16_tflops"] = next((v for k, v in SPEC_BF16_TFLOPS.items() if k in props.name), None)
    return info


# Parity ---------------------------------------------------------------------------------------
@torch.no_grad()
def parity(device: torch.device, tiny: bool) -> dict[str, Any]:
    """Logits of bardlm and transformers on the same random-weight checkpoint, on `device`."""
    layers, dim, vocab, seq = (1, 64, 256, 16) if tiny else (4, 512, 8192, 256)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32 matmuls
    out: dict[str, Any] = {}
    try:
        for family in ("gpt2", "llama", "qwen3"):
            torch.manual_seed(0)
            ref = reference(family, layers, dim, vocab).eval()
            idx = torch.randint(0, vocab, (2, seq), device=device)
            with tempfile.TemporaryDirectory() as d:
                ref.save_pretrained(d)
                ours32, _ = bardlm.load(d, device=device)
                ours16, _ = bardlm.load(d, dtype="bf16", device=device)
            ref.to(device)
            want = ref(idx).logits.float()
            fp32 = (ours32(idx)[0].float() - want).abs().max().item()
            ref.to(torch.bfloat16)
            want16 = ref(idx).logits.float()
            rel = ((ours16(idx)[0].float() - want16).abs().mean() / want16.abs().mean()).item()
            out[family] = {"fp32_max_abs": fp32, "bf16_mean_rel": round(rel, 5),
                           "ok": fp32 <= FP32_TOL and rel <= BF16_REL_TOL}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    out["ok"] = all(v["ok"] for v in out.values())
    return out


# Training -------------------------------------------------------------------------------------
def shakespeare(tiny: bool) -> tuple[str, CharTokenizer]:
    """Tiny Shakespeare (shipped with bardlm: nothing is downloaded); its first 20,000
    characters with --tiny, so that the final full-split evaluation is quick too."""
    text, _ = load_corpus("tiny-shakespeare")
    tok = CharTokenizer.train(text)  # all 65 characters either way
    return (text[:20_000] if tiny else text), tok


def recipe(device: torch.device, tiny: bool, iters: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """char-5min with a GPU batch: training seconds to nanoGPT's 1.4697, and the final loss.
    `overrides`: model or training fields (--recipe-set), e.g. nanoGPT's shape and dropout."""
    text, tok = shakespeare(tiny)
    model_over: dict[str, Any] = dict(block_size=32, n_layer=1, n_embd=64, ffn_hidden=160) if tiny else {}
    model_fields = set(ModelConfig.__dataclass_fields__)
    model_over.update({k: v for k, v in overrides.items() if k in model_fields})
    train = {**TRAIN_PRESETS["char-5min"], "device": str(device)}
    if tiny:
        train.update(batch_size=2, max_iters=4, eval_interval=2, eval_batches=1, compile=False)
    else:
        train.update(batch_size=64, max_iters=iters, eval_interval=100, eval_batches=8,
                     warmup_iters=50)
    train.update({k: v for k, v in overrides.items() if k not in model_fields})
    if not tiny:  # the GPU run's model: nanoGPT's shape and dropout (more data per step than
        # char-5min's 4 x 256 can use: without dropout it overfits from step ~400 at batch 64)
        model_over = {**GPU_RECIPE_MODEL, **model_over}
    cfg = preset("char-5min", vocab_size=tok.vocab_size, **model_over)
    with tempfile.TemporaryDirectory() as outdir:
        trainer = Trainer(cfg, TrainConfig(**train), tok, text, outdir, progress=False,
                          log=lambda m: None)
        final = trainer.fit()
    hit = next((h for h in trainer.history if h["val_loss"] <= NANOGPT_CHAR_LOSS), None)
    return {"overrides": overrides, "params": sum(p.numel() for p in trainer.model.parameters()),
            "steps": final["step"], "batch": train["batch_size"], "train_s": round(final["elapsed_s"], 1),
            "val_loss_full": round(final["val_loss_full"], 4),
            "seconds_to_1.4697": None if hit is None else round(hit["elapsed_s"], 1),
            "step_at_1.4697": None if hit is None else hit["step"],
            "curve": [(h["step"], round(h["val_loss"], 4), round(h["elapsed_s"], 1))
                      for h in trainer.history]}


def throughput(device: torch.device, tiny: bool, peak_tflops: float | None,
               measured_tflops: float, batch_size: int | None = None) -> dict[str, Any]:
    """Training tokens/s and MFU of nanoGPT's shakespeare_char shape (bf16, compiled on GPU)."""
    text, tok = shakespeare(tiny)
    shape = "baby" if tiny else "shakespeare_char"
    fields, batch = SHAPES[shape]
    cfg = ModelConfig(vocab_size=tok.vocab_size, bias=False, **fields)
    tc = TrainConfig(batch_size=2 if tiny else batch_size or batch, max_iters=10**6, warmup_iters=10, dtype="bf16",
                     compile=device.type == "cuda", device=str(device))
    warmup, steps = (1, 2) if tiny else (10, 50)
    with tempfile.TemporaryDirectory() as outdir:
        trainer = Trainer(cfg, tc, tok, text, outdir, progress=False, log=lambda m: None)
        for _ in range(warmup):  # compilation happens here
            trainer.train_step(sync=False)
        waits = step_waits(trainer, device)
        sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            loss = trainer.train_step(sync=i == steps - 1)  # read the loss once, at the end
        elapsed = time.perf_counter() - t0
    tok_s = steps * tc.batch_size * cfg.block_size / elapsed
    flops = tok_s * flops_per_token(cfg)
    return {"shape": shape, "batch": tc.batch_size, "compile": tc.compile, "tokens_per_sec": round(tok_s),
            "last_loss": round(loss, 4), "step_waits_for_gpu": waits,
            "mfu_vs_spec": None if not peak_tflops else round(flops / (peak_tflops * 1e12), 4),
            "mfu_vs_measured_matmul": round(flops / (measured_tflops * 1e12), 4) if measured_tflops else None}


def step_waits(trainer: Trainer, device: torch.device) -> bool | None:
    """Whether an unsynced training step makes the host wait for the GPU (CUDA only): the sync
    debug mode turns any synchronising call into an error."""
    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(sync=False)
        return False
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")


# Decode ---------------------------------------------------------------------------------------
@torch.no_grad()
def decode(device: torch.device, tiny: bool, only: list[str] | None = None) -> dict[str, Any]:
    """B=1 greedy tokens/s, bardlm vs transformers' generate, same weights and device."""
    torch.manual_seed(0)
    cfg = preset("qwen3-tiny", vocab_size=65) if tiny else preset("gpt2-124m")
    n, prompt, runs = (8, 8, 1) if tiny else (256, 16, 3)
    base = GPT(cfg).eval()
    hf = to_hf(base).to(device)
    idx = torch.randint(0, cfg.vocab_size, (1, prompt), device=device)

    def timed(run: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
        run()  # warm-up (and compilation)
        times, out = [], None
        for _ in range(runs):
            sync(device)
            t = time.perf_counter()
            out = run()
            sync(device)
            times.append(time.perf_counter() - t)
        return n / statistics.median(times), out

    def hf_run() -> torch.Tensor:
        return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)

    res: dict[str, Any] = {"model": "qwen3-tiny" if tiny else "gpt2-124m", "new_tokens": n}
    res["hf_fp32"], hf_ids = timed(hf_run)
    variants: list[tuple[str, str, bool | str]] = [("fp32", "fp32", False), ("bf16", "bf16", False)]
    if device.type == "cuda":  # static KV cache, compiled step; then replayed as a CUDA graph
        variants += [("bf16_compiled", "bf16", True), ("bf16_cuda_graph", "bf16", "reduce-overhead")]
    variants = [v for v in variants if not only or v[0] in only]
    for name, dtype, compiled in variants:
        model = prepare_for_inference(copy.deepcopy(base), dtype).to(device)
        try:  # one variant's failure is recorded, the others still run
            res[name], ids = timed(lambda m=model, c=compiled: m.generate(idx, n, temperature=0, compile=c))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            res[name + "_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
            continue
        if name == "fp32":
            res["fp32_ids_equal_hf"] = bool(torch.equal(ids, hf_ids))
        else:  # bf16 rounding may flip a near-tie: how many of the n ids agree with fp32 HF
            res[name + "_ids_agree"] = int((ids == hf_ids).sum()) - prompt
    hf.to(torch.bfloat16)
    res["hf_bf16"], _ = timed(hf_run)
    ran = [k for k, *_ in variants if k in res]
    res["best_vs_hf_best"] = round(max(res[k] for k in ran) / max(res["hf_fp32"], res["hf_bf16"]), 3)
    for k in ("hf_fp32", "hf_bf16", *ran):
        res[k] = round(res[k], 1)
    return res


# Serving --------------------------------------------------------------------------------------
def serve(device: torch.device, tiny: bool, clients: int) -> dict[str, Any]:
    """`bardlm serve --device D` in its own process; `clients` concurrent streaming clients."""
    from serve import Server, drive, make_model_dir

    n_clients, tokens = (4, 4) if tiny else (clients, 64)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        chars = make_model_dir(model_dir, "qwen3-tiny" if tiny else "gpt2-124m")
        server = Server([sys.executable, "-m", "bardlm", "serve", "--ckpt", str(model_dir),
                         "--device", str(device), "--port", "0", "--max-batch", str(n_clients),
                         "--max-queue", str(2 * n_clients), "--log-level", "warning",
                         "--model-name", "bench"], r"at (http://[\d.]+:\d+)/v1")
        try:
            def body(i: int, j: int) -> dict:
                prompt = "".join(chars[(7 * i + k) % len(chars)] for k in range(16))
                return {"model": "bench", "prompt": prompt, "max_tokens": tokens,
                        "temperature": 0, "stream": True}

            asyncio.run(drive(server.url, 1, 1, body))  # warm-up
            row = asyncio.run(drive(server.url, n_clients, 1, body))
        finally:
            server.stop()
    del row["text"]
    return row


# Main -----------------------------------------------------------------------------------------
def section(results: dict[str, Any], name: str, device: torch.device, fn: Callable[[], dict]) -> None:
    """Run one section, recording its figures, its peak memory and its time; an error is kept
    as one line (the traceback goes to stderr) and the next section runs."""
    reset_memory(device)
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - one bad section must not hide the others' figures
        traceback.print_exc(file=sys.stderr)
        results[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    results.setdefault("memory_mib", {})[name] = peak_mib(device)
    print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda:N, ...")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and budgets (the test suite's run)")
    ap.add_argument("--recipe-iters", type=int, default=1500, help="char-5min steps at batch 64")
    ap.add_argument("--recipe-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a model or training field of the recipe (JSON values), "
                    "e.g. --recipe-set dropout=0.2 --recipe-set n_layer=6")
    ap.add_argument("--batch", type=int, default=None, help="throughput batch (default nanoGPT's 64)")
    ap.add_argument("--decode-variants", nargs="*", default=None,
                    choices=["fp32", "bf16", "bf16_compiled", "bf16_cuda_graph"],
                    help="bardlm decode variants to time (default: all this device has)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent server clients")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["parity", "recipe", "throughput", "decode", "serve"])
    args = ap.parse_args()
    try:
        device = resolve_device(args.device)
    except BardlmError as e:
        raise SystemExit(f"bench/gpu.py: {e}") from None
    overrides = {}
    for item in args.recipe_set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bench/gpu.py: --recipe-set {item!r}: expected KEY=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare word: a string (e.g. optimizer=adamw)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    info = device_info(device, args.tiny)
    res: dict[str, Any] = {"device": info, "tiny": args.tiny}
    sections: dict[str, Callable[[], dict]] = {
        "parity": lambda: parity(device, args.tiny),
        "recipe": lambda: recipe(device, args.tiny, args.recipe_iters, overrides),
        "throughput": lambda: throughput(device, args.tiny, info["spec_bf16_tflops"],
                                         info["measured_bf16_tflops"], args.batch),
        "decode": lambda: decode(device, args.tiny, args.decode_variants),
        "serve": lambda: serve(device, args.tiny, args.clients),
    }
    for name, fn in sections.items():
        if name not in args.skip:
            section(res, name, device, fn)
    get = lambda s, k: res.get(s, {}).get(k)  # noqa: E731
    seconds, mfu, speed = get("recipe", "seconds_to_1.4697"), get("throughput", "mfu_vs_spec"), \
        get("decode", "best_vs_hf_best")
    res["goals"] = {  # None: not measured here (no such section, or no spec peak for this device)
        "recipe_1.4697_within_60s": None if "recipe" not in res or "error" in res["recipe"]
        else seconds is not None and seconds <= 60,
        "mfu_bf16_at_least_40pct": None if mfu is None else mfu >= 0.40,
        "decode_at_least_1.5x_hf": None if speed is None else speed >= 1.5,
    }
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))


if __name__ == "__main__":
    main()
