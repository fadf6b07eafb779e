"""The gated delta rule: linear attention with a fixed-size state (Qwen3.5, Qwen3-Next; Yang, Kautz
and Hatamizadeh, "Gated Delta Networks", 2024).

A softmax attention layer keeps every key and value it has seen. A delta-rule layer keeps one
matrix per value head instead, S (d_k, d_v), a memory that maps keys to values, and per token:

    S_t = exp(g_t) S_{t-1}                         decay: forget a little of everything
    u_t = beta_t (v_t - S_t^T k_t)                 what the memory gets wrong about k_t, times a rate
    S_t = S_t + k_t u_t^T                          write the correction (the "delta rule")
    o_t = S_t^T q_t / sqrt(d_k)                    read with the query

with q and k L2-normalised, beta_t = sigmoid(b_t) in (0, 1) and g_t = -exp(A) softplus(a_t +
dt_bias) < 0, both per head and per token. The state never grows: its cache (`StateCache`) is the
same size at token 10 and at token 100,000.

Two forms compute it, held equal by tests:
* `recurrent_delta_rule`: the loop above, one token at a time (decoding).
* `chunked_delta_rule`: chunks of 64 tokens (prefill and training). Within a chunk the writes
  u_1..u_L depend on each other only through a unit lower-triangular system, solved at once for
  every chunk; only the state S is carried from chunk to chunk (the paper's WY/UT form).

The layer (`GatedDeltaNet`) around the rule: one projection of x into q, k, v, the output gate z
and the per-head a, b; a causal depthwise convolution (kernel 4, SiLU) over q, k and v, whose last
inputs are also state; the rule; an RMSNorm of each head's output times SiLU(z); the output
projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import StateCache
from .dropout import Dropout
from .norm import RMSNorm

CHUNK = 64  # tokens per chunk of the chunked form (the Gated DeltaNet paper's and FLA's choice)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (eps inside the root, as the reference kernels)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def recurrent_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule one token at a time. q, k (B, H, T, d_k) normalised; v (B, H, T, d_v); g, beta
    (B, H, T); state (B, H, d_k, d_v) or None (zeros). Returns (o (B, H, T, d_v), final state).
    Computed in fp32 (the state accumulates over the whole sequence)."""
    B, H, T, dk = k.shape
    q = q.float() / math.sqrt(dk)
    k, v, g, beta = k.float(), v.float(), g.float(), beta.float()
    S = q.new_zeros(B, H, dk, v.shape[-1]) if state is None else state.float()
    out = []
    for t in range(T):
        S = S * g[:, :, t, None, None].exp()  # decay
        k_t = k[:, :, t]  # (B, H, d_k)
        predicted = torch.einsum("bhkv,bhk->bhv", S, k_t)  # what the memory says about k_t
        u = beta[:, :, t, None] * (v[:, :, t] - predicted)  # the correction, scaled
        S = S + k_t[..., :, None] * u[..., None, :]  # rank-1 write k_t u^T
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, :, t]))
    return torch.stack(out, dim=2), S


def chunked_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor | None = None, chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rule, `chunk` tokens at a time; arguments and results as `recurrent_delta_rule`.

    In a chunk of L tokens, let c_t = g_1 + ... + g_t (the log-decay since the chunk began) and
    S_0 the state it starts from. Unrolling the loop,

        S_t = e^{c_t} S_0 + sum_{j<=t} e^{c_t - c_j} k_j u_j^T
        u_t = beta_t v_t - beta_t e^{c_t} S_0^T k_t - sum_{j<t} beta_t e^{c_t - c_j} (k_t.k_j) u_j

    so (I + A) U = beta V - beta e^c K S_0 with A strictly lower triangular, A_tj = beta_t
    e^{c_t - c_j} k_t.k_j. Solving that system once gives W = (I + A)^-1 (beta e^c K) and
    U' = (I + A)^-1 (beta V), both free of S_0: every chunk's at once. Then, chunk by chunk,

        U   = U' - W S_0
        O   = (e^c Q) S_0 + ((Q K^T) * D) U      D_tj = e^{c_t - c_j} for j <= t, else 0
        S_L = e^{c_L} S_0 + (e^{c_L - c} K)^T U
    """
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    q = q.float() / math.sqrt(dk)
    k, v, g, beta = k.float(), v.float(), g.float(), beta.float()
    pad = (-T) % chunk  # zero tokens at the end: k = 0 writes nothing, g = 0 decays nothing
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (T + pad) // chunk
    # (B, H, n, L, d) and (B, H, n, L): chunk i is [.., i, :, :]
    q, k, v = (x.reshape(B, H, n, chunk, -1) for x in (q, k, v))
    g, beta = g.reshape(B, H, n, chunk), beta.reshape(B, H, n, chunk)
    c = g.cumsum(-1)  # log-decay from each chunk's start, through token t
    # D_tj = e^{c_t - c_j} on and below the diagonal; -inf above (e^-inf = 0, and no overflow).
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    D = (c[..., :, None] - c[..., None, :]).masked_fill(upper, float("-inf")).exp()
    k_beta = k * beta[..., None]
    A = ((k_beta @ k.transpose(-1, -2)) * D).tril(-1)  # strictly lower: earlier writes only
    IA = torch.eye(chunk, dtype=q.dtype, device=q.device) + A
    W = torch.linalg.solve_triangular(IA, k_beta * c.exp()[..., None], upper=False, unitriangular=True)
    U0 = torch.linalg.solve_triangular(IA, v * beta[..., None], upper=False, unitriangular=True)
    QK = (q @ k.transpose(-1, -2)) * D  # within-chunk scores, causal and decayed
    q_decayed = q * c.exp()[..., None]  # reads S_0, decayed to each token
    k_to_end = k * (c[..., -1:] - c).exp()[..., None]  # writes, decayed to the chunk's end
    chunk_decay = c[..., -1].exp()[..., None, None]  # (B, H, n, 1, 1)
    S = q.new_zeros(B, H, dk, dv) if state is None else state.float()
    out = []
    for i in range(n):
        U = U0[:, :, i] - W[:, :, i] @ S
        out.append(q_decayed[:, :, i] @ S + QK[:, :, i] @ U)
        S = chunk_decay[:, :, i] * S + k_to_end[:, :, i].transpose(-1, -2) @ U
    o = torch.stack(out, dim=2).reshape(B, H, n * chunk, dv)[:, :, :T]
    return o, S


class GatedDeltaNet(nn.Module):
    """A linear-attention layer (Qwen3.5 / Qwen3-Next's GatedDeltaNet); x (B, T, C) -> (B, T, C).

    `c_in` projects x into [q | k | v | z | b | a]: q and k `linear_k_heads` heads of
    `linear_k_head_dim`, v and the gate z `linear_v_heads` heads of `linear_v_head_dim`, and one
    b and a per value head. A key head serves linear_v_heads / linear_k_heads value heads (as
    GQA, the other way round). Weight names: conv_weight (conv_dim, 1, kernel) is the depthwise
    conv over [q | k | v]; A_log, dt_bias (H_v,) set the decay; norm the per-head RMSNorm.
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_k, self.n_v = cfg.linear_k_heads, cfg.linear_v_heads
        self.d_k, self.d_v = cfg.linear_k_head_dim, cfg.linear_v_head_dim
        self.kernel = cfg.linear_conv_kernel
        self.key_dim, self.value_dim = self.n_k * self.d_k, self.n_v * self.d_v
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.splits = [self.key_dim, self.key_dim, self.value_dim, self.value_dim, self.n_v, self.n_v]
        self.c_in = nn.Linear(cfg.n_embd, sum(self.splits), bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, 1, self.kernel))
        self.A_log = nn.Parameter(torch.empty(self.n_v))
        self.dt_bias = nn.Parameter(torch.empty(self.n_v))
        self.norm = RMSNorm(self.d_v, cfg.norm_eps, cfg.fused_ops)  # a plain gain, from 1
        self.c_proj = nn.Linear(self.value_dim, cfg.n_embd, bias=False)
        self.resid_dropout = Dropout(cfg.resid_dropout, cfg.fast_dropout)
        self.chunk = CHUNK
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters(recurse=False):
            p.copy_(self.initial(name))

    def initial(self, name: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """The initial value of parameter `name`, whole, on the CPU (drawn from `generator`).
        As transformers: A uniform in [0.01, 16] (so decays from fast to very slow), dt_bias 1,
        the conv as PyTorch's default (uniform within 1/sqrt(kernel))."""
        if name == "A_log":
            return torch.empty(self.n_v).uniform_(0.01, 16, generator=generator).log()
        if name == "dt_bias":
            return torch.ones(self.n_v)
        bound = 1 / math.sqrt(self.kernel)
        return torch.empty(self.conv_dim, 1, self.kernel).uniform_(-bound, bound, generator=generator)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache: StateCache | None = None,
        start_pos: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); Attention's signature (rope is unused: no positions here).

        mask: the attention mask (B, 1, T, S) of a left-padded batch: a token the last query may
              not read is padding, and enters neither the conv nor the state.
        cache: the layer's `StateCache` (or a view of some of its rows): the conv's last inputs
              and the state S, read before and written after this pass. A row whose first token
              is at cache index 0 starts a new sequence from zeros.
        """
        B, T, _ = x.shape
        real = padding_free(mask, start_pos, T)  # (B, T) bool or None
        if real is not None:
            x = x * real[..., None].to(x.dtype)
        qkv, z, b, a = self.c_in(x).split([self.conv_dim, self.value_dim, self.n_v, self.n_v], dim=-1)
        conv_state, state = (None, None) if cache is None else cache.read(start_pos, B)
        qkv, conv_state = self.conv(qkv, conv_state)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2_normalize(q.float().view(B, T, self.n_k, self.d_k)).transpose(1, 2)  # (B, H_k, T, d_k)
        k = l2_normalize(k.float().view(B, T, self.n_k, self.d_k)).transpose(1, 2)
        v = v.view(B, T, self.n_v, self.d_v).transpose(1, 2)  # (B, H_v, T, d_v)
        if self.n_v != self.n_k:  # each key head serves n_v / n_k consecutive value heads
            q = q.repeat_interleave(self.n_v // self.n_k, dim=1)
            k = k.repeat_interleave(self.n_v // self.n_k, dim=1)
        beta = torch.sigmoid(b.float()).transpose(1, 2)  # (B, H_v, T)
        g = (-self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())).transpose(1, 2)
        if real is not None:  # padding neither writes nor decays
            keep = real[:, None, :]
            beta, g = beta * keep, g * keep
        if T == 1:  # decoding: one step of the loop
            o, state = recurrent_delta_rule(q, k, v, g, beta, state)
        else:
            o, state = chunked_delta_rule(q, k, v, g, beta, state, self.chunk)
        if cache is not None:
            cache.write(conv_state, state, start_pos)
        o = o.transpose(1, 2).to(x.dtype)  # (B, T, H_v, d_v)
        z = z.view(B, T, self.n_v, self.d_v)
        y = (self.norm(o).float() * F.silu(z.float())).to(x.dtype)  # gated RMSNorm, per head
        return self.resid_dropout(self.c_proj(y.reshape(B, T, self.value_dim)))

    def conv(self, qkv: torch.Tensor, conv_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal depthwise convolution then SiLU: qkv (B, T, conv_dim) -> (the same shape,
        the next call's conv_state (B, conv_dim, kernel - 1)); see `causal_conv`."""
        y, conv_state = causal_conv(qkv, self.conv_weight, conv_state)
        return F.silu(y), conv_state


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal depthwise convolution, channel c of output t = sum_j weight[c, 0, j] *
    x[t - (kernel - 1) + j, c]: x (B, T, D), weight (D, 1, kernel) -> (y (B, T, D), the last
    kernel - 1 inputs (B, D, kernel - 1): the next call's conv_state). conv_state: the inputs
    before this call's first (None: zeros, a sequence's start). The gated delta rule's conv
    (then SiLU) and LFM2's short convolution (nn/shortconv.py) are this one."""
    B, T, D = x.shape
    kernel = weight.shape[-1]
    xt = x.transpose(1, 2)  # (B, D, T)
    if conv_state is None:
        conv_state = xt.new_zeros(B, D, kernel - 1)
    xt = torch.cat([conv_state.to(xt.dtype), xt], dim=-1)  # (B, D, kernel - 1 + T)
    if T == 1:  # decoding: one dot product per channel; conv1d's setup cost ~10x more
        y = (xt * weight[:, 0].to(xt.dtype)).sum(-1, keepdim=True)  # (B, D, 1)
    else:
        y = F.conv1d(xt, weight.to(xt.dtype), groups=D)  # (B, D, T): no padding needed
    return y.transpose(1, 2), xt[:, :, xt.shape[-1] - (kernel - 1):]


def padding_free(mask: torch.Tensor | None, start_pos: int | torch.Tensor, T: int) -> torch.Tensor | None:
    """Which of the T new tokens are real (B, T) bool, from an attention mask (B, 1, T', S) over
    cache indices, or None when every token is. The last query of a left-padded batch is real and
    reads every real key: its row, at the new tokens' cache indices, marks them."""
    if mask is None or mask.dim() != 4:
        return None
    last = mask[:, 0, -1, :]  # (B, S)
    if isinstance(start_pos, int):
        return last[:, start_pos:start_pos + T]
    idx = start_pos.expand(last.shape[0], T).clamp(max=last.shape[1] - 1)
    return last.gather(1, idx)


__all__ = ["GatedDeltaNet", "causal_conv", "chunked_delta_rule", "recurrent_delta_rule", "l2_normalize"]
