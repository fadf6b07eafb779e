"""INT4 weight-only quantization: group-wise scales, as a module swap (like `quantize.py`'s INT8).

Each row of a weight matrix is cut into groups of G consecutive input channels (G = 32, 64 or
128); a group gets one scale d and 4-bit codes q in 0..15:

    m = the group's value of largest magnitude (sign kept),  d = m / -8,
    q = min(15, floor(w / d + 8.5)),   w ~ (q - 8) * d

This is ggml's Q4_0 rule (so a G=32 model and a `--type q4_0` GGUF hold the same numbers, up to
the rounding of d): the largest value lands exactly on the code -8, and the 15 other codes
spread over [-8d, 7d]. d is rounded to bf16 (the kernel's dtype) before the codes are computed,
so the codes are the nearest grid points of the scale actually applied.

The matmul is PyTorch's CPU int4 kernel `aten._weight_int4pack_mm_for_cpu` (bf16 activations,
weights repacked once by `_convert_weight_to_int4pack_for_cpu`). Measured on this project's
CPU, one thread, a 3072 x 768 layer, one token: the kernel takes ~130 us, about int8's
`_weight_int8pack_mm`, while dequantizing to bf16 and calling `F.linear` takes ~1100 us (the
dequantization writes a full bf16 matrix every call) - so the kernel it is. torchao is not a
dependency. The kernel's packed layout depends on the CPU's vector width, so checkpoints store
the portable form (two codes per byte, low nibble first, and the bf16 scales) and the layer
repacks on load; saving recovers the codes from the packed layout exactly (`_codes`).

The kernel needs the output width to be a multiple of 16 (a vocabulary of 65 is padded with
zero rows, cut off again after the matmul) and the input width to be a multiple of G: a layer
whose width is not (llama-tiny's 344) is stored with zero columns up to the next multiple (they
take part in no group's maximum), and its input is padded with zeros to match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BardlmError
from .quantize import COMPUTE_DTYPE, FrozenQuantMatmul, swap_weights

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32
N_MULTIPLE = 16  # the CPU int4 pack refuses other output widths
METHOD = "int4-weight-only"


def check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise BardlmError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                          f"got {group_size}")


def padded_width(in_features: int, group_size: int) -> int:
    """The input width rounded up to a whole number of groups."""
    return -(-in_features // group_size) * group_size


def quantize_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) float -> (codes (out, K) uint8 in 0..15, scales (out, K / G) bf16) with
    w ~ (codes - 8) * scales (each scale repeated over its group); K = in rounded up to a
    multiple of G, the extra columns zeros (code 8)."""
    out_f, in_f = w.shape
    k = padded_width(in_f, group_size)
    g = F.pad(w.detach().float(), (0, k - in_f)).reshape(out_f, k // group_size, group_size)
    idx = g.abs().argmax(-1, keepdim=True)
    scales = (g.gather(-1, idx) / -8).squeeze(-1).to(COMPUTE_DTYPE)  # (out, in / G)
    d = scales.float().unsqueeze(-1)
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))  # an all-zero group: codes 8 = 0
    codes = torch.floor(g * inv + 8.5).clamp(0, 15).to(torch.uint8)
    return codes.reshape(out_f, k), scales


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes (out, in) uint8 0..15 -> (out, in / 2) uint8: column 2j in the low nibble, 2j+1 high."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: (..., in / 2) uint8 -> (..., in) uint8 0..15."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def dequantize(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float weights (..., in) that packed codes (..., in / 2) and scales (..., in / G) stand
    for: (codes - 8) * scale."""
    codes = unpack_nibbles(packed).float()
    group = codes.shape[-1] // scales.shape[-1]
    return (codes - 8) * scales.float().repeat_interleave(group, dim=-1)


class Int4Linear(nn.Module):
    """y = x @ W^T + b with W stored as 4-bit codes and group-wise bf16 scales.

    Runtime buffers (not saved): `packed` (out_pad, K / 2) uint8 in the kernel's layout and
    `scales_zeros` (K / G, out_pad, 2) bf16, out_pad = out rounded up to 16 and K = in rounded
    up to a multiple of G. Saved (see `_save_to_state_dict`): weight (out, K / 2) uint8 nibbles,
    scales (out, K / G) bf16, bias.

    As the frozen base of QLoRA (`frozen`), the layer keeps the portable form instead (buffers
    `weight`, the nibbles, and `scales`, as saved) and computes through `FrozenQuantMatmul`, which dequantizes
    for each matmul: the CPU kernel has no backward, and LoRA needs the gradient of x.
    """

    frozen_base = False

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 device=None) -> None:  # noqa: ANN001
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.k = k = padded_width(in_features, group_size)
        n_pad = -(-out_features // N_MULTIPLE) * N_MULTIPLE
        self.register_buffer("packed", torch.empty(n_pad, k // 2, dtype=torch.uint8,
                                                   device=device), persistent=False)
        self.register_buffer("scales_zeros", torch.empty(k // group_size, n_pad, 2,
                                                         dtype=COMPUTE_DTYPE, device=device),
                             persistent=False)
        self.register_buffer(
            "bias", torch.empty(out_features, dtype=COMPUTE_DTYPE, device=device) if bias else None
        )

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int) -> Int4Linear:
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, group_size, lin.weight.device)
        codes, scales = quantize_groups(lin.weight, group_size)
        q.set_codes(codes, scales)
        if lin.bias is not None:
            q.bias.copy_(lin.bias.detach())
        return q

    @classmethod
    def frozen(cls, lin: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Linear:
        """A frozen 4-bit copy of `lin` for LoRA on top (QLoRA): 0.5 byte a weight plus a bf16
        scale a group, never packed for the inference kernel."""
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, group_size, lin.weight.device)
        q.frozen_base = True
        q.packed, q.scales_zeros = None, None  # the kernel's buffers: not used, not held
        codes, scales = quantize_groups(lin.weight, group_size)
        q.register_buffer("weight", pack_nibbles(codes))
        q.register_buffer("scales", scales)
        if lin.bias is not None:
            q.bias.copy_(lin.bias.detach())
        return q

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight (out, in) as `dtype`, made when asked, never kept: from the nibbles of a
        frozen QLoRA base, or read back from the kernel's layout."""
        if self.frozen_base:
            nibbles, scales = self.weight, self.scales
        else:
            codes, scales = self._codes()
            nibbles = pack_nibbles(codes)
        return dequantize(nibbles, scales)[:, :self.in_features].to(dtype)

    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        """Pack codes (out, K) uint8 and scales (out, K / G) into the kernel's buffers."""
        pad = self.packed.shape[0] - self.out_features
        codes = F.pad(codes.to(torch.int32), (0, 0, 0, pad), value=8)  # padded rows: zeros
        scales = F.pad(scales.to(COMPUTE_DTYPE), (0, 0, 0, pad))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        self.scales_zeros = torch.stack([scales.t(), torch.zeros_like(scales.t())], -1).contiguous()

    def _codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (out, K) uint8, scales (out, K / G) bf16) read back from the packed layout.

        The kernel applied to the identity with unit scales returns codes - 8 exactly (small
        integers in bf16), whatever its CPU-specific layout is."""
        n = self.out_features
        scales = self.scales_zeros[:, :n, 0].t().contiguous()
        if self.packed.is_meta:
            return (torch.empty(n, self.k, dtype=torch.uint8, device="meta"), scales)
        unit = torch.stack([torch.ones_like(self.scales_zeros[..., 0]),
                            torch.zeros_like(self.scales_zeros[..., 0])], -1)
        eye = torch.eye(self.k, dtype=COMPUTE_DTYPE)
        cols = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, unit)
        return (cols[:, :n].t() + 8).to(torch.uint8), scales

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # noqa: ANN001
        if self.frozen_base:  # already in the portable form
            destination[prefix + "weight"], destination[prefix + "scales"] = self.weight, self.scales
            if self.bias is not None:
                destination[prefix + "bias"] = self.bias
            return
        codes, scales = self._codes()
        destination[prefix + "weight"] = pack_nibbles(codes) if not codes.is_meta else \
            torch.empty(self.out_features, self.k // 2, dtype=torch.uint8, device="meta")
        destination[prefix + "scales"] = scales
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # noqa: ANN001
                              unexpected_keys, error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # the bias
        keys = [prefix + "weight", prefix + "scales"]
        for k in keys:
            if k in unexpected_keys:
                unexpected_keys.remove(k)
        if all(k in state_dict for k in keys):
            self.set_codes(unpack_nibbles(state_dict[keys[0]]), state_dict[keys[1]])
        else:
            missing_keys.extend(k for k in keys if k not in state_dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out) bf16
        if self.frozen_base:  # QLoRA's base: x's dtype, with a backward
            y = FrozenQuantMatmul.apply(x, self)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        if self.k != self.in_features:  # zero inputs meet the zero columns of the padding
            x2 = F.pad(x2, (0, self.k - self.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group_size,
                                                       self.scales_zeros)
        y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 group {self.group_size}"


class Int4Embedding(nn.Module):
    """Token embedding stored as 4-bit rows (nibbles, low first) with group-wise scales.

    Buffers: weight (V, K / 2) uint8, scales (V, K / G) bf16 (K = C rounded up to a multiple of
    G, as in `Int4Linear`, so a tied head packs the same tensors). Lookups unpack only the rows
    they touch; a tied head packs the same codes for the matmul kernel (`tie_int4_head`).
    """

    def __init__(self, num_embeddings: int, dim: int, group_size: int, device=None) -> None:  # noqa: ANN001
        super().__init__()
        self.group_size, self.dim = group_size, dim
        k = padded_width(dim, group_size)
        self.register_buffer("weight", torch.empty(num_embeddings, k // 2, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, k // group_size,
                                                   dtype=COMPUTE_DTYPE, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group_size: int) -> Int4Embedding:
        q = cls(emb.num_embeddings, emb.embedding_dim, group_size, emb.weight.device)
        codes, scales = quantize_groups(emb.weight, group_size)
        q.weight.copy_(pack_nibbles(codes))
        q.scales.copy_(scales)
        return q

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C) bf16
        rows = dequantize(F.embedding(idx, self.weight), F.embedding(idx, self.scales))
        return rows[..., :self.dim].to(COMPUTE_DTYPE)


def tie_int4_head(model: nn.Module) -> None:
    """Pack the int4 embedding's codes into the head's kernel buffers (one set of codes saved)."""
    wte = model.transformer.wte
    model.lm_head.set_codes(unpack_nibbles(wte.weight), wte.scales)


def swap_int4(model: nn.Module, group_size: int, embeddings: bool, convert: bool) -> nn.Module:
    """Replace nn.Linear (and, with `embeddings`, the token embedding) by int4 modules.

    convert=True quantizes the existing weights; convert=False builds empty modules of the right
    shapes on the meta device (for loading a quantized checkpoint).
    """
    check_group_size(group_size)
    tied = model.config.tie_embeddings

    def linear(full: str, child: nn.Linear) -> nn.Module:
        if convert and not (full == "lm_head" and tied):
            return Int4Linear.from_linear(child, group_size)
        device = child.weight.device if convert else "meta"
        return Int4Linear(child.in_features, child.out_features, child.bias is not None, group_size, device)

    swap_weights(model, embeddings, linear, lambda child: (
        Int4Embedding.from_embedding(child, group_size) if convert
        else Int4Embedding(child.num_embeddings, child.embedding_dim, group_size, "meta")))
    if embeddings and tied and convert:
        tie_int4_head(model)
    return model


def quantize_model4(model: nn.Module, group_size: int = DEFAULT_GROUP_SIZE,
                    embeddings: bool = True) -> nn.Module:
    """Quantize a float GPT in place to int4 weights + bf16 everything else; returns it (eval)."""
    model = model.eval()
    swap_int4(model, group_size, embeddings, convert=True)
    for p in model.parameters():  # the remaining float weights (norms, positions) run in bf16
        p.data = p.data.to(COMPUTE_DTYPE)
    model.quantization = {"method": METHOD, "group_size": group_size, "embeddings": embeddings}
    return model
