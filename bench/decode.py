"""Decode speed of a GPT-2 124M-shaped model (random weights), every variant in one process.

    PYTHONPATH=src python bench/decode.py                 # the full run (several minutes)
    PYTHONPATH=src python bench/decode.py --preset char-tiny --tokens 32 --runs 2   # smoke test
    PYTHONPATH=src python bench/decode.py --vs-llama-cpp   # + llama.cpp on the same weights
    PYTHONPATH=src python bench/decode.py --draft-pair runs/pair/target runs/pair/draft  # trained pair

Batch 1, a 16-token prompt, 256 new greedy tokens, 2 threads, after a warm-up; the median of
--runs runs per variant. Variants: ours fp32 with and without the KV cache, `transformers`
`generate` (greedy, use_cache=True) on the same fp32 weights, ours bf16, int8 and int4 (groups of
32 and of 128), prompt-lookup speculative decoding (`--draft ngram`, 4 guesses) on fp32 and on
int4 with a prompt that repeats itself (its greedy ids must equal plain greedy decoding's), and
with --compile ours fp32 with the static-shape decode step compiled (`generate(compile=True)`).
With --vs-llama-cpp, llama.cpp (llama-cpp-python) decodes the same weights exported to GGUF
f32 / q8_0 / q4_0 with the same prompt, greedy, the same threads; it is skipped, and the JSON
says why, where llama-cpp-python is not installed. Each is
also given as a fraction of its memory-bandwidth bound: (bytes of weights + KV cache read per
token) / (read bandwidth measured in this run), and against its kernel ceiling: the time the
weight matmuls alone take when every linear layer is applied to one token's activation in model
order, with nothing else (the speed a decode step would have with zero overhead on this CPU's
kernels). Ends with one JSON line.

--draft-pair TARGET DRAFT (a pair from bench/draft_pair.py) times, instead, plain greedy decoding
of the trained target against speculative decoding with the trained draft (and with prompt
lookup) on ordinary text: passages from the corpus's last 1%, which neither model trained on.
The variants run in interleaved rounds in one process (plain, draft, ngram, plain, ...), so a
change in the machine's load hits them alike; each round's ratio is reported, then the median,
with the load average.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bardlm import GPT, preset
from bardlm.infer.int4 import quantize_model4
from bardlm.infer.layouts import prepare_for_inference
from bardlm.infer.quantize import weight_bytes
from bardlm.infer.speculative import generate_speculative


def read_bandwidth(n_bytes: int = 512 * 2**20, reps: int = 5) -> float:
    """Memory read bandwidth in bytes/s: the median time to sum a buffer far larger than L3."""
    x = torch.ones(n_bytes // 4)
    x.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return n_bytes / statistics.median(times)


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so each variant gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def to_hf(model: GPT):  # noqa: ANN201
    """A transformers GPT2LMHeadModel holding our weights, through the library's bridge (hf.py)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from bardlm.io.hf import save_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        return AutoModelForCausalLM.from_pretrained(tmp).eval()


def kernel_ceiling(model: torch.nn.Module, reps: int = 20) -> float:
    """Tokens/s if a decode step were its weight matmuls alone (median of `reps` passes)."""
    from bardlm.infer.int4 import Int4Linear
    from bardlm.infer.layouts import FastLinear, model_dtype
    from bardlm.infer.quantize import Int8Linear

    lins = [m for m in model.modules()
            if isinstance(m, (torch.nn.Linear, FastLinear, Int8Linear, Int4Linear))]
    xs = [torch.randn(1, 1, m.in_features, dtype=model_dtype(model)) for m in lins]

    def step() -> None:
        for m, x in zip(lins, xs):
            m(x)

    with torch.no_grad():
        step()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    return 1 / statistics.median(times)


def time_decode(run, runs: int) -> tuple[float, torch.Tensor]:  # noqa: ANN001
    """Median seconds of `run()` over `runs` calls after one warm-up call; and its output."""
    out = run(warm=True)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = run(warm=False)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--nocache-runs", type=int, default=1, help="the uncached run is slow")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", action="append", default=[],
                    help="variant to leave out: nocache, hf, bf16, int8, int4, spec")
    ap.add_argument("--vs-llama-cpp", action="store_true",
                    help="also time llama.cpp (llama-cpp-python) on the same weights as GGUF")
    ap.add_argument("--compile", action="store_true",
                    help="also time fp32 with the decode step under torch.compile (compiles first)")
    ap.add_argument("--draft-pair", nargs=2, metavar=("TARGET", "DRAFT"),
                    help="time a trained target alone and with its trained draft (bench/draft_pair.py)")
    ap.add_argument("--pair-data", default=None,
                    help="--draft-pair's corpus (default: the one in the pair's pair.json, else tiny-shakespeare)")
    ap.add_argument("--draft-tokens", type=int, default=4, help="--draft-pair's K")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.draft_pair:
        print(json.dumps(draft_pair(args)))
        return
    torch.manual_seed(0)
    cfg = preset(args.preset, **({"vocab_size": 65} if args.preset.endswith("tiny") else {}))
    base = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, args.prompt))
    n = args.tokens
    bw = read_bandwidth()
    print(f"{args.preset}: {base.num_params():,} parameters; batch 1, prompt {args.prompt}, "
          f"{n} new tokens, {args.threads} threads; read bandwidth {bw / 1e9:.1f} GB/s")

    # bytes of KV cache read per token, averaged over the run (fp32; halved for bf16 caches)
    kv_per_pos = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim
    avg_ctx = args.prompt + n / 2

    results: dict[str, dict] = {}

    def ours(name: str, dtype: str, use_cache: bool = True, runs: int = args.runs,
             compile: bool = False, group_size: int | None = None, prompt: torch.Tensor = idx,
             draft: str | None = None) -> torch.Tensor:
        model = copy.deepcopy(base)
        if group_size is not None:  # int4 with a chosen group size (`--dtype int4` is G=32)
            quantize_model4(model, group_size)
        model = prepare_for_inference(model, dtype)
        gc.collect()
        reset_peak_rss()

        def run(warm: bool) -> torch.Tensor:
            # The warm-up call has the timed call's length: a compiled step is compiled for
            # the cache size it sees (prompt + new tokens).
            length = n if warm and compile else 8 if warm else n
            if draft is not None:
                return generate_speculative(model, prompt, length, draft=draft, draft_tokens=4,
                                            temperature=0, stats=spec_stats.setdefault(name, {}))
            return model.generate(prompt, length, temperature=0, use_cache=use_cache,
                                  compile=compile)

        sec, out = time_decode(run, runs)
        act = 4 if dtype == "fp32" else 2
        read = weight_bytes(model) - _wpe_bytes(model) + (kv_per_pos * act * avg_ctx if use_cache else 0)
        results[name] = dict(tokens_per_sec=n / sec, weight_bytes=weight_bytes(model),
                             bound=bw / read, peak_rss=peak_rss(), ceiling=kernel_ceiling(model))
        print(f"  {name}: {n / sec:.1f} tokens/s", flush=True)
        return out  # the model is freed on return

    ids_fp32 = ours("fp32_cache", "fp32")
    if args.compile:
        ids_compiled = ours("fp32_compiled", "fp32", compile=True)
        assert torch.equal(ids_compiled, ids_fp32), "compiled and eager greedy ids differ"
    if "nocache" not in args.skip:
        ids_nocache = ours("fp32_nocache", "fp32", use_cache=False, runs=args.nocache_runs)
        results["fp32_nocache"]["bound"] = None  # compute bound, not a bandwidth one
        results["fp32_nocache"]["ceiling"] = None
        assert torch.equal(ids_nocache, ids_fp32), "cached and uncached greedy ids differ"
    ids_hf = None
    if "hf" not in args.skip:
        hf = to_hf(base)
        gc.collect()
        reset_peak_rss()
        mask = torch.ones_like(idx)

        def run_hf(warm: bool) -> torch.Tensor:
            with torch.no_grad():
                return hf.generate(idx, attention_mask=mask, max_new_tokens=8 if warm else n,
                                   min_new_tokens=8 if warm else n, do_sample=False,
                                   use_cache=True, pad_token_id=0)

        sec, ids_hf = time_decode(run_hf, args.runs)
        read = weight_bytes(base) - _wpe_bytes(base) + kv_per_pos * 4 * avg_ctx
        results["hf_fp32"] = dict(tokens_per_sec=n / sec, weight_bytes=weight_bytes(base),
                                  bound=bw / read, peak_rss=peak_rss(), ceiling=None)
        print(f"  hf_fp32: {n / sec:.1f} tokens/s", flush=True)
        del hf
        gc.collect()
    agree = {}
    for dtype in ("bf16", "int8"):
        if dtype not in args.skip:
            out = ours(dtype, dtype)
            agree[dtype] = (out[0, args.prompt:] == ids_fp32[0, args.prompt:]).float().mean().item()
    if "int4" not in args.skip:
        for g in (32, 128):
            out = ours(f"int4_g{g}", "int4", group_size=g)
            agree[f"int4_g{g}"] = (out[0, args.prompt:] == ids_fp32[0, args.prompt:]).float().mean().item()
    spec_equal = {}
    spec_stats: dict[str, dict] = {}
    if "spec" not in args.skip:
        # A prompt that repeats itself (a passage quoted back), the case prompt lookup is for.
        rep = idx.repeat(1, max(1, min(4, (cfg.block_size - n) // args.prompt)))  # fits the context
        plain = ours("fp32_repeat", "fp32", prompt=rep)
        spec = ours("fp32_ngram", "fp32", prompt=rep, draft="ngram")
        spec_equal["fp32"] = bool(torch.equal(plain, spec))
        if "int4" not in args.skip:
            plain = ours("int4_repeat", "int4", prompt=rep)
            spec = ours("int4_ngram", "int4", prompt=rep, draft="ngram")
            spec_equal["int4"] = bool(torch.equal(plain, spec))
        for name in [k for k in results if k.endswith(("_repeat", "_ngram"))]:
            results[name]["ceiling"] = None  # speculative steps read the weights once per K+1
    llama = llama_cpp_results(base, idx, n, args) if args.vs_llama_cpp else None

    print(f"\n{'variant':<14}{'tokens/s':>10}{'of bound':>10}{'ceiling':>9}{'of ceiling':>12}"
          f"{'weights MiB':>13}{'peak RSS MiB':>14}")
    for name, r in results.items():
        frac = f"{r['tokens_per_sec'] / r['bound']:.0%}" if r["bound"] else "-"
        ceil = f"{r['ceiling']:.1f}" if r["ceiling"] else "-"
        of_ceil = f"{r['tokens_per_sec'] / r['ceiling']:.0%}" if r["ceiling"] else "-"
        print(f"{name:<14}{r['tokens_per_sec']:>10.1f}{frac:>10}{ceil:>9}{of_ceil:>12}"
              f"{r['weight_bytes'] / 2**20:>13.1f}{r['peak_rss'] / 2**20:>14.1f}")
    tps = {k: round(v["tokens_per_sec"], 2) for k, v in results.items()}
    ratio = lambda a, b: round(tps[a] / tps[b], 3) if a in tps and b in tps else None  # noqa: E731
    summary = dict(
        tokens_per_sec=tps,
        fraction_of_bound={k: round(v["tokens_per_sec"] / v["bound"], 3)
                           for k, v in results.items() if v["bound"]},
        cache_vs_nocache=ratio("fp32_cache", "fp32_nocache"),
        ours_vs_hf=ratio("fp32_cache", "hf_fp32"),
        compiled_vs_hf=ratio("fp32_compiled", "hf_fp32"),
        compiled_vs_eager=ratio("fp32_compiled", "fp32_cache"),
        bf16_vs_fp32=ratio("bf16", "fp32_cache"),
        int8_vs_fp32=ratio("int8", "fp32_cache"),
        bf16_vs_hf=ratio("bf16", "hf_fp32"),
        int8_vs_hf=ratio("int8", "hf_fp32"),
        int4_g32_vs_int8=ratio("int4_g32", "int8"),
        int4_g128_vs_int8=ratio("int4_g128", "int8"),
        int4_g32_vs_fp32=ratio("int4_g32", "fp32_cache"),
        ngram_vs_plain_fp32=ratio("fp32_ngram", "fp32_repeat"),
        ngram_vs_plain_int4=ratio("int4_ngram", "int4_repeat"),
        ngram_ids_equal_plain=spec_equal,
        ngram_acceptance={k: round(v["accepted"] / max(1, v["drafted"]), 3)
                          for k, v in spec_stats.items()},
        llama_cpp=llama,
        # the matmuls-only speed of each variant over transformers' measured speed: the most
        # that variant could reach against transformers on this CPU's kernels
        kernel_ceiling_vs_hf={k: round(v["ceiling"] / results["hf_fp32"]["tokens_per_sec"], 3)
                              for k, v in results.items() if v["ceiling"] and "hf_fp32" in results},
        int8_bytes_ratio=(round(results["int8"]["weight_bytes"] / weight_bytes(base), 4)
                          if "int8" in results else None),
        greedy_ids_equal_hf=None if ids_hf is None else bool(torch.equal(ids_hf, ids_fp32)),
        greedy_agreement_with_fp32=agree,
        read_bandwidth_gbs=round(bw / 1e9, 2),
        kernel_ceiling_tokens_per_sec={k: round(v["ceiling"], 1) for k, v in results.items()
                                       if v["ceiling"]},
        peak_rss_mib={k: round(v["peak_rss"] / 2**20, 1) for k, v in results.items()},
    )
    if llama and "tokens_per_sec" in llama:
        theirs = llama["tokens_per_sec"]
        llama["ours_vs_llama_cpp"] = {
            f"{a}/{b}": round(tps[a] / theirs[b], 3)
            for a, b in (("fp32_cache", "f32"), ("int8", "q8_0"), ("int4_g32", "q4_0"))
            if a in tps and b in theirs}
    print(f"\nwith cache / without: {summary['cache_vs_nocache']}; ours / transformers: "
          f"{summary['ours_vs_hf']}; bf16 / fp32: {summary['bf16_vs_fp32']}; int8 / fp32: "
          f"{summary['int8_vs_fp32']}; int8 bytes / fp32 bytes: {summary['int8_bytes_ratio']}; "
          f"greedy ids equal transformers': {summary['greedy_ids_equal_hf']}")
    print(json.dumps(summary))


def draft_pair(args: argparse.Namespace, passages: int = 4) -> dict:
    """Tokens/s of a trained target decoding greedily alone, with its trained draft and with
    prompt lookup, on `passages` held-out passages per round, in interleaved rounds."""
    from bardlm import load
    from bardlm.io.load import load_draft
    from bardlm.train.data import load_corpus

    target, tok = load(args.draft_pair[0], "fp32")
    draft = load_draft(args.draft_pair[1], tok, "fp32")
    made = Path(args.draft_pair[0]).parent / "pair.json"  # written by bench/draft_pair.py
    data = args.pair_data or (json.loads(made.read_text())["data"] if made.exists() else "tiny-shakespeare")
    text, _ = load_corpus(data)
    ids = tok.encode(text[len(text) * 99 // 100:])  # the last 1%: held out from both models
    step = len(ids) // passages
    prompts = [torch.tensor([ids[i * step:i * step + args.prompt]]) for i in range(passages)]
    n = min(args.tokens, target.config.block_size - args.prompt - args.draft_tokens)
    k = args.draft_tokens
    variants = {
        "plain": lambda p, st: target.generate(p, n, temperature=0),
        "draft": lambda p, st: generate_speculative(target, p, n, draft=draft, draft_tokens=k,
                                                    temperature=0, stats=st),
        "ngram": lambda p, st: generate_speculative(target, p, n, draft="ngram", draft_tokens=k,
                                                    temperature=0, stats=st),
    }
    for run in variants.values():  # warm-up (and the packed fp32 weights, made on first use)
        run(prompts[0][:, :8], {})
    print(f"target {target.num_params():,} parameters, draft {draft.num_params():,}; {passages} "
          f"passages x ({args.prompt} + {n}) tokens, K = {k}, {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    secs: dict[str, list[float]] = {v: [] for v in variants}
    outs: dict[str, list[torch.Tensor]] = {}
    stats = {v: {"drafted": 0, "accepted": 0} for v in variants}
    for r in range(args.runs):
        for name, run in variants.items():
            t = time.perf_counter()
            outs[name] = []
            for p in prompts:
                st: dict = {}
                outs[name].append(run(p, st))
                for key in ("drafted", "accepted"):
                    stats[name][key] += st.get(key, 0)
            secs[name].append(time.perf_counter() - t)
        print(f"  round {r + 1}: " + ", ".join(
            f"{v} {passages * n / secs[v][-1]:.1f} tok/s" for v in variants)
            + f"; draft x{secs['plain'][-1] / secs['draft'][-1]:.2f}, ngram "
            f"x{secs['plain'][-1] / secs['ngram'][-1]:.2f}; load {os.getloadavg()[0]:.2f}", flush=True)
    ratios = {v: [round(a / b, 3) for a, b in zip(secs["plain"], secs[v])] for v in ("draft", "ngram")}
    return dict(
        tokens_per_sec={v: round(passages * n / statistics.median(t), 2) for v, t in secs.items()},
        speedup_median={v: statistics.median(r) for v, r in ratios.items()},
        speedup_per_round=ratios,
        acceptance={v: round(stats[v]["accepted"] / max(1, stats[v]["drafted"]), 3)
                    for v in ("draft", "ngram")},
        ids_equal_plain={v: all(torch.equal(a, b) for a, b in zip(outs[v], outs["plain"]))
                         for v in ("draft", "ngram")},
        load_average=[round(x, 2) for x in os.getloadavg()],
        new_tokens=n, passages=passages, draft_tokens=k,
    )


def llama_cpp_results(base: GPT, idx: torch.Tensor, n: int, args: argparse.Namespace) -> dict:
    """llama.cpp's tokens/s on `base` exported as GGUF f32 / q8_0 / q4_0 (the same prompt ids,
    greedy, n new tokens, the same threads), with ours / llama.cpp ratios for each matched pair;
    or {"skipped": why}."""
    try:
        import llama_cpp
    except ImportError:
        why = "llama-cpp-python is not installed (pip install llama-cpp-python)"
        print(f"  llama.cpp: skipped, {why}")
        return {"skipped": why}
    import tempfile

    from bardlm.io.gguf import write_gguf
    from bardlm.tokenizers import train_bpe

    # The file needs a byte-level BPE vocabulary; token ids are fed directly, so any will do
    # (padded to the model's vocab_size by the exporter).
    tok = train_bpe("the quick brown fox jumps over the lazy dog " * 50, 300)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in ("f32", "q8_0", "q4_0"):
            path = f"{tmp}/m-{qtype}.gguf"
            write_gguf(base, tok, path, qtype)
            llm = llama_cpp.Llama(model_path=path, n_ctx=idx.shape[1] + n + 8, n_threads=args.threads,
                                  n_threads_batch=args.threads, verbose=False, seed=0)
            prompt = idx[0].tolist()
            _llama_decode(llm, prompt, 8)  # warm-up
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                _llama_decode(llm, prompt, n)
                times.append(time.perf_counter() - t)
            out[qtype] = round(n / statistics.median(times), 2)
            print(f"  llama.cpp {qtype}: {out[qtype]:.1f} tokens/s", flush=True)
            del llm
    return {"tokens_per_sec": out}


def _llama_decode(llm, prompt: list[int], k: int) -> list[int]:  # noqa: ANN001
    """k greedy tokens after `prompt` from a llama_cpp.Llama, from a fresh context."""
    llm.reset()
    ids: list[int] = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        ids.append(int(t))
        if len(ids) == k:
            break
    return ids


def _wpe_bytes(model: torch.nn.Module) -> int:
    """A learned position table is read one row per token, not whole: leave it out of the bound."""
    wpe = getattr(model.transformer, "wpe", None)
    return 0 if wpe is None else wpe.weight.numel() * wpe.weight.element_size()


if __name__ == "__main__":
    main()
