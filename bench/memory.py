"""Peak memory of one training step at Qwen3-0.6B's shape: ours vs transformers (+ peft), QLoRA,
`bardlm info`'s estimate, and the time activation checkpointing and the chunked loss cost.

Each row runs in a fresh subprocess (`--row NAME`) that builds the model with random weights
(vocabulary 151,936), takes ONE optimizer step on a batch of 1 x 1,024 tokens and reports the
peak resident set size of that step (VmHWM, reset through /proc/self/clear_refs once the model
is built, so building's own transients do not count) and the step's wall time. Ours: `Loop.train_step` (the one
training step), AdamW (foreach), fp32, after `return_freed_memory()` as `bardlm train` and
`finetune` call it; transformers: Qwen3ForCausalLM with gradient checkpointing on, torch's
AdamW, fp32, the same step, glibc's default allocator. The last line is JSON.

    PYTHONPATH=src python bench/memory.py                 # every row (needs ~14 GB, minutes)
    PYTHONPATH=src python bench/memory.py --layers 2      # a 2-layer model of the same width
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

CONTEXT, BATCH, RANK, CHUNK = 1024, 1, 16, 256
# name -> (what, our TrainConfig memory fields)
ROWS = {
    "ours_full": ("full", dict(checkpoint_activations=True, loss_chunk=CHUNK)),
    "ours_full_plain": ("full", {}),
    "ours_full_ckpt": ("full", dict(checkpoint_activations=True)),
    "ours_full_chunk": ("full", dict(loss_chunk=CHUNK)),
    "hf_full": ("hf", {}),
    "ours_lora": ("lora", dict(checkpoint_activations=True, loss_chunk=CHUNK)),
    "peft_lora": ("peft", {}),
    "ours_qlora_int8": ("qlora", dict(checkpoint_activations=True, loss_chunk=CHUNK)),
    "ours_qlora_int4": ("qlora", dict(checkpoint_activations=True, loss_chunk=CHUNK)),
    # fused AdamW: one kernel over all parameters, without foreach's per-group temporaries
    "ours_full_fused": ("full", dict(checkpoint_activations=True, loss_chunk=CHUNK, optimizer="fused")),
    # each parameter updated in backward as soon as its gradient is ready (no clipping)
    "ours_full_in_backward": ("full", dict(checkpoint_activations=True, loss_chunk=CHUNK, optimizer="fused",
                                           step_in_backward=True, grad_clip=0.0)),
}
BASE_DTYPE = {"ours_qlora_int8": "int8", "ours_qlora_int4": "int4"}  # QLoRA rows' frozen bases


def _shape(layers: int | None):  # noqa: ANN202
    from bardlm.config import preset

    return preset("qwen3-0.6b", block_size=CONTEXT, **({"n_layer": layers} if layers else {}))


def _batch(vocab: int) -> torch.Tensor:
    return torch.randint(vocab, (BATCH, CONTEXT + 1), generator=torch.Generator().manual_seed(0))


def _reset_peak() -> None:
    """Start the peak resident set size (VmHWM) over from the current one (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_gib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


def run_row(name: str, layers: int | None) -> dict:
    """One optimizer step of row `name` in this process: {"peak_gib", "step_s", "loss"}."""
    what, memory = ROWS[name]
    if what not in ("hf", "peft"):
        from bardlm.train.memory import return_freed_memory

        return_freed_memory()  # as `bardlm train` / `finetune` do first
    torch.manual_seed(0)
    cfg = _shape(layers)
    ids = _batch(cfg.vocab_size)
    if what in ("hf", "peft"):
        import transformers

        hf_cfg = transformers.Qwen3Config(
            vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
            head_dim=cfg.head_dim, max_position_embeddings=CONTEXT, rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta, tie_word_embeddings=True, attn_implementation="sdpa")
        model = transformers.Qwen3ForCausalLM(hf_cfg).train()
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if what == "peft":
            import peft

            model.enable_input_require_grads()
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)
        _reset_peak()
        start = time.time()
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.item()
    else:
        from bardlm.nn.lora import apply_lora
        from bardlm.nn.model import GPT
        from bardlm.train import TrainConfig
        from bardlm.train.loop import Loop
        from bardlm.train.memory import configure

        model = GPT(cfg).train()
        if what == "qlora":
            from bardlm.infer.qlora import quantize_base

            quantize_base(model, BASE_DTYPE[name])
        if what in ("lora", "qlora"):
            apply_lora(model, RANK, 2 * RANK)
        tcfg = TrainConfig(lr=1e-4, warmup_iters=0, max_iters=1, **memory)
        configure(model, tcfg)
        loop = Loop(model, tcfg)
        _reset_peak()
        start = time.time()
        loss = loop.train_step(lambda s, m: (ids[:, :-1], ids[:, 1:]))
    step_s = time.time() - start
    return {"peak_gib": round(_peak_gib(), 3), "step_s": round(step_s, 2), "loss": round(loss, 4)}


def estimate_row(name: str, layers: int | None) -> float | None:
    """`bardlm info --train`'s first-step estimate (GiB) of one of our rows."""
    from bardlm.train import TrainConfig
    from bardlm.train.memory import estimate

    what, memory = ROWS[name]
    if what in ("hf", "peft"):
        return None
    est = estimate(_shape(layers), TrainConfig(**memory), BATCH, CONTEXT,
                   lora_rank=RANK if what != "full" else 0, base_dtype=BASE_DTYPE.get(name, "fp32"))
    return round(est.first_step / 2**30, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--row", choices=list(ROWS), help="(internal) run one row in this process")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than Qwen3-0.6B's 28")
    args = ap.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args.layers)))
        return
    results = {}
    for name in args.rows:
        cmd = [sys.executable, __file__, "--row", name] + (["--layers", str(args.layers)] if args.layers else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if out.returncode != 0:
            results[name] = {"error": out.stderr.strip().splitlines()[-1]}
        else:
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            est = estimate_row(name, args.layers)
            if est is not None:
                results[name]["estimate_gib"] = est
                results[name]["estimate_error"] = round(est / results[name]["peak_gib"] - 1, 3)
        print(name, results[name], flush=True)

    def ratio(a: str, b: str, key: str = "peak_gib") -> float | None:
        if key in results.get(a, {}) and key in results.get(b, {}):
            return round(results[a][key] / results[b][key], 3)
        return None

    summary = {
        "full_vs_hf": ratio("ours_full", "hf_full"), "full_fused_vs_hf": ratio("ours_full_fused", "hf_full"),
        "full_in_backward_vs_hf": ratio("ours_full_in_backward", "hf_full"),
        "goal_full_vs_hf": 0.8,
        "lora_vs_peft": ratio("ours_lora", "peft_lora"), "goal_lora_vs_peft": 0.7,
        "qlora_int8_vs_lora": ratio("ours_qlora_int8", "ours_lora"),
        "qlora_int4_vs_lora": ratio("ours_qlora_int4", "ours_lora"), "goal_qlora_int4_vs_lora": 0.4,
        "checkpointing_time": ratio("ours_full_ckpt", "ours_full_plain", "step_s"), "goal_checkpointing_time": 1.35,
        "chunking_time": ratio("ours_full_chunk", "ours_full_plain", "step_s"), "goal_chunking_time": 1.05,
        "max_estimate_error": max((abs(r["estimate_error"]) for r in results.values() if "estimate_error" in r),
                                  default=None), "goal_estimate_error": 0.15,
    }
    print(json.dumps({"layers": args.layers or 28, "context": CONTEXT, "batch": BATCH, "rank": RANK,
                      "loss_chunk": CHUNK, "load_1min": round(os.getloadavg()[0], 2),
                      "rows": results, "summary": summary}))


if __name__ == "__main__":
    main()
