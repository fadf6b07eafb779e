"""Mixture-of-experts decode speed: a Qwen3-MoE-shaped model (random weights) against transformers
on the same weights and against a dense model with the same active parameters, in one process.

    PYTHONPATH=src python bench/moe.py            # 32 experts, top 4 (~1-2 minutes on 2 cores)
    PYTHONPATH=src python bench/moe.py --tiny     # smoke test (seconds)

Batch 1, a 16-token prompt, --tokens new greedy tokens after a warm-up, the median of --runs
rounds (each round times every variant once, interleaved):
  ours      bardlm `generate` (KV cache) on the MoE model;
  hf        `transformers`' Qwen3MoeForCausalLM `generate` (greedy, cache) on the same weights,
            written by bardlm's exporter and read by `from_pretrained`;
  dense     bardlm on a Qwen3 model of the same shape whose FFN is one SwiGLU as wide as the
            top-k experts together: the same parameters per token (but for the router).
The greedy ids of ours and hf are compared, and the training auxiliary loss of our model
(`nn.moe.load_balancing_loss` on the router logits of a training forward) is compared with
transformers' `load_balancing_loss_func` on the same logits. Ratios are of this run only: on a
shared machine the absolute tokens/s move with the load, the ratios much less. Ends with one
JSON line.
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


def time_decode(fns: dict, runs: int) -> dict[str, float]:  # noqa: ANN001
    """Median seconds of each `fns[k]()` over `runs` rounds, after one warm-up each. The rounds
    interleave the variants, so a change in the machine's load hits every one alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


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
    p.add_argument("--tiny", action="store_true", help="a smoke-test shape (seconds)")
    args = p.parse_args()
    if args.tiny:
        args.n_embd, args.heads, args.layers, args.vocab = 64, 4, 2, 256
        args.experts, args.top_k, args.expert_hidden, args.tokens, args.runs = 8, 2, 32, 8, 1
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
    with torch.no_grad():
        ours_ids = moe.generate(prompt, n, temperature=0.0)
        hf_ids = hf.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(prompt))
        seconds = time_decode({
            "ours": lambda: moe.generate(prompt, n, temperature=0.0),
            "hf": lambda: hf.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0,
                                      attention_mask=torch.ones_like(prompt)),
            "dense": lambda: dense.generate(prompt, n, temperature=0.0),
        }, args.runs)
    tps = {k: n / v for k, v in seconds.items()}
    result = {
        "shape": {"n_embd": args.n_embd, "n_layer": args.layers, "experts": args.experts,
                  "top_k": args.top_k, "expert_hidden": args.expert_hidden, "tokens": n},
        "params": {"moe_total": moe.num_params(), "moe_active": active_params(moe),
                   "dense": dense.num_params()},
        "threads": torch.get_num_threads(),
        "tokens_per_sec": {k: round(v, 1) for k, v in tps.items()},
        "ours_vs_hf": round(tps["ours"] / tps["hf"], 2),
        "ours_vs_dense": round(tps["ours"] / tps["dense"], 2),
        "greedy_ids_equal_hf": bool(torch.equal(ours_ids, hf_ids)),
        "aux_loss": {"ours": ours_aux, "hf": hf_aux, "equal": abs(ours_aux - hf_aux) <= 1e-4 * abs(hf_aux)},
    }
    print(f"B=1 decode, {n} tokens, {torch.get_num_threads()} threads: ours {tps['ours']:.1f} tok/s, "
          f"transformers {tps['hf']:.1f} tok/s (x{result['ours_vs_hf']}), dense with the same active "
          f"parameters {tps['dense']:.1f} tok/s (x{result['ours_vs_dense']})")
    print(f"aux loss ours {ours_aux:.6f} vs transformers {hf_aux:.6f}; greedy ids equal: "
          f"{result['greedy_ids_equal_hf']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
