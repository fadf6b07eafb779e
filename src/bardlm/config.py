"""Configuration: `ModelConfig` (every variant of the network), `TrainConfig` (everything about a
run that is not the model), their presets, and typed `--set key=value` parsing for both.

A variant (GPT-2, Llama-style, Qwen3-style, a tiny character model) is a `ModelConfig`, never a new
class tree: the model reads these fields and nothing else. Fields that default to "derive me"
(`n_kv_head`, `head_dim`, `ffn_hidden`, `attn_bias`, `qkv_bias`, the three dropout rates) are
resolved once, in `__post_init__`, so
every reader sees plain values and there is one name per quantity.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import BardlmError

NORMS = ("layernorm", "rmsnorm", "none")  # "none": no normalisation (an ablation)
POSITIONS = ("learned", "sinusoidal", "rope", "none")
FFNS = ("gelu", "relu", "swiglu", "geglu", "swiglu_clamped")
# "sandwich" (Gemma 2/3): a norm before each sublayer and another on its output, before the add;
# "output" (OLMo 2): only the norm on the output.
NORM_PLACEMENTS = ("pre", "post", "sandwich", "output")
# Per layer: every earlier key, the last `sliding_window`, or "linear": no softmax attention but
# the gated delta rule (nn/deltanet.py), a fixed-size state instead of keys and values, or
# "conv": LFM2's gated short convolution (nn/shortconv.py), whose state is its last few inputs.
ATTN_KINDS = ("global", "local", "linear", "conv")
# The kinds whose cache is a fixed-size state per sequence (nn/cache.py `StateCache`), not
# keys and values per position.
STATE_KINDS = ("linear", "conv")
# How a layer makes its keys and values: "mha" (per KV head: MHA, GQA, MQA) or "mla" (DeepSeek's
# multi-head latent attention: one compressed latent per token, nn/mla.py).
ATTN_TYPES = ("mha", "mla")
ROUTER_SCORES = ("softmax", "sigmoid")
QK_NORM_SCOPES = ("head", "proj")
ATTN_IMPLS = ("sdpa", "explicit")
# How a query scores a key; everything but "dot" runs on the explicit path (docs/concepts.md).
ATTN_SCORES = ("dot", "dot_unscaled", "additive", "bilinear", "cosine")
DROPOUT_SITES = ("emb_dropout", "attn_dropout", "resid_dropout")  # each None -> `dropout`


@dataclass
class ModelConfig:
    """Every architectural choice of the decoder-only transformer.

    Names follow GPT-2 / nanoGPT (`n_layer`, `n_head`, `n_embd`, `block_size`); the Llama/Qwen3
    additions (`n_kv_head`, `head_dim`, `rope_theta`, `qk_norm`) default to "off" so a plain
    GPT-2 config stays short.
    """

    vocab_size: int = 50257
    block_size: int = 1024  # context length: the most positions one forward pass sees
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # None -> n_head (MHA); 1 -> MQA; in between -> GQA
    head_dim: int | None = None  # None -> n_embd // n_head (Qwen3 decouples the two)
    ffn_hidden: int | None = None  # None -> 4 * n_embd
    ffn: str = "gelu"  # "gelu" (tanh approx, GPT-2), "relu", "swiglu" (Llama) or "geglu" (Gemma)
    # or "swiglu_clamped" (gpt-oss): gate clamped to <= swiglu_limit, up to [-limit, limit],
    # then (up + 1) * gate * sigmoid(swiglu_alpha * gate). The two numbers are read only then.
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    norm_eps: float = 1e-5
    # "pre" (GPT-2 onwards): x + f(norm(x)); "post" (the 2017 paper): norm(x + f(x));
    # "sandwich" (Gemma 2/3): x + norm'(f(norm(x))); "output" (OLMo 2): x + norm(f(x)).
    norm_placement: str = "pre"
    # Gemma's RMSNorm scales by (1 + w) with w initialised to 0, instead of by w from 1.
    norm_unit_offset: bool = False
    pos: str = "learned"  # "learned", "sinusoidal", "rope" or "none"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. Llama 3.x {"rope_type": "llama3", ...}
    qk_norm: bool = False  # RMSNorm on q and k before RoPE
    # What that RMSNorm spans: "head" (each head's head_dim channels: Qwen3) or "proj" (the
    # whole q and k projections, n_head*head_dim and n_kv_head*head_dim wide: OLMo 2, OLMoE).
    qk_norm_scope: str = "head"
    # Attention per layer (transformers' `layer_types`): "global" sees every earlier key,
    # "local" only the last `sliding_window` (itself included: Mistral, Gemma 2/3). None ->
    # every layer "local" when sliding_window is set (Mistral), else "global".
    attn_layers: list[str] | None = None
    sliding_window: int | None = None
    # The gated delta rule of "linear" layers (Qwen3.5, Qwen3-Next; nn/deltanet.py): key heads
    # (q and k), value heads (v, the gate z, the state), their widths, the causal conv's kernel.
    # None -> n_head heads of head_dim; value heads default to the key heads.
    linear_k_heads: int | None = None
    linear_v_heads: int | None = None
    linear_k_head_dim: int | None = None
    linear_v_head_dim: int | None = None
    # (The kernel is also a "conv" layer's: LFM2's short convolution, kernel 3.)
    linear_conv_kernel: int = 4
    # Softmax attention's output times sigmoid(a gate the query projection also makes), per
    # channel (Qwen3.5, Qwen3-Next): an attention layer may then output nothing.
    attn_gate: bool = False
    # The share of each head's channels RoPE rotates (the first ones; Qwen3.5: 0.25).
    partial_rotary_factor: float = 1.0
    # Per layer, whether attention rotates q and k (pos="rope"); False is a NoPE layer
    # (SmolLM3's no_rope_layers). None -> every layer True when pos="rope".
    rope_layers: list[bool] | None = None
    rope_local_theta: float | None = None  # local layers' RoPE base, unscaled (Gemma 3); None -> rope_theta
    # Attention logits: scaled by 1/sqrt(attn_scale_dim) (None -> head_dim; Gemma's
    # query_pre_attn_scalar), then soft-capped to (-cap, cap) by cap * tanh(x / cap) (Gemma 2).
    attn_scale_dim: float | None = None
    attn_softcap: float | None = None
    logit_softcap: float | None = None  # the same cap on the output logits (Gemma 2)
    embed_scale: bool = False  # token embeddings times sqrt(n_embd) (Gemma)
    # A learned logit per head in each softmax's denominator (gpt-oss): a query may attend to
    # "nothing" instead of being forced to spread its weight over the keys.
    attn_sinks: bool = False
    bias: bool = True  # biases in the linear layers (and the shift of LayerNorm)
    # Attention biases. `attn_bias` is the output projection's (c_proj) and the default of
    # `qkv_bias`, the query/key/value projection's (c_attn): GPT-2 has both, Llama neither,
    # Qwen2 only q/k/v, and "LLMs from scratch" (qkv_bias=False) only the output one.
    attn_bias: bool | None = None  # None -> `bias`
    qkv_bias: bool | None = None  # None -> `attn_bias`
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    # Dropout rates. `dropout` is the default of the three sites (the book's exercise 4.3 sets
    # them apart): the embedding sum, the attention weights, and each sublayer's output before
    # it joins the residual stream (after attention's c_proj and after the FFN).
    dropout: float = 0.0
    emb_dropout: float | None = None  # None -> `dropout`
    attn_dropout: float | None = None  # None -> `dropout`
    resid_dropout: float | None = None  # None -> `dropout`
    # Dropout masks from 16-bit slices of 64-bit random words (dropout.py): ~6x cheaper to draw on
    # CPU than one random float per element, dropout 2-4x faster (bench/dropout.py); False: F.dropout.
    fast_dropout: bool = True
    attn_impl: str = "sdpa"  # "sdpa" (fused kernel) or "explicit" (softmax written out)
    # Norms and GELU as one PyTorch kernel each (same values as the written-out formulas, which
    # False runs; tests hold them equal). The written-out ones cost ~2x a CPU training step.
    fused_ops: bool = True
    attn_score: str = "dot"  # "dot" q.k/sqrt(d), "dot_unscaled", "additive", "bilinear", "cosine"
    # Multi-head latent attention (DeepSeek-V2/V3, attn_type="mla"): keys and values come from a
    # latent of kv_lora_rank values per token (RMS-normed), plus one RoPE key of qk_rope_head_dim
    # shared by the heads; the cache holds only those two. Queries are low-rank too when
    # q_lora_rank is set. Each head scores with qk_nope_head_dim + qk_rope_head_dim channels
    # (head_dim resolves to that sum) and returns v_head_dim. rope_interleave: RoPE pairs
    # channels (2i, 2i+1), as DeepSeek's checkpoints store them, instead of (i, i + d/2).
    attn_type: str = "mha"
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_interleave: bool = False
    share_layers: bool = False  # ALBERT: one block's weights applied n_layer times
    residual: bool = True  # skip connections around attention and FFN (False: an ablation)
    # Mixture of experts (nn/moe.py): a router sends each token to `n_expert_active` of
    # `n_expert` SwiGLU experts. n_expert=0: every FFN is dense.
    n_expert: int = 0
    n_expert_active: int = 2  # top-k
    expert_hidden: int | None = None  # each expert's SwiGLU width; None -> ffn_hidden
    # Top-k weights renormalised to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob), or the
    # softmax probabilities as they are (OLMoE).
    router_renorm: bool = True
    router_bias: bool = False  # a bias on the router's logits (gpt-oss)
    shared_expert_hidden: int = 0  # > 0: a SwiGLU every token runs, sigmoid-gated (Qwen2-MoE)
    shared_expert_gate: bool = True  # False: the shared expert's output is added as is (DeepSeek-V3)
    # DeepSeek-V3 routing: "sigmoid" scores each expert alone (no softmax over experts) and picks
    # the top k of score + a correction bias (a buffer, `correction_bias`; selection only, the
    # weights are the scores). router_groups / router_topk_groups: experts split in groups, a
    # token picks among the best topk groups only (a group's worth: its two best scores).
    # routed_scale multiplies the routed experts' weights (routed_scaling_factor).
    router_score: str = "softmax"
    router_groups: int = 1
    router_topk_groups: int = 1
    routed_scale: float = 1.0
    # Sigmoid routing's renormalisation: w / (sum(w) + router_renorm_eps), as transformers adds
    # it: DeepSeek-V3 1e-20, LFM2-MoE 1e-6 (large enough to matter in fp32 logits).
    router_renorm_eps: float = 1e-20
    # DeepSeek-V3's auxiliary-loss-free balancing: after each training step every correction
    # bias moves by this much toward balance (up for an expert chosen less than the mean, down
    # for one chosen more; the paper's gamma, 0.001). 0: the bias stays as loaded.
    correction_bias_rate: float = 0.0
    # Per layer "dense" (ffn_hidden wide), "moe", or "dense+moe" (Gemma 4: both, side by side,
    # each with its own norms, their outputs summed); None -> every layer "moe" when n_expert > 0
    # (transformers' mlp_only_layers / decoder_sparse_step, resolved once).
    ffn_layers: list[str] | None = None
    # Training-only losses on the router logits, added to the cross-entropy in training mode:
    # the load-balancing loss (Switch Transformer; transformers' load_balancing_loss_func)
    # and the router z-loss (ST-MoE: mean squared logsumexp of the logits).
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    # Gemma 4 (each off by default; docs in README "Gemma 4"):
    # Global layers' head size and KV heads (Gemma 4 widens global heads); None -> head_dim, n_kv_head.
    global_head_dim: int | None = None
    global_n_kv_head: int | None = None
    # Global layers project no values: a head's value is its key before k's norm and RoPE (K = V).
    attn_k_eq_v: bool = False
    v_norm: bool = False  # a scale-free RMSNorm on each head's values (Gemma 4)
    # The last `kv_shared_layers` layers project no keys or values: each reads those of the
    # last earlier layer of its kind (global/local), so the cache holds only the earlier layers.
    kv_shared_layers: int = 0
    # Per-layer inputs (Gemma 4's PLE): each layer gets a `per_layer_input_dim` vector per token
    # (its own embedding of the token plus a projection of the token's embedding), gated into
    # the residual after the FFN. 0: none. per_layer_vocab_size None -> vocab_size.
    per_layer_input_dim: int = 0
    per_layer_vocab_size: int | None = None
    layer_scalar: bool = False  # each layer's output times a learned scalar (Gemma 4)
    double_wide_mlp: bool = False  # the KV-shared layers' MLP is 2 * ffn_hidden wide (Gemma 4)
    # Gemma 4's router: a scale-free RMSNorm of the residual stream times a learned vector and
    # 1/sqrt(n_embd) before the logits, and a learned scale per expert on the top-k weights.
    router_norm: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. HF architecture)

    def __post_init__(self) -> None:
        check_types(self, "config")
        self.validate()  # sizes first: the derived fields divide by them
        self.resolve()
        self.validate()

    # Derived sizes -------------------------------------------------------------------------
    def derived(self) -> dict[str, Any]:
        """The value each "derive me" field takes when left as None."""
        head_dim = self.n_embd // self.n_head
        if self.attn_type == "mla" and self.qk_nope_head_dim is not None and self.qk_rope_head_dim is not None:
            head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim  # the width q.k spans
        # global_head_dim / global_n_kv_head follow the (possibly still unresolved) local ones.
        own_head_dim = self.head_dim if self.head_dim is not None else head_dim
        own_kv_head = self.n_kv_head if self.n_kv_head is not None else self.n_head
        # qkv_bias follows attn_bias, which may itself still be None (-> bias) at this point.
        attn_bias = self.bias if self.attn_bias is None else self.attn_bias
        return {"n_kv_head": self.n_head, "head_dim": head_dim, "ffn_hidden": 4 * self.n_embd,
                "attn_bias": self.bias, "qkv_bias": attn_bias, "emb_dropout": self.dropout,
                "attn_dropout": self.dropout, "resid_dropout": self.dropout,
                "expert_hidden": 4 * self.n_embd if self.ffn_hidden is None else self.ffn_hidden,
                "ffn_layers": ["moe" if self.n_expert > 0 else "dense"] * self.n_layer,
                "attn_layers": ["local" if self.sliding_window else "global"] * self.n_layer,
                "rope_layers": [self.pos == "rope"] * self.n_layer,
                "global_head_dim": own_head_dim, "global_n_kv_head": own_kv_head,
                "per_layer_vocab_size": self.vocab_size,
                "linear_k_heads": self.n_head,
                "linear_v_heads": self.linear_k_heads or self.n_head,
                "linear_k_head_dim": self.head_dim or head_dim,
                "linear_v_head_dim": self.head_dim or head_dim}

    def resolve(self) -> None:
        for name, value in self.derived().items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate(self) -> None:
        """Raise `BardlmError` with the fix for any inconsistent field."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise BardlmError(f"config: {name} must be a positive integer, got {value!r}")
        for name in ("n_kv_head", "head_dim", "ffn_hidden", "global_head_dim", "global_n_kv_head",
                     "per_layer_vocab_size", "linear_k_heads", "linear_v_heads", "linear_k_head_dim",
                     "linear_v_head_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise BardlmError(
                    f"config: {name} must be a positive integer or null, got {value!r}"
                )
        _check_choice("ffn", self.ffn, FFNS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("pos", self.pos, POSITIONS)
        _check_choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        _check_choice("qk_norm_scope", self.qk_norm_scope, QK_NORM_SCOPES)
        _check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        _check_choice("attn_score", self.attn_score, ATTN_SCORES)
        _check_choice("attn_type", self.attn_type, ATTN_TYPES)
        _check_choice("router_score", self.router_score, ROUTER_SCORES)
        if self.head_dim is None and self.n_embd % self.n_head != 0 and self.attn_type != "mla":  # before resolve()
            raise BardlmError(
                f"config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"pick n_head from {_divisors(self.n_embd)} or set head_dim explicitly"
            )
        if self.n_kv_head is not None and self.n_head % self.n_kv_head != 0:
            raise BardlmError(
                f"config: n_head ({self.n_head}) must be divisible by n_kv_head "
                f"({self.n_kv_head}); pick n_kv_head from {_divisors(self.n_head)}"
            )
        for name in ("head_dim", "global_head_dim"):  # (latent attention checks its own RoPE key)
            value = getattr(self, name)
            if self.pos != "rope" or self.attn_type == "mla" or value is None:
                continue
            rotated = int(value * self.partial_rotary_factor)
            if rotated % 2 != 0:
                what = name if self.partial_rotary_factor == 1 else \
                    f"{name} * partial_rotary_factor ({self.partial_rotary_factor})"
                raise BardlmError(
                    f"config: RoPE rotates pairs of channels, so {what} must be even, got "
                    f"{rotated}; change n_embd/n_head, {name} or partial_rotary_factor"
                )
        if self.global_n_kv_head is not None and self.n_head % self.global_n_kv_head != 0:
            raise BardlmError(
                f"config: n_head ({self.n_head}) must be divisible by global_n_kv_head "
                f"({self.global_n_kv_head}); pick global_n_kv_head from {_divisors(self.n_head)}"
            )
        if self.pos == "sinusoidal" and self.n_embd % 2 != 0:
            raise BardlmError(
                f"config: sinusoidal positions need an even n_embd, got {self.n_embd}"
            )
        for name in ("dropout", *DROPOUT_SITES):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise BardlmError(f"config: {name} must be in [0, 1), got {value}")
        if self.norm_eps <= 0:
            raise BardlmError(f"config: norm_eps must be positive, got {self.norm_eps}")
        if self.rope_theta <= 0:
            raise BardlmError(f"config: rope_theta must be positive, got {self.rope_theta}")
        for name in ("swiglu_alpha", "swiglu_limit"):
            if getattr(self, name) <= 0:
                raise BardlmError(f"config: {name} must be positive, got {getattr(self, name)} "
                                  "(gpt-oss uses swiglu_alpha=1.702, swiglu_limit=7.0)")
        self._validate_moe()
        self._validate_attention()
        self._validate_mla()
        self._validate_gemma4()

    def _validate_attention(self) -> None:
        """The per-layer attention fields (attn_layers, sliding_window, rope_layers, caps)."""
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise BardlmError(f"config: sliding_window must be a positive integer or null, "
                              f"got {self.sliding_window}")
        if not 0 < self.partial_rotary_factor <= 1:
            raise BardlmError(f"config: partial_rotary_factor must be in (0, 1], got "
                              f"{self.partial_rotary_factor} (the share of head_dim RoPE rotates)")
        if self.linear_conv_kernel < 1:
            raise BardlmError(f"config: linear_conv_kernel must be >= 1, got {self.linear_conv_kernel}")
        if self.linear_k_heads and self.linear_v_heads and self.linear_v_heads % self.linear_k_heads:
            raise BardlmError(f"config: linear_v_heads ({self.linear_v_heads}) must be a multiple of "
                              f"linear_k_heads ({self.linear_k_heads}); pick linear_k_heads from "
                              f"{_divisors(self.linear_v_heads)}")
        for name in ("attn_scale_dim", "attn_softcap", "logit_softcap", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise BardlmError(f"config: {name} must be positive or null, got {value}")
        if self.attn_layers is not None:
            if len(self.attn_layers) != self.n_layer or not set(self.attn_layers) <= set(ATTN_KINDS):
                raise BardlmError(f"config: attn_layers must list \"global\", \"local\", \"linear\" or "
                                  f"\"conv\" for each of the {self.n_layer} layers, got {self.attn_layers}")
            if "local" in self.attn_layers and self.sliding_window is None:
                raise BardlmError("config: attn_layers has \"local\" layers but sliding_window "
                                  "is null; set sliding_window (the keys a local layer sees)")
        if self.rope_layers is not None:
            if len(self.rope_layers) != self.n_layer or not all(isinstance(r, bool) for r in self.rope_layers):
                raise BardlmError(f"config: rope_layers must list true or false for each of the "
                                  f"{self.n_layer} layers, got {self.rope_layers}")
            if any(self.rope_layers) and self.pos != "rope":
                raise BardlmError(f"config: rope_layers has rotary layers but pos={self.pos}; "
                                  "set pos=rope or rope_layers=null")
        if self.share_layers and (len(set(self.attn_layers or [])) > 1 or len(set(self.rope_layers or [])) > 1):
            raise BardlmError("config: share_layers applies one block to every layer, so "
                              "attn_layers and rope_layers cannot vary; drop share_layers")

    def _validate_mla(self) -> None:
        """The latent-attention fields: all sizes given for attn_type="mla", none otherwise."""
        sizes = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        for name in ("q_lora_rank", *sizes):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise BardlmError(f"config: {name} must be a positive integer or null, got {value}")
        if self.attn_type != "mla":
            given = [n for n in ("q_lora_rank", *sizes) if getattr(self, n) is not None]
            if given or self.rope_interleave:
                raise BardlmError(f"config: {', '.join(given) or 'rope_interleave'} only apply to "
                                  "latent attention; set attn_type=mla or drop them")
            return
        missing = [n for n in sizes if getattr(self, n) is None]
        if missing:
            raise BardlmError(f"config: attn_type=mla needs {', '.join(missing)} (e.g. DeepSeek-V3: "
                              "kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)")
        odd = {"pos other than rope": self.pos != "rope", "attn_score other than dot": self.attn_score != "dot",
               "local layers": "local" in (self.attn_layers or []), "attn_sinks": self.attn_sinks,
               "linear or conv layers": bool(set(self.attn_layers or []) & set(STATE_KINDS)),
               "attn_softcap": self.attn_softcap is not None, "qk_norm": self.qk_norm,
               "attn_scale_dim": self.attn_scale_dim is not None,
               "layers without RoPE": self.rope_layers is not None and not all(self.rope_layers)}
        found = [k for k, v in odd.items() if v]
        if found:
            raise BardlmError(f"config: attn_type=mla does not combine with {', '.join(found)}; "
                              "latent attention is global, rotary, dot-product attention")
        if self.qk_rope_head_dim % 2:
            raise BardlmError(f"config: RoPE rotates pairs of channels, so qk_rope_head_dim must be "
                              f"even, got {self.qk_rope_head_dim}")
        if self.head_dim is not None and self.head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:
            raise BardlmError(f"config: with attn_type=mla head_dim is qk_nope_head_dim + "
                              f"qk_rope_head_dim = {self.qk_nope_head_dim + self.qk_rope_head_dim}, "
                              f"got {self.head_dim}; leave head_dim null")
        if self.n_kv_head not in (None, self.n_head):
            raise BardlmError(f"config: latent attention has no KV heads of its own (every head reads "
                              f"the one latent), so n_kv_head must equal n_head, got {self.n_kv_head}")
        if self.rope_scaling and (self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
                                  not in ("yarn", "default")):
            raise BardlmError(f"config: attn_type=mla supports rope_scaling yarn (DeepSeek-V3's) "
                              f"only, got {self.rope_scaling}")

    @property
    def rope_dim(self) -> int:
        """The channels of a global layer's head that RoPE's table covers: the first
        global_head_dim * partial_rotary_factor (global_head_dim is head_dim but in Gemma 4;
        Qwen3.5 rotates a quarter), or the decoupled RoPE key's qk_rope_head_dim under latent
        attention."""
        if self.attn_type == "mla":
            return self.qk_rope_head_dim
        return int(self.global_head_dim * self.partial_rotary_factor)

    def cache_width(self, layer: int = 0) -> int:
        """Values layer `layer`'s cache holds per position: a key and a value per KV head (with
        that layer's heads and head size: Gemma 4's global layers differ), or under latent
        attention the latent and the RoPE key (kv_lora_rank + qk_rope_head_dim); none in a
        linear or conv layer (its state does not grow: `linear_state_elements`)."""
        if self.attn_layers[layer] in STATE_KINDS:
            return 0
        if self.attn_type == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.layer_kv_heads(layer) * self.layer_head_dim(layer)

    def layer_cache_lengths(self, tokens: int) -> list[int]:
        """Positions the KV cache of one sequence holds per cached layer (`cache_layers`) for a
        `tokens` context: all of them for a global layer, at most `sliding_window` for a local
        one (a ring buffer), none for a linear or conv one (its fixed state is
        `linear_state_elements`)."""
        kinds = [self.attn_layers[i] for i in self.cache_layers()]
        return [0 if kind in STATE_KINDS else min(tokens, self.sliding_window) if kind == "local"
                else tokens for kind in kinds]

    # Per-layer attention shapes (Gemma 4) ---------------------------------------------------
    def layer_head_dim(self, layer: int) -> int:
        """Layer `layer`'s head size: global_head_dim in a global layer, else head_dim."""
        return self.global_head_dim if self.attn_layers[layer] == "global" else self.head_dim

    def layer_kv_heads(self, layer: int) -> int:
        """Layer `layer`'s KV heads: global_n_kv_head in a global layer, else n_kv_head."""
        return self.global_n_kv_head if self.attn_layers[layer] == "global" else self.n_kv_head

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values layer `layer` attends over: itself, or for one of the
        last `kv_shared_layers` layers the last earlier (unshared) layer of its kind."""
        first_shared = self.n_layer - self.kv_shared_layers
        if layer < first_shared:
            return layer
        kind = self.attn_layers[layer]
        return max(i for i in range(first_shared) if self.attn_layers[i] == kind)

    def cache_layers(self) -> list[int]:
        """The layers that own a KV cache (in order): every layer but the KV-shared ones."""
        return list(range(self.n_layer - self.kv_shared_layers))

    def layer_ffn_hidden(self, layer: int) -> int:
        """Layer `layer`'s dense MLP width: twice ffn_hidden in a KV-shared layer when
        double_wide_mlp (Gemma 4), else ffn_hidden."""
        wide = self.double_wide_mlp and self.kv_source(layer) != layer
        return self.ffn_hidden * (2 if wide else 1)

    def _validate_gemma4(self) -> None:
        """KV sharing, per-layer inputs, the dense+moe block (Gemma 4's fields)."""
        if not 0 <= self.kv_shared_layers < self.n_layer:
            raise BardlmError(f"config: kv_shared_layers must be in [0, n_layer={self.n_layer}), "
                              f"got {self.kv_shared_layers} (at least one layer must own its keys)")
        if self.kv_shared_layers and self.attn_layers is not None:
            first = self.n_layer - self.kv_shared_layers
            missing = sorted(set(self.attn_layers[first:]) - set(self.attn_layers[:first]))
            if missing:
                raise BardlmError(f"config: the KV-shared layers have {missing[0]} attention but "
                                  f"none of the first {first} layers does; lower kv_shared_layers")
            if self.share_layers:
                raise BardlmError("config: share_layers applies one block to every layer, so "
                                  "kv_shared_layers cannot be set; drop one of them")
        if self.double_wide_mlp and self.ffn not in ("swiglu", "geglu"):
            raise BardlmError(f"config: double_wide_mlp widens a gated MLP (Gemma 4), so it needs "
                              f"ffn=swiglu or geglu, got ffn={self.ffn}")
        if self.per_layer_input_dim < 0:
            raise BardlmError(f"config: per_layer_input_dim must be >= 0, got {self.per_layer_input_dim}")
        if self.ffn_layers is not None and "dense+moe" in self.ffn_layers \
                and self.norm_placement != "sandwich":
            raise BardlmError("config: \"dense+moe\" layers normalise each branch (Gemma 4), "
                              "which needs norm_placement=sandwich")

    def linear_state_elements(self) -> tuple[int, int]:
        """(conv, state): the values one sequence's fixed state holds over all linear and conv
        layers, whatever its length: per linear layer the conv's last (kernel - 1) inputs of q,
        k and v, and the (d_k, d_v) matrix of each value head (nn/deltanet.py); per conv layer
        the last (kernel - 1) inputs B*h, n_embd wide (nn/shortconv.py), and no matrix."""
        n, n_conv = self.attn_layers.count("linear"), self.attn_layers.count("conv")
        conv = (2 * self.linear_k_heads * self.linear_k_head_dim
                + self.linear_v_heads * self.linear_v_head_dim) * (self.linear_conv_kernel - 1)
        state = self.linear_v_heads * self.linear_k_head_dim * self.linear_v_head_dim
        return n * conv + n_conv * self.n_embd * (self.linear_conv_kernel - 1), n * state

    def _validate_moe(self) -> None:
        """The mixture-of-experts fields (n_expert, ffn_layers, ...) agree with each other."""
        for name in ("n_expert", "shared_expert_hidden", "router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise BardlmError(f"config: {name} must be >= 0, got {getattr(self, name)}")
        if self.expert_hidden is not None and self.expert_hidden <= 0:
            raise BardlmError(f"config: expert_hidden must be a positive integer or null, got {self.expert_hidden}")
        if self.n_expert > 0:
            if self.ffn not in ("swiglu", "swiglu_clamped", "geglu"):
                raise BardlmError(f"config: experts are gated MLPs, so n_expert > 0 needs "
                                  f"ffn=swiglu, swiglu_clamped or geglu, got ffn={self.ffn}")
            if not 1 <= self.n_expert_active <= self.n_expert:
                raise BardlmError(f"config: n_expert_active must be in [1, n_expert={self.n_expert}], "
                                  f"got {self.n_expert_active}")
            self._validate_groups()
        if self.ffn_layers is None:
            return
        if len(self.ffn_layers) != self.n_layer or not set(self.ffn_layers) <= {"dense", "moe", "dense+moe"}:
            raise BardlmError(f"config: ffn_layers must list \"dense\", \"moe\" or \"dense+moe\" "
                              f"for each of the {self.n_layer} layers, got {self.ffn_layers}")
        if set(self.ffn_layers) & {"moe", "dense+moe"} and self.n_expert == 0:
            raise BardlmError("config: ffn_layers has \"moe\" layers but n_expert is 0; set n_expert")
        if self.share_layers and len(set(self.ffn_layers)) > 1:
            raise BardlmError("config: share_layers applies one block to every layer, so ffn_layers "
                              "cannot mix dense and moe; drop share_layers or use one kind")

    def _validate_groups(self) -> None:
        """Group-limited routing: groups divide the experts, the kept groups hold the top k."""
        groups, kept = self.router_groups, self.router_topk_groups
        if groups <= 0 or self.n_expert % groups or not 1 <= kept <= groups:
            raise BardlmError(f"config: router_groups must divide n_expert ({self.n_expert}) and "
                              f"router_topk_groups be in [1, router_groups]; got {groups}, {kept}")
        per_group = self.n_expert // groups
        if groups > 1 and per_group < 2:
            raise BardlmError(f"config: a group's score is its two best experts, so each of the "
                              f"{groups} groups needs >= 2 experts; use fewer groups")
        if self.n_expert_active > kept * per_group:
            raise BardlmError(f"config: n_expert_active ({self.n_expert_active}) is more than the "
                              f"{kept} kept groups hold ({kept * per_group}); raise router_topk_groups")
        if self.routed_scale <= 0:
            raise BardlmError(f"config: routed_scale must be positive, got {self.routed_scale}")
        if self.router_renorm_eps < 0:
            raise BardlmError(f"config: router_renorm_eps must be >= 0, got {self.router_renorm_eps}")
        if self.correction_bias_rate < 0 or (self.correction_bias_rate > 0 and self.router_score != "sigmoid"):
            raise BardlmError(f"config: correction_bias_rate moves the correction bias of router_score=sigmoid "
                              f"routers and must be >= 0, got {self.correction_bias_rate} with {self.router_score}")
        if self.router_score == "sigmoid" and self.router_aux_loss_coef > 0:
            raise BardlmError("config: the load-balancing loss is written for softmax routers; "
                              "with router_score=sigmoid set router_aux_loss_coef=0")

    # Serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, data, "config")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated). A derived field that still holds its
        derived value is derived again from the new fields (n_embd=256 also moves head_dim)."""
        derived = self.derived()
        for name, value in derived.items():
            if name not in changes and getattr(self, name) == value:
                changes[name] = None
        return dataclasses.replace(self, **changes)


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """A config dataclass from a JSON dict, naming an unknown key (with a suggestion)."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise BardlmError(f"{where}: unknown key {unknown[0]!r}{_suggest(unknown[0], known)}")
    return cls(**data)


def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


def _check_choice(name: str, value: str, choices: tuple[str, ...], where: str = "config") -> None:
    if value not in choices:
        raise BardlmError(
            f"{where}: {name} must be one of {', '.join(choices)}; got {value!r}"
            f"{_suggest(str(value), list(choices))}"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0][:12]


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# Presets -----------------------------------------------------------------------------------
# Model shapes only; training budgets live in `TRAIN_PRESETS` under the same names.
_GPT2 = dict(vocab_size=50257, block_size=1024, bias=True, tie_embeddings=True)
_LLAMA = dict(norm="rmsnorm", ffn="swiglu", pos="rope", bias=False)
_GEMMA3 = dict(norm="rmsnorm", norm_unit_offset=True, norm_placement="sandwich", ffn="geglu",
               pos="rope", rope_theta=1000000.0, rope_local_theta=10000.0, qk_norm=True,
               embed_scale=True, bias=False, tie_embeddings=True, norm_eps=1e-6)

# Gemma 4's block: Gemma 3's, with plain-w RMSNorms, values normalised too, attention scale 1,
# a layer scalar, and the global layers' RoPE turning only a quarter of their (wider) heads.
_GEMMA4 = dict(norm="rmsnorm", norm_placement="sandwich", ffn="geglu", pos="rope",
               rope_theta=1000000.0, rope_local_theta=10000.0, qk_norm=True, v_norm=True,
               rope_scaling={"rope_type": "proportional", "partial_rotary_factor": 0.25},
               attn_scale_dim=1.0, layer_scalar=True, embed_scale=True, bias=False,
               tie_embeddings=True, norm_eps=1e-6)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    # GPT_CONFIG_124M of "Build a Large Language Model (From Scratch)" (Raschka), ch. 4: GPT-2
    # small's shape without the q/k/v biases, with an untied head and dropout 0.1 everywhere.
    # 163,009,536 parameters (124,412,160 if the head were tied); docs/sources.md.
    "gpt2-124m-lfs": dict(_GPT2, n_layer=12, n_head=12, n_embd=768, dropout=0.1,
                          qkv_bias=False, tie_embeddings=False),
    # nanoGPT's CPU "baby GPT": 4 layers, 4 heads, 128 dims, context 64 (vocab set by the data).
    "char-tiny": dict(
        vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False
    ),
    # The best character model for 5 minutes of a 2-core CPU (issue 11): Qwen3-style blocks
    # (RoPE, RMSNorm, SwiGLU, QK-norm) learn characters in far fewer steps than GPT-2's, and no
    # dropout (5 minutes is ~2 epochs: too short to overfit). See TRAIN_PRESETS.
    "char-5min": dict(
        _LLAMA, vocab_size=65, block_size=256, n_layer=4, n_head=4, n_embd=256, ffn_hidden=688,
        qk_norm=True, tie_embeddings=True,
    ),
    # A word-level model for the complete works (vocab set by the tokenizer).
    "word-small": dict(
        vocab_size=16384, block_size=64, n_layer=4, n_head=4, n_embd=256, bias=False, dropout=0.1
    ),
    # Llama 3.2 1B: GQA 32/8, RoPE theta 500000 with llama3 scaling, tied embeddings.
    "llama-3.2-1b": dict(
        _LLAMA, vocab_size=128256, block_size=131072, n_layer=16, n_head=32, n_kv_head=8,
        n_embd=2048, ffn_hidden=8192, norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    # Qwen3 0.6B: GQA 16/8, head_dim 128 != 1024/16, QK-norm, tied embeddings.
    "qwen3-0.6b": dict(
        _LLAMA, vocab_size=151936, block_size=40960, n_layer=28, n_head=16, n_kv_head=8,
        head_dim=128, n_embd=1024, ffn_hidden=3072, norm_eps=1e-6, rope_theta=1000000.0,
        qk_norm=True, tie_embeddings=True,
    ),
    # Gemma 3 1B (text): 26 layers, five sliding-window (512) layers to one global, each kind
    # with its own RoPE base; GeGLU, sandwich (1 + w) RMSNorms, QK-norm, embeddings x sqrt(d).
    "gemma-3-1b": dict(
        _GEMMA3, vocab_size=262144, block_size=32768, n_layer=26, n_head=4, n_kv_head=1,
        head_dim=256, n_embd=1152, ffn_hidden=6912, sliding_window=512,
        attn_layers=[("global" if (i + 1) % 6 == 0 else "local") for i in range(26)],
    ),
    # Small CPU models of each style (same budget as char-tiny).
    "llama-tiny": dict(
        _LLAMA, vocab_size=65, block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
        ffn_hidden=344, tie_embeddings=False,
    ),
    "qwen3-tiny": dict(
        _LLAMA, vocab_size=65, block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
        head_dim=32, ffn_hidden=344, qk_norm=True, tie_embeddings=True, norm_eps=1e-6,
    ),
    # Gemma 3's block at char-tiny's budget: three local layers (window 16) then a global one.
    "gemma3-tiny": dict(
        _GEMMA3, vocab_size=65, block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
        head_dim=32, ffn_hidden=344, sliding_window=16,
        attn_layers=["local", "local", "local", "global"],
    ),
    # Gemma 4's block at char-tiny's budget: 6 layers (local x2, global, local, then two that
    # reuse the keys and values of layers 3 and 2: the cache holds 4 layers), global heads twice
    # as wide with one KV head and K = V, per-layer inputs of 16, double-wide MLPs when shared.
    "gemma4-tiny": dict(
        _GEMMA4, vocab_size=65, block_size=64, n_layer=6, n_head=4, n_kv_head=2, n_embd=128,
        head_dim=32, global_head_dim=64, global_n_kv_head=1, attn_k_eq_v=True, ffn_hidden=256,
        sliding_window=16, attn_layers=["local", "local", "global", "local", "local", "global"],
        kv_shared_layers=2, double_wide_mlp=True, per_layer_input_dim=16,
    ),
    # Qwen3.5's block at qwen3-tiny's budget: three gated delta rule (linear) layers, then one
    # gated attention layer rotating a quarter of each head; (1 + w) RMSNorms.
    "qwen3.5-tiny": dict(
        _LLAMA, vocab_size=65, block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
        head_dim=32, ffn_hidden=344, qk_norm=True, tie_embeddings=True, norm_eps=1e-6,
        norm_unit_offset=True, attn_gate=True, partial_rotary_factor=0.25,
        attn_layers=["linear", "linear", "linear", "global"], linear_k_heads=2, linear_v_heads=4,
        linear_k_head_dim=32, linear_v_head_dim=32,
    ),
    # LFM2's block at qwen3-tiny's budget: gated short convolutions (kernel 3) in layers 0 and
    # 2, GQA attention with QK-norm in layers 1 and 3.
    "lfm2-tiny": dict(
        _LLAMA, vocab_size=65, block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
        ffn_hidden=344, qk_norm=True, tie_embeddings=True, linear_conv_kernel=3,
        attn_layers=["conv", "global", "conv", "global"],
    ),
    # qwen3-tiny with a mixture of experts (Qwen3-MoE's layout): the first FFN dense, the others
    # 4 experts of half the dense width, top 2, so each token runs as many FFN weights as in
    # qwen3-tiny; load-balancing and z-loss keep all experts in use.
    "moe-tiny": dict(
        _LLAMA, vocab_size=65, block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
        head_dim=32, ffn_hidden=344, qk_norm=True, tie_embeddings=True, norm_eps=1e-6,
        n_expert=4, n_expert_active=2, expert_hidden=172, ffn_layers=["dense", "moe", "moe", "moe"],
        router_aux_loss_coef=0.01, router_z_loss_coef=0.001,
    ),
    # gpt-oss's block at the same budget: sliding-window (16) and full layers alternating,
    # a sink logit per head, q/k/v/o biases, every FFN 4 clamped-SwiGLU experts with biases
    # (top 2) behind a router with a bias. Plain RoPE: YaRN matters only past a 4k context.
    "gpt-oss-tiny": dict(
        _LLAMA, vocab_size=65, block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
        head_dim=32, ffn="swiglu_clamped", bias=True, attn_sinks=True, tie_embeddings=False,
        sliding_window=16, attn_layers=["local", "global", "local", "global"],
        n_expert=4, n_expert_active=2, expert_hidden=172, ffn_hidden=172, router_bias=True,
        router_aux_loss_coef=0.01, router_z_loss_coef=0.001,
    ),
    # DeepSeek-V3's block at char-tiny's budget: latent attention (a cache of 32 + 16 = 48
    # values per token and layer where llama-tiny's holds 128), the first FFN dense, then 8
    # experts in 4 groups (top 2 of the best 2 groups, sigmoid scores) beside a shared expert:
    # 3 x 112 FFN rows a token, as llama-tiny's 344. (Expert widths are multiples of 8:
    # transformers' grouped expert kernel refuses rows that are not 16-byte aligned.)
    "mla-tiny": dict(
        _LLAMA, vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, ffn_hidden=344,
        tie_embeddings=False, norm_eps=1e-6, attn_type="mla", q_lora_rank=64, kv_lora_rank=32,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, rope_interleave=True,
        n_expert=8, n_expert_active=2, expert_hidden=112, shared_expert_hidden=112,
        shared_expert_gate=False, router_score="sigmoid", router_groups=4, router_topk_groups=2,
        correction_bias_rate=0.001, ffn_layers=["dense", "moe", "moe", "moe"],
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise BardlmError(
            f"unknown preset {name!r}{_suggest(name, list(PRESETS))}; "
            f"valid presets: {', '.join(PRESETS)}"
        )
    # Deep copy: nested fields (rope_scaling) must not be shared with the preset table.
    return ModelConfig(**copy.deepcopy({**PRESETS[name], **overrides}))


# Training ----------------------------------------------------------------------------------
OPTIMIZERS = ("auto", "fused", "foreach", "loop", "muon")
SCHEDULES = ("cosine", "noam", "constant", "wsd")


@dataclass
class TrainConfig:
    """Everything about a run that is not the model's shape."""

    batch_size: int = 12
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None -> max_iters
    schedule: str = "cosine"  # warm-up, then "cosine" to min_lr, "noam" 1/sqrt(step), "constant" or "wsd"
    decay_fraction: float = 0.2  # wsd: the share of the steps after warm-up spent decaying to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    eval_interval: int = 250
    eval_batches: int = 20  # validation subset during training: eval_batches * batch_size windows
    seed: int = 1337
    val_fraction: float = 0.1
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast)
    device: str = "cpu"
    compile: bool = False  # torch.compile the training forward/backward (eval stays eager)
    # AdamW kernel: "fused" (one kernel), "foreach", "loop", "auto" (fused on CUDA, else
    # foreach); or "muon"
    optimizer: str = "auto"
    fsdp: bool = False  # under torchrun: shard parameters with FSDP2 instead of DDP
    # Memory (train/memory.py). They change what a step keeps for backward, never what it
    # computes: a run may turn them on or off when it resumes.
    checkpoint_activations: bool = False  # recompute blocks' activations in backward
    checkpoint_every: int = 1  # with checkpoint_activations: every k-th block (0, k, 2k, ...)
    loss_chunk: int = 0  # > 0: the loss through the head this many tokens at a time (no full logits)
    # Each parameter's optimizer update as soon as its gradient is ready in backward, which then
    # frees it: the gradients of the whole model never exist at once (train/loop.py).
    step_in_backward: bool = False

    def __post_init__(self) -> None:
        check_types(self, "train")
        for name in ("batch_size", "max_iters", "grad_accum", "eval_interval", "eval_batches", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise BardlmError(f"train: {name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0:
            raise BardlmError(f"train: lr must be positive and min_lr >= 0, got {self.lr}, {self.min_lr}")
        for name in ("warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise BardlmError(f"train: {name} must be >= 0, got {value}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise BardlmError(f"train: {name} must be in [0, 1), got {getattr(self, name)} "
                                  "(AdamW's moving averages; 0.9 and 0.99 are usual)")
        if self.eps <= 0:
            raise BardlmError(f"train: eps must be positive, got {self.eps} (1e-8 is usual)")
        if self.dtype not in ("fp32", "bf16"):
            raise BardlmError(f"train: dtype must be fp32 or bf16, got {self.dtype!r} (fp16 is unusable on CPU)")
        _check_choice("schedule", self.schedule, SCHEDULES, "train")
        if not 0 < self.decay_fraction <= 1:
            raise BardlmError(f"train: decay_fraction must be in (0, 1], got {self.decay_fraction} "
                              "(the share of the run that wsd spends decaying; 0.2 is usual)")
        _check_choice("optimizer", self.optimizer, OPTIMIZERS, "train")
        if self.optimizer == "muon" and self.fsdp:
            raise BardlmError("train: optimizer=muon orthogonalises whole matrices, which FSDP "
                              "shards; use DDP (drop fsdp) or optimizer=fused")
        if self.loss_chunk < 0:
            raise BardlmError(f"train: loss_chunk must be >= 0 (0: the whole logits at once), got {self.loss_chunk}")
        if self.step_in_backward and (self.grad_clip > 0 or self.grad_accum > 1 or self.fsdp):
            raise BardlmError("train: step_in_backward updates each parameter before the others' gradients "
                              "exist, so it cannot clip, accumulate or shard them: set grad_clip=0 and "
                              "grad_accum=1 (and drop fsdp), or drop step_in_backward")
        if not 0 < self.val_fraction < 1:
            raise BardlmError(f"train: val_fraction must be in (0, 1), got {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, data, "train config")


def train_config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


# Training budgets of the presets (model shapes are in PRESETS under the same names).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT's CPU budget (batch 12, 2000 iterations); a peak lr of 2e-3 (nanoGPT: 1e-3)
    # reaches 1.81 instead of 1.89 with the same steps.
    "char-tiny": dict(batch_size=12, max_iters=2000, lr=2e-3, min_lr=2e-4, warmup_iters=100),
    "llama-tiny": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100),
    "qwen3-tiny": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100),
    "moe-tiny": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100),
    "qwen3.5-tiny": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100),
    "lfm2-tiny": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100),
    "gemma3-tiny": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100),
    "gpt-oss-tiny": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100),
    "mla-tiny": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100),
    "gemma4-tiny": dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100),
    # 5 minutes on a 2-core CPU: bf16 autocast + torch.compile, Muon (about 2.1M tokens).
    "char-5min": dict(batch_size=16, max_iters=500, lr=3e-3, min_lr=3e-4, warmup_iters=30,
                      eval_interval=250, eval_batches=2, dtype="bf16", compile=True,
                      optimizer="muon"),
    "word-small": dict(batch_size=32, max_iters=3000, lr=1e-3, min_lr=1e-4, warmup_iters=200),
}


# Types: checked on construction, parsed from `--set` ------------------------------------------
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_types(*classes: type) -> dict[str, Any]:
    """Field name -> annotation of the given dataclasses (for `parse_overrides(types=...)`)."""
    return {name: tp for cls in classes for name, tp in _field_types(cls).items()}


def _kinds(tp: Any) -> tuple[set[type], bool]:
    """({base types}, None allowed) of an annotation such as `int | None`."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (tp,)
    kinds = {typing.get_origin(a) or a for a in args if a is not type(None)}
    return kinds, type(None) in args


def _type_name(kinds: set[type], optional: bool) -> str:
    names = {bool: "a boolean (true/false)", int: "an integer", float: "a number",
             str: "a string", dict: "a JSON object", list: "a JSON list"}
    text = " or ".join(names.get(k, k.__name__) for k in sorted(kinds, key=str))
    return text + (" or null" if optional else "")


def check_types(obj: Any, where: str) -> None:
    """Each field must hold its annotated type (an int is a fine float; a bool is no int)."""
    hints = _field_types(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kinds, optional = _kinds(hints[f.name])
        if value is None and optional:
            continue
        ok = any(
            (k is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (k is int and isinstance(value, int) and not isinstance(value, bool))
            or (k not in (int, float) and isinstance(value, k))
            for k in kinds
        ) or Any in kinds
        if not ok:
            raise BardlmError(f"{where}: {f.name} must be {_type_name(kinds, optional)}, got {value!r}")
        # NaN passes every `<` check unnoticed (a config.json may hold NaN or Infinity): refuse it.
        if isinstance(value, float) and not math.isfinite(value):
            raise BardlmError(f"{where}: {f.name} must be a finite number, got {value}")


_TRUE, _FALSE = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")


def parse_value(key: str, raw: str, tp: Any) -> Any:
    """The value of `--set key=raw` for a field annotated `tp`; a one-line error otherwise."""
    kinds, optional = _kinds(tp)
    text = raw.strip()
    if optional and text.lower() in ("none", "null"):
        return None
    for kind in (bool, int, float, dict, list, str):
        if kind not in kinds:
            continue
        if kind is bool and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        if kind is int:
            try:
                return int(text)
            except ValueError:
                pass
        if kind is float:
            try:
                value = float(text)
            except ValueError:
                continue
            if math.isfinite(value):
                return value
        if kind in (dict, list):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(value, kind):
                return value
        if kind is str:
            return text
    if Any in kinds:
        return text
    raise BardlmError(f"--set {key}={raw}: {raw!r} is not {_type_name(kinds, optional)}")


def parse_overrides(
    pairs: list[str], keys: list[str] | None = None, types: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Parse `--set key=value` pairs, each value by its field's type (ModelConfig and TrainConfig
    fields by default; pass `types` for other dataclasses, see `field_types`). Every key in
    `keys` needs a type: a missing one is a bug here, never a reason to pass the text through
    as a string (which a bool or int field then refuses)."""
    types = types if types is not None else field_types(TrainConfig, ModelConfig)
    keys = keys if keys is not None else config_keys()
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise BardlmError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if key not in keys:
            raise BardlmError(f"--set: unknown key {key!r}{_suggest(key, keys)}")
        out[key] = parse_value(key, raw, types[key])
    return out
