"""One attention module for every case: causal self-attention, bidirectional self-attention and
cross-attention; MHA, GQA and MQA; optional QK-RMSNorm and rotary positions; a KV cache;
global or sliding-window (local) layers; attention sinks and soft-capped logits.

Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V. The explicit path writes that formula out; the
"sdpa" path calls PyTorch's fused kernel, and a test holds the two to 1e-5 of each other.
`attn_score` swaps the scaled dot product for another way to score (query, key) pairs
(`AttentionScore`); those variants always take the explicit path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import KVCache
from .dropout import Dropout, dropout
from .norm import RMSNorm
from .position import apply_rope


class Attention(nn.Module):
    """Multi-head attention with `n_head` query heads sharing `n_kv_head` key/value heads.

    Q, K and V come from one fused projection `c_attn` (as GPT-2): rows [0, H*D) make queries,
    the next H_kv*D keys and the last H_kv*D values. For cross-attention the query rows are
    applied to the decoder stream and the key/value rows to the encoder output.
    """

    def __init__(self, cfg: ModelConfig, causal: bool = True, layer: int = 0) -> None:
        super().__init__()
        self.causal = causal
        # A local layer's query sees its last `window` keys (itself included); None: all of them.
        self.kind = cfg.attn_layers[layer]
        self.window = cfg.sliding_window if causal and self.kind == "local" else None
        # Head size and KV heads may differ between global and local layers (Gemma 4).
        self.n_head, self.n_kv_head = cfg.n_head, cfg.layer_kv_heads(layer)
        self.head_dim = cfg.layer_head_dim(layer)
        self.q_dim = self.n_head * self.head_dim
        self.kv_dim = self.n_kv_head * self.head_dim
        # KV sharing (Gemma 4): a shared layer projects only queries and attends over the keys
        # and values its source layer (`cfg.kv_source`) puts in the pass's `shared_kv`; a source
        # layer that a later layer reads stores them there.
        self.kv_shared = causal and cfg.kv_source(layer) != layer
        self.kv_stored = causal and not self.kv_shared and any(
            cfg.kv_source(j) == layer for j in range(layer + 1, cfg.n_layer))
        # K = V (Gemma 4's global layers): no value rows; a value is its key before norm and RoPE.
        self.k_eq_v = cfg.attn_k_eq_v and self.kind == "global"
        kv_rows = 0 if self.kv_shared else self.kv_dim * (1 if self.k_eq_v else 2)
        # attn_gate (Qwen3.5, Qwen3-Next): c_attn also makes a gate per query channel, rows
        # [q | k | v | gate]; the output is multiplied by sigmoid(gate) before c_proj.
        self.gate_dim = self.q_dim if cfg.attn_gate else 0
        self.c_attn = nn.Linear(cfg.n_embd, self.q_dim + kv_rows + self.gate_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(self.q_dim, cfg.n_embd, bias=cfg.attn_bias)
        # Qwen3 normalises each head's q and k before RoPE: keeps logits bounded in deep stacks.
        # OLMo 2 / OLMoE normalise the whole q and k projections instead ("proj").
        self.qk_norm_proj = cfg.qk_norm_scope == "proj"
        q_width, k_width = (self.q_dim, self.kv_dim) if self.qk_norm_proj else (self.head_dim,) * 2
        self.q_norm = RMSNorm(q_width, cfg.norm_eps, cfg.fused_ops, cfg.norm_unit_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_width, cfg.norm_eps, cfg.fused_ops, cfg.norm_unit_offset) \
            if cfg.qk_norm and not self.kv_shared else None
        # Gemma 4: values normalised per head too, with no learned scale.
        self.v_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.fused_ops, scale=False) \
            if cfg.v_norm and not self.kv_shared else None
        # Logits q.k / sqrt(attn_scale_dim) (Gemma's query_pre_attn_scalar; default head_dim),
        # soft-capped to (-cap, cap) (Gemma 2), a learned sink logit per head (gpt-oss).
        self.scale = 1.0 / math.sqrt(cfg.attn_scale_dim or self.head_dim)
        self.softcap = cfg.attn_softcap
        self.sinks = nn.Parameter(torch.zeros(self.n_head)) if cfg.attn_sinks else None
        self.dropout = cfg.attn_dropout  # on the attention weights (B, H, T, S)
        self.fast_dropout = cfg.fast_dropout
        self.resid_dropout = Dropout(cfg.resid_dropout, cfg.fast_dropout)  # on c_proj's output
        # Scores other than the scaled dot product have no fused kernel: explicit path.
        self.score = AttentionScore(cfg) if cfg.attn_score != "dot" else None
        # Caps and sinks change the softmax itself: no fused kernel has them.
        fused_ok = self.score is None and self.softcap is None and self.sinks is None
        self.impl = cfg.attn_impl if fused_ok else "explicit"

    def _project(
        self, x: torch.Tensor, kv_source: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q (B, T, H*D), k and v (B, S, H_kv*D), the output gate (B, T, H*D) or None, from the
        fused projection.

        Always through the module `c_attn`, never its `.weight`: it may have been swapped for
        a layout (FastLinear), INT8 weights (Int8Linear) or a LoRA adapter, each of which
        computes its own output.
        """
        if kv_source is None:
            proj = self.c_attn(x)
            gate = proj[..., proj.shape[-1] - self.gate_dim:] if self.gate_dim else None
            if self.kv_shared:  # keys and values come from another layer (`forward`)
                return proj[..., :self.q_dim], None, None, gate
            if self.k_eq_v:
                q, k = proj[..., :self.q_dim + self.kv_dim].split([self.q_dim, self.kv_dim], dim=-1)
                return q, k, k, gate
            q, k, v = proj[..., :self.q_dim + 2 * self.kv_dim].split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
            return q, k, v, gate
        # Cross-attention: only the query rows of the decoder stream are kept. Projecting the
        # whole fused matrix costs the (unused) k/v rows too, but works for every swap.
        proj = self.c_attn(x)
        q = proj[..., : self.q_dim]
        gate = proj[..., self.q_dim + 2 * self.kv_dim:] if self.gate_dim else None
        # A (k, v) pair was projected earlier by `project_kv`: a decoder reuses it every step.
        k, v = kv_source if isinstance(kv_source, tuple) else self.project_kv(kv_source)
        return q, k, v, gate

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values, each (B, S, H_kv*D), of an encoder output (B, S, C)."""
        kv = self.c_attn(source)[..., self.q_dim : self.q_dim + 2 * self.kv_dim]  # the module, as in `_project`
        return kv.split([self.kv_dim, self.kv_dim], dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        kv_source: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        shared_kv: dict[str, tuple] | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        rope: (cos, sin) for the T query positions, (T, D) or (B, 1, T, D).
        mask: bool, True where a query may attend a key, broadcastable to (B, 1, T, S);
              combined with the causal mask when the module is causal.
        cache: keys/values of earlier positions; the new ones are written at `start_pos`: an
              int (the next free position), or a tensor of cache indices, (T,) or (B, T), for
              the static-shape step (see nn/cache.py).
        kv_source: (B, S, C) encoder output for cross-attention (then no RoPE, no cache), or
              its (k, v) from `project_kv`, computed once per sequence when decoding.
        shared_kv: this pass's {kind: (k, v, k_pos)} of the KV-sharing layers (Gemma 4): a
              source layer writes its keys and values (after the cache) there, a shared layer
              reads them instead of projecting its own (and has no cache).
        """
        B, T, _ = x.shape
        q, k, v, gate = self._project(x, kv_source)
        if self.kv_shared:  # queries only, normalised and rotated as `_heads` does them
            if self.q_norm is not None and self.qk_norm_proj:
                q = self.q_norm(q)
            q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
            if self.q_norm is not None and not self.qk_norm_proj:
                q = self.q_norm(q)
            if rope is not None:
                q = apply_rope(q, *rope)
            k, v, k_pos = shared_kv[self.kind]
        else:
            q, k, v = self._heads(q, k, v, rope)
            k_pos = None  # cache indices of the keys; None: 0..S-1 (a linear cache, or none)
            if cache is not None:
                k, v, k_pos = cache.update(start_pos, k, v)
            if self.kv_stored:
                shared_kv[self.kind] = (k, v, k_pos)
        mask, is_causal = self._mask(mask, T, k.shape[2], start_pos, k_pos, x.device)
        y = self._attend(q, k, v, mask, is_causal)
        y = y.transpose(1, 2).reshape(B, T, self.q_dim)
        if gate is not None:  # each channel's share of the output, in (0, 1)
            y = y * torch.sigmoid(gate)
        return self.resid_dropout(self.c_proj(y))

    def _heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, T, H*D), k and v (B, S, H_kv*D) -> per head, normalised and rotated:
        q (B, H, T, D), k and v (B, H_kv, S, D)."""
        B, T, _ = q.shape
        if self.q_norm is not None and self.qk_norm_proj:  # over all heads: (B, T, H*D)
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, k.shape[1], self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = v.view(B, v.shape[1], self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and not self.qk_norm_proj:  # per head: (B, H, T, D)
            q, k = self.q_norm(q), self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _mask(
        self, mask: torch.Tensor | None, T: int, S: int, start_pos: int | torch.Tensor,
        k_pos: torch.Tensor | None, device: torch.device,
    ) -> tuple[torch.Tensor | None, bool]:
        """(the bool mask (.., T, S) to apply or None, whether the kernel's own causal mask does):
        the caller's mask alone when not causal, else `causal_layout`."""
        if not self.causal:
            return mask, False
        return causal_layout(mask, T, S, start_pos, k_pos, device, self.window)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        """softmax(q k^T * scale) v with q (B, H, T, D), k and v (B, H_kv, S, D)."""
        return attend(q, k, v, mask, is_causal, self.scale, self.impl,
                      self.dropout if self.training else 0.0, self.fast_dropout,
                      self.score, self.softcap, self.sinks)


def causal_layout(
    mask: torch.Tensor | None, T: int, S: int, start_pos: int | torch.Tensor,
    k_pos: torch.Tensor | None, device: torch.device, window: int | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """(the bool mask (.., T, S) to apply or None, whether the kernel's own causal mask does) for
    causal self-attention of T queries over S keys.

    Query i sits at cache index start_pos + i (or start_pos[.., i] for the static-shape
    step) and key j at k_pos[.., j] (j when the cache is linear); `attention_mask` decides
    from those indices alone, so the eager cache, the static step, a ring buffer and the
    uncached pass all use one rule. A caller's `mask` is indexed by cache index: a ring
    buffer's keys pick their columns of it.
    """
    static = isinstance(start_pos, torch.Tensor)
    if not static and k_pos is None and mask is None and (window is None or window >= S):
        if T == S and T > 1:
            return None, True  # plain causal self-attention: the kernel builds the mask
        if T == 1:
            return None, False  # one new token sees the whole (linear) cache
    q_pos = start_pos if static else torch.arange(start_pos, start_pos + T, device=device)
    if k_pos is None:
        k_pos = torch.arange(S, device=device)
    elif mask is not None:
        mask = mask_columns(mask, k_pos)
    seen = attention_mask(q_pos, k_pos, window)
    return (seen if mask is None else mask & seen), False


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
    scale: float, impl: str = "sdpa", dropout_p: float = 0.0, fast_dropout: bool = False,
    score: AttentionScore | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v: q (B, H, T, D), k (B, H_kv, S, D), v (B, H_kv, S, Dv) ->
    (B, H, T, Dv), through SDPA or the written-out formula (`explicit_attention`)."""
    # SDPA cannot take our dropout mask, and on CPU attention dropout sends it to its math
    # path anyway: so CPU training with fast dropout runs the written-out formula, which is
    # faster then. (On CUDA SDPA's own fused dropout is the fast path.)
    own_dropout = dropout_p > 0 and fast_dropout and q.device.type == "cpu"
    if impl == "sdpa" and not own_dropout:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
            enable_gqa=k.shape[1] != q.shape[1], scale=scale,
        )
    if is_causal:
        T = q.shape[2]
        mask = causal_mask(torch.arange(T, device=q.device), T)
    return explicit_attention(q, k, v, mask, dropout_p, score, fast_dropout, scale, softcap, sinks)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """The one mask builder: True where a query at cache index q_pos may read a key at cache
    index k_pos. Causal (k <= q), within the window when one is given (k > q - window: the last
    `window` keys, the query's own included) and never an empty slot (k < 0).

    q_pos (T,) or (B, T); k_pos (S,) or (B, S) -> (T, S), or (B, 1, T, S) when either has rows.
    Every causal path builds its mask here: the uncached pass, the eager cache (q = start_pos +
    0..T-1, k = 0..S-1), the static-shape step (q given per row) and a ring buffer (k = the
    cache indices its slots hold).
    """
    q, k = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)  # (.., T, 1), (.., 1, S)
    seen = (k <= q) & (k >= 0)
    if window is not None:
        seen = seen & (k > q - window)
    return seen.unsqueeze(1) if seen.dim() == 3 else seen


def causal_mask(cache_pos: torch.Tensor, S: int) -> torch.Tensor:
    """`attention_mask` over keys 0..S-1: cache_pos (T,) -> (T, S); (B, T) -> (B, 1, T, S)."""
    return attention_mask(cache_pos, torch.arange(S, device=cache_pos.device))


def mask_columns(mask: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """A mask over cache indices, (.., T, L), read at the keys' cache indices k_pos (S,) or
    (B, S) -> (.., T, S). Indices outside 0..L-1 (an empty or parked ring slot) read column 0 or
    L-1: `attention_mask` hides those keys anyway."""
    idx = k_pos.clamp(0, mask.shape[-1] - 1)
    if idx.dim() == 1:
        return mask.index_select(-1, idx)
    B, S = idx.shape
    mask = mask.expand(B, *mask.shape[-3:]) if mask.dim() == 4 else mask.expand(B, 1, *mask.shape[-2:])
    return mask.gather(-1, idx[:, None, None, :].expand(B, mask.shape[1], mask.shape[2], S))


class AttentionScore(nn.Module):
    """score(q, k) for every (query, key) pair: q (B, H, T, D), k (B, H, S, D) -> (B, H, T, S).

    Alternatives to the scaled dot product q.k / sqrt(D), each with its own (small) parameters:
      dot_unscaled  q.k                                   (shows why the 1/sqrt(D) is there)
      additive      w_h . tanh(q + k)                     (Bahdanau 2014; q, k are already W_q x, W_k x)
      bilinear      q^T W_h k / sqrt(D)                   (Luong 2015 "general"; W_h starts as I)
      cosine        g_h * cos(q, k)                       (learned per-head temperature g_h)
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind, H, D = cfg.attn_score, cfg.n_head, cfg.head_dim
        self.n_head, self.head_dim = H, D
        if self.kind == "additive":
            self.score_v = nn.Parameter(torch.empty(H, D))
        elif self.kind == "bilinear":
            self.score_w = nn.Parameter(torch.empty(H, D, D))
        elif self.kind == "cosine":
            self.score_g = nn.Parameter(torch.empty(H))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters(recurse=False):
            p.copy_(self.initial(name))

    def initial(self, name: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """The initial value of parameter `name`, whole, on the CPU (drawn from `generator`)."""
        H, D = self.n_head, self.head_dim
        if name == "score_v":
            return torch.randn(H, D, generator=generator, device="cpu") / math.sqrt(D)
        if name == "score_w":  # (H, D, D): starts as the dot product
            return torch.eye(D, device="cpu").repeat(H, 1, 1)
        # score_g: cos is in [-1, 1]: without a temperature softmax could not become sharp.
        return torch.full((H,), math.sqrt(D), device="cpu")

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        D = q.shape[-1]
        if self.kind == "dot_unscaled":
            return q @ k.transpose(-2, -1)
        if self.kind == "bilinear":
            return (q @ self.score_w) @ k.transpose(-2, -1) / math.sqrt(D)
        if self.kind == "cosine":
            qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            return self.score_g.view(1, -1, 1, 1) * (qn @ kn.transpose(-2, -1))
        # additive: every (query, key) pair goes through tanh, so it costs a (B, H, T, S, D)
        # tensor; this is why dot products, which need no such tensor, won.
        hidden = torch.tanh(q.unsqueeze(3) + k.unsqueeze(2))  # (B, H, T, S, D)
        return torch.einsum("bhtsd,hd->bhts", hidden, self.score_v)


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_p: float = 0.0,
    score: AttentionScore | None = None,
    fast_dropout: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The formula written out: q (B, H, T, D), k and v (B, H_kv, S, D) -> (B, H, T, D).

    score: another way to score (q, k) pairs; None is the scaled dot product, with `scale`
    (default 1/sqrt(D)). softcap: logits -> softcap * tanh(logits / softcap) before the mask.
    sinks (H,): one more logit per head in each softmax, whose weight goes to no value.
    fast_dropout: draw the dropout mask on the attention weights with `dropout.keep_mask`.
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # GQA: each KV head serves n_rep query heads
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    if score is None:
        # sqrt(d_k) keeps the logits' variance near 1, so softmax does not saturate as D grows.
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        att = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    else:
        att = score(q, k)
    if softcap is not None:  # bounded logits: tanh keeps them in (-softcap, softcap)
        att = torch.tanh(att / softcap) * softcap
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    if sinks is None:
        att = F.softmax(att.float(), dim=-1).to(q.dtype)
    else:  # the sink's column takes its share of the softmax, then is dropped
        sink = sinks.float().view(1, -1, 1, 1).expand(*att.shape[:-1], 1)
        att = F.softmax(torch.cat([att.float(), sink], dim=-1), dim=-1)[..., :-1].to(q.dtype)
    att = dropout(att, dropout_p, training=True, fast=fast_dropout)
    return att @ v
