"""INT8 weight-only quantization: symmetric, one scale per output channel, as a module swap.

    s = max|W[o, :]| / 127,   W_q = round(W / s) in [-127, 127],   W ~ s * W_q

Only weights are quantized; activations run in bf16, because the CPU kernel
`aten._weight_int8pack_mm` (int8 weights, bf16 activations, per-row scales) reads 4x fewer bytes
than fp32 and decoding one token is bound by reading weights. Like gpt-fast, every `nn.Linear`
(and optionally the token embedding, which a tied head shares) is replaced by an int8 module;
the model code itself is untouched. A mixture of experts' router stays a float matrix: it is
tiny, and rounding its logits would change which experts a token reaches.

A quantized checkpoint is an ordinary checkpoint directory whose `model.safetensors` holds int8
`*.weight` tensors, bf16 `*.scales` tensors and bf16 everything else; `config.json` gains a
`quantization` entry. `bardlm.io.checkpoint.build_model` builds such a model on the meta device
and adopts the stored tensors as they are, so no fp32 copy of the weights ever exists in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

QMAX = 127  # symmetric: -128 is never used, so -W_q is always representable
COMPUTE_DTYPE = torch.bfloat16
# `_weight_int8pack_mm` on CPU needs the input width to be a multiple of 16 (torch 2.13
# segfaults otherwise); narrower layers take a slower dequantize-on-the-fly path.
KERNEL_K_MULTIPLE = 16
# Linear layers left in float: MoE routers (nn/moe.py) and the shared expert's gate.
FLOAT_LINEARS = ("router", "shared_gate")


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) float -> (w_q (out, in) int8, scales (out,) bf16) with w ~ scales[:, None] * w_q.

    The scale is rounded to bf16 (the dtype stored and used by the kernel) *before* w is divided
    by it, so w_q is the nearest grid point of the scale actually applied. bf16 rounding moves a
    scale by at most 2^-9, so max|w| / s stays below 127.5 and no row clips.
    """
    w = w.detach().float()
    scales = (w.abs().amax(dim=1).clamp(min=1e-12) / QMAX).to(COMPUTE_DTYPE)  # zero row: tiny scale
    w_q = torch.round(w / scales.float()[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return w_q, scales


def dequantize(w_q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float weights (out, in) an int8 tensor stands for (for tests and inspection)."""
    return scales.float()[:, None] * w_q.float()


class Int8Linear(nn.Module):
    """y = x @ (scales * W_q)^T + b, computed by the int8 kernel with bf16 activations.

    Buffers: weight (out, in) int8, scales (out,) bf16, bias (out,) bf16 or None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None) -> None:  # noqa: ANN001
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # True (quantize_base): the frozen base of QLoRA, computed in its input's dtype through
        # FrozenQuantMatmul; False: inference, the int8 kernel with bf16 activations.
        self.frozen_base = False
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=COMPUTE_DTYPE, device=device))
        self.register_buffer(
            "bias", torch.empty(out_features, dtype=COMPUTE_DTYPE, device=device) if bias else None
        )

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, lin.weight.device)
        w_q, scales = quantize_per_channel(lin.weight)
        q.weight.copy_(w_q)
        q.scales.copy_(scales)
        if lin.bias is not None:
            q.bias.copy_(lin.bias.detach())
        return q

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight (out, in) as `dtype`: this layer's alone, made when asked, never kept."""
        return self.weight.to(dtype) * self.scales.to(dtype)[:, None]

    def dequantized_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows start:end of the weight (end - start, in) as `dtype`: a block of a frozen head,
        for the chunked loss (nn/loss.py), which never holds the whole float head."""
        return self.weight[start:end].to(dtype).mul_(self.scales[start:end].to(dtype)[:, None])  # one temporary

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out) bf16
        if self.frozen_base or x.requires_grad:  # a base under LoRA (QLoRA): x's dtype, a backward
            y = FrozenQuantMatmul.apply(x, self)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous()
        if self.in_features % KERNEL_K_MULTIPLE == 0:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        else:  # the kernel crashes on other widths: same product, dequantizing on the fly
            y = F.linear(x2, self.weight.to(COMPUTE_DTYPE)) * self.scales
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


class FrozenQuantMatmul(torch.autograd.Function):
    """y = x W^T for a frozen quantized layer: gradients for x only, and W dequantized (by
    `layer.dequantized(dtype)`) for the one matmul that needs it, in forward and again in
    backward, never saved. So a QLoRA step holds at most one layer's float weight at a time.
    Any layer with `dequantized(dtype)` plugs in (INT8 here; 4-bit layers the same way)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:  # noqa: ANN001
        ctx.layer = layer
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.dtype = dtype
        with torch.autocast(x.device.type, enabled=False):
            return x.to(dtype) @ layer.dequantized(dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205, ANN001
        return grad.to(ctx.dtype) @ ctx.layer.dequantized(ctx.dtype), None


class Int8Embedding(nn.Module):
    """Token embedding stored as int8 rows with one scale per row (per token).

    Rows of the table are the output channels of a tied head, so the same (weight, scales) pair
    serves both; lookups dequantize only the rows they touch.
    """

    def __init__(self, num_embeddings: int, dim: int, device=None) -> None:  # noqa: ANN001
        super().__init__()
        # True (quantize_base): QLoRA's frozen embedding, whose rows come out in fp32 (the float
        # model's dtype); False: inference, rows in bf16.
        self.frozen_base = False
        self.register_buffer("weight", torch.empty(num_embeddings, dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=COMPUTE_DTYPE, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> Int8Embedding:
        q = cls(emb.num_embeddings, emb.embedding_dim, emb.weight.device)
        w_q, scales = quantize_per_channel(emb.weight)
        q.weight.copy_(w_q)
        q.scales.copy_(scales)
        return q

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C) bf16 (fp32 frozen)
        dtype = torch.float32 if self.frozen_base else COMPUTE_DTYPE
        rows = F.embedding(idx, self.weight).to(dtype)
        return rows * F.embedding(idx, self.scales.unsqueeze(1)).to(dtype)


def tie_int8_head(model: nn.Module) -> None:
    """Point the int8 head at the int8 embedding table (one copy of the matrix)."""
    head, wte = model.lm_head, model.transformer.wte
    head.weight, head.scales = wte.weight, wte.scales


def swap_weights(model: nn.Module, embeddings: bool, linear: Callable[[str, nn.Linear], nn.Module],
                 embedding: Callable[[nn.Embedding], nn.Module]) -> None:
    """The one module swap of weight-only quantization (INT8 here, INT4 in `int4.py`): each
    nn.Linear but FLOAT_LINEARS becomes `linear(full name, layer)`, and with `embeddings` the
    token embedding becomes `embedding(layer)`; without, the head stays float with it."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and child_name not in FLOAT_LINEARS:
                if full == "lm_head" and not embeddings:
                    continue  # the head stays a float matrix with the embedding
                setattr(module, child_name, linear(full, child))
            elif isinstance(child, nn.Embedding) and full == "transformer.wte" and embeddings:
                setattr(module, child_name, embedding(child))


def swap_int8(model: nn.Module, embeddings: bool, convert: bool) -> nn.Module:
    """Replace nn.Linear (and, with `embeddings`, the token embedding) by int8 modules.

    convert=True quantizes the existing weights; convert=False only builds empty modules of the
    right shapes (for loading a quantized checkpoint).
    """
    tied = model.config.tie_embeddings

    def linear(full: str, child: nn.Linear) -> nn.Module:
        if full == "lm_head" and tied:
            return Int8Linear(child.in_features, child.out_features, False, "meta")
        if convert:
            return Int8Linear.from_linear(child)
        return Int8Linear(child.in_features, child.out_features, child.bias is not None, "meta")

    swap_weights(model, embeddings, linear, lambda child: (
        Int8Embedding.from_embedding(child) if convert
        else Int8Embedding(child.num_embeddings, child.embedding_dim, "meta")))
    if embeddings and tied:
        tie_int8_head(model)
    return model


def quantize_model(model: nn.Module, embeddings: bool = True) -> nn.Module:
    """Quantize a float GPT in place to int8 weights + bf16 everything else; returns it (eval)."""
    model = model.eval()
    swap_int8(model, embeddings, convert=True)
    for p in model.parameters():  # the remaining float weights (norms, positions) run in bf16
        p.data = p.data.to(COMPUTE_DTYPE)
    model.quantization = {"method": "int8-weight-only", "embeddings": embeddings}
    return model


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to save: a tied head is stored once, under the embedding's names."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd = {k: v for k, v in sd.items() if not k.startswith("lm_head.")}
    return sd


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights (parameters and persistent buffers), shared tensors once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for _, b in model.named_buffers()]:
        if t is None or t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
