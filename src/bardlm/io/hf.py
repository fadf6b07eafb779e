"""The Hugging Face bridge: load `transformers` checkpoints into `GPT` and write them back.

The families: `GPT2LMHeadModel`, `LlamaForCausalLM`, `Qwen2ForCausalLM` (Qwen2 and 2.5),
`Qwen3ForCausalLM`, `Olmo2ForCausalLM`, `Phi3ForCausalLM`, the mixtures of experts
`Qwen3MoeForCausalLM`, `Qwen2MoeForCausalLM`, `MixtralForCausalLM` and `OlmoeForCausalLM`, and
the sliding-window families `MistralForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM`
(text) and `SmolLM3ForCausalLM` (with NoPE layers), and the linear-attention hybrids
`Qwen3_5ForCausalLM` (Qwen3.5 text, dense) and `Qwen3NextForCausalLM` (a MoE with a shared
expert): three gated delta rule layers to one gated, partially rotary attention layer. The bridge
is two tables and two config translators:

* NAME TABLES map each of our tensors to the HF tensors it is made of. Our attention projection
  `c_attn` is fused (rows [q | k | v]) and SwiGLU's `c_fc` is fused (rows [gate | up]), so one of
  our tensors may be several HF tensors concatenated along dim 0. GPT-2's HF `Conv1D` stores
  weights as (in, out), the transpose of `nn.Linear`, so those entries are marked `transpose`.
  Phi-3 fuses the same way (qkv_proj, gate_up_proj), so its fused tensors map one to one.
  A MoE layer's experts are numbered ("{e}"): the files hold one gate/up/down per expert (the
  Hub layout, which transformers 5 also writes), so they map one to one onto our experts.
  Some tensors are stored in another row order (`Entry.layout`): Qwen3.5's q_proj interleaves
  each head's query and gate rows, Qwen3-Next groups its linear layers' q, k, v, z, b, a by key
  head; `to_ours` / `to_theirs` reorder them, nothing else differs. An entry with `kinds` maps
  only layers of those `attn_layers` kinds (a linear layer's c_proj is out_proj, an attention
  layer's o_proj).
* CONFIG TRANSLATION reads `config.json` (any `transformers` version: missing keys take that
  family's defaults) into a `ModelConfig`, and writes one back from a `ModelConfig`.

RoPE: HF Llama/Qwen3 checkpoints pair channel i with i + head_dim/2 ("rotate half"; the HF
conversion script permutes Meta's interleaved q/k rows into that layout), which is what
`position.apply_rope` does, so weights load without any permutation.

`transformers` itself is never imported here: the bridge reads and writes plain files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..config import ModelConfig
from ..errors import BardlmError
from ..nn.model import GPT
from ..tokenizers import HFTokenizer
from ..tokenizers import from_dict as tokenizer_from_dict
from ..tokenizers import load as load_tokenizer
from .atomic import atomic_write_many, tensors_writer, text_writer
from .checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    build_model,
    claim_out,
    load_tensors,
    read_config,
    save_checkpoint,
)
from .metadata import ID_KEYS, ModelMeta, hf_special_tokens

INDEX_FILE = "model.safetensors.index.json"
# A bardlm tokenizer (char/word/our BPE) has no `transformers` equivalent: it travels beside the
# HF files under this name so that bardlm -> HF -> bardlm keeps it.
BARDLM_TOKENIZER_FILE = "bardlm_tokenizer.json"
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "mixtral": "MixtralForCausalLM", "mistral": "MistralForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "smollm3": "SmolLM3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "olmo2": "Olmo2ForCausalLM", "phi3": "Phi3ForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "qwen3_5_text": "Qwen3_5ForCausalLM", "qwen3_next": "Qwen3NextForCausalLM"}
GEMMA_FAMILIES = ("gemma2", "gemma3_text")
# Families whose attention may be sliding-window (per layer); the others refuse windows.
WINDOW_FAMILIES = ("mistral", "smollm3", *GEMMA_FAMILIES)
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
# Linear-attention hybrids: gated delta rule layers and gated attention layers (nn/deltanet.py).
HYBRID_FAMILIES = ("qwen3_5_text", "qwen3_next")
# Families that compute exactly what another one does: a model imported from one is exported
# back to it (`family_of` reads the family recorded at import), a bardlm model to the other.
SAME_FUNCTION = {"phi3": "llama"}
# Buffers some HF checkpoints carry that are not weights (causal masks, RoPE tables).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


# Name tables ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    ours: str  # our state_dict name ("{i}" = layer index, "{e}" = expert index)
    theirs: tuple[str, ...]  # HF names, concatenated along dim 0 in this order
    transpose: bool = False  # HF Conv1D (GPT-2) stores the weight as (in, out)
    layout: str | None = None  # another row order than plain concatenation (`to_ours`)
    kinds: tuple[str, ...] | None = None  # only layers of these attn_layers kinds; None: all


def _gpt2_table() -> list[Entry]:
    conv1d = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    layer = [
        Entry(f"transformer.h.{{i}}.{mod}.{p}", (f"transformer.h.{{i}}.{mod}.{p}",),
              transpose=(mod in conv1d and p == "weight"))
        for mod in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
        for p in ("weight", "bias")
    ]
    top = [Entry(n, (n,)) for n in ("transformer.wte.weight", "transformer.wpe.weight",
                                    "transformer.ln_f.weight", "transformer.ln_f.bias",
                                    "lm_head.weight")]
    return top + layer


def _llama_table() -> list[Entry]:
    """Llama and Qwen3 share names; Qwen3 adds q_norm/k_norm (absent tensors are skipped)."""
    h, t = "transformer.h.{i}.", "model.layers.{i}."
    layer = [
        Entry(h + "ln_1.weight", (t + "input_layernorm.weight",)),
        Entry(h + "ln_2.weight", (t + "post_attention_layernorm.weight",)),
        Entry(h + "attn.q_norm.weight", (t + "self_attn.q_norm.weight",)),
        Entry(h + "attn.k_norm.weight", (t + "self_attn.k_norm.weight",)),
    ]
    for p in ("weight", "bias"):
        layer += [
            Entry(h + f"attn.c_attn.{p}", tuple(t + f"self_attn.{x}_proj.{p}" for x in "qkv")),
            Entry(h + f"attn.c_proj.{p}", (t + f"self_attn.o_proj.{p}",)),
            Entry(h + f"mlp.c_fc.{p}", (t + f"mlp.gate_proj.{p}", t + f"mlp.up_proj.{p}")),
            Entry(h + f"mlp.c_proj.{p}", (t + f"mlp.down_proj.{p}",)),
        ]
    top = [
        Entry("transformer.wte.weight", ("model.embed_tokens.weight",)),
        Entry("transformer.ln_f.weight", ("model.norm.weight",)),
        Entry("lm_head.weight", ("lm_head.weight",)),
    ]
    return top + layer


def _olmo2_table() -> list[Entry]:
    """Llama's names, but OLMo 2's two block norms act on the sublayers' outputs:
    post_attention_layernorm normalises attention's output, post_feedforward_layernorm the MLP's
    (our ln_1 and ln_2 under norm_placement="output")."""
    h, t = "transformer.h.{i}.", "model.layers.{i}."
    renamed = {h + "ln_1.weight": (t + "post_attention_layernorm.weight",),
               h + "ln_2.weight": (t + "post_feedforward_layernorm.weight",)}
    return [Entry(e.ours, renamed.get(e.ours, e.theirs)) for e in _llama_table()]


def _phi3_table() -> list[Entry]:
    """Phi-3 stores q/k/v as one `qkv_proj` (rows [q | k | v]) and gate/up as one `gate_up_proj`
    (rows [gate | up]): our fused `c_attn` and `c_fc` exactly, so every tensor maps one to one."""
    h, t = "transformer.h.{i}.", "model.layers.{i}."
    fused = {h + "attn.c_attn.weight": (t + "self_attn.qkv_proj.weight",),
             h + "mlp.c_fc.weight": (t + "mlp.gate_up_proj.weight",)}
    return [Entry(e.ours, fused.get(e.ours, e.theirs)) for e in _llama_table()]


def _moe_table(moe: str, router: str, gate: str, up: str, down: str) -> list[Entry]:
    """The Llama table plus a MoE layer's router and numbered experts (dense layers keep the
    Llama MLP names): `moe` is the block's module name, the others its tensors'."""
    h, t = "transformer.h.{i}.mlp.", f"model.layers.{{i}}.{moe}."
    return _llama_table() + [
        Entry(h + "router.weight", (t + f"{router}.weight",)),
        Entry(h + "experts.{e}.c_fc.weight", (t + f"experts.{{e}}.{gate}.weight",
                                              t + f"experts.{{e}}.{up}.weight")),
        Entry(h + "experts.{e}.c_proj.weight", (t + f"experts.{{e}}.{down}.weight",)),
    ]


def _gemma_table() -> list[Entry]:
    """Gemma 2/3: Llama's names, with sandwich norms around attention and the MLP (Gemma 3 adds
    q_norm/k_norm, skipped when absent). Gemma's (1 + w) norms store w, as we do."""
    h, t = "transformer.h.{i}.", "model.layers.{i}."
    norms = [Entry(h + ours, (t + theirs,)) for ours, theirs in (
        ("ln_1.weight", "input_layernorm.weight"),
        ("ln_1_post.weight", "post_attention_layernorm.weight"),
        ("ln_2.weight", "pre_feedforward_layernorm.weight"),
        ("ln_2_post.weight", "post_feedforward_layernorm.weight"))]
    llama = [e for e in _llama_table() if not e.ours.startswith((h + "ln_1", h + "ln_2"))]
    return llama + norms


def _hybrid_table(family: str) -> list[Entry]:
    """Qwen3.5 (text) and Qwen3-Next: Llama's names ((1 + w) norms store w, as we do) with the
    attention entries on "global" layers only, c_attn gated (q_proj holds each head's query then
    gate rows), and a linear layer's `linear_attn` tensors; Qwen3-Next adds Qwen2-MoE's
    experts, router and gated shared expert."""
    h, t = "transformer.h.{i}.", "model.layers.{i}."
    attn, lin = ("global",), ("linear",)
    out = []
    for e in (_moe_table("mlp", "gate", "gate_proj", "up_proj", "down_proj") + _SHARED_EXPERT
              if family == "qwen3_next" else _llama_table()):
        if not e.ours.startswith(h + "attn."):
            out.append(e)
        elif e.ours.startswith(h + "attn.c_attn."):
            out.append(Entry(e.ours, e.theirs, layout="gated_q", kinds=attn))
        else:
            out.append(Entry(e.ours, e.theirs, kinds=attn))
    a = t + "linear_attn."
    proj = ((a + "in_proj_qkvz.weight", a + "in_proj_ba.weight") if family == "qwen3_next"
            else tuple(a + f"in_proj_{x}.weight" for x in ("qkv", "z", "b", "a")))
    out.append(Entry(h + "attn.c_in.weight", proj, kinds=lin,
                     layout="delta_grouped" if family == "qwen3_next" else "delta"))
    out += [Entry(h + f"attn.{ours}", (a + theirs,), kinds=lin) for ours, theirs in (
        ("conv_weight", "conv1d.weight"), ("A_log", "A_log"), ("dt_bias", "dt_bias"),
        ("norm.weight", "norm.weight"), ("c_proj.weight", "out_proj.weight"))]
    return out


_SHARED_EXPERT = [
    Entry("transformer.h.{i}.mlp.shared.c_fc.weight",
          ("model.layers.{i}.mlp.shared_expert.gate_proj.weight",
           "model.layers.{i}.mlp.shared_expert.up_proj.weight")),
    Entry("transformer.h.{i}.mlp.shared.c_proj.weight",
          ("model.layers.{i}.mlp.shared_expert.down_proj.weight",)),
    Entry("transformer.h.{i}.mlp.shared_gate.weight",
          ("model.layers.{i}.mlp.shared_expert_gate.weight",))]

TABLES = {"gpt2": _gpt2_table(), "llama": _llama_table(), "qwen3": _llama_table(),
          "mistral": _llama_table(), "smollm3": _llama_table(),
          "gemma2": _gemma_table(), "gemma3_text": _gemma_table(),
          "qwen3_moe": _moe_table("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
          "qwen2_moe": _moe_table("mlp", "gate", "gate_proj", "up_proj", "down_proj") + _SHARED_EXPERT,
          "mixtral": _moe_table("block_sparse_moe", "gate", "w1", "w3", "w2"),
          "qwen2": _llama_table(), "olmo2": _olmo2_table(), "phi3": _phi3_table(),
          "olmoe": _moe_table("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
          "qwen3_5_text": _hybrid_table("qwen3_5_text"), "qwen3_next": _hybrid_table("qwen3_next")}


def name_map(cfg: ModelConfig, family: str, ours: set[str]) -> list[Entry]:
    """The table expanded for every layer (and expert), keeping only tensors our model has.

    `ours` is the set of our state_dict names; biases, q/k norms, a dense layer's MLP or a MoE
    layer's experts, and an untied head appear in the map only when the config gives the model
    those tensors. A tied head is `wte` itself.
    """
    out = []
    for e in TABLES[family]:
        layers = range(cfg.n_layer) if "{i}" in e.ours else [None]
        experts = range(cfg.n_expert) if "{e}" in e.ours else [None]
        for i in layers:
            if e.kinds is not None and cfg.attn_layers[i] not in e.kinds:
                continue
            for x in experts:
                name = e.ours.format(i=i, e=x)
                if name not in ours or (name == "lm_head.weight" and cfg.tie_embeddings):
                    continue
                out.append(Entry(name, tuple(n.format(i=i, e=x) for n in e.theirs), e.transpose,
                                 e.layout))
    return out


def to_ours(e: Entry, parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Our tensor from the HF tensors of entry `e`, in its `layout`:
    None / "delta": concatenated along dim 0;
    "gated_q": q_proj (H * 2D, ..) holds per head D query rows then D gate rows -> c_attn rows
        [q | k | v | gate];
    "delta_grouped" (Qwen3-Next): in_proj_qkvz holds per key head [q, k, v's, z's] rows and
        in_proj_ba per key head [b's, a's] -> c_in rows [q | k | v | z | b | a]."""
    if e.layout == "gated_q":
        qg, k, v = parts
        qg = qg.reshape(cfg.n_head, 2, cfg.head_dim, *qg.shape[1:])
        q, gate = (qg[:, j].reshape(cfg.n_head * cfg.head_dim, *qg.shape[3:]) for j in (0, 1))
        return torch.cat([q, k, v, gate], dim=0)
    if e.layout == "delta_grouped":
        qkvz, ba = parts
        nk, dk, dv = cfg.linear_k_heads, cfg.linear_k_head_dim, cfg.linear_v_head_dim
        r = cfg.linear_v_heads // nk  # value heads per key head
        q, k, v, z = qkvz.reshape(nk, 2 * dk + 2 * r * dv, -1).split([dk, dk, r * dv, r * dv], dim=1)
        b, a = ba.reshape(nk, 2 * r, -1).split([r, r], dim=1)
        return torch.cat([x.reshape(-1, qkvz.shape[-1]) for x in (q, k, v, z, b, a)], dim=0)
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def to_theirs(e: Entry, t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """The HF tensors of entry `e` from our tensor `t`: `to_ours` undone."""
    if e.layout == "gated_q":
        q, k, v, gate = t.split(row_splits(cfg, 4), dim=0)
        H, D = cfg.n_head, cfg.head_dim
        qg = torch.stack([q.reshape(H, D, *q.shape[1:]), gate.reshape(H, D, *q.shape[1:])], dim=1)
        return [qg.reshape(2 * H * D, *q.shape[1:]), k, v]
    if e.layout in ("delta", "delta_grouped"):
        nk, dk, dv = cfg.linear_k_heads, cfg.linear_k_head_dim, cfg.linear_v_head_dim
        nv = cfg.linear_v_heads
        q, k, v, z, b, a = t.split([nk * dk, nk * dk, nv * dv, nv * dv, nv, nv], dim=0)
        if e.layout == "delta":
            return [torch.cat([q, k, v]), z, b, a]
        r, C = nv // nk, t.shape[-1]
        qkvz = torch.cat([q.reshape(nk, dk, C), k.reshape(nk, dk, C), v.reshape(nk, r * dv, C),
                          z.reshape(nk, r * dv, C)], dim=1)
        ba = torch.cat([b.reshape(nk, r, C), a.reshape(nk, r, C)], dim=1)
        return [qkvz.reshape(-1, C), ba.reshape(-1, C)]
    parts = t.split(row_splits(cfg, len(e.theirs), len(t)), dim=0) if len(e.theirs) > 1 else [t]
    return list(parts)


def row_splits(cfg: ModelConfig, n_parts: int, rows: int | None = None) -> list[int]:
    """Row sizes of a fused tensor of `rows` rows: [q, k, v] for c_attn, [gate, up] (two equal
    halves: a dense layer's or an expert's width) for SwiGLU's c_fc."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    if n_parts == 4:  # a gated c_attn: [q | k | v | gate]
        return [q, kv, kv, q]
    return [q, kv, kv] if n_parts == 3 else [(rows or 2 * cfg.ffn_hidden) // 2] * 2


# Config translation ---------------------------------------------------------------------------
# Each family's `transformers` defaults: `save_pretrained` leaves out keys equal to them.
GPT2_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                     n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                     tie_word_embeddings=True, scale_attn_weights=True,
                     scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                      head_dim=None, hidden_act="silu", max_position_embeddings=2048,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
                      rope_scaling=None, attention_bias=False, mlp_bias=False)
QWEN3_DEFAULTS = dict(LLAMA_DEFAULTS, vocab_size=151936, intermediate_size=22016,
                      max_position_embeddings=32768, head_dim=128, use_sliding_window=False)
QWEN3_MOE_DEFAULTS = dict(QWEN3_DEFAULTS, hidden_size=2048, intermediate_size=6144,
                          num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                          router_aux_loss_coef=0.001)
QWEN2_MOE_DEFAULTS = dict(QWEN3_MOE_DEFAULTS, intermediate_size=5632, num_attention_heads=16,
                          num_key_value_heads=16, head_dim=None, moe_intermediate_size=1408,
                          shared_expert_intermediate_size=5632, num_experts=60,
                          num_experts_per_tok=4, qkv_bias=True)
MIXTRAL_DEFAULTS = dict(LLAMA_DEFAULTS, intermediate_size=14336, num_key_value_heads=8,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=1e6,
                        sliding_window=None, num_local_experts=8, num_experts_per_tok=2,
                        router_aux_loss_coef=0.001)
MISTRAL_DEFAULTS = dict(LLAMA_DEFAULTS, intermediate_size=14336, num_key_value_heads=8,
                        max_position_embeddings=131072, rms_norm_eps=1e-6, sliding_window=4096)
SMOLLM3_DEFAULTS = dict(LLAMA_DEFAULTS, vocab_size=128256, hidden_size=2048, intermediate_size=11008,
                        num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=4,
                        max_position_embeddings=32768, rope_theta=2000000.0, tie_word_embeddings=True,
                        use_sliding_window=False, sliding_window=None, no_rope_layers=None,
                        no_rope_layer_interval=4, layer_types=None)
GEMMA2_DEFAULTS = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                       num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=256, hidden_activation="gelu_pytorch_tanh",
                       max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       rope_theta=10000.0, attention_bias=False, query_pre_attn_scalar=256,
                       sliding_window=4096, layer_types=None, final_logit_softcapping=30.0,
                       attn_logit_softcapping=50.0)
GEMMA3_DEFAULTS = dict(GEMMA2_DEFAULTS, vocab_size=262208, max_position_embeddings=131072,
                       rope_theta=1000000.0, rope_local_base_freq=10000.0,
                       final_logit_softcapping=None, attn_logit_softcapping=None,
                       sliding_window_pattern=6, use_bidirectional_attention=False)
QWEN2_DEFAULTS = dict(LLAMA_DEFAULTS, vocab_size=151936, intermediate_size=22016,
                      max_position_embeddings=32768, use_sliding_window=False)
OLMO2_DEFAULTS = dict(LLAMA_DEFAULTS, vocab_size=50304, rms_norm_eps=1e-5)
PHI3_DEFAULTS = dict(LLAMA_DEFAULTS, vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                     max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=None)
OLMOE_DEFAULTS = dict(OLMO2_DEFAULTS, hidden_size=2048, intermediate_size=2048,
                      num_hidden_layers=16, num_attention_heads=16, max_position_embeddings=4096,
                      clip_qkv=None, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
                      router_aux_loss_coef=0.01)
QWEN3_5_DEFAULTS = dict(LLAMA_DEFAULTS, vocab_size=248320, hidden_size=4096, intermediate_size=12288,
                        num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
                        head_dim=256, max_position_embeddings=32768, rms_norm_eps=1e-6,
                        linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                        linear_num_key_heads=16, linear_num_value_heads=32, layer_types=None,
                        full_attention_interval=4, partial_rotary_factor=0.25)
QWEN3_NEXT_DEFAULTS = dict(QWEN3_5_DEFAULTS, vocab_size=151936, hidden_size=2048,
                           intermediate_size=5632, num_hidden_layers=48, num_key_value_heads=2,
                           decoder_sparse_step=1, moe_intermediate_size=512,
                           shared_expert_intermediate_size=512, num_experts_per_tok=10,
                           num_experts=512, norm_topk_prob=True, router_aux_loss_coef=0.001,
                           mlp_only_layers=[])
DEFAULTS = {"gpt2": GPT2_DEFAULTS, "llama": LLAMA_DEFAULTS, "qwen3": QWEN3_DEFAULTS,
            "qwen3_moe": QWEN3_MOE_DEFAULTS, "qwen2_moe": QWEN2_MOE_DEFAULTS,
            "mixtral": MIXTRAL_DEFAULTS, "mistral": MISTRAL_DEFAULTS, "smollm3": SMOLLM3_DEFAULTS,
            "gemma2": GEMMA2_DEFAULTS, "gemma3_text": GEMMA3_DEFAULTS, "qwen2": QWEN2_DEFAULTS,
            "olmo2": OLMO2_DEFAULTS, "phi3": PHI3_DEFAULTS, "olmoe": OLMOE_DEFAULTS,
            "qwen3_5_text": QWEN3_5_DEFAULTS, "qwen3_next": QWEN3_NEXT_DEFAULTS}
GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new")  # both GELU's tanh approximation
GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}


def hf_family(hf: dict[str, Any], where: str = "config.json") -> str:
    """A key of ARCHITECTURES ("gpt2", "llama", "gemma2", ...) from `model_type` (or
    `architectures`), else a clear error."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        archs = hf.get("architectures") or []
        model_type = next((k for k, v in ARCHITECTURES.items() if v in archs), None)
    if model_type is None:
        found = hf.get("model_type") or hf.get("architectures")
        raise BardlmError(
            f"{where}: architecture {found!r} is not supported; bardlm loads "
            f"{', '.join(ARCHITECTURES.values())}"
        )
    return model_type


def _rope_from_hf(hf: dict[str, Any], where: str, partial: bool = False) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`.
    partial: the family rotates part of each head (`_partial_rotary`), else that is refused."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    for key in ("mrope_section", "mrope_interleaved"):  # Qwen3.5's vision axes: text positions
        params.pop(key, None)                          # are equal on all three, plain RoPE
    # transformers 5 keeps the factor inside rope_parameters (Phi-3 always writes 1.0 there).
    if params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0 and not partial:
        raise BardlmError(f"{where}: partial_rotary_factor is not supported (rotary on all dims only)")
    if kind == "default":
        return theta, None
    if kind == "longrope":  # Phi-3 128k, Phi-3.5, Phi-4-mini
        raise BardlmError(f"{where}: rope scaling type 'longrope' (Phi-3 long-context) is not "
                          "supported; load a Phi-3 with plain RoPE (the 4k-context models)")
    if kind not in ("llama3", "linear", "yarn"):
        raise BardlmError(
            f"{where}: rope scaling type {kind!r} is not supported; bardlm implements "
            "'default', 'linear', 'llama3' and 'yarn'"
        )
    return theta, {"rope_type": kind, **params}


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """A `ModelConfig` from a `transformers` config.json dict (a family of ARCHITECTURES)."""
    family = hf_family(hf, where)
    c = {**DEFAULTS[family], **{k: v for k, v in hf.items() if v is not None}, "_hf": hf}
    # Special-token ids mean nothing to the model but must survive a round trip back to HF.
    extra: dict[str, Any] = {"hf": {k: hf[k] for k in ID_KEYS if hf.get(k) is not None}}
    if family in SAME_FUNCTION:  # exported back to this family, not to its twin
        extra["hf_family"] = family
    if family == "gpt2":
        if c["activation_function"] not in GPT2_ACTIVATIONS:
            raise BardlmError(
                f"{where}: GPT-2 activation {c['activation_function']!r} is not supported; "
                f"bardlm implements {', '.join(GPT2_ACTIVATIONS)}"
            )
        if not c["scale_attn_weights"] or c["scale_attn_by_inverse_layer_idx"] or c["add_cross_attention"]:
            raise BardlmError(f"{where}: GPT-2 attention variants (scale_attn_*, cross-attention) "
                              "are not supported; only the standard GPT-2 attention is")
        return ModelConfig(
            vocab_size=c["vocab_size"], block_size=c["n_positions"], n_layer=c["n_layer"],
            n_head=c["n_head"], n_embd=c["n_embd"], ffn_hidden=c["n_inner"],
            ffn=GPT2_ACTIVATIONS[c["activation_function"]], norm="layernorm",
            norm_eps=c["layer_norm_epsilon"], pos="learned", bias=True,
            tie_embeddings=bool(c["tie_word_embeddings"]), extra=extra,
        )
    if family in GEMMA_FAMILIES:
        return _gemma_config(hf, c, family, extra, where)
    if family in HYBRID_FAMILIES:
        return _hybrid_config(hf, c, family, extra, where)
    if c["hidden_act"] != "silu":
        raise BardlmError(f"{where}: hidden_act {c['hidden_act']!r} is not supported; SwiGLU needs 'silu'")
    # Mixtral and Phi-3 slide whenever sliding_window is set (a window as long as the context
    # never hides a key, so it is full attention).
    window = c.get("sliding_window") if family in ("mixtral", "phi3") else None
    if family not in WINDOW_FAMILIES and (
            c.get("use_sliding_window") or "sliding_attention" in (c.get("layer_types") or [])
            or (window is not None and window < c["max_position_embeddings"])):
        raise BardlmError(f"{where}: sliding-window attention is not supported for {family}; "
                          "use full attention (bardlm has windows for Mistral, Gemma 2/3 and SmolLM3)")
    if family == "olmoe" and c["clip_qkv"] is not None:
        raise BardlmError(f"{where}: clip_qkv (clamping q, k and v) is not supported; only "
                          "OLMoE models with clip_qkv null load")
    theta, scaling = _rope_from_hf(hf, where)
    n_head, n_embd = c["num_attention_heads"], c["hidden_size"]
    head_dim = c["head_dim"]
    mlp_bias = bool(c["mlp_bias"]) and family in ("llama", "smollm3")  # Qwen3's MLP has none
    moe = {**_moe_from_hf(c, family), **_window_from_hf(c, family, where)}
    return ModelConfig(
        vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"],
        n_layer=c["num_hidden_layers"], n_head=n_head, n_embd=n_embd,
        n_kv_head=c["num_key_value_heads"] or n_head,
        head_dim=None if head_dim in (None, n_embd // n_head) and n_embd % n_head == 0 else head_dim,
        ffn_hidden=c["intermediate_size"], ffn="swiglu", norm="rmsnorm", norm_eps=c["rms_norm_eps"],
        pos="rope", rope_theta=theta, rope_scaling=scaling, bias=mlp_bias,
        attn_bias=None if bool(c["attention_bias"]) == mlp_bias else bool(c["attention_bias"]),
        tie_embeddings=bool(c["tie_word_embeddings"]),
        extra=extra, **_block_from_hf(family), **moe,
    )


def _given(c: dict[str, Any], key: str) -> Any:
    """c[key] as config.json gives it: an explicit null there (no window, no cap) is None, not
    the family default that `config_from_hf`'s merge puts in its place."""
    return c["_hf"][key] if key in c["_hf"] else c[key]


def _layer_types(c: dict[str, Any], where: str) -> list[str] | None:
    """transformers' `layer_types` as our `attn_layers` ("local"/"global"), or None."""
    types = c.get("layer_types")
    if types is None:
        return None
    kinds = {"sliding_attention": "local", "full_attention": "global"}
    if len(types) != c["num_hidden_layers"] or not set(types) <= set(kinds):
        raise BardlmError(f"{where}: layer_types must list sliding_attention or full_attention "
                          f"for each of the {c['num_hidden_layers']} layers, got {types}")
    return [kinds[t] for t in types]


def _window_from_hf(c: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    """Mistral's sliding window (every layer), SmolLM3's per-layer windows and NoPE layers."""
    if family == "mistral":  # an explicit null is full attention, not the default window
        return dict(sliding_window=_given(c, "sliding_window"))
    if family != "smollm3":
        return {}
    n = c["num_hidden_layers"]
    rope = c["no_rope_layers"]  # 1: the layer uses RoPE (transformers' naming)
    if rope is None:
        rope = [int((i + 1) % c["no_rope_layer_interval"] != 0) for i in range(n)]
    if len(rope) != n:
        raise BardlmError(f"{where}: no_rope_layers must have one entry per layer ({n}), got {len(rope)}")
    kinds = _layer_types(c, where) or ["global"] * n
    window = _given(c, "sliding_window") if c["use_sliding_window"] else None
    if window is None:
        kinds = ["global"] * n  # transformers ignores layer_types without use_sliding_window
    return dict(sliding_window=window if "local" in kinds else None,
                attn_layers=kinds, rope_layers=[bool(r) for r in rope])


def _gemma_config(hf: dict[str, Any], c: dict[str, Any], family: str, extra: dict[str, Any],
                  where: str) -> ModelConfig:
    """Gemma 2 and Gemma 3 (text): GeGLU, (1 + w) RMSNorms in a sandwich around each sublayer,
    embeddings times sqrt(n_embd), query_pre_attn_scalar, local/global layers; Gemma 2's
    logit soft-caps; Gemma 3's QK-norm and the local layers' own RoPE base."""
    act = c.get("hidden_activation") or c.get("hidden_act")
    if act not in GEMMA_ACTIVATIONS:
        raise BardlmError(f"{where}: hidden_activation {act!r} is not supported; GeGLU needs "
                          "'gelu_pytorch_tanh'")
    if c.get("use_bidirectional_attention"):
        raise BardlmError(f"{where}: use_bidirectional_attention is not supported; bardlm "
                          "models are causal decoders")
    n = c["num_hidden_layers"]
    kinds = _layer_types(c, where)
    if kinds is None:  # the pattern older config.json files give instead
        pattern = c.get("sliding_window_pattern", 2)
        kinds = ["global" if (i + 1) % pattern == 0 else "local" for i in range(n)]
    params = c.get("rope_parameters") or {}
    local_theta = None
    if family == "gemma3_text":
        if "full_attention" in params:  # transformers 5: one RoPE per layer type
            local = dict(params.get("sliding_attention") or {})
            if local.get("rope_type", "default") != "default":
                raise BardlmError(f"{where}: scaled RoPE on sliding-window layers is not supported")
            local_theta = float(local.get("rope_theta", 10000.0))
            hf = {**hf, "rope_parameters": params["full_attention"]}
        else:
            local_theta = float(c["rope_local_base_freq"])
    theta, scaling = _rope_from_hf({"rope_theta": c["rope_theta"], **hf}, where)
    return ModelConfig(
        vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=n,
        n_head=c["num_attention_heads"], n_embd=c["hidden_size"],
        n_kv_head=c["num_key_value_heads"], head_dim=c["head_dim"],
        ffn_hidden=c["intermediate_size"], ffn="geglu", norm="rmsnorm", norm_eps=c["rms_norm_eps"],
        norm_placement="sandwich", norm_unit_offset=True, embed_scale=True, pos="rope",
        rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
        qk_norm=family == "gemma3_text", bias=False, attn_bias=bool(c["attention_bias"]),
        sliding_window=_given(c, "sliding_window") if "local" in kinds else None, attn_layers=kinds,
        attn_scale_dim=float(c["query_pre_attn_scalar"]),
        attn_softcap=_given(c, "attn_logit_softcapping"),
        logit_softcap=_given(c, "final_logit_softcapping"),
        tie_embeddings=bool(c["tie_word_embeddings"]), extra=extra,
    )


def _partial_rotary(hf: dict[str, Any], c: dict[str, Any]) -> float:
    """partial_rotary_factor: inside rope_parameters (transformers 5) or at the top level."""
    params = hf.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", c["partial_rotary_factor"]))


def _hybrid_config(hf: dict[str, Any], c: dict[str, Any], family: str, extra: dict[str, Any],
                   where: str) -> ModelConfig:
    """Qwen3.5 (text) and Qwen3-Next: linear_attention layers (gated delta rule) and
    full_attention layers (gated, QK-normed, partially rotary attention); (1 + w) RMSNorms;
    SwiGLU MLPs, or (Qwen3-Next) Qwen2-MoE-style experts with a gated shared expert."""
    if c["hidden_act"] != "silu":
        raise BardlmError(f"{where}: hidden_act {c['hidden_act']!r} is not supported; SwiGLU needs 'silu'")
    n = c["num_hidden_layers"]
    types = c.get("layer_types")
    if types is None:  # transformers' rule: every full_attention_interval-th layer attends
        every = c["full_attention_interval"]
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
    kinds = {"linear_attention": "linear", "full_attention": "global"}
    if len(types) != n or not set(types) <= set(kinds):
        raise BardlmError(f"{where}: layer_types must list linear_attention or full_attention for "
                          f"each of the {n} layers, got {types}")
    theta, scaling = _rope_from_hf(hf, where, partial=True)
    n_head, n_embd, head_dim = c["num_attention_heads"], c["hidden_size"], c["head_dim"]
    moe = _moe_from_hf(c, family) if family == "qwen3_next" else {}
    if family == "qwen3_next":
        extra["hf_family"] = family  # a dense Qwen3-Next (no experts) goes back as Qwen3-Next
    return ModelConfig(
        vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=n,
        n_head=n_head, n_embd=n_embd, n_kv_head=c["num_key_value_heads"] or n_head,
        head_dim=None if head_dim in (None, n_embd // n_head) and n_embd % n_head == 0 else head_dim,
        ffn_hidden=c["intermediate_size"], ffn="swiglu", norm="rmsnorm", norm_eps=c["rms_norm_eps"],
        norm_unit_offset=True, pos="rope", rope_theta=theta, rope_scaling=scaling,
        partial_rotary_factor=_partial_rotary(hf, c), qk_norm=True, attn_gate=True, bias=False,
        attn_bias=bool(c["attention_bias"]), attn_layers=[kinds[t] for t in types],
        linear_k_heads=c["linear_num_key_heads"], linear_v_heads=c["linear_num_value_heads"],
        linear_k_head_dim=c["linear_key_head_dim"], linear_v_head_dim=c["linear_value_head_dim"],
        linear_conv_kernel=c["linear_conv_kernel_dim"],
        tie_embeddings=bool(c["tie_word_embeddings"]), extra=extra, **moe,
    )


def _block_from_hf(family: str) -> dict[str, Any]:
    """The attention and norm fields each Llama-like family fixes (not read from config.json)."""
    if family in ("qwen3", "qwen3_moe"):  # RMSNorm on each head of q and k
        return dict(qk_norm=True)
    if family in ("olmo2", "olmoe"):  # RMSNorm over the whole q and k projections
        return dict(qk_norm=True, qk_norm_scope="proj",
                    norm_placement="output" if family == "olmo2" else "pre")
    if family == "qwen2":  # biases on q, k and v only (not on o_proj, not in the MLP)
        return dict(qkv_bias=True)
    return {}


def _moe_from_hf(c: dict[str, Any], family: str) -> dict[str, Any]:
    """The mixture-of-experts fields of `ModelConfig` from a HF config (with defaults) `c`, and
    Qwen2-MoE's shared expert and q/k/v biases (its own `qkv_bias` key)."""
    if family == "mixtral":  # every layer is MoE; experts are `intermediate_size` wide
        return dict(n_expert=c["num_local_experts"], n_expert_active=c["num_experts_per_tok"],
                    expert_hidden=c["intermediate_size"], router_renorm=True,
                    ffn_layers=["moe"] * c["num_hidden_layers"],
                    router_aux_loss_coef=float(c["router_aux_loss_coef"]))
    if family == "olmoe":  # every layer MoE, no shared expert
        return dict(n_expert=c["num_experts"], n_expert_active=c["num_experts_per_tok"],
                    expert_hidden=c["intermediate_size"], router_renorm=bool(c["norm_topk_prob"]),
                    ffn_layers=["moe"] * c["num_hidden_layers"],
                    router_aux_loss_coef=float(c["router_aux_loss_coef"]))
    if family not in ("qwen3_moe", "qwen2_moe", "qwen3_next"):
        return {}
    n_expert = c.get("num_local_experts", c["num_experts"])  # transformers 5 writes the former
    dense = set(c["mlp_only_layers"] or [])
    # transformers' rule (Qwen3MoeDecoderLayer): MoE unless listed in mlp_only_layers, every
    # decoder_sparse_step-th layer.
    layers = ["moe" if i not in dense and n_expert > 0 and (i + 1) % c["decoder_sparse_step"] == 0
              else "dense" for i in range(c["num_hidden_layers"])]
    qwen2 = dict(shared_expert_hidden=c["shared_expert_intermediate_size"],
                 qkv_bias=bool(c["qkv_bias"])) if family == "qwen2_moe" else {}
    if family == "qwen3_next":  # every MoE layer has the gated shared expert
        qwen2 = dict(shared_expert_hidden=c["shared_expert_intermediate_size"] if n_expert else 0)
    return dict(n_expert=n_expert, n_expert_active=c["num_experts_per_tok"],
                expert_hidden=c["moe_intermediate_size"], router_renorm=bool(c["norm_topk_prob"]),
                ffn_layers=layers, router_aux_loss_coef=float(c["router_aux_loss_coef"]), **qwen2)


def family_of(cfg: ModelConfig) -> str:
    """Which `transformers` family computes exactly what this config does, else a clear error."""
    # Options no transformers family has: exporting them would write a different model.
    odd = {"share_layers=true": cfg.share_layers, "residual=false": not cfg.residual,
           f"attn_score={cfg.attn_score}": cfg.attn_score != "dot"}
    if any(odd.values()):
        raise BardlmError(
            f"this model has no transformers equivalent ({', '.join(k for k, v in odd.items() if v)}"
            "); keep it as a bardlm checkpoint, or train without those options to export it"
        )
    if "linear" in cfg.attn_layers or cfg.attn_gate or cfg.partial_rotary_factor != 1:
        return _hybrid_family(cfg)
    if cfg.norm_unit_offset or cfg.embed_scale or cfg.norm_placement == "sandwich" or cfg.ffn == "geglu":
        return _gemma_family(cfg)
    _refuse(cfg, "Gemma-only or gpt-oss options", {
        f"attn_softcap={cfg.attn_softcap}": cfg.attn_softcap is not None,
        f"logit_softcap={cfg.logit_softcap}": cfg.logit_softcap is not None,
        f"attn_scale_dim={cfg.attn_scale_dim}": cfg.attn_scale_dim is not None,
        f"rope_local_theta={cfg.rope_local_theta}": cfg.rope_local_theta is not None,
        "attn_sinks=true": cfg.attn_sinks})
    style = (cfg.pos, cfg.norm, cfg.ffn)
    pre = cfg.norm_placement == "pre"
    windows = {"local layers (sliding_window)": "local" in cfg.attn_layers,
               "layers without RoPE (rope_layers)": cfg.pos == "rope" and not all(cfg.rope_layers)}
    if style == ("rope", "rmsnorm", "swiglu") and pre and not cfg.qk_norm and any(windows.values()):
        return _windowed_llama_family(cfg)
    _refuse(cfg, "Mistral, SmolLM3 or Gemma", windows)
    if "moe" in cfg.ffn_layers:
        return _moe_family(cfg, style == ("rope", "rmsnorm", "swiglu") and pre)
    proj_qk = cfg.qk_norm and cfg.qk_norm_scope == "proj"
    if style == ("rope", "rmsnorm", "swiglu") and (cfg.norm_placement == "output" or proj_qk):
        return _olmo2_family(cfg)
    if style == ("rope", "rmsnorm", "swiglu") and pre and not cfg.qk_norm and not cfg.bias \
            and not cfg.attn_bias and cfg.qkv_bias:
        return "qwen2"  # biases on q, k and v only
    family = None
    if style in (("learned", "layernorm", "gelu"), ("learned", "layernorm", "relu")) and pre \
            and cfg.bias and cfg.attn_bias and cfg.n_kv_head == cfg.n_head \
            and not cfg.qk_norm and cfg.head_dim * cfg.n_head == cfg.n_embd:
        family = "gpt2"
    if style == ("rope", "rmsnorm", "swiglu") and pre:
        if not cfg.qk_norm:
            family = "llama"
        elif not cfg.bias:
            family = "qwen3"
    if family is not None:
        # GPT-2 always has q/k/v biases; Llama and Qwen3 have one `attention_bias` for q, k, v
        # and o together. Zero biases would compute the same function, but the round trip
        # would then not give back this config, so refuse rather than change the model.
        expressible = cfg.attn_bias if family != "gpt2" else True
        if cfg.qkv_bias != expressible:
            raise BardlmError(
                f"this model has qkv_bias={str(cfg.qkv_bias).lower()}, but transformers' "
                f"{family} " + ("always has q/k/v biases" if family == "gpt2" else
                               "has one attention_bias for q, k, v and o") +
                f" (here attn_bias={str(cfg.attn_bias).lower()}); keep it as a bardlm checkpoint"
            )
        twin = cfg.extra.get("hf_family")  # Phi-3 is Llama without biases
        return twin if SAME_FUNCTION.get(twin) == family and not cfg.bias and not cfg.attn_bias else family
    raise BardlmError(
        "this model has no transformers equivalent: save_pretrained writes GPT-2 (learned "
        "positions, LayerNorm, GELU, biases, MHA), Llama (RoPE, RMSNorm, SwiGLU) or Qwen3 "
        f"(Llama + QK-norm, no MLP bias); got pos={cfg.pos}, norm={cfg.norm}, ffn={cfg.ffn}, "
        f"qk_norm={cfg.qk_norm}, bias={cfg.bias}, norm_placement={cfg.norm_placement}"
    )


def _refuse(cfg: ModelConfig, families: str, why: dict[str, bool]) -> None:
    """Refuse an export whose config has options (the true keys of `why`) only `families` have."""
    found = [k for k, v in why.items() if v]
    if found:
        raise BardlmError(f"this model has no transformers equivalent in its family: "
                          f"{', '.join(found)} need {families}; keep it as a bardlm checkpoint")


def _windowed_llama_family(cfg: ModelConfig) -> str:
    """A Llama block with sliding windows or NoPE layers: Mistral (every layer local, RoPE in
    every layer, no biases) or SmolLM3 (any mix, Llama's biases)."""
    if all(k == "local" for k in cfg.attn_layers) and all(cfg.rope_layers) \
            and not (cfg.bias or cfg.attn_bias or cfg.qkv_bias):
        return "mistral"
    if cfg.qkv_bias != cfg.attn_bias:
        raise BardlmError(f"this model has qkv_bias={str(cfg.qkv_bias).lower()}, but "
                          "transformers' smollm3 has one attention_bias for q, k, v and o; keep "
                          "it as a bardlm checkpoint")
    return "smollm3"


def _gemma_family(cfg: ModelConfig) -> str:
    """gemma3_text (QK-norm) or gemma2, when the config has every Gemma trait."""
    _refuse(cfg, "transformers' Gemma 2/3 traits (or no Gemma traits at all)", {
        "ffn other than geglu": cfg.ffn != "geglu", "norm other than rmsnorm": cfg.norm != "rmsnorm",
        "norm_unit_offset=false": not cfg.norm_unit_offset, "embed_scale=false": not cfg.embed_scale,
        "norm_placement other than sandwich": cfg.norm_placement != "sandwich",
        "pos other than rope": cfg.pos != "rope", "layers without RoPE": not all(cfg.rope_layers),
        "MLP biases": cfg.bias, "qkv_bias != attn_bias": cfg.qkv_bias != cfg.attn_bias,
        "mixture of experts": "moe" in cfg.ffn_layers, "attn_sinks=true": cfg.attn_sinks,
        "rope_local_theta without qk_norm (Gemma 2 has one RoPE base)":
            not cfg.qk_norm and cfg.rope_local_theta not in (None, cfg.rope_theta)})
    return "gemma3_text" if cfg.qk_norm else "gemma2"


def _hybrid_family(cfg: ModelConfig) -> str:
    """qwen3_next (mixture of experts with a shared expert, or a model imported from it) or
    qwen3_5_text (dense), when the config has every trait of their blocks."""
    moe = "moe" in cfg.ffn_layers
    _refuse(cfg, "transformers' Qwen3.5 / Qwen3-Next blocks", {
        "ffn other than swiglu": cfg.ffn != "swiglu", "norm other than rmsnorm": cfg.norm != "rmsnorm",
        "norm_unit_offset=false": not cfg.norm_unit_offset, "norm_placement other than pre":
            cfg.norm_placement != "pre", "embed_scale=true": cfg.embed_scale,
        "pos other than rope": cfg.pos != "rope", "layers without RoPE": not all(cfg.rope_layers),
        "qk_norm=false or over the projections": not cfg.qk_norm or cfg.qk_norm_scope != "head",
        "attn_gate=false": not cfg.attn_gate, "local layers": "local" in cfg.attn_layers,
        "MLP biases": cfg.bias, "qkv_bias != attn_bias": cfg.qkv_bias != cfg.attn_bias,
        "attn_sinks=true": cfg.attn_sinks, "soft-caps": cfg.attn_softcap or cfg.logit_softcap,
        "attn_scale_dim": cfg.attn_scale_dim is not None,
        "experts without a shared expert": moe and not cfg.shared_expert_hidden,
        "a shared expert on a dense model": not moe and cfg.shared_expert_hidden > 0})
    return "qwen3_next" if moe or cfg.extra.get("hf_family") == "qwen3_next" else "qwen3_5_text"


def _olmo2_family(cfg: ModelConfig) -> str:
    """olmo2: norm_placement="output" with QK-norm over the whole q and k projections."""
    if cfg.norm_placement != "output" or not cfg.qk_norm or cfg.qk_norm_scope != "proj" \
            or cfg.bias or cfg.qkv_bias != cfg.attn_bias:
        raise BardlmError(
            "this model has no transformers equivalent: OLMo 2 needs norm_placement=output, "
            "qk_norm=true with qk_norm_scope=proj, no MLP bias and one attention_bias for q, k, "
            f"v and o; got norm_placement={cfg.norm_placement}, qk_norm={cfg.qk_norm}, "
            f"qk_norm_scope={cfg.qk_norm_scope}; keep it as a bardlm checkpoint")
    return "olmo2"


def _moe_family(cfg: ModelConfig, llama_style: bool) -> str:
    """qwen2_moe (a shared expert, no QK-norm, q/k/v biases optional), qwen3_moe (QK-norm per
    head, dense layers allowed), olmoe (QK-norm over the projections, every layer MoE) or mixtral
    (no QK-norm, every layer MoE)."""
    proj_qk = cfg.qk_norm and cfg.qk_norm_scope == "proj"
    family = ("qwen2_moe" if cfg.shared_expert_hidden else "olmoe" if proj_qk
              else "qwen3_moe" if cfg.qk_norm else "mixtral")
    why = []
    if not llama_style or cfg.bias or cfg.attn_bias:
        why.append("a Llama-style block without MLP or output biases")
    if cfg.qkv_bias and family != "qwen2_moe":
        why.append("no q/k/v biases without a shared expert")
    if family == "qwen2_moe" and cfg.qk_norm:
        why.append("no QK-norm with a shared expert (Qwen2-MoE)")
    if family == "mixtral" and ("dense" in cfg.ffn_layers or not cfg.router_renorm):
        why.append("with no QK-norm (Mixtral): every layer MoE and router_renorm=true")
    if family == "olmoe" and ("dense" in cfg.ffn_layers or cfg.head_dim * cfg.n_head != cfg.n_embd):
        why.append("with QK-norm over the projections (OLMoE): every layer MoE and "
                   "head_dim * n_head == n_embd")
    if why:
        raise BardlmError(
            "this mixture-of-experts model has no transformers equivalent: Qwen3-MoE, Qwen2-MoE, "
            f"OLMoE and Mixtral need {'; '.join(why)}; keep it as a bardlm checkpoint"
        )
    return family


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The `transformers` config.json dict of a model with this config."""
    family = family_of(cfg)
    out: dict[str, Any] = {"architectures": [ARCHITECTURES[family]], "model_type": family,
                           "dtype": str(dtype).removeprefix("torch."),
                           "tie_word_embeddings": cfg.tie_embeddings}
    out.update(cfg.extra.get("hf", {}))
    if family == "gpt2":
        act = "gelu_new" if cfg.ffn == "gelu" else "relu"
        return {**out, "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size,
                "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_inner": cfg.ffn_hidden, "activation_function": act,
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "attn_pdrop": 0.0}
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(cfg.rope_scaling or {})}
    if family in GEMMA_FAMILIES:
        return _gemma_config_to_hf(cfg, family, out, rope)
    if family in HYBRID_FAMILIES:
        rope["partial_rotary_factor"] = cfg.partial_rotary_factor
    out.update(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.block_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim, hidden_size=cfg.n_embd,
        intermediate_size=cfg.ffn_hidden, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
        attention_bias=cfg.attn_bias, attention_dropout=0.0,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
        # (copies: transformers edits these dicts in place)
        rope_parameters=rope, rope_theta=cfg.rope_theta,
        rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
    )
    if family == "llama":
        out["mlp_bias"] = cfg.bias
    elif family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    elif family == "smollm3":
        local = "local" in cfg.attn_layers
        out.update(mlp_bias=cfg.bias, use_sliding_window=local, sliding_window=cfg.sliding_window,
                   layer_types=[f"{'sliding' if k == 'local' else 'full'}_attention"
                                for k in cfg.attn_layers],
                   no_rope_layers=[int(r) for r in cfg.rope_layers])
    elif family == "mixtral":
        out.update(intermediate_size=cfg.expert_hidden, num_local_experts=cfg.n_expert,
                   num_experts_per_tok=cfg.n_expert_active, sliding_window=None,
                   router_aux_loss_coef=cfg.router_aux_loss_coef)
    elif family == "phi3":  # no window; the context it was trained at is the whole context
        out.update(sliding_window=None, original_max_position_embeddings=cfg.block_size,
                   resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=out.get("pad_token_id"))
    elif family == "olmoe":
        out.update(intermediate_size=cfg.expert_hidden, num_experts=cfg.n_expert,
                   num_experts_per_tok=cfg.n_expert_active, norm_topk_prob=cfg.router_renorm,
                   router_aux_loss_coef=cfg.router_aux_loss_coef, clip_qkv=None)
    elif family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        out["use_sliding_window"] = False
    elif family in HYBRID_FAMILIES:
        out.update(layer_types=[f"{'linear' if k == 'linear' else 'full'}_attention" for k in cfg.attn_layers],
                   linear_num_key_heads=cfg.linear_k_heads, linear_num_value_heads=cfg.linear_v_heads,
                   linear_key_head_dim=cfg.linear_k_head_dim, linear_value_head_dim=cfg.linear_v_head_dim,
                   linear_conv_kernel_dim=cfg.linear_conv_kernel, rope_scaling=None)
        out.pop("rope_theta")  # transformers 5 reads rope_parameters only (strict configs)
    if family == "qwen3_next":
        moe = "moe" in cfg.ffn_layers
        out.update(moe_intermediate_size=cfg.expert_hidden if moe else 1, num_experts=cfg.n_expert,
                   num_experts_per_tok=cfg.n_expert_active if moe else 1,
                   norm_topk_prob=cfg.router_renorm, decoder_sparse_step=1,
                   shared_expert_intermediate_size=cfg.shared_expert_hidden if moe else 1,
                   router_aux_loss_coef=cfg.router_aux_loss_coef,
                   mlp_only_layers=[i for i, kind in enumerate(cfg.ffn_layers) if kind == "dense"])
    if family == "qwen2_moe":
        out.update(shared_expert_intermediate_size=cfg.shared_expert_hidden, qkv_bias=cfg.qkv_bias)
    if family in ("qwen3_moe", "qwen2_moe"):
        out.update(moe_intermediate_size=cfg.expert_hidden, num_experts=cfg.n_expert,
                   num_experts_per_tok=cfg.n_expert_active, norm_topk_prob=cfg.router_renorm,
                   decoder_sparse_step=1, router_aux_loss_coef=cfg.router_aux_loss_coef,
                   mlp_only_layers=[i for i, kind in enumerate(cfg.ffn_layers) if kind == "dense"])
    return out


def _gemma_config_to_hf(cfg: ModelConfig, family: str, out: dict[str, Any],
                        rope: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2 / Gemma 3 (text) config.json: `rope` is the global layers' RoPE; Gemma 3's local
    layers have their own unscaled base."""
    scale = cfg.attn_scale_dim or cfg.head_dim
    out.update(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.block_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim, hidden_size=cfg.n_embd,
        intermediate_size=cfg.ffn_hidden, hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=cfg.norm_eps, attention_bias=cfg.attn_bias, attention_dropout=0.0,
        query_pre_attn_scalar=int(scale) if float(scale).is_integer() else scale,
        # transformers wants a window even with no local layer; then none reads it
        sliding_window=cfg.sliding_window or cfg.block_size,
        layer_types=[f"{'sliding' if k == 'local' else 'full'}_attention" for k in cfg.attn_layers],
        attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.logit_softcap,
        rope_theta=cfg.rope_theta, rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
    )
    if family == "gemma2":
        out["rope_parameters"] = rope
        return out
    local = cfg.rope_local_theta or cfg.rope_theta
    out.update(rope_local_base_freq=local, rope_parameters={
        "full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": local}})
    return out


# Tensors --------------------------------------------------------------------------------------
def read_hf_tensors(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors`, or of every shard named in the index file."""
    index = src / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    elif (src / MODEL_FILE).is_file():
        files = [MODEL_FILE]
    else:
        pickles = sorted(p.name for p in src.glob("*.bin"))
        hint = (f" (found {pickles[0]}: a pickle, which bardlm never loads; re-save it with "
                "save_pretrained(safe_serialization=True))") if pickles else ""
        raise BardlmError(f"{src} has neither {MODEL_FILE} nor {INDEX_FILE}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = src / name
        if not path.is_file():
            raise BardlmError(f"shard {path} named in {INDEX_FILE} is missing; download it again")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[key] = f.get_tensor(key)
    return tensors


def _normalise_hf_names(tensors: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Drop non-weight buffers; the original GPT-2 files omit the `transformer.` prefix."""
    out = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    if family == "gpt2":
        out = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
               for k, v in out.items()}
    return out


def state_dict_from_hf(
    tensors: dict[str, torch.Tensor], cfg: ModelConfig, family: str, ours: set[str], where: str
) -> dict[str, torch.Tensor]:
    """Our state dict from HF tensors: fuse, transpose, and name every missing or extra tensor."""
    tensors = _normalise_hf_names(tensors, family)
    entries = name_map(cfg, family, ours)
    needed = {n for e in entries for n in e.theirs}
    missing = sorted(needed - set(tensors))
    if missing:
        raise BardlmError(f"{where} lacks tensor(s) {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                          f"needed by its config; the checkpoint is incomplete or mislabelled")
    # A tied checkpoint may still store the head; it must then be the embedding and is skipped.
    extra = sorted(set(tensors) - needed - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if extra:
        raise BardlmError(f"{where} has tensor(s) {extra[:3]} that its config does not use "
                          "(e.g. biases the config turns off); the config and weights disagree")
    out = {}
    for e in entries:
        parts = [tensors[n].t() if e.transpose else tensors[n] for n in e.theirs]
        out[e.ours] = to_ours(e, parts, cfg)
    return out


def state_dict_to_hf(model: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    """HF tensors from our model: split fused rows, transpose Conv1D weights."""
    sd = model.state_dict()
    out = {}
    for e in name_map(model.config, family, set(sd)):
        parts = to_theirs(e, sd[e.ours].detach(), model.config)
        for name, part in zip(e.theirs, parts):
            out[name] = (part.t() if e.transpose else part).contiguous()
    return out


# Loading and saving ---------------------------------------------------------------------------
def read_hf_config(src: str | Path) -> dict[str, Any]:
    src = Path(src)
    if not (src / CONFIG_FILE).is_file():
        raise BardlmError(f"{src} has no {CONFIG_FILE}; pass a directory written by save_pretrained")
    try:
        return json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BardlmError(f"{src / CONFIG_FILE} is not valid JSON ({e})") from None


def is_hf_dir(path: str | Path) -> bool:
    """True for a `transformers` directory (its config.json names an architecture)."""
    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "model" not in data and (
        "model_type" in data or "architectures" in data)


def from_pretrained(
    src: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    with_tokenizer: bool = False,
):  # noqa: ANN201
    """Load a `transformers` directory (a family of ARCHITECTURES) as a bardlm `GPT` in eval mode.

    `src` holds config.json and model.safetensors (or shards with model.safetensors.index.json).
    With `with_tokenizer=True` returns (model, tokenizer or None), reading `tokenizer.json` (or a
    bardlm tokenizer saved beside the weights) when present.
    """
    src = Path(src)
    if not src.is_dir():
        raise BardlmError(f"{src} is not a directory; pass the folder written by save_pretrained")
    hf = read_hf_config(src)
    cfg = config_from_hf(hf, str(src / CONFIG_FILE))
    family = hf_family(hf)
    with torch.device("meta"):
        ours = set(GPT(cfg).state_dict())
    sd = state_dict_from_hf(read_hf_tensors(src), cfg, family, ours, str(src))
    model = build_model(cfg, sd, str(src), dtype=dtype).to(device).eval()
    if not with_tokenizer:
        return model
    return model, load_hf_tokenizer(src)


def _tokenizer_path(src: Path) -> Path | None:
    for name in (BARDLM_TOKENIZER_FILE, TOKENIZER_FILE):
        if (src / name).is_file():
            return src / name
    return None


def load_hf_tokenizer(src: str | Path):  # noqa: ANN201
    """The tokenizer saved in a HF directory, or None when it has none.

    A Hugging Face tokenizer.json also gets the directory's BOS/EOS facts (`hf_special_tokens`);
    a bardlm tokenizer saved beside the weights keeps its own behaviour.
    """
    src = Path(src)
    path = _tokenizer_path(src)
    if path is None:
        return None
    tokenizer = load_tokenizer(path)
    if isinstance(tokenizer, HFTokenizer):
        ids = hf_special_tokens(src, tokenizer)
        tokenizer.set_special_tokens(ids["bos_id"], ids["add_bos"], ids["eos_ids"])
    return tokenizer


class RawTokenizerJSON:
    """A tokenizer file carried through unchanged: `to_dict` returns its JSON."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    @classmethod
    def read(cls, path: Path) -> RawTokenizerJSON:
        return cls(json.loads(path.read_text(encoding="utf-8")))

    @property
    def is_hf(self) -> bool:
        return "kind" not in self.data and "model" in self.data

    def to_dict(self) -> dict[str, Any]:
        return self.data


def save_pretrained(model: torch.nn.Module, out: str | Path, tokenizer: Any = None,
                    meta: ModelMeta | None = None) -> Path:
    """Write `out/config.json` + `out/model.safetensors` that `transformers` loads.

    `tokenizer` (anything with `to_dict()`) is written as tokenizer.json when it is a Hugging
    Face tokenizer, else as bardlm_tokenizer.json (transformers ignores it; bardlm reads it).
    `meta` (default: the BOS/EOS the tokenizer knows) becomes tokenizer_config.json and
    generation_config.json: special tokens, chat template, the ids generation stops at.
    """
    out = Path(out)
    family = family_of(model.config)
    dtype = next(model.parameters()).dtype
    hf_config = config_to_hf(model.config, dtype)
    tensors = {k: v.cpu() for k, v in state_dict_to_hf(model, family).items()}
    writes = [(out / MODEL_FILE, tensors_writer(tensors, {"format": "pt"})),
              (out / CONFIG_FILE, text_writer(json.dumps(hf_config, indent=2)))]
    if tokenizer is not None:
        data = tokenizer.to_dict()
        name = TOKENIZER_FILE if RawTokenizerJSON(data).is_hf else BARDLM_TOKENIZER_FILE
        writes.append((out / name, text_writer(json.dumps(data, ensure_ascii=False))))
    meta = meta if meta is not None else ModelMeta.from_tokenizer(tokenizer)
    if isinstance(tokenizer, RawTokenizerJSON):  # a file carried through: read its vocabulary
        tokenizer = tokenizer_from_dict(tokenizer.data)
    for name, content in meta.hf_files(tokenizer).items():
        writes.append((out / name, text_writer(json.dumps(content, indent=2, ensure_ascii=False))))
    atomic_write_many(writes)
    return out


# Conversion (the `bardlm convert` command) ----------------------------------------------------
def convert(src: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """HF directory -> bardlm checkpoint, or bardlm checkpoint -> HF directory (detected).

    Tokenizer files travel unchanged, and so does the model's metadata (`ModelMeta`: special
    ids and tokens, chat template, generation defaults). Returns a summary dict for the CLI.
    """
    src, out, tok_path, tokenizer = _check_paths(src, out, overwrite)
    if is_hf_dir(src):
        model = from_pretrained(src)
        meta = ModelMeta.from_hf_dir(src, load_hf_tokenizer(src)).to_checkpoint()
        save_checkpoint(out, model, tokenizer, meta={"source": str(src), **meta})
        direction = "hf->bardlm"
    else:
        model = _save_bardlm_as_hf(src, out, tokenizer)
        direction = "bardlm->hf"
    return {"out": str(out), "direction": direction, "parameters": model.num_params(),
            "architecture": ARCHITECTURES[family_of(model.config)],
            "tokenizer": tok_path.name if tok_path else None}


def _check_paths(src: str | Path, out: str | Path, overwrite: bool):  # noqa: ANN202
    """(src, out, tokenizer path or None, the tokenizer file carried through unchanged)."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise BardlmError(f"{src} is not a directory; pass a HF directory or a bardlm checkpoint")
    claim_out(out, overwrite)
    tok_path = _tokenizer_path(src)
    return src, out, tok_path, RawTokenizerJSON.read(tok_path) if tok_path else None


def _save_bardlm_as_hf(src: Path, out: Path, tokenizer: Any) -> GPT:
    """A bardlm checkpoint -> a HF directory, keeping the checkpoint's precision and metadata."""
    meta = read_config(src)
    cfg = ModelConfig.from_dict(meta["model"])
    tensors = load_tensors(src / MODEL_FILE, meta.get("save_id"))
    if any(not t.is_floating_point() for t in tensors.values()):
        raise BardlmError(f"{src} holds quantized weights; transformers needs float weights: "
                          "convert the checkpoint saved before quantization")
    dtype = next(iter(tensors.values())).dtype  # keep the checkpoint's precision
    model = build_model(cfg, tensors, str(src / MODEL_FILE), dtype=dtype)
    save_pretrained(model, out, tokenizer, ModelMeta.from_checkpoint(meta))
    return model


def export_hf(src: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """`bardlm export --format hf`: a bardlm checkpoint (or a HF directory, re-saved) -> a HF
    directory. The bardlm -> HF direction of `convert`, under the export verb."""
    src, out, tok_path, tokenizer = _check_paths(src, out, overwrite)
    if is_hf_dir(src):
        model = from_pretrained(src)
        save_pretrained(model, out, tokenizer, ModelMeta.from_hf_dir(src, load_hf_tokenizer(src)))
    else:
        model = _save_bardlm_as_hf(src, out, tokenizer)
    return {"out": str(out), "format": "hf", "parameters": model.num_params(),
            "architecture": ARCHITECTURES[family_of(model.config)],
            "tokenizer": tok_path.name if tok_path else None}


__all__ = ["from_pretrained", "save_pretrained", "convert", "export_hf", "config_from_hf", "config_to_hf"]
