"""Turn a trained model into a fast decoding model, without touching the training code.

Decoding one token multiplies a vector by every weight matrix, so its speed is the speed of
reading the weights (see ../shared/CPU.md). Three ways to read fewer bytes, or read them faster:

  fp32  each nn.Linear becomes a `FastLinear` holding W^T as (in, out) contiguous and computing
        x @ W^T with `addmm`: the CPU matrix-vector kernel streams that layout up to twice as
        fast as `F.linear` on (out, in). Same values as the training model (to float rounding).
  bf16  weights and activations in bf16, (out, in) layout kept: half the bytes (norm statistics
        stay fp32).
  int8  int8 weights with per-channel scales and bf16 activations (`quantize.py`): a quarter.
  int4  4-bit weights with a bf16 scale per 32 weights and bf16 activations (`int4.py`): an
        eighth (plus the scales).

Checking several tokens in one pass (speculative decoding's verify pass, K + 1 rows; a
server's batched step) should cost about what one token does: the weights are read once either
way. In fp32 it did not: for a few rows MKL's sgemm (on this AMD CPU, at least) runs 3-8x slower
than its one-row kernel, so a 5-row pass of GPT-2 124M cost ~2.7 one-row steps. `pack_rows`
gives each fp32 `FastLinear` a copy of its weight in oneDNN's blocked layout, reordered once
(what inductor's CPU freezing uses), and passes of more than one row go through oneDNN's
linear: 5 rows then cost about one row (docs/benchmarks.md). One-row steps keep the (in, out)
matrix-vector kernel, faster there, so the packed copy doubles the weight memory.

All of them are module swaps, like gpt-fast: `prepare_for_inference` returns the same GPT object
with some children replaced, so `forward`, the KV cache and `generate` work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BardlmError
from ..nn.moe import MoE
from ..nn.norm import LayerNorm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class FastLinear(nn.Module):
    """y = x @ weight_t + bias with weight_t (in, out) contiguous: a faster matrix-vector layout.

    After `pack_rows`, an input of several rows (a verify pass, a server's batched decode step,
    a prompt) goes through oneDNN's linear kernel on a copy of the weights in its blocked layout
    instead (`packed`); a single row keeps x @ weight_t."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight_t.shape
        self.weight_t = nn.Parameter(weight_t.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # The weight in oneDNN's blocked layout, for passes of several rows (`pack_rows`); a
        # plain attribute: inference on the CPU only, never saved.
        self.packed: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, dtype: torch.dtype) -> FastLinear:
        b = None if lin.bias is None else lin.bias.detach().to(dtype)
        return cls(lin.weight.detach().t().to(dtype), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        x2 = x.reshape(-1, self.in_features)
        if self.packed is not None and x2.shape[0] > 1:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
        elif self.bias is None:
            y = x2 @ self.weight_t
        else:
            y = torch.addmm(self.bias, x2, self.weight_t)
        return y.view(*x.shape[:-1], self.out_features)


PACK_ROWS = 8  # the batch size oneDNN picks its blocking for, by default (a verify pass: K + 1)


def can_pack_rows() -> bool:
    """Whether this torch has oneDNN's CPU linear on packed weights (private ops, what
    inductor's CPU freezing uses: checked, not assumed)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight"))


def pack_rows(model: nn.Module, rows: int = PACK_ROWS) -> int:
    """Give every fp32 CPU `FastLinear` of `model` a oneDNN-packed copy of its weights, used by
    inputs of several rows (a speculative verify pass, a server's batched step, a prompt),
    blocked for `rows` rows; once per layer, in place. Returns the bytes added (0 where nothing
    is packed: no oneDNN, another dtype or device, already packed).

    Why: PyTorch's fp32 matrix product on the CPU is MKL's, and on the AMD EPYC measured
    (docs/benchmarks.md, "Serving load" and the verify pass) MKL's few-row products run 3-8x
    slower than its one-row kernel: GPT-2's 768 x 50257 head took 49 ms for 5 rows against 15
    for one, and a 16-row decode step cost 3-4x a one-row step. oneDNN's kernel on weights
    packed once does 5 rows in about one row's time and 16 rows 1.7-2.3x faster than MKL; one
    row it does no faster than x @ W^T on the (in, out) layout, which single rows keep. The copy
    doubles the fp32 linear weights in memory. Its values differ from x @ W^T by float rounding
    only, and each row's result does not depend on the other rows in the batch.
    """
    if not can_pack_rows():
        return 0
    added = 0
    for m in model.modules():
        if (isinstance(m, FastLinear) and m.packed is None and m.weight_t.dtype == torch.float32
                and m.weight_t.device.type == "cpu"):
            m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight_t.t().contiguous(), rows)
            added += m.weight_t.numel() * m.weight_t.element_size()
    return added


class TiedEmbedding(nn.Module):
    """Token embedding read from a tied head's (C, V) matrix: one copy serves both."""

    def __init__(self, head: FastLinear) -> None:
        super().__init__()
        self.head = [head]  # a list, so the head is not registered (and saved) twice

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return F.embedding(idx, self.head[0].weight_t.t())


def prepare_for_inference(model: nn.Module, dtype: str = "fp32") -> nn.Module:
    """Swap `model`'s layers for fast decoding ones, in place; returns it in eval mode.

    dtype: "fp32", "bf16" (weights and activations), "int8" (int8 weights, bf16 activations) or
    "int4" (4-bit weights in groups of 32, bf16 activations).
    The model can no longer be trained afterwards: keep the original if you need to.
    """
    from ..nn.feedforward import MLP, SwiGLU, fused_gelu_tanh, gelu_tanh
    from ..nn.norm import RMSNorm
    from .int4 import quantize_model4
    from .quantize import quantize_model

    if dtype not in (*DTYPES, "int8", "int4"):
        raise BardlmError(f"inference dtype must be fp32, bf16, int8 or int4, got {dtype!r}")
    if getattr(model, "prepared", None):
        raise BardlmError(f"the model is already prepared for {model.prepared} inference")
    model.eval()
    if getattr(model, "quantization", None) is None and dtype == "int8":
        quantize_model(model)
    elif getattr(model, "quantization", None) is None and dtype == "int4":
        quantize_model4(model)
    elif getattr(model, "quantization", None) is None:
        _swap_linears(model, DTYPES[dtype])
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(module, name, nn.Identity())  # eval dropout is the identity anyway
        if isinstance(module, (LayerNorm, RMSNorm)):
            module.fused = True  # one kernel instead of ~8 small ops: a decode step has ~50 norms
        if isinstance(module, (MLP, SwiGLU)) and module.act is gelu_tanh:  # SwiGLU: GeGLU
            module.act = fused_gelu_tanh
    model.prepared = dtype
    return model


def _swap_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """fp32: nn.Linear -> FastLinear (transposed weights); bf16: every float weight to bf16.

    bf16 keeps the (out, in) layout: measured here, `F.linear` on bf16 (out, in) weights is ~1.6x
    faster than x @ W^T on bf16 (in, out) ones, the opposite of fp32.
    """
    if dtype == torch.float32:
        # A mixture's experts keep nn.Linear: the compiled decode step reads them stacked
        # (`MoE.stack_experts`), and eager decoding measured no faster with them transposed.
        experts = {id(e) for m in model.modules() if isinstance(m, MoE) for e in m.experts}
        for module in list(model.modules()):
            if id(module) in experts:
                continue
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, FastLinear.from_linear(child, dtype))
        if model.config.tie_embeddings:  # the embedding reads the head's transposed matrix
            model.transformer.wte = TiedEmbedding(model.lm_head)
        return
    model.to(dtype)  # a tied head stays tied: one Parameter, cast once; position tables stay fp32


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations (and the KV cache) use: bf16 for int8 and int4 models."""
    if getattr(model, "quantization", None):
        return torch.bfloat16
    return model.transformer.ln_f.weight.dtype
