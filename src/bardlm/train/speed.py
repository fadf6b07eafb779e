"""Throughput of a training run: tokens/s, the model FLOP/s they mean, the MFU, and the peak
memory (resident set size on a CPU, max_memory_allocated on CUDA).

Model FLOPs per token follow PaLM (appendix B) and nanoGPT's `estimate_mfu`: 6N for the
matrix multiplies of forward and backward over N parameters (a mixture of experts counts the
parameters a token runs through: its k chosen experts, not all of them), plus 12 x n_layer x n_embd x T
for attention over a context of T. MFU = those FLOP/s over the device's peak (bf16 dense, from
the vendor's sheet); a device not in the table (a CPU, an unknown GPU) gets no MFU, only the
achieved FLOP/s.
"""

from __future__ import annotations

import torch

from ..nn.moe import active_params

# bf16 dense peak FLOP/s by a word of the CUDA device name (first match wins).
PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("L4", 121e12), ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12))


def flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs (forward + backward) per token of a `GPT` (any device, meta included).

    N counts every parameter once (the tied embedding is the lm_head matmul) but the position
    table, which is looked up, not multiplied: nanoGPT's convention. Experts a token's router
    does not pick do no work for it, so they are left out (`active_params`)."""
    cfg = model.config
    n = active_params(model) - sum(p.numel() for name, p in model.named_parameters() if "wpe" in name)
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_embd * cfg.block_size


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 dense peak FLOP/s, or None where unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for word, peak in PEAK_BF16 if word in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """The process's peak memory so far (GiB): max_memory_allocated on CUDA (tensors only), the
    peak resident set size elsewhere (everything, the interpreter and libraries too)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def speed(tokens_per_s: float, per_token: float, device: torch.device) -> dict[str, float]:
    """{"tokens_per_sec", "flops_per_sec", "peak_mem_gib"} plus "mfu" (a fraction) where the
    peak FLOP/s is known."""
    achieved = tokens_per_s * per_token
    row = {"tokens_per_sec": tokens_per_s, "flops_per_sec": achieved, "peak_mem_gib": peak_memory_gib(device)}
    peak = peak_flops(device)
    if peak is not None:
        row["mfu"] = achieved / peak
    return row


def describe(row: dict[str, float]) -> str:
    """'1,234 tok/s, peak 1.23 GiB, MFU 12.3%' or '..., 5.6 GFLOP/s' (no known peak FLOP/s)."""
    head = f"{row['tokens_per_sec']:,.0f} tok/s"
    if "peak_mem_gib" in row:
        head += f", peak {row['peak_mem_gib']:.2f} GiB"
    if "mfu" in row:
        return f"{head}, MFU {100 * row['mfu']:.1f}%"
    return f"{head}, {row['flops_per_sec'] / 1e9:,.1f} GFLOP/s"
