"""One mixture-of-experts layer decoding one token, five ways: why the compiled decode step
reads experts through views of stacked weights (nn/moe.py) rather than gathering them.

    PYTHONPATH=src python bench/moe_layer.py            # 32 experts of 256, top 4, width 512
    PYTHONPATH=src python bench/moe_layer.py --quick    # smoke test (a small shape, seconds)

  loop            `MoE._one_token`: the chosen experts' SwiGLUs in turn (eager decoding);
  stacked         `MoE._few_tokens_stacked` in eager mode: the chosen experts' rows of the stacked
                  weights gathered (a copy), multiplied and summed;
  stacked_compiled  the same under torch.compile (fullgraph), which fuses the gather into the
                  reduction: what `generate(..., compile=True)` runs;
  gather_bmm      the gathered weights applied with two batched products (eager);
  ids_compiled    compiled, each chosen id read as an integer (`.item()`, capture_scalar_outputs)
                  and its expert's weights multiplied as a view of the stacks: the loop's
                  products in one graph.
Median microseconds per call over --calls calls (interleaved rounds); every variant's output is
checked against `loop`. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bardlm import ModelConfig
from bardlm.nn.moe import MoE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-hidden", type=int, default=256)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a loaded machine")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a small shape, few calls (seconds)")
    args = p.parse_args()
    if args.quick:
        args.n_embd, args.experts, args.top_k, args.expert_hidden, args.calls, args.rounds = 64, 8, 2, 32, 5, 1
    if args.threads:  # with more threads than free cores, each parallel region waits for a core
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=4, n_embd=args.n_embd, ffn="swiglu",
                      norm="rmsnorm", pos="rope", bias=False, n_expert=args.experts,
                      n_expert_active=args.top_k, expert_hidden=args.expert_hidden)
    moe = MoE(cfg).eval()
    with torch.no_grad():
        moe.router.weight.normal_()
    moe.stack_experts()
    st = moe.stacked
    x = torch.randn(1, args.n_embd)
    _, w, ids = moe.route(x)

    def gather_bmm(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        fc, proj = st.fc[ids[0]], st.proj[ids[0]]  # (k, 2I, C), (k, C, I): copies
        h = torch.bmm(fc, x.t().expand(len(ids[0]), -1, 1)).squeeze(-1)  # (k, 2I)
        y = torch.bmm(proj, moe.experts[0].unit(h).unsqueeze(-1)).squeeze(-1)  # (k, C)
        return w @ y

    def ids_one_by_one(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for j in range(ids.shape[1]):
            e = ids[0, j].item()
            torch._check(e >= 0)
            torch._check(e < st.fc.shape[0])
            out = out + w[0, j] * (moe.experts[0].unit(x @ st.fc[e].t()) @ st.proj[e].t())
        return out

    fns = {"loop": lambda: moe._one_token(x, w[0], ids[0]),
           "stacked": lambda: moe._few_tokens_stacked(x, w, ids),
           "gather_bmm": lambda: gather_bmm(x, w, ids)}
    compile_s = {}
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        for name, fn in (("stacked_compiled", moe._few_tokens_stacked), ("ids_compiled", ids_one_by_one)):
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            t = time.perf_counter()
            compiled(x, w, ids)
            compile_s[name] = round(time.perf_counter() - t, 1)
            fns[name] = lambda c=compiled: c(x, w, ids)
        want = fns["loop"]()
        max_diff = {k: float((fn() - want).abs().max()) for k, fn in fns.items()}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                fn()
                t = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                times[k].append((time.perf_counter() - t) / args.calls * 1e6)
    us = {k: round(statistics.median(v)) for k, v in times.items()}
    for k, v in us.items():
        print(f"{k:>20}: {v:7d} us  (x{v / us['loop']:.2f} the loop; max |diff| {max_diff[k]:.1e})")
    print(json.dumps({"us_per_call": us, "max_diff": max_diff, "compile_seconds": compile_s,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
