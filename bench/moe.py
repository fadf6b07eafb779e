"""Mixture-of-experts decode speed: a Qwen3-MoE-shaped model (random weights) against transformers
on the same weights and against a dense model with the same active parameters, in one process.

    PYTHONPATH=src python bench/moe.py                 # 32 experts, top 4, compiled (~3-5 minutes on 2 cores)
    PYTHONPATH=src python bench/moe.py --mode eager    # no torch.compile (~1-2 minutes)
    PYTHONPATH=src python bench/moe.py --tiny --mode eager   # smoke test (seconds)

Batch 1, a 16-token prompt, --tokens new greedy tokens after a warm-up, the median of --runs
rounds (each round times every variant once, interleaved):
  ours      bardlm `generate` (KV cache) on the MoE model, in --mode: "compile" (the fastest a
            user can pick: `generate(..., compile=True)`, `bardlm serve --compile`; the experts
            read through stacked weights, nn/moe.py) or "eager";
  ours_eager  the same model without compiling (only with --mode compile);
  hf        `transformers`' Qwen3MoeForCausalLM `generate` (greedy, cache, eager: its default) on
            the same weights, written by bardlm's exporter and read by `from_pretrained`;
  dense     bardlm, in the same mode as ours, on a Qwen3 model of the same shape whose FFN is one
            SwiGLU as wide as the top-k experts together: the same parameters per token (but for
            the router); dense_eager: that model without compiling (only with --mode compile).
The compile time (the warm-up call, all of the step's cache-length buckets) is reported apart.
The greedy ids of ours (compiled and eager) and hf are compared, and the training auxiliary loss
of our model (`nn.moe.load_balancing_loss` on the router logits of a training forward) is
compared with transformers' `load_balancing_loss_func` on the same logits. Ratios are of this
run only: on a shared machine the absolute tokens/s move with the load, the ratios much less.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from bardlm import GPT, ModelConfig
from bardlm.nn.moe import MoE, active_params


def configs(args: argparse.Namespace) -> tuple[ModelConfig, ModelConfig]:
    """(the MoE config, the dense config with the same active FFN width)."""
    shape = dict(vocab_size=args.vocab, block_size=256, n_layer=args.layers, n_head=args.heads,
                 n_kv_head=max(1, args.heads // 4), n_embd=args.n_embd, head_dim=args.n_embd // args.heads,
                 ffn="swiglu", norm="rmsnorm", pos="rope", bias=False, qk_norm=True, norm_eps=1e-6,
                 rope_theta=1e6, tie_embeddings=False)
    moe = ModelConfig(**shape, n_expert=args.experts, n_expert_active=args.top_k,
                      expert_hidden=args.expert_hidden, ffn_hidden=args.expert_hidden,
                      router_aux_loss_coef=0.001)
    dense = ModelConfig(**shape, ffn_hidden=args.top_k * args.expert_hidden)
    return moe, dense


def to_hf(model: GPT):  # noqa: ANN201
    """transformers' model of the same weights, through bardlm's exporter (io/hf.py)."""
    from transformers import AutoModelForCausalLM

    from bardlm.io.hf import save_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        ref = AutoModelForCausalLM.from_pretrained(tmp).eval()
    ref.generation_config.eos_token_id = None  # greedy for exactly --tokens tokens
    return ref


def time_decode(fns: dict, runs: int) -> tuple[dict[str, float], dict[str, float]]:  # noqa: ANN001
    """(median seconds of each `fns[k]()` over `runs` rounds, seconds of its first call: the
    warm-up, which compiles a compiled variant). The rounds interleave the variants, so a change
    in the machine's load hits every one alike."""
    first = {}
    for k, fn in fns.items():
        t = time.perf_counter()
        fn()
        first[k] = time.perf_counter() - t
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a loaded machine")
    p.add_argument("--mode", choices=["compile", "eager"], default="compile",
                   help="how ours and the dense model decode (default compile: the fastest)")
    p.add_argument("--tiny", action="store_true", help="a smoke-test shape (seconds)")
    args = p.parse_args()
    if args.tiny:
        args.n_embd, args.heads, args.layers, args.vocab = 64, 4, 2, 256
        args.experts, args.top_k, args.expert_hidden, args.tokens, args.runs = 8, 2, 32, 8, 1
    if args.threads:  # with more threads than free cores, each parallel region waits for a core
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    moe_cfg, dense_cfg = configs(args)
    moe, dense = GPT(moe_cfg).eval(), GPT(dense_cfg).eval()
    with torch.no_grad():  # N(0, 1) routers: tokens spread over the experts, as in a trained model
        for m in moe.modules():
            if isinstance(m, MoE):
                m.router.weight.normal_(0.0, 1.0)
    hf = to_hf(moe)
    # The training auxiliary loss on the router logits of one training forward (all MoE layers).
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    # Ours is the model's own term: its training loss with the coefficient minus without, over it.
    moe.train()
    idx = torch.randint(0, args.vocab, (4, 32))
    logits: list[torch.Tensor] = []
    hooks = [m.router.register_forward_hook(lambda mod, inp, out: logits.append(out.detach()))
             for m in moe.modules() if isinstance(m, MoE)]
    with torch.no_grad():  # coefficient 1: the difference keeps fp32's digits
        moe.config = moe.config.replace(router_aux_loss_coef=1.0)
        with_aux = moe(idx, idx)[1]
        moe.config = moe.config.replace(router_aux_loss_coef=0.0)
        plain = moe(idx, idx)[1]
    for h in hooks:
        h.remove()
    logits = logits[: len(hooks)]  # the first forward's, one per MoE layer
    ours_aux = (with_aux - plain).item()
    hf_aux = load_balancing_loss_func(tuple(logits), num_experts=args.experts, top_k=args.top_k).item()
    moe.eval()
    prompt = torch.randint(0, args.vocab, (1, 16))
    n = args.tokens
    compiled = args.mode == "compile"
    with torch.no_grad():
        hf_ids = hf.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(prompt))
        fns = {"ours": lambda: moe.generate(prompt, n, temperature=0.0, compile=compiled)}
        if compiled:
            fns["ours_eager"] = lambda: moe.generate(prompt, n, temperature=0.0)
        fns["hf"] = lambda: hf.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0,
                                        attention_mask=torch.ones_like(prompt))
        fns["dense"] = lambda: dense.generate(prompt, n, temperature=0.0, compile=compiled)
        if compiled:
            fns["dense_eager"] = lambda: dense.generate(prompt, n, temperature=0.0)
        seconds, first = time_decode(fns, args.runs)
        ours_ids = moe.generate(prompt, n, temperature=0.0, compile=compiled)
        eager_ids = moe.generate(prompt, n, temperature=0.0)
    tps = {k: n / v for k, v in seconds.items()}
    result = {
        "shape": {"n_embd": args.n_embd, "n_layer": args.layers, "experts": args.experts,
                  "top_k": args.top_k, "expert_hidden": args.expert_hidden, "tokens": n},
        "params": {"moe_total": moe.num_params(), "moe_active": active_params(moe),
                   "dense": dense.num_params()},
        "threads": torch.get_num_threads(),
        "mode": args.mode,
        "tokens_per_sec": {k: round(v, 1) for k, v in tps.items()},
        "ours_vs_hf": round(tps["ours"] / tps["hf"], 2),
        "ours_vs_dense": round(tps["ours"] / tps["dense"], 2),
        "greedy_ids_equal_hf": bool(torch.equal(ours_ids, hf_ids)),
        "greedy_ids_equal_eager": bool(torch.equal(ours_ids, eager_ids)),
        "aux_loss": {"ours": ours_aux, "hf": hf_aux, "equal": abs(ours_aux - hf_aux) <= 1e-4 * abs(hf_aux)},
    }
    if compiled:  # the warm-up call less a timed one: the compiling alone
        result["compile_seconds"] = {k: round(first[k] - seconds[k], 1) for k in ("ours", "dense")}
        result["ours_eager_vs_hf"] = round(tps["ours_eager"] / tps["hf"], 2)
    print(f"B=1 decode, {n} tokens, {torch.get_num_threads()} threads, ours and dense {args.mode}"
          f"{' (generate(..., compile=True))' if compiled else ''}: ours {tps['ours']:.1f} tok/s, "
          f"transformers (eager) {tps['hf']:.1f} tok/s (x{result['ours_vs_hf']}), dense with the same "
          f"active parameters {tps['dense']:.1f} tok/s (x{result['ours_vs_dense']})")
    if compiled:
        print(f"eager: ours {tps['ours_eager']:.1f} tok/s (x{result['ours_eager_vs_hf']} transformers), "
              f"dense {tps['dense_eager']:.1f} tok/s; compiling took {result['compile_seconds']['ours']} s "
              f"(MoE), {result['compile_seconds']['dense']} s (dense)")
    print(f"aux loss ours {ours_aux:.6f} vs transformers {hf_aux:.6f}; greedy ids equal: "
          f"{result['greedy_ids_equal_hf']} (transformers), {result['greedy_ids_equal_eager']} (eager)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
