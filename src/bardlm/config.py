"""Model configuration: one dataclass describes every variant, plus named presets.

A variant (GPT-2, Llama-style, Qwen3-style, a tiny character model) is a `ModelConfig`, never a new
class tree: the model reads these fields and nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from .errors import BardlmError

NORMS = ("layernorm", "rmsnorm", "none")  # "none": no normalisation (an ablation)
POSITIONS = ("learned", "sinusoidal", "rope", "none")
FFNS = ("gelu", "relu", "swiglu")
NORM_PLACEMENTS = ("pre", "post")
ATTN_IMPLS = ("sdpa", "explicit")
# How a query scores a key; everything but "dot" runs on the explicit path (docs/concepts.md).
ATTN_SCORES = ("dot", "dot_unscaled", "additive", "bilinear", "cosine")


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
    ffn: str = "gelu"  # "gelu" (tanh approx, GPT-2), "relu", or "swiglu" (Llama)
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    norm_eps: float = 1e-5
    norm_placement: str = "pre"  # "pre" (GPT-2 onwards) or "post" (the 2017 paper)
    pos: str = "learned"  # "learned", "sinusoidal", "rope" or "none"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. Llama 3.x {"rope_type": "llama3", ...}
    qk_norm: bool = False  # RMSNorm on each head of q and k (Qwen3)
    bias: bool = True  # biases in the linear layers (and the shift of LayerNorm)
    attn_bias: bool | None = None  # None -> `bias`; Qwen2-style q/k/v bias can differ from MLP
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    dropout: float = 0.0
    # Dropout masks from 16-bit slices of 64-bit random words (dropout.py): ~6x cheaper to draw on
    # CPU than one random float per element, dropout 2-4x faster (bench/dropout.py); False: F.dropout.
    fast_dropout: bool = True
    attn_impl: str = "sdpa"  # "sdpa" (fused kernel) or "explicit" (softmax written out)
    # Norms and GELU as one PyTorch kernel each (same values as the written-out formulas, which
    # False runs; tests hold them equal). The written-out ones cost ~2x a CPU training step.
    fused_ops: bool = True
    attn_score: str = "dot"  # "dot" q.k/sqrt(d), "dot_unscaled", "additive", "bilinear", "cosine"
    share_layers: bool = False  # ALBERT: one block's weights applied n_layer times
    residual: bool = True  # skip connections around attention and FFN (False: an ablation)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. HF architecture)

    def __post_init__(self) -> None:
        self.validate()

    # Derived sizes -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else 4 * self.n_embd

    @property
    def use_attn_bias(self) -> bool:
        return self.bias if self.attn_bias is None else self.attn_bias

    def validate(self) -> None:
        """Raise `BardlmError` with the fix for any inconsistent field."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise BardlmError(f"config: {name} must be a positive integer, got {value!r}")
        for name in ("n_kv_head", "head_dim", "ffn_hidden"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise BardlmError(
                    f"config: {name} must be a positive integer or null, got {value!r}"
                )
        _check_choice("ffn", self.ffn, FFNS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("pos", self.pos, POSITIONS)
        _check_choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        _check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        _check_choice("attn_score", self.attn_score, ATTN_SCORES)
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            raise BardlmError(
                f"config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"pick n_head from {_divisors(self.n_embd)} or set head_dim explicitly"
            )
        if self.n_head % self.kv_heads != 0:
            raise BardlmError(
                f"config: n_head ({self.n_head}) must be divisible by n_kv_head "
                f"({self.kv_heads}); pick n_kv_head from {_divisors(self.n_head)}"
            )
        if self.pos == "rope" and self.dim_head % 2 != 0:
            raise BardlmError(
                f"config: RoPE rotates pairs of channels, so head_dim must be even, got "
                f"{self.dim_head}; change n_embd/n_head or head_dim"
            )
        if self.pos == "sinusoidal" and self.n_embd % 2 != 0:
            raise BardlmError(
                f"config: sinusoidal positions need an even n_embd, got {self.n_embd}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise BardlmError(f"config: dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            raise BardlmError(f"config: norm_eps must be positive, got {self.norm_eps}")
        if self.rope_theta <= 0:
            raise BardlmError(f"config: rope_theta must be positive, got {self.rope_theta}")

    # Serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            key = sorted(unknown)[0]
            raise BardlmError(f"config: unknown key {key!r}{_suggest(key, config_keys())}")
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise BardlmError(
            f"config: {name} must be one of {', '.join(choices)}; got {value!r}"
            f"{_suggest(str(value), list(choices))}"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0][:12]


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# Presets -----------------------------------------------------------------------------------
# Model shapes only; training budgets live in `train.TRAIN_PRESETS` under the same names.
_GPT2 = dict(vocab_size=50257, block_size=1024, bias=True, tie_embeddings=True)
_LLAMA = dict(norm="rmsnorm", ffn="swiglu", pos="rope", bias=False)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    # nanoGPT's CPU "baby GPT": 4 layers, 4 heads, 128 dims, context 64 (vocab set by the data).
    "char-tiny": dict(
        vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False
    ),
    # The best character model for 5 minutes of a 2-core CPU (issue 11): Qwen3-style blocks
    # (RoPE, RMSNorm, SwiGLU, QK-norm) learn characters in far fewer steps than GPT-2's, and no
    # dropout (5 minutes is ~2 epochs: too short to overfit). See train.TRAIN_PRESETS.
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
    # Small CPU models of each style (same budget as char-tiny).
    "llama-tiny": dict(
        _LLAMA, vocab_size=65, block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
        ffn_hidden=344, tie_embeddings=False,
    ),
    "qwen3-tiny": dict(
        _LLAMA, vocab_size=65, block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
        head_dim=32, ffn_hidden=344, qk_norm=True, tie_embeddings=True, norm_eps=1e-6,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise BardlmError(
            f"unknown preset {name!r}{_suggest(name, list(PRESETS))}; "
            f"valid presets: {', '.join(PRESETS)}"
        )
    import copy

    # Deep copy: nested fields (rope_scaling) must not be shared with the preset table.
    return ModelConfig(**copy.deepcopy({**PRESETS[name], **overrides}))


def parse_overrides(pairs: list[str], keys: list[str] | None = None) -> dict[str, Any]:
    """Parse `--set key=value` pairs; values are read as JSON when they parse, else as strings."""
    import json

    keys = keys if keys is not None else config_keys()
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise BardlmError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if key not in keys:
            raise BardlmError(f"--set: unknown key {key!r}{_suggest(key, keys)}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out
