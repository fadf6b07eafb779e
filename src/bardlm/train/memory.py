"""The memory of a training step: switches that lower it, and the peak it reaches.

`configure` puts a run's memory switches on its model: activation checkpointing (every k-th
block keeps only its input and runs again in backward) and the chunked loss (nn/loss.py).
`estimate` works out a step's peak from the shapes alone (`bardlm info --train`);
The measured peak that training logs beside tokens/s is `speed.peak_memory_gib`.
`return_freed_memory` makes the C allocator give freed tensors back to the system at once
(the training commands call it first).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig, TrainConfig
from ..nn.lora import TARGETS, apply_lora, lora_layers
from ..nn.loss import VOCAB_BLOCK
from ..nn.model import GPT
from .optim import adamw_kernel


def configure(model: nn.Module, cfg: TrainConfig) -> None:
    """Set `cfg`'s activation checkpointing and loss chunking on a `GPT` (other models: no-op)."""
    if hasattr(model, "checkpoint_every"):
        model.checkpoint_every = cfg.checkpoint_every if cfg.checkpoint_activations else 0
    if hasattr(model, "loss_chunk"):
        model.loss_chunk = cfg.loss_chunk


# What the process keeps -----------------------------------------------------------------------
# glibc's malloc serves blocks under its mmap threshold from its heaps, and raises that threshold
# (up to 32 MiB) each time it frees a larger mapped block: most of a model's weights, gradients
# and activations (a few MiB each) then land in heaps whose freed holes stay resident. Measured
# at Qwen3-0.6B's width, 8 layers, one full step: a peak 0.67 GiB (17%) above the tensors alive.
MMAP_THRESHOLD = 1 << 20  # bytes: every tensor from 1 MiB up gets its own mapping, unmapped when freed
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_freed_memory() -> bool:
    """Make glibc's malloc map every block of MMAP_THRESHOLD bytes or more on its own (a fixed
    threshold, which also stops it rising), so a freed tensor is handed back to the system at
    once, and hand back what the heaps hold free now (`malloc_trim`). Process-wide; call it
    before building the model. Returns False (and changes nothing) without glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt, trim = libc.mallopt, libc.malloc_trim  # glibc's own (absent on macOS, musl's are no-ops)
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    trim(0)
    return ok


# The estimate ---------------------------------------------------------------------------------
# Resident memory of a training process besides its tensors: the interpreter, torch, bardlm and
# the allocator's slack (measured: ~0.3 GiB on Linux, CPython 3.11, torch 2.13); CUDA's
# max_memory_allocated leaves it out.
RUNTIME_BYTES = 300 * 2**20


@dataclass
class MemoryEstimate:
    """Bytes of the parts of one training step; `first_step`/`later_steps` are the peaks.

    The first step allocates the optimizer state only when it steps, after backward has freed
    the activations; later steps hold that state all along."""

    weights: int
    grads: int
    optimizer: int
    optimizer_temp: int  # the optimizer step's own temporaries (foreach AdamW's intermediates)
    activations: int  # kept for backward, at the end of the forward pass
    logits: int  # logits, their log-softmax and gradients at the head (while the loss runs)
    runtime: int  # the interpreter and libraries (0 on CUDA)
    # step_in_backward: the updates run during backward, each with one parameter's gradient
    # (`grads`), which a tied head holds from the start of backward to its end.
    in_backward: bool = False
    head_grad: int = 0  # the head's (V, C) gradient, from the loss to the end of backward
    recomputed: int = 0  # checkpointing: one block's activations, again, during its backward

    @property
    def passes(self) -> int:
        """The forward and backward passes' own peak: what is kept, plus the loss's logits or
        (later, once those are gone) a checkpointed block's recomputed activations."""
        return self.activations + self.head_grad + max(self.logits, self.recomputed)

    @property
    def first_step(self) -> int:
        if self.in_backward:  # the state is allocated as backward frees the activations
            return self.runtime + self.weights + self.grads + self.optimizer_temp + max(self.passes, self.optimizer)
        return self.runtime + self.weights + max(self.passes, self.grads + self.optimizer + self.optimizer_temp)

    @property
    def later_steps(self) -> int:
        if self.in_backward:
            return self.runtime + self.weights + self.optimizer + self.grads + self.optimizer_temp + self.passes
        return self.runtime + self.weights + self.optimizer + max(self.passes, self.grads + self.optimizer_temp)


def _saved_bytes(model: nn.Module, idx: torch.Tensor) -> tuple[list[int], int]:
    """(bytes kept for backward by each block, bytes kept by the rest) of one forward pass of
    `model` on the meta device: the tensors autograd saves, each storage once, parameters left
    out. Exact for the ops' own choices (what SDPA keeps, views sharing storage)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    params |= {b.untyped_storage()._cdata for b in model.buffers()}
    seen: dict[int, tuple[int, int]] = {}
    where = [-1]  # the block running now; -1: embeddings, final norm, head
    hooks = []
    for i, block in enumerate(model.transformer.h):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: where.__setitem__(0, -1)))

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st._cdata not in params:
            seen.setdefault(st._cdata, (where[0], st.nbytes()))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx)  # no targets: the logits' part is `_logit_bytes`
    finally:
        for h in hooks:
            h.remove()
    per_block = [0] * len(model.transformer.h)
    rest = 0
    for block, n in seen.values():
        if block >= 0:
            per_block[block] += n
        else:
            rest += n
    return per_block, rest


def estimate(model_cfg: ModelConfig, cfg: TrainConfig, batch: int, context: int, lora_rank: int = 0,
             lora_targets: tuple[str, ...] = TARGETS, base_dtype: str = "fp32") -> MemoryEstimate:
    """The memory of one training step of `model_cfg` under `cfg` (dtype, optimizer, activation
    checkpointing, loss_chunk) on `batch` rows of `context` tokens, full or LoRA (`lora_rank`
    > 0, on a base held in `base_dtype`), worked out on the meta device (no memory used).

    Activations are those autograd keeps, traced op by op in fp32 (bf16 autocast: the matmul
    outputs halve, norms and softmax stay fp32; estimated as 0.75x). Checkpointed blocks keep
    their input only, and one block's activations exist again while it is recomputed (in
    backward, when the loss's logits are gone)."""
    with torch.device("meta"):
        model = GPT(model_cfg).train()
        if lora_rank:
            apply_lora(model, lora_rank, 2.0 * lora_rank, lora_targets)
        idx = torch.zeros(batch, context, dtype=torch.long)
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    weights = sum(p.numel() * 4 for p in params)
    if base_dtype == "int8":  # an adapted layer's weight: 1 byte an entry and a bf16 scale a row
        for layer in lora_layers(model).values():
            weights += layer.base.weight.numel() * (1 - 4) + layer.base.out_features * 2
    elif base_dtype == "int4":  # half a byte an entry and a bf16 scale a group of 32
        for layer in lora_layers(model).values():
            out_f, in_f = layer.base.weight.shape
            k = -(-in_f // 32) * 32
            weights += out_f * k // 2 + out_f * (k // 32) * 2 - layer.base.weight.numel() * 4
    if base_dtype != "fp32":  # the embedding and head (tied: one table) in int8, a bf16 scale a row
        tables = {id(t): t for t in (model.transformer.wte.weight, model.lm_head.weight)}.values()
        weights += sum(t.numel() * (1 - 4) + t.shape[0] * 2 for t in tables)
    per_block, rest = _saved_bytes(model, idx)
    if cfg.checkpoint_activations:
        kept = [batch * context * model_cfg.n_embd * 4 if i % cfg.checkpoint_every == 0 else n
                for i, n in enumerate(per_block)]
        recomputed = max(n for i, n in enumerate(per_block) if i % cfg.checkpoint_every == 0)
        blocks = sum(kept)
    else:
        blocks, recomputed = sum(per_block), 0
    activations = blocks + rest
    if cfg.dtype == "bf16":
        activations, recomputed = int(activations * 0.75), int(recomputed * 0.75)
    head = model.lm_head
    head_trainable = type(head) is nn.Linear and head.weight.requires_grad
    rows = batch * context if cfg.loss_chunk == 0 or type(head) is not nn.Linear else min(cfg.loss_chunk, batch * context)
    # Chunked: two (rows, V) fp32 tensors at once, a chunk's logits (turned into their gradient
    # in place) and logsumexp's temporary; whole: three, the logits, their log-softmax and the
    # gradient. And the head's (V, C) gradient when it trains.
    whole = cfg.loss_chunk == 0 or type(head) is not nn.Linear
    logits = (3 if whole else 2) * rows * model_cfg.vocab_size * 4
    if base_dtype != "fp32" and cfg.loss_chunk:  # a block of the int8 head's rows, dequantized
        logits += min(VOCAB_BLOCK, model_cfg.vocab_size) * model_cfg.n_embd * 4
    kind = adamw_kernel(cfg.optimizer, torch.device(cfg.device if cfg.device != "auto" else "cpu"))
    states = 1 if cfg.optimizer == "muon" else 2  # Muon's momentum; AdamW's two moments
    # step_in_backward: one parameter's gradient (and update temporaries) at a time, the largest
    # one at worst; the whole model's otherwise.
    stepped = max((p.numel() for p in params if p.requires_grad), default=0) if cfg.step_in_backward else trainable
    return MemoryEstimate(
        weights=weights, grads=stepped * 4, optimizer=states * trainable * 4,
        optimizer_temp=stepped * 4 if kind == "foreach" else 0,
        activations=activations, logits=logits,
        runtime=0 if str(cfg.device).startswith("cuda") else RUNTIME_BYTES,
        in_backward=cfg.step_in_backward, head_grad=head.weight.numel() * 4 if head_trainable else 0,
        recomputed=recomputed,
    )
