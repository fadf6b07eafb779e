"""What a speculative verify pass costs: K + 1 tokens in one pass against one token, fp32.

    PYTHONPATH=src python bench/verify_pass.py                  # GPT-2 124M shape, 1 and 2 threads
    PYTHONPATH=src python bench/verify_pass.py --preset char-tiny --rounds 2   # smoke test

A pass over T tokens (T = 1, and T = K + 1) after a 90-token cache, for the fp32 inference
layout as `prepare_for_inference` leaves it (`x @ W^T` for every row count) and with
`layouts.pack_rows` (oneDNN-packed weights for passes of several rows, what speculative decoding
uses), interleaved in rounds in one process so that the machine's load hits both alike. Prints
each as a multiple of the plain one-token step; ends with one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

from bardlm import GPT, preset
from bardlm.infer.layouts import pack_rows, prepare_for_inference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--draft-tokens", type=int, default=4, help="K: the verify pass reads K + 1")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = preset(args.preset, **({"vocab_size": 65} if args.preset.endswith("tiny") else {}))
    base = GPT(cfg).eval()
    layouts = {"dense": prepare_for_inference(copy.deepcopy(base), "fp32"),
               "packed": prepare_for_inference(copy.deepcopy(base), "fp32")}
    pack_rows(layouts["packed"])
    T = args.draft_tokens + 1
    start = min(90, cfg.block_size - T - 1)
    idx = torch.randint(0, cfg.vocab_size, (1, start + T))
    results: dict = {"load_average": [round(x, 2) for x in os.getloadavg()]}
    with torch.no_grad():
        caches = {}
        for name, model in layouts.items():
            caches[name] = model.make_cache(1, start + T)
            model(idx[:, :start], cache=caches[name], logits_rows=1)
        for threads in args.threads:
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {f"{n}_{t}": [] for n in layouts for t in (1, T)}
            for _ in range(args.rounds + 1):  # the first round warms up
                for name, model in layouts.items():
                    for t in (1, T):
                        t0 = time.perf_counter()
                        model(idx[:, start:start + t], start_pos=start, cache=caches[name], logits_rows=t)
                        times[f"{name}_{t}"].append(time.perf_counter() - t0)
            ms = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
            step = ms["dense_1"]
            results[f"threads_{threads}"] = dict(
                median_ms={k: round(v, 2) for k, v in ms.items()},
                verify_in_steps={"dense": round(ms[f"dense_{T}"] / step, 2),
                                 "packed": round(ms[f"packed_{T}"] / step, 2)})
            print(f"{threads} thread(s): one token {step:.1f} ms; {T} tokens: x @ W^T "
                  f"{ms[f'dense_{T}'] / step:.2f} steps, oneDNN packed {ms[f'packed_{T}'] / step:.2f} "
                  f"steps; load {os.getloadavg()[0]:.1f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
