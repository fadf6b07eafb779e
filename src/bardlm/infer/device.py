"""Which device a run uses: `--device auto` (cuda, then mps, then cpu) or one named, checked.

Every verb that runs a model takes `--device`; `cli.main` resolves it here once, so a device the
machine lacks is one line (`--device cuda` on a CPU-only PyTorch, `--device bogus`), never a
traceback from deep inside a run. The library resolves the same way (`Trainer`, `bardlm.load`).

Also here: the per-device switches the fast paths need, each a no-op off CUDA:
`enable_tf32` (TF32 tensor-core matmuls) and `to_device` (pinned host memory and a
non-blocking copy, so the host queues the next batch while the GPU computes).
"""

from __future__ import annotations

import torch

from ..errors import BardlmError

AUTO = "auto"
KNOWN = ("cpu", "cuda", "mps")
HINT = "use --device auto, cpu, cuda, cuda:N or mps"


def mps_available() -> bool:
    """Apple's Metal backend (PyTorch builds for macOS on Apple silicon)."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = AUTO) -> torch.device:
    """`auto` (or None) -> the best device present: cuda, then mps, then cpu. A named device is
    checked against this machine and PyTorch build; one it lacks is a one-line BardlmError."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or AUTO).strip()
    if name == AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise BardlmError(f"--device {name!r} is not a device; {HINT}") from None
    if device.type not in KNOWN:
        raise BardlmError(f"--device {name}: bardlm runs on cpu, cuda (NVIDIA or ROCm) or mps; {HINT}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch build has no CUDA (a CPU-only wheel)" if torch.version.cuda is None
                   and torch.version.hip is None else "no CUDA GPU is visible")
            raise BardlmError(f"--device {name}: {why}; use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise BardlmError(f"--device {name}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not mps_available():
        raise BardlmError(f"--device {name}: the MPS backend (Apple silicon) is not available "
                          "here; use --device cpu (or auto)")
    return device


def enable_tf32(device: torch.device) -> None:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (10-bit mantissa inputs,
    fp32 accumulation): several times the fp32 throughput on Ampere and later, the precision
    training tolerates. Elsewhere nothing changes."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. A CPU tensor bound for CUDA goes through pinned (page-locked) memory
    with a non-blocking copy: the host does not wait for the transfer."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
