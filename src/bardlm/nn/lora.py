"""LoRA: low-rank adapters on chosen linear layers, as a module swap (Hu et al., 2021).

A frozen linear layer W (out, in) gets a trainable update of rank r:

    y = x W^T + b + (alpha / r) * x A^T B^T        A: (r, in), B: (out, r)

B starts at zero, so the adapted model starts as the base model exactly; A starts as peft's
(Kaiming-uniform), so the two libraries' adapters are interchangeable tensor for tensor. Only A
and B train: the optimizer (`train.optim.make_optimizer`) sees parameters with requires_grad.
`merge_lora` folds the update into W (W + scale * B A) and swaps plain `nn.Linear` back in.

Targets are module names: "c_attn", "c_proj", "c_fc" match every layer of that name
("attn.c_proj" only the attention's). Our c_attn is fused [q | k | v] (and SwiGLU's c_fc is
[gate | up]); one adapter on it has one A shared by the parts, where peft on a Llama model puts
an adapter on each of q_proj, k_proj, v_proj. Those three are one adapter of rank 3r here, with
A stacked and B block-diagonal (the test of equality with peft builds exactly that).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import BardlmError

TARGETS = ("c_attn", "c_proj", "c_fc")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (or a frozen quantized layer: QLoRA) plus a trainable low-rank
    update; x (..., in) -> (..., out)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank <= 0:
            raise BardlmError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        w = base.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32  # a quantized base: fp32 adapters
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=dtype))
        if not w.is_meta:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's (and nn.Linear's) init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two thin matmuls (in -> r -> out): never the (out, in) product B A.
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def delta(self) -> torch.Tensor:
        """The update scale * B A (out, in) that merging adds to the weight."""
        return (self.lora_B @ self.lora_A) * self.scale

    @property
    def weight(self) -> torch.Tensor:  # the frozen weight, for readers of dtype/device/shape
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias


def _adaptable(module: nn.Module) -> bool:
    """A plain linear layer, or a frozen quantized one (it has `dequantized`: QLoRA)."""
    return isinstance(module, nn.Linear) or hasattr(module, "dequantized")


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, rank: int, alpha: float,
               targets: tuple[str, ...] | list[str] = TARGETS,
               train_also: tuple[str, ...] = ()) -> list[str]:
    """Freeze `model` and put adapters on the linear layers named by `targets`.

    train_also: parameter names (e.g. an embedding that gained rows) that stay trainable.
    Returns the names of the adapted layers; raises when no layer matches.
    """
    targets = tuple(targets)
    for n, p in model.named_parameters():  # adapters put on earlier keep training
        p.requires_grad_(n in train_also or ".lora_" in n)
    swapped = []
    for name, module in list(model.named_modules()):
        if _adaptable(module) and _matches(name, targets):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, LoRALinear(module, rank, alpha))
            swapped.append(name)
    if not swapped:
        layers = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise BardlmError(f"no linear layer matches the LoRA targets {list(targets)}; "
                          f"this model's linear layers are named {layers}")
    return swapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Run the body with every adapter's update switched off (scale 0): the model computes what
    its frozen base does, with no second copy of the weights (the reference model of DPO/RL)."""
    layers = list(lora_layers(model).values())
    scales = [layer.scale for layer in layers]
    for layer in layers:
        layer.scale = 0.0
    try:
        yield
    finally:
        for layer, scale in zip(layers, scales):
            layer.scale = scale


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + scale * B A) and swap the plain layer back in;
    the model then computes what the adapted one did, at the base model's cost."""
    for name, layer in lora_layers(model).items():
        base = layer.base
        if not isinstance(base, nn.Linear):
            raise BardlmError("the adapters sit on a quantized base: merge them into the float base "
                              "the run started from (bardlm merge --adapter RUN --out DIR)")
        base.weight += layer.delta().to(base.weight.dtype)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), each tensor counted once (a tied head too)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
