"""GGUF export: one file that llama.cpp, Ollama and LM Studio run.

    bardlm export --ckpt DIR --format gguf --out model.gguf [--type f32|f16|q8_0|q4_0]

GGUF is llama.cpp's container: a header of typed key/value metadata (architecture sizes, the
tokenizer) followed by named tensors. llama.cpp's own converter (`convert_hf_to_gguf.py`) reads a
Hugging Face directory and renames HF tensors to GGUF ones; we do the same in two steps, so the
family detection and the HF name tables stay in one place (`hf.py`):

    our state_dict --(hf.name_map: split fused q|k|v, gate|up)--> HF names --(tables here)--> GGUF

Sixteen families, written as fourteen llama.cpp architectures:

* "gpt2": one fused `attn_qkv` per layer, rows [q | k | v] like our `c_attn`. HF's GPT-2 stores
  its Conv1D weights as (in, out); GGUF wants the `nn.Linear` layout (out, in), which is ours, so
  our tensors go in untransposed (llama.cpp's converter transposes HF's back).
* "llama": llama.cpp rotates *adjacent* channel pairs (2i, 2i+1) ("normal" RoPE), while HF and
  we pair channel i with i + d/2 ("rotate half"). Permuting the rows of W_q and W_k within each
  head, [0, d/2, 1, d/2+1, ...], makes the one compute what the other does (`permute_rope`).
* "qwen3", "qwen2" (q/k/v biases) and "olmo2" (norms on the sublayers' outputs, QK-norm over
  the whole projections): llama.cpp runs them with "neox" RoPE, which *is* rotate-half: no
  permutation.
* "gemma3" (our gemma3_text): neox RoPE too, with the local layers' base in
  `rope.freq_base_swa`; llama.cpp's norms multiply by their weight, Gemma's by (1 + w), so every
  norm weight is written + 1; llama.cpp fixes the layer pattern (every 6th layer global) and the
  logit scale (1/sqrt(head_dim)), so other Gemma 3 layouts are refused.
* "smollm3": llama's layout (q/k rows permuted), llama.cpp skipping RoPE in every 4th layer, as
  SmolLM3's default `no_rope_layers` does; other NoPE patterns and windows are refused.
* "olmo2" with `attention.sliding_window` runs our olmo3: llama.cpp fixes the pattern (every
  4th layer global) and one RoPE base for both kinds.
* "lfm2": neox RoPE (no permutation); `head_count_kv` per layer, 0 marking a short-convolution
  layer, whose kernel is `shortconv.l_cache` and whose conv weight is stored 2-D (C, kernel), f32.
* "gemma2": Gemma 3's names and (1 + w) norms, no QK-norm, every 2nd layer global, both
  soft-caps always on (`attn_logit_softcapping`, `final_logit_softcapping`), the embedding as head.
* Mixtures of experts: "llama" with `expert_count` runs Mixtral (q/k rows permuted as Llama's),
  "qwen3moe", "qwen2moe" (+ a sigmoid-gated shared expert: `ffn_*_shexp`) and "olmoe" (neox
  RoPE), "gpt-oss" (sinks as `attn_sinks`, router and expert biases, clamped SwiGLU, every 2nd
  layer global). Each layer's experts are stacked into one (n_expert, out, in) tensor per
  projection (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`; gpt-oss's biases (n_expert, out)),
  the router is `ffn_gate_inp`. llama.cpp fixes each family's routing (`MOE_RENORM`) and routes
  every layer.
* "granite_swa" runs Mistral: llama.cpp's llama and mistral3 have no sliding window (its phi3
  turns it off), but Granite's windowed architecture is a Llama block (normal RoPE: q/k rows
  permuted) with a window per layer (`sliding_window_pattern`, all true here), scales that are
  off when absent (the logit scale written as 1) and a sink logit per head, written as -1e30:
  it takes no weight. Older llama.cpp builds (before granite_swa) do not load the file.

Issue 34's families go through transformers' names too (`_tensors_via_hf`), each with its own
table and transforms: Qwen3.5 as "qwen35" and the MoE hybrid (Qwen3-Next) as "qwen3next" or
"qwen35moe" (Qwen3.5-MoE: "qwen35moe" first) (`_hybrid_tensors`), DeepSeek-V3 as "deepseek2" (`_mla_tensors`), Gemma 4 (text)
as "gemma4" (`_gemma4_tensors`).

Shapes: GGUF lists dimensions fastest-first, numpy slowest-first; the `gguf` package reverses
them, so an (out, in) numpy array is stored as ne = [in, out], as llama.cpp expects.

RoPE scaling: linear, llama3 (Llama only: the `rope_freqs` factors) and YaRN with its ramp's
ends on whole channel pairs (transformers' truncate=true, which is how llama.cpp computes it).

Types: `f32` keeps everything float32; `f16`, `q8_0` and `q4_0` store weights (experts' too) as
float16 / Q8_0 / Q4_0 and keep 1-D tensors (norms), biases (the experts' are 2-D), routers and
tables added to activations (positions, RoPE factors) in float32, as llama.cpp's converter does.
Q8_0 and Q4_0 are packed here (`quantize_q8_0`, `quantize_q4_0`, byte for byte ggml's reference quantizers); a row that does
not split into blocks of 32 is stored f16.

The tokenizer must be byte-level BPE (bardlm's `bpe`, or a Hugging Face tokenizer.json such as
GPT-2's, Llama 3's or Qwen's): llama.cpp's "gpt2" tokenizer model with its pre-tokenizer named.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import BardlmError
from ..nn.position import rope_inv_freq
from ..tokenizers.bpe import PRETOKENIZE_PATTERN, bytes_to_unicode
from .atomic import atomic_write_many
from .hf import (
    HYBRID_FAMILIES,
    MOE_FAMILIES,
    SAME_FUNCTION,
    family_of,
    name_map,
    row_splits,
    state_dict_to_hf,
)
from .load import kind_of, load, read_meta
from .metadata import ModelMeta

TYPES = ("f32", "f16", "q8_0", "q4_0")
GGUF_SUFFIX = ".gguf"

# HF name (without ".weight"/".bias") -> GGUF name, per family. "{i}" is the layer index.
# (What llama.cpp's gguf-py TensorNameMap does for these three families, written out.)
_LLAMA_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{i}.input_layernorm": "blk.{i}.attn_norm",
    "model.layers.{i}.self_attn.q_proj": "blk.{i}.attn_q",
    "model.layers.{i}.self_attn.k_proj": "blk.{i}.attn_k",
    "model.layers.{i}.self_attn.v_proj": "blk.{i}.attn_v",
    "model.layers.{i}.self_attn.o_proj": "blk.{i}.attn_output",
    "model.layers.{i}.self_attn.q_norm": "blk.{i}.attn_q_norm",
    "model.layers.{i}.self_attn.k_norm": "blk.{i}.attn_k_norm",
    "model.layers.{i}.post_attention_layernorm": "blk.{i}.ffn_norm",
    "model.layers.{i}.mlp.gate_proj": "blk.{i}.ffn_gate",
    "model.layers.{i}.mlp.up_proj": "blk.{i}.ffn_up",
    "model.layers.{i}.mlp.down_proj": "blk.{i}.ffn_down",
}
# OLMo 2: no norm before the sublayers; the two block norms act on their outputs.
_OLMO2_NAMES = {**{k: v for k, v in _LLAMA_NAMES.items() if "layernorm" not in k},
                "model.layers.{i}.post_attention_layernorm": "blk.{i}.post_attention_norm",
                "model.layers.{i}.post_feedforward_layernorm": "blk.{i}.post_ffw_norm"}
# Gemma 3 (text): Llama's names with a norm before and after each sublayer.
_GEMMA3_NAMES = {**{k: v for k, v in _LLAMA_NAMES.items() if "layernorm" not in k},
                 "model.layers.{i}.input_layernorm": "blk.{i}.attn_norm",
                 "model.layers.{i}.post_attention_layernorm": "blk.{i}.post_attention_norm",
                 "model.layers.{i}.pre_feedforward_layernorm": "blk.{i}.ffn_norm",
                 "model.layers.{i}.post_feedforward_layernorm": "blk.{i}.post_ffw_norm"}
# LFM2: per layer either attention (Qwen3's names) or a short convolution; the final norm is
# HF's embedding_norm, which llama.cpp calls token_embd_norm (and applies after the last layer).
_LFM2_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.embedding_norm": "token_embd_norm",
    "lm_head": "output",
    "model.layers.{i}.operator_norm": "blk.{i}.attn_norm",
    "model.layers.{i}.self_attn.q_proj": "blk.{i}.attn_q",
    "model.layers.{i}.self_attn.k_proj": "blk.{i}.attn_k",
    "model.layers.{i}.self_attn.v_proj": "blk.{i}.attn_v",
    "model.layers.{i}.self_attn.out_proj": "blk.{i}.attn_output",
    "model.layers.{i}.self_attn.q_layernorm": "blk.{i}.attn_q_norm",
    "model.layers.{i}.self_attn.k_layernorm": "blk.{i}.attn_k_norm",
    "model.layers.{i}.conv.in_proj": "blk.{i}.shortconv.in_proj",
    "model.layers.{i}.conv.conv": "blk.{i}.shortconv.conv",
    "model.layers.{i}.conv.out_proj": "blk.{i}.shortconv.out_proj",
    "model.layers.{i}.ffn_norm": "blk.{i}.ffn_norm",
    "model.layers.{i}.feed_forward.w1": "blk.{i}.ffn_gate",
    "model.layers.{i}.feed_forward.w3": "blk.{i}.ffn_up",
    "model.layers.{i}.feed_forward.w2": "blk.{i}.ffn_down",
}
# Gemma 2: Gemma 3's sandwich names (no QK-norm tensors to write).
# gpt-oss: Llama's names, but its second norm is llama.cpp's "post_attention_norm" (before the
# experts), a sink logit per head, a router with a bias, experts (and their biases) stacked.
_GPT_OSS_NAMES = {**_LLAMA_NAMES, "model.layers.{i}.post_attention_layernorm": "blk.{i}.post_attention_norm",
                  "model.layers.{i}.self_attn.sinks": "blk.{i}.attn_sinks"}


def _moe_names(moe: str, router: str, gate: str, up: str, down: str) -> dict[str, str]:
    """A MoE layer's router and experts: each expert's gate/up/down ("{e}" its index) goes into
    one 3-D tensor per kind, (n_expert, out, in), which llama.cpp's ggml_mul_mat_id reads."""
    t = f"model.layers.{{i}}.{moe}."
    return {t + router: "blk.{i}.ffn_gate_inp", t + f"experts.{{e}}.{gate}": "blk.{i}.ffn_gate_exps",
            t + f"experts.{{e}}.{up}": "blk.{i}.ffn_up_exps", t + f"experts.{{e}}.{down}": "blk.{i}.ffn_down_exps"}


_QWEN_MOE_NAMES = {**_LLAMA_NAMES, **_moe_names("mlp", "gate", "gate_proj", "up_proj", "down_proj")}
# Qwen2-MoE's shared expert (a SwiGLU every token runs) and its sigmoid gate.
_SHARED_EXPERT_NAMES = {"model.layers.{i}.mlp.shared_expert.gate_proj": "blk.{i}.ffn_gate_shexp",
                        "model.layers.{i}.mlp.shared_expert.up_proj": "blk.{i}.ffn_up_shexp",
                        "model.layers.{i}.mlp.shared_expert.down_proj": "blk.{i}.ffn_down_shexp",
                        "model.layers.{i}.mlp.shared_expert_gate": "blk.{i}.ffn_gate_inp_shexp"}
GGUF_NAMES = {
    "gpt2": {
        "transformer.wte": "token_embd",
        "transformer.wpe": "position_embd",
        "transformer.ln_f": "output_norm",
        "lm_head": "output",
        "transformer.h.{i}.ln_1": "blk.{i}.attn_norm",
        "transformer.h.{i}.attn.c_attn": "blk.{i}.attn_qkv",
        "transformer.h.{i}.attn.c_proj": "blk.{i}.attn_output",
        "transformer.h.{i}.ln_2": "blk.{i}.ffn_norm",
        "transformer.h.{i}.mlp.c_fc": "blk.{i}.ffn_up",
        "transformer.h.{i}.mlp.c_proj": "blk.{i}.ffn_down",
    },
    "llama": _LLAMA_NAMES,
    "qwen3": _LLAMA_NAMES,
    "qwen2": _LLAMA_NAMES,  # + q/k/v biases
    "olmo2": _OLMO2_NAMES,
    "gemma3_text": _GEMMA3_NAMES,
    "olmo3": _OLMO2_NAMES,
    "smollm3": _LLAMA_NAMES,  # with NoPE layers
    "lfm2": _LFM2_NAMES,
    "gemma2": _GEMMA3_NAMES,
    "mistral": _LLAMA_NAMES,  # as granite_swa, with sinks `gguf_tensors` adds
    "mixtral": {**_LLAMA_NAMES, **_moe_names("block_sparse_moe", "gate", "w1", "w3", "w2")},
    "qwen3_moe": _QWEN_MOE_NAMES,
    "qwen2_moe": {**_QWEN_MOE_NAMES, **_SHARED_EXPERT_NAMES},
    "olmoe": _QWEN_MOE_NAMES,
    "gpt_oss": {**_GPT_OSS_NAMES, **_moe_names("mlp", "router", "gate_proj", "up_proj", "down_proj")},
}
# llama.cpp's name where it differs from transformers' (OLMo 3 is its olmo2 with a window,
# Mixtral its llama with experts)
GGUF_ARCH = {"gemma3_text": "gemma3", "olmo3": "olmo2", "mixtral": "llama", "qwen3_moe": "qwen3moe",
             "qwen2_moe": "qwen2moe", "gpt_oss": "gpt-oss", "mistral": "granite_swa",
             "deepseek_v3": "deepseek2", "gemma4_text": "gemma4"}
# llama.cpp fixes the layer pattern of these: every n-th layer global, the others local
SWA_EVERY = {"gemma3_text": 6, "olmo3": 4, "gemma2": 2, "gpt_oss": 2}
SWA_NAMES = {"gemma3_text": "Gemma 3", "olmo3": "OLMo 3", "gemma2": "Gemma 2", "gpt_oss": "gpt-oss"}
# Families llama.cpp runs with "normal" RoPE (adjacent pairs): q/k rows permuted (`permute_rope`)
NORMAL_ROPE = ("llama", "smollm3", "mixtral", "mistral")
# Mistral's sinks in llama.cpp's granite_swa: exp(-1e30 - max) is exactly 0 in float32, so
# the sink takes no softmax weight and attention is Mistral's
NO_SINK = -1e30
# Families whose norms scale by (1 + w): written as 1 + w, since llama.cpp's scale by the weight
UNIT_OFFSET_NORMS = ("gemma3_text", "gemma2")
# llama.cpp's graph for these reads `output.weight` with no fallback to the embedding
NEEDS_OUTPUT = ("qwen2_moe", "olmoe", "gpt_oss")
_LAYER = re.compile(r"^(transformer\.h|model\.layers)\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"\.experts\.\d+\.")


def gguf_name(hf_name: str, family: str) -> str:
    """The GGUF tensor name of a HF tensor name, e.g. model.layers.3.mlp.up_proj.weight ->
    blk.3.ffn_up.weight. Every expert of a layer has the one name of their stacked tensor
    (model.layers.3.mlp.experts.5.up_proj.weight -> blk.3.ffn_up_exps.weight)."""
    # "weight" or "bias"; gpt-oss's sink logits (self_attn.sinks) are llama.cpp's attn_sinks.weight
    stem, _, suffix = (hf_name, "", "weight") if hf_name.endswith(".sinks") else hf_name.rpartition(".")
    m = _LAYER.match(stem)
    key, layer = (f"{m.group(1)}.{{i}}.{m.group(3)}", m.group(2)) if m else (stem, None)
    return GGUF_NAMES[family][_EXPERT.sub(".experts.{e}.", key)].format(i=layer) + "." + suffix


# What llama.cpp can run -----------------------------------------------------------------------
def check_exportable(cfg: ModelConfig) -> str:
    """The family (a key of GGUF_NAMES: "gpt2", "llama", "gemma2", "qwen3_moe", ...) whose
    llama.cpp architecture computes what `cfg` does, or a one-line `BardlmError` naming what
    llama.cpp lacks."""
    try:
        family = family_of(cfg)  # the same three shapes transformers has
        family = SAME_FUNCTION.get(family, family)  # a Phi-3 is written as the Llama it equals
    except BardlmError as e:
        raise BardlmError(str(e).replace("transformers equivalent", "GGUF (llama.cpp) equivalent")
                          .replace("save_pretrained writes", "GGUF export writes")) from None
    if family in HYBRID_FAMILIES:
        _check_hybrid(cfg)
        return family
    if family == "deepseek_v3":
        _check_mla(cfg)
        return family
    if family == "gemma4_text":
        _check_gemma4(cfg)
        return family
    if family not in GGUF_NAMES:
        written = [*GGUF_NAMES, *HYBRID_FAMILIES, "deepseek_v3", "gemma4_text"]
        raise BardlmError(f"GGUF export of {family} models is not implemented (bardlm writes "
                          f"{', '.join(written)}); export --format hf writes one transformers loads")
    if family in SWA_EVERY:
        _check_fixed_layout(cfg, family)
    if family in MOE_FAMILIES:
        _check_moe(cfg, family)
    if family == "gpt2" and cfg.ffn != "gelu":
        raise BardlmError(f"llama.cpp's GPT-2 uses GELU; this model uses ffn={cfg.ffn}, so it "
                          "cannot be exported to GGUF (export --format hf still works)")
    if family in ("qwen3", "olmo2", "olmo3", "smollm3") and (cfg.attn_bias or cfg.bias):
        raise BardlmError(f"llama.cpp's {family} has no q/k/v/o or MLP biases; this model has "
                          f"attn_bias={str(cfg.attn_bias).lower()}, bias={str(cfg.bias).lower()}")
    nope = [(i + 1) % 4 != 0 for i in range(cfg.n_layer)]  # llama.cpp's SmolLM3: every 4th layer
    if family == "smollm3" and ("local" in cfg.attn_layers or cfg.rope_layers != nope):
        raise BardlmError("no GGUF export for this SmolLM3-style model: llama.cpp's SmolLM3 has no "
                          "sliding windows and skips RoPE in exactly every 4th layer; export --format "
                          "hf writes one transformers loads")
    kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type"))
    if family != "llama" and kind == "llama3":
        raise BardlmError(f"llama.cpp's {family} takes no per-frequency RoPE factors; llama3 rope "
                          "scaling exports only as a Llama model")
    if kind == "yarn":
        _check_yarn(cfg.rope_scaling)
    return family


def _check_yarn(scaling: dict[str, Any]) -> None:
    """What llama.cpp's YaRN computes: the ramp between interpolated and kept frequencies starts
    and ends on whole channel pairs (transformers' truncate=true; gpt-oss's checkpoints say
    false: measured, its logits then differ), and cos/sin scaled by 0.1 ln(factor) + 1."""
    why = {"truncate=false: llama.cpp rounds the ramp's ends to whole channel pairs":
               not scaling.get("truncate", True),
           "attention_factor or mscale: llama.cpp scales by 0.1 ln(factor) + 1":
               any(scaling.get(k) is not None for k in ("attention_factor", "mscale", "mscale_all_dim"))}
    found = [k for k, v in why.items() if v]
    if found:
        raise BardlmError(f"GGUF export: llama.cpp's YaRN cannot run this model's RoPE ({'; '.join(found)}); "
                          "export --format hf writes one transformers loads")


def _check_fixed_layout(cfg: ModelConfig, family: str) -> None:
    """What llama.cpp fixes for Gemma 3 (five local layers to one global, the logit scale
    1/sqrt(head_dim), no soft-caps), OLMo 3 (three local layers to one global, one RoPE base
    for both kinds), Gemma 2 (one local layer to one global, its logit scale, both soft-caps, a
    tied head) and gpt-oss (one local to one global), and for all but gpt-oss: unscaled RoPE."""
    every = SWA_EVERY[family]
    pattern = ["global" if (i + 1) % every == 0 else "local" for i in range(cfg.n_layer)]
    why = {f"attn_layers other than llama.cpp's (every {every}th layer global)": cfg.attn_layers != pattern,
           # gpt-oss's YaRN applies to both kinds of layer in llama.cpp as in transformers
           "rope_scaling": cfg.rope_scaling is not None and family != "gpt_oss"}
    if family == "gemma3_text":
        why.update({"attn_scale_dim other than head_dim": cfg.attn_scale_dim not in (None, cfg.head_dim),
                    "soft-caps": cfg.attn_softcap is not None or cfg.logit_softcap is not None})
    elif family == "gemma2":
        # llama.cpp scales queries by 1/sqrt(head_dim), or by 1/sqrt(n_embd / n_head) when the
        # model has 46 layers (Gemma 2 27B), and always soft-caps, reusing the embedding as head
        scale = cfg.n_embd / cfg.n_head if cfg.n_layer == 46 else cfg.head_dim
        why.update({f"attn_scale_dim other than {scale:g}": (cfg.attn_scale_dim or cfg.head_dim) != scale,
                    "no soft-caps: llama.cpp always caps attention and output logits":
                        cfg.attn_softcap is None or cfg.logit_softcap is None,
                    "an untied output layer": not cfg.tie_embeddings,
                    "rope_local_theta other than rope_theta": cfg.rope_local_theta not in (None, cfg.rope_theta)})
    else:
        why["rope_local_theta other than rope_theta"] = cfg.rope_local_theta not in (None, cfg.rope_theta)
    found = [k for k, v in why.items() if v]
    if found:
        raise BardlmError(f"llama.cpp's {SWA_NAMES[family]} cannot run this model ({', '.join(found)}); "
                          "export --format hf writes one transformers loads")


# What llama.cpp's mixture-of-experts graphs fix: whether the top-k weights are renormalised to
# sum to 1 (its norm_w / gpt-oss's softmax over the chosen logits), per family.
MOE_RENORM = {"mixtral": True, "qwen3_moe": True, "gpt_oss": True, "qwen2_moe": False, "olmoe": False}


def _check_moe(cfg: ModelConfig, family: str) -> None:
    """What llama.cpp's graph for a MoE family fixes: every layer routed, softmax routing with its
    renormalisation (`MOE_RENORM`), and per family: OLMoE's k-norm over n_embd channels (MHA),
    Qwen2-MoE's gated shared expert and n_embd-wide attention, gpt-oss's clamp and biases."""
    renorm = str(MOE_RENORM[family]).lower()
    why = {"dense FFN layers: llama.cpp routes every layer": "dense" in cfg.ffn_layers,
           f"router_renorm other than {renorm}": str(cfg.router_renorm).lower() != renorm,
           f"router_score={cfg.router_score}": cfg.router_score != "softmax",
           "grouped routing or routed_scale": cfg.router_groups != 1 or cfg.routed_scale != 1.0}
    if family == "olmoe":
        why["n_kv_head other than n_head"] = cfg.n_kv_head != cfg.n_head
    if family == "qwen2_moe":
        why.update({"head_dim * n_head other than n_embd": cfg.head_dim * cfg.n_head != cfg.n_embd,
                    "shared_expert_gate=false": not cfg.shared_expert_gate})
    if family == "gpt_oss":
        why.update({"swiglu_alpha/swiglu_limit other than 1.702/7.0": (cfg.swiglu_alpha, cfg.swiglu_limit) != (1.702, 7.0),
                    "no attention biases": not cfg.attn_bias})
    found = [k for k, v in why.items() if v]
    if found:
        raise BardlmError(f"GGUF export: llama.cpp's {GGUF_ARCH.get(family, family)} cannot run this "
                          f"mixture-of-experts model ({'; '.join(found)}); export --format hf writes one "
                          "transformers loads")
# Linear-attention hybrids (Qwen3.5, Qwen3-Next) ------------------------------------------------
# The llama.cpp architectures that run each hybrid family, the default first: a MoE hybrid is
# transformers' Qwen3-Next, which llama.cpp runs as "qwen3next" and, computing the same
# function, as Qwen3.5-MoE's "qwen35moe"; a model imported from Qwen3.5-MoE goes to its own
# "qwen35moe" by default.
HYBRID_ARCHS = {"qwen3_5_text": ("qwen35",), "qwen3_next": ("qwen3next", "qwen35moe"),
                "qwen3_5_moe_text": ("qwen35moe", "qwen3next")}
# HF tensor name after "model.layers.{i}." -> GGUF name after "blk.{i}." (the linear layers'
# in_proj tensors are cut from our c_in instead: `_hybrid_in_proj`).
_HYBRID_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",  # per head: query rows, then gate rows
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "linear_attn.conv1d.weight": "ssm_conv1d.weight",
    "linear_attn.A_log": "ssm_a",
    "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
_HYBRID_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def full_attention_interval(cfg: ModelConfig) -> int | None:
    """n where layer i is attention exactly when (i + 1) % n == 0 (llama.cpp's one hybrid
    pattern), else None."""
    n = cfg.attn_layers.index("global") + 1 if "global" in cfg.attn_layers else cfg.n_layer + 1
    want = ["global" if (i + 1) % n == 0 else "linear" for i in range(cfg.n_layer)]
    return n if cfg.attn_layers == want else None


def _check_hybrid(cfg: ModelConfig) -> None:
    """What llama.cpp's qwen35 / qwen3next / qwen35moe fix: one head size for the linear layers'
    keys and values, every n-th layer attention, unscaled RoPE, and for the MoE ones every FFN
    a mixture of experts beside a gated shared expert, top-k weights renormalised."""
    moe = "moe" in cfg.ffn_layers
    why = {"linear_k_head_dim != linear_v_head_dim (llama.cpp gives both one size)":
               cfg.linear_k_head_dim != cfg.linear_v_head_dim,
           "attn_layers other than every n-th layer attention": full_attention_interval(cfg) is None,
           "rope_scaling": cfg.rope_scaling is not None,
           "dense FFN layers beside MoE ones": moe and "dense" in cfg.ffn_layers,
           "router_renorm=false": moe and not cfg.router_renorm,
           "an ungated shared expert": moe and not cfg.shared_expert_gate}
    found = [k for k, v in why.items() if v]
    if found:
        raise BardlmError(f"no GGUF export: llama.cpp's Qwen3.5 / Qwen3-Next cannot run this model "
                          f"({', '.join(found)}); "
                          "export --format hf writes one transformers loads")


def _v_heads_tiled(t: torch.Tensor, cfg: ModelConfig, head: int, dim: int = 0) -> torch.Tensor:
    """Value heads (`head` channels each) along `dim` from grouped order (the r = n_v / n_k heads
    of key head 0, then key head 1's, ...: ours and transformers') to tiled order (one head of
    each key head, then the next, ...). llama.cpp's qwen35 repeats key heads by tiling
    (ggml_repeat), so value head j must meet key head j % n_k; llama.cpp's converter reorders
    the same way."""
    nk, r = cfg.linear_k_heads, cfg.linear_v_heads // cfg.linear_k_heads
    if r == 1:
        return t
    t = t.movedim(dim, 0)
    t = t.reshape(nk, r, head, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return t.movedim(0, dim)


def _hybrid_in_proj(w: torch.Tensor, cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """A linear layer's c_in (rows [q | k | v | z | b | a]) -> llama.cpp's attn_qkv ([q | k | v],
    the conv's input), attn_gate (z) and ssm_beta / ssm_alpha (qwen35, qwen35moe) or ssm_ba
    (qwen3next: per key head its r b rows then its r a rows, as transformers' in_proj_ba)."""
    nk, dk, nv, dv = cfg.linear_k_heads, cfg.linear_k_head_dim, cfg.linear_v_heads, cfg.linear_v_head_dim
    q, k, v, z, b, a = w.split([nk * dk, nk * dk, nv * dv, nv * dv, nv, nv], dim=0)
    if arch == "qwen3next":
        ba = torch.cat([b.reshape(nk, -1, w.shape[1]), a.reshape(nk, -1, w.shape[1])], dim=1)
        return {"attn_qkv.weight": torch.cat([q, k, v]), "attn_gate.weight": z,
                "ssm_ba.weight": ba.reshape(2 * nv, -1)}
    v, z, b, a = _v_heads_tiled(v, cfg, dv), _v_heads_tiled(z, cfg, dv), _v_heads_tiled(b, cfg, 1), \
        _v_heads_tiled(a, cfg, 1)
    return {"attn_qkv.weight": torch.cat([q, k, v]), "attn_gate.weight": z,
            "ssm_beta.weight": b, "ssm_alpha.weight": a}


def _tensors_via_hf(model: torch.nn.Module, family: str,
                    layer: Callable[[int, str, torch.Tensor], dict[str, torch.Tensor]],
                    top: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 tensor, from transformers' tensors of `family` (`state_dict_to_hf`):
    the embedding, final norm and head (and the family's other tensors outside the layers,
    `top`) renamed, numbered experts stacked (n_expert, out, in) as llama.cpp's *_exps, and every
    other layer tensor given to `layer(i, name after "model.layers.{i}.", tensor)`, which
    returns {GGUF name after "blk.{i}.": tensor}."""
    top = {**_TOP_NAMES, **(top or {})}
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, list[torch.Tensor]] = {}
    for hf_name, t in state_dict_to_hf(model, family).items():
        t = t.detach().float().cpu()
        if hf_name in top:
            out[top[hf_name]] = t
            continue
        m = _LAYER.match(hf_name)
        i, rest = m.group(2), m.group(3)
        if e := _HYBRID_EXPERT.match(rest):  # in expert order: transformers numbers them
            experts.setdefault(f"blk.{i}.ffn_{e.group(2)}_exps.weight", []).append(t)
            continue
        out.update({f"blk.{i}.{k}": v.contiguous() for k, v in layer(int(i), rest, t).items()})
    out.update({name: torch.stack(ts) for name, ts in experts.items()})
    return out


def _hybrid_tensors(model: torch.nn.Module, family: str, arch: str) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 tensor for a Qwen3.5 / Qwen3-Next model (llama.cpp's converter's
    transforms): (1 + w) norms written w + 1 (not the linear layers' gated norm, a plain gain),
    A_log as ssm_a = -exp(A_log), the conv (conv_dim, 1, K) as (conv_dim, K), and for qwen35 /
    qwen35moe the value heads tiled (`_v_heads_tiled`)."""
    cfg = model.config
    c_in = {i: model.state_dict()[f"transformer.h.{i}.attn.c_in.weight"].detach().float().cpu()
            for i, kind in enumerate(cfg.attn_layers) if kind == "linear"}
    tiled = arch != "qwen3next"
    dv = cfg.linear_v_head_dim

    def layer(i: int, rest: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if rest.startswith("linear_attn.in_proj"):  # cut from our c_in instead, once per layer
            return _hybrid_in_proj(c_in[i], cfg, arch) if rest.endswith(("_qkv.weight", "_qkvz.weight")) else {}
        name = _HYBRID_LAYER_NAMES[rest]
        if name.endswith("norm.weight") and name != "ssm_norm.weight":
            t = t + 1.0  # Qwen3.5's RMSNorms scale by (1 + w); llama.cpp's by the weight
        elif name == "ssm_a":
            t = -t.exp()  # llama.cpp multiplies softplus(a + dt_bias) by ssm_a
        elif name == "ssm_conv1d.weight":
            t = t.squeeze(1)
        elif name == "ffn_gate_inp_shexp.weight":
            t = t.reshape(-1)  # one gate logit per token: llama.cpp's {n_embd}
        if tiled and name in ("ssm_a", "ssm_dt.bias"):
            t = _v_heads_tiled(t, cfg, 1)
        elif tiled and name == "ssm_conv1d.weight":
            qk = 2 * cfg.linear_k_heads * cfg.linear_k_head_dim
            t = torch.cat([t[:qk], _v_heads_tiled(t[qk:], cfg, dv)])
        elif tiled and name == "ssm_out.weight":
            t = _v_heads_tiled(t, cfg, dv, dim=1)
        return {name: t}

    out = _tensors_via_hf(model, family, layer)
    out["output_norm.weight"] = out["output_norm.weight"] + 1.0
    return out


def _hybrid_metadata(w: Any, cfg: ModelConfig, arch: str) -> None:
    """llama.cpp's hybrid keys: the linear layers' sizes (ssm.*: state_size is the head size,
    group_count the key heads, time_step_rank the value heads), the layer pattern, Qwen3.5's
    M-RoPE sections (text tokens give the three sections one position: plain RoPE) and the
    experts. (The rotated channels, head_dim * partial_rotary_factor, are written with RoPE's.)"""
    w.add_ssm_conv_kernel(cfg.linear_conv_kernel)
    w.add_ssm_state_size(cfg.linear_k_head_dim)
    w.add_ssm_group_count(cfg.linear_k_heads)
    w.add_ssm_time_step_rank(cfg.linear_v_heads)
    w.add_ssm_inner_size(cfg.linear_v_heads * cfg.linear_v_head_dim)
    w.add_uint32(f"{arch}.full_attention_interval", full_attention_interval(cfg))
    if arch != "qwen3next":
        # llama.cpp's interleaved M-RoPE gives rotated pair j section j % 3 while j < 3 * its
        # size, else the fourth (zero for text): sizes counting each residue keep every pair
        # on a text position ([11, 11, 10] for Qwen3.5's 32 pairs)
        pairs = int(cfg.head_dim * cfg.partial_rotary_factor) // 2
        w.add_rope_dimension_sections([(pairs - r + 2) // 3 for r in range(3)] + [0])
    if "moe" in cfg.ffn_layers:
        w.add_expert_count(cfg.n_expert)
        w.add_expert_used_count(cfg.n_expert_active)
        w.add_expert_feed_forward_length(cfg.expert_hidden)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_hidden)


# Latent attention (DeepSeek-V3) -----------------------------------------------------------------
# llama.cpp's deepseek2 runs it. HF tensor name after "model.layers.{i}." -> GGUF name after
# "blk.{i}." (kv_b_proj is split in two: `_mla_tensors`).
_MLA_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}


def _check_mla(cfg: ModelConfig) -> None:
    """What llama.cpp's deepseek2 lacks or requires: no attention biases or RoPE scaling (YaRN is
    refused for every family); a low-rank query (it reads a full-rank one only in
    DeepSeek-V2-Lite's layer counts) and MoE layers (it requires the expert keys), in groups of
    equal size."""
    moe = "moe" in cfg.ffn_layers
    why = {"attention biases": cfg.attn_bias or cfg.qkv_bias, "rope_scaling": cfg.rope_scaling is not None,
           "a full-rank query (q_lora_rank unset)": not cfg.q_lora_rank,
           "no mixture-of-experts layer": not moe,
           "n_expert not a multiple of router_groups": moe and cfg.n_expert % cfg.router_groups != 0}
    found = [k for k, v in why.items() if v]
    if found:
        raise BardlmError(f"no GGUF export: llama.cpp's DeepSeek-V3 (deepseek2) cannot run this model "
                          f"({', '.join(found)}); export --format hf writes one transformers loads")


def _rope_rows_adjacent(w: torch.Tensor, heads: int, head: int, rope: int) -> torch.Tensor:
    """Rows of a projection holding `heads` heads of `head` rows whose last `rope` rows are RoPE
    channels: those reordered from rotate-half pairs (i, i + rope/2) to adjacent pairs (2i,
    2i + 1), llama.cpp's deepseek2 RoPE (`permute_rope`). DeepSeek's own checkpoints
    (rope_interleave) are adjacent already."""
    w = w.reshape(heads, head, -1).clone()
    w[:, head - rope:] = permute_rope(w[:, head - rope:].reshape(heads * rope, -1), heads).reshape(heads, rope, -1)
    return w.reshape(heads * head, -1)


def _mla_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 tensor for a DeepSeek-V3 model: kv_b_proj ((H * (dn + dv), r): per
    head dn key rows then dv value rows) split into llama.cpp's attn_k_b (H, r, dn), the key
    rows transposed, which it multiplies the query by (absorbed attention over the latents),
    and attn_v_b (H, dv, r), which maps the attended latent out; RoPE rows adjacent."""
    cfg = model.config
    H, dn, dr, dv = cfg.n_head, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

    def layer(i: int, rest: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if rest == "self_attn.kv_b_proj.weight":
            k_b, v_b = t.reshape(H, dn + dv, -1).split([dn, dv], dim=1)
            return {"attn_k_b.weight": k_b.transpose(1, 2), "attn_v_b.weight": v_b}
        name = _MLA_LAYER_NAMES[rest]
        if not cfg.rope_interleave and name == "attn_q_b.weight":
            t = _rope_rows_adjacent(t, H, dn + dr, dr)
        elif not cfg.rope_interleave and name == "attn_kv_a_mqa.weight":  # rows [latent | k_rope]
            t = _rope_rows_adjacent(t, 1, len(t), dr)
        return {name: t}

    return _tensors_via_hf(model, "deepseek_v3", layer)


def _mla_metadata(w: Any, cfg: ModelConfig, gguf: Any) -> None:
    """llama.cpp's deepseek2 keys: attention as MQA over the latents (one KV head, keys of
    kv_lora_rank + qk_rope_head_dim, values of kv_lora_rank), the per-head sizes it scores and
    outputs with (key/value_length_mla), the ranks, the dense first layers and DeepSeek's
    routing (sigmoid scores, the correction bias, groups, routed_scale)."""
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_leading_dense_block_count(cfg.ffn_layers.index("moe"))
    w.add_expert_count(cfg.n_expert)
    w.add_expert_used_count(cfg.n_expert_active)
    w.add_expert_feed_forward_length(cfg.expert_hidden)
    w.add_expert_shared_count(cfg.shared_expert_hidden // cfg.expert_hidden)
    w.add_expert_weights_scale(float(cfg.routed_scale))
    w.add_expert_weights_norm(bool(cfg.router_renorm))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if cfg.router_topk_groups < cfg.router_groups:  # keeping every group limits nothing
        w.add_expert_group_count(cfg.router_groups)
        w.add_expert_group_used_count(cfg.router_topk_groups)


# Gemma 4 (text) -------------------------------------------------------------------------------
# llama.cpp's gemma4. HF tensor name after "model.layers.{i}." -> GGUF name after "blk.{i}.".
_GEMMA4_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",  # absent where the layer reads shared keys
    "self_attn.v_proj.weight": "attn_v.weight",  # absent where K = V: llama.cpp then takes k
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "per_layer_input_gate.weight": "inp_gate.weight",
    "per_layer_projection.weight": "proj.weight",
    "post_per_layer_input_norm.weight": "post_norm.weight",
    "layer_scalar": "layer_output_scale.weight",
    # the MoE block beside the MLP: its norms, router (weight, the scale of its normed input,
    # the per-expert output scales) and experts, stacked as transformers stacks them
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight",  # (E, 2 * expert_hidden, C): [gate | up]
    "experts.down_proj": "ffn_down_exps.weight",
}
_GEMMA4_TOP_NAMES = {"model.embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
                     "model.per_layer_model_projection.weight": "per_layer_model_proj.weight",
                     "model.per_layer_projection_norm.weight": "per_layer_proj_norm.weight"}


def _check_gemma4(cfg: ModelConfig) -> None:
    """What llama.cpp's gemma4 fixes: the values RMS-normalised, attention scale 1, no attention
    soft-cap, RoPE scaling only Gemma 4's proportional one on global layers (local layers with
    their own base), KV-shared local layers reading the last unshared layer but one and global
    ones the last (so those two are local then global)."""
    kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type"))
    first_shared = cfg.n_layer - cfg.kv_shared_layers
    reuse = [first_shared - (2 if cfg.attn_layers[i] == "local" else 1) for i in range(first_shared, cfg.n_layer)]
    why = {"v_norm=false": not cfg.v_norm, "attn_scale_dim other than 1": cfg.attn_scale_dim != 1.0,
           "attn_softcap": cfg.attn_softcap is not None,
           "rope_scaling other than proportional": cfg.rope_scaling is not None and kind != "proportional",
           "rope_scaling on local layers (no rope_local_theta)":
               cfg.rope_scaling is not None and cfg.rope_local_theta is None and "local" in cfg.attn_layers,
           "KV-shared layers reading other layers than the last unshared local and global ones":
               [cfg.kv_source(i) for i in range(first_shared, cfg.n_layer)] != reuse,
           "per_layer_vocab_size other than vocab_size": cfg.per_layer_input_dim > 0
               and cfg.per_layer_vocab_size != cfg.vocab_size}
    found = [k for k, v in why.items() if v]
    if found:
        raise BardlmError(f"no GGUF export: llama.cpp's Gemma 4 cannot run this model ({', '.join(found)}); "
                          "export --format hf writes one transformers loads")


def _gemma4_rope_freqs(cfg: ModelConfig) -> torch.Tensor:
    """(global_head_dim // 2,) float32 `rope_freqs`, which llama.cpp divides the global layers'
    RoPE frequencies by: it rotates every channel pair of the head at theta^(-2i/head_dim), so
    proportional RoPE's unrotated pairs get 1e30 (angle 0, as llama.cpp's converter writes) and
    the rotated ones its `factor`."""
    pairs = cfg.global_head_dim // 2
    scaling = cfg.rope_scaling or {}
    rotated = int(scaling.get("partial_rotary_factor", 1.0) * cfg.global_head_dim // 2)
    factor = float(scaling.get("factor", 1.0))
    return torch.tensor([factor] * rotated + [1e30] * (pairs - rotated), dtype=torch.float32)


def _gemma4_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 tensor for a Gemma 4 (text) model: norms as they are (Gemma 4's
    scale by w, as llama.cpp's), the per-layer input tables, the experts as transformers stacks
    them, and `rope_freqs`."""

    def layer(i: int, rest: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {_GEMMA4_LAYER_NAMES[rest]: t}

    return {"rope_freqs.weight": _gemma4_rope_freqs(model.config),
            **_tensors_via_hf(model, "gemma4_text", layer, _GEMMA4_TOP_NAMES)}


def _gemma4_metadata(w: Any, cfg: ModelConfig) -> None:
    """llama.cpp's gemma4 keys: head sizes and KV heads of global layers (key_length,
    head_count_kv per layer) and local ones (*_swa), which layers are local, the window, the two
    RoPE bases and rotated channels (a global layer's whole head: `rope_freqs` stops the rest),
    the KV-shared layers, the per-layer input width, the final soft-cap and the experts. (The MLP widths, per
    layer for the double-wide MLP, are written with the common keys.)"""
    w.add_head_count_kv([cfg.layer_kv_heads(i) for i in range(cfg.n_layer)])
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_key_length(cfg.global_head_dim)
    w.add_value_length(cfg.global_head_dim)
    w.add_key_length_swa(cfg.head_dim)
    w.add_value_length_swa(cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window or cfg.block_size)
    w.add_sliding_window_pattern([kind == "local" for kind in cfg.attn_layers])
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_freq_base_swa(cfg.rope_local_theta or cfg.rope_theta)
    w.add_rope_dimension_count(cfg.global_head_dim)
    w.add_rope_dimension_count_swa(int(cfg.head_dim * cfg.partial_rotary_factor))
    w.add_shared_kv_layers(cfg.kv_shared_layers)
    w.add_embedding_length_per_layer_input(cfg.per_layer_input_dim)
    if cfg.logit_softcap is not None:
        w.add_final_logit_softcapping(cfg.logit_softcap)
    if cfg.n_expert:
        w.add_expert_count(cfg.n_expert)
        w.add_expert_used_count(cfg.n_expert_active)
        w.add_expert_feed_forward_length(cfg.expert_hidden)


# RoPE layout ----------------------------------------------------------------------------------
def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of W_q or W_k (or their bias), (n_heads * head_dim, ...) -> the same shape with each
    head's rows reordered from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i + 1).

    Within a head, new row 2i is old row i and new row 2i + 1 is old row i + d/2, so llama.cpp's
    "normal" RoPE, rotating (2i, 2i + 1) by angle i, rotates the same two numbers we rotate."""
    d = w.shape[0] // n_heads
    return (w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape))


def rope_freq_factors(cfg: ModelConfig) -> torch.Tensor:
    """(head_dim // 2,) float32: how much llama3 scaling divides each RoPE frequency by.

    llama.cpp computes angle_i = pos * theta^(-2i/d) / factor_i from the `rope_freqs` tensor;
    ours is pos * inv_freq_i, so factor_i = unscaled inv_freq_i / scaled inv_freq_i."""
    plain = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None).double()
    scaled = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).double()
    return (plain / scaled).float()


# Tensors --------------------------------------------------------------------------------------
def gguf_tensors(model: torch.nn.Module, family: str, arch: str | None = None) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 tensor (numpy layout (out, in) for 2-D weights), in file order.
    `arch`: the llama.cpp architecture, where more than one runs the family."""
    if family in HYBRID_FAMILIES:
        return _hybrid_tensors(model, family, arch or HYBRID_ARCHS[family][0])
    if family == "deepseek_v3":
        return _mla_tensors(model)
    if family == "gemma4_text":
        return _gemma4_tensors(model)
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, list[torch.Tensor]] = {}  # GGUF name -> each expert's tensor, in order
    if family == "llama" and cfg.rope_scaling and \
            cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) == "llama3":
        out["rope_freqs.weight"] = rope_freq_factors(cfg)
    for e in name_map(cfg, family, set(sd)):
        t = sd[e.ours]
        parts = t.split(row_splits(cfg, len(e.theirs), len(t)), dim=0) if len(e.theirs) > 1 else [t]
        for hf_name, part in zip(e.theirs, parts):
            if family in NORMAL_ROPE and ".self_attn.q_proj." in hf_name:
                part = permute_rope(part, cfg.n_head)
            elif family in NORMAL_ROPE and ".self_attn.k_proj." in hf_name:
                part = permute_rope(part, cfg.n_kv_head)
            elif family in UNIT_OFFSET_NORMS and hf_name.endswith("norm.weight"):
                part = part + 1.0  # Gemma's norms scale by (1 + w); llama.cpp's by the weight
            elif family == "lfm2" and hf_name.endswith(".conv.conv.weight"):
                part = part.squeeze(1)  # (C, 1, kernel) -> (C, kernel): llama.cpp's ssm_conv wants 2-D
            name = gguf_name(hf_name, family)
            if "_exps." in name:
                experts.setdefault(name, []).append(part)
            else:  # Qwen2-MoE's shared-expert gate (1, C): llama.cpp reads a vector
                out[name] = (part.reshape(-1) if "_gate_inp_shexp." in name else part).contiguous()
    # (n_expert, out, in) weights and (n_expert, out) biases: GGUF ne [in, out, n_expert]
    out.update({name: torch.stack(parts) for name, parts in experts.items()})
    if family in NEEDS_OUTPUT and "output.weight" not in out:  # a tied head, written twice
        out["output.weight"] = out["token_embd.weight"]
    if family == "mistral":  # granite_swa reads a sink logit per head in every layer
        out.update({f"blk.{i}.attn_sinks.weight": torch.full((cfg.n_head,), NO_SINK)
                    for i in range(cfg.n_layer)})
    return out


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """GGUF Q8_0 packing of float32 (rows, cols) with cols % 32 == 0 -> uint8 (rows, cols/32*34).

    Each block of 32 consecutive values of a row becomes 34 bytes: the scale d = max|x| / 127 as
    float16, then 32 int8 q = round(x / d) (half away from zero, as C's roundf in ggml's
    reference quantize_row_q8_0; x * (1/d) exactly as it computes it, so the bytes match)."""
    rows, cols = x.shape
    if cols % 32:
        raise ValueError(f"Q8_0 needs rows of a multiple of 32 values, got {cols}")
    blocks = x.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    v = blocks * inv
    q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)
    packed = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return packed.reshape(rows, cols // 32 * 34)


def dequantize_q8_0(packed: np.ndarray) -> np.ndarray:
    """The inverse of `quantize_q8_0`: uint8 (rows, n*34) -> float32 (rows, n*32)."""
    rows = packed.shape[0]
    blocks = packed.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(rows, -1)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """GGUF Q4_0 packing of float32 (rows, cols) with cols % 32 == 0 -> uint8 (rows, cols/32*18).

    ggml's quantize_row_q4_0_ref: each block of 32 values becomes 18 bytes, the scale
    d = m / -8 (m the value of largest magnitude, the first such, sign kept) as float16, then 16
    bytes of 4-bit codes q = min(15, trunc(x / d + 8.5)): byte j holds value j in its low nibble
    and value j + 16 in its high one (not neighbours). x * (1/d) in float32, as ggml computes it.
    The value is (q - 8) * d, the rule `bardlm.infer.int4` quantizes by (with a bf16 d)."""
    rows, cols = x.shape
    if cols % 32:
        raise ValueError(f"Q4_0 needs rows of a multiple of 32 values, got {cols}")
    blocks = x.astype(np.float32).reshape(-1, 32)
    m = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
    d = m / np.float32(-8)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(15, np.trunc(blocks * inv + np.float32(8.5))).astype(np.uint8)
    nibbles = q[:, :16] | (q[:, 16:] << 4)
    packed = np.concatenate([d.astype(np.float16).view(np.uint8), nibbles], axis=1)
    return packed.reshape(rows, cols // 32 * 18)


def dequantize_q4_0(packed: np.ndarray) -> np.ndarray:
    """The inverse of `quantize_q4_0`: uint8 (rows, n*18) -> float32 (rows, n*32)."""
    rows = packed.shape[0]
    blocks = packed.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = np.concatenate([blocks[:, 2:] & 15, blocks[:, 2:] >> 4], axis=1).astype(np.float32)
    return (d * (q - 8)).reshape(rows, -1)


def _storage_type(name: str, t: torch.Tensor, qtype: str) -> str:
    """"f32", "f16", "q8_0" or "q4_0" for one tensor of a file of type `qtype`."""
    if qtype == "f32" or t.ndim < 2 or name.startswith(("position_embd", "rope_freqs")) \
            or not name.endswith(".weight") or ".ffn_gate_inp." in name \
            or name.endswith(("shortconv.conv.weight", "ssm_conv1d.weight")):
        # llama.cpp reads 1-D tensors (and its conv ops' weights) as f32 only; positions and
        # biases (the experts' are 2-D) are added as is; routers stay f32, as llama.cpp's
        # converter keeps them
        return "f32"
    if qtype in ("q8_0", "q4_0") and t.shape[-1] % 32 == 0:
        return qtype
    return "f16"  # what llama.cpp's converter falls back to when a row does not split into blocks


# Tokenizer ------------------------------------------------------------------------------------
# Pre-tokenizer split regexes llama.cpp knows by name (tokenizer.ggml.pre). bardlm's `bpe` and
# GPT-2 use the GPT-2 regex inside the ByteLevel pre-tokenizer.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {PRETOKENIZE_PATTERN: "gpt-2", _LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
# Special tokens that end (or begin) a text, by the names the common tokenizers give them.
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "</s>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|endoftext|>")
# llama.cpp token types (gguf.TokenType): normal, control (special), user-defined, unused.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _pre_tokenizer_name(tok: dict[str, Any]) -> str:
    """llama.cpp's name for this tokenizer.json's pre-tokenization, or a one-line error."""
    pre = tok.get("pre_tokenizer") or {}
    if tok.get("normalizer") not in (None, {"type": "NFC"}):  # Qwen's NFC changes no usual text
        raise BardlmError(f"GGUF export: tokenizer normalizer {tok['normalizer'].get('type')!r} "
                          "has no llama.cpp equivalent")
    regex = None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        regex = PRETOKENIZE_PATTERN
    elif pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if len(steps) == 2 and steps[0].get("type") == "Split" and \
                steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True):
            regex = steps[0].get("pattern", {}).get("Regex")
    if regex not in PRE_TOKENIZERS or pre.get("add_prefix_space"):
        raise BardlmError("GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp names "
                          f"({', '.join(sorted(set(PRE_TOKENIZERS.values())))}); "
                          "train the model with --tokenizer bpe:N")
    return PRE_TOKENIZERS[regex]


def tokenizer_metadata(tokenizer: Any, cfg: ModelConfig, meta: ModelMeta | None = None) -> dict[str, Any]:
    """llama.cpp's "gpt2" (byte-level BPE) tokenizer fields for a bardlm tokenizer.

    Returns {"pre", "tokens", "types", "merges", "bos", "eos", "eot", "pad", "add_bos",
    "chat_template"}: tokens are byte-symbol strings (GPT-2's printable stand-ins for bytes),
    padded with unused "[PADi]" tokens up to the model's vocab_size as llama.cpp's converter pads
    them; merges are "a b" strings in rank order. `meta` gives the special ids and the chat
    template (default: the BOS/EOS the tokenizer knows)."""
    if tokenizer is None:
        raise BardlmError("GGUF export needs the model's tokenizer; this directory has none")
    if tokenizer.kind not in ("bpe", "hf"):
        raise BardlmError(
            f"GGUF export: llama.cpp has no {tokenizer.kind!r} tokenizer; it reads byte-level "
            "BPE. Train with --tokenizer bpe:N (e.g. bpe:4096) to export to GGUF")
    tok = tokenizer.to_dict()
    tok = tok["tokenizer"] if tokenizer.kind == "bpe" else tok
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise BardlmError("GGUF export: only byte-level BPE tokenizers are supported "
                          f"(this one is {model.get('type')!r}, e.g. sentencepiece)")
    pre = _pre_tokenizer_name(tok)
    by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model["vocab"].items()}
    for a in tok.get("added_tokens") or []:
        by_id[a["id"]] = (a["content"], CONTROL if a.get("special") else USER_DEFINED)
    n = max(by_id) + 1
    if sorted(by_id) != list(range(n)) or n > cfg.vocab_size:
        raise BardlmError(f"GGUF export: the tokenizer's ids are not 0..{cfg.vocab_size - 1} "
                          f"(it has {len(by_id)} tokens, highest id {n - 1})")
    tokens = [by_id[i][0] for i in range(n)] + [f"[PAD{i}]" for i in range(n, cfg.vocab_size)]
    types = [by_id[i][1] for i in range(n)] + [UNUSED] * (cfg.vocab_size - n)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    meta = meta if meta is not None else ModelMeta.from_tokenizer(tokenizer)
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges,
            "chat_template": meta.chat_template.source if meta.chat_template else None,
            **_special_ids(cfg, meta, tokenizer, tokens, types)}


def _special_ids(cfg: ModelConfig, meta: ModelMeta, tokenizer: Any, tokens: list[str],
                 types: list[int]) -> dict[str, Any]:
    """{"bos", "eos", "eot", "pad", "add_bos"}: the model's own metadata (`meta`), else the HF
    config's ids, else special tokens by name, else a byte that never occurs.

    llama.cpp always has an EOS and stops generating at it; left unset it defaults to id 11,
    which in a bardlm BPE vocabulary is ",". A tokenizer without special tokens (bardlm's `bpe`)
    gets the byte 0xFF instead: it never occurs in UTF-8 text, so the model never learnt to emit
    it and generation stops only at the length limit, exactly as `bardlm generate` does."""
    stops = list(meta.stop_ids(tokenizer))
    hf = cfg.extra.get("hf", {})
    ids = {"bos": meta.bos_id if meta.bos_id is not None else hf.get("bos_token_id"),
           "eos": stops[0] if stops else hf.get("eos_token_id"),
           "pad": meta.pad_id if meta.pad_id is not None else hf.get("pad_token_id")}
    ids = {k: v[0] if isinstance(v, list) else v for k, v in ids.items()}
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL}
    for key, names in (("eos", EOS_NAMES), ("bos", BOS_NAMES)):
        if ids[key] is None:
            ids[key] = next((special[n] for n in names if n in special), None)
    never = tokens.index(bytes_to_unicode()[0xFF]) if bytes_to_unicode()[0xFF] in tokens else 0
    eos = ids["eos"] if ids["eos"] is not None else never
    bos = ids["bos"] if ids["bos"] is not None else eos
    # A second end id (Llama 3 instruct's <|eot_id|>, a chat template's end of turn) is
    # llama.cpp's end-of-turn token.
    eot = stops[1] if len(stops) > 1 else None
    return {"bos": int(bos), "eos": int(eos), "eot": eot, "pad": ids["pad"], "add_bos": meta.add_bos}


# Writing --------------------------------------------------------------------------------------
def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise BardlmError("GGUF export needs the gguf package: pip install 'bardlm[gguf]'") from None
    return gguf


def gguf_arch(family: str, arch: str | None = None) -> str:
    """llama.cpp's architecture name for `family` (`arch` picks one where several run it)."""
    archs = HYBRID_ARCHS.get(family, (GGUF_ARCH.get(family, family),))
    if arch is not None and arch not in archs:
        raise BardlmError(f"llama.cpp runs this model as {' or '.join(archs)}, not {arch!r}")
    return arch or archs[0]


def write_gguf(model: torch.nn.Module, tokenizer: Any, out: str | Path, qtype: str = "f16",
               name: str = "bardlm", meta: ModelMeta | None = None,
               arch: str | None = None) -> dict[str, Any]:
    """Write `model` (+ its byte-level BPE tokenizer and `meta`: special ids, chat template) to
    the GGUF file `out`, all or nothing. `arch`: the llama.cpp architecture where more than one
    runs the model (a MoE hybrid: "qwen3next", the default, or "qwen35moe"; "qwen35moe" first
    for a model imported from Qwen3.5-MoE).

    Returns a summary: architecture, type, tensor count and bytes."""
    if qtype not in TYPES:
        raise BardlmError(f"--type must be one of {', '.join(TYPES)}, got {qtype!r}")
    if Path(out).suffix != GGUF_SUFFIX:
        raise BardlmError(f"--out should name a {GGUF_SUFFIX} file, got {out}")
    if getattr(model, "quantization", None):
        raise BardlmError("this model holds bardlm quantized weights; export the float checkpoint "
                          "saved before `bardlm quantize` (GGUF has its own q8_0 and q4_0)")
    gguf = _gguf()
    cfg = model.config
    family = check_exportable(cfg)
    arch = gguf_arch(family, arch)
    vocab = tokenizer_metadata(tokenizer, cfg, meta)
    tensors = gguf_tensors(model, family, arch)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype]
    out = Path(out)

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)  # the arch string is also the metadata key prefix
        w.add_name(name)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        # llama.cpp's llama (Mixtral) and olmoe read the experts' width from feed_forward_length;
        # Gemma 4's double-wide MLPs differ per layer
        w.add_feed_forward_length(cfg.expert_hidden if family in ("mixtral", "olmoe") else
                                  [cfg.layer_ffn_hidden(i) for i in range(cfg.n_layer)]
                                  if cfg.double_wide_mlp else cfg.ffn_hidden)
        w.add_head_count(cfg.n_head)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(file_type)
        if qtype in ("q8_0", "q4_0"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if family == "gpt2":
            w.add_layer_norm_eps(cfg.norm_eps)
        elif family == "deepseek_v3":
            _mla_metadata(w, cfg, gguf)
        elif family == "gemma4_text":
            _gemma4_metadata(w, cfg)
        else:
            w.add_head_count_kv(_head_count_kv(cfg, family))
            w.add_layer_norm_rms_eps(cfg.norm_eps)
            w.add_rope_freq_base(cfg.rope_theta)
            w.add_rope_dimension_count(int(cfg.head_dim * cfg.partial_rotary_factor))
            if cfg.head_dim * cfg.n_head != cfg.n_embd or family in ("gemma3_text", "gemma2"):  # decoupled head size
                w.add_key_length(cfg.head_dim)
                w.add_value_length(cfg.head_dim)
            if family in HYBRID_FAMILIES:
                _hybrid_metadata(w, cfg, arch)
            if family in SWA_EVERY:
                w.add_sliding_window(cfg.sliding_window or cfg.block_size)
            if family == "lfm2":  # the short convolutions' kernel
                w.add_shortconv_l_cache(cfg.linear_conv_kernel)
            if family == "gemma3_text":  # llama.cpp scales the embeddings by sqrt(n_embd) itself
                w.add_float32(f"{arch}.rope.freq_base_swa", cfg.rope_local_theta or cfg.rope_theta)
            _write_family_metadata(w, cfg, family)
            scaling = cfg.rope_scaling or {}
            if scaling.get("rope_type", scaling.get("type")) == "linear":
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(float(scaling["factor"]))
            elif scaling.get("rope_type", scaling.get("type")) == "yarn":
                w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
                w.add_rope_scaling_factor(float(scaling["factor"]))
                w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
                w.add_rope_scaling_yarn_beta_fast(float(scaling.get("beta_fast") or 32))
                w.add_rope_scaling_yarn_beta_slow(float(scaling.get("beta_slow") or 1))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        w.add_bos_token_id(vocab["bos"])
        w.add_eos_token_id(vocab["eos"])
        if vocab["eot"] is not None:
            w.add_eot_token_id(vocab["eot"])
        if vocab["pad"] is not None:
            w.add_pad_token_id(vocab["pad"])
        if vocab["chat_template"] is not None:
            w.add_chat_template(vocab["chat_template"])
        # Said explicitly: llama.cpp's default for a BPE vocabulary differs between versions.
        w.add_add_bos_token(vocab["add_bos"])
        w.add_add_eos_token(False)
        for tname, t in tensors.items():
            kind = _storage_type(tname, t, qtype)
            x = t.numpy()
            if kind in ("q8_0", "q4_0"):  # rows of the last dimension (each expert's too)
                quantize = quantize_q8_0 if kind == "q8_0" else quantize_q4_0
                packed = quantize(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
                w.add_tensor(tname, packed, raw_dtype=gguf.GGMLQuantizationType[kind.upper()])
            else:
                w.add_tensor(tname, x.astype(np.float16 if kind == "f16" else np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write_many([(out, write)])
    return {"out": str(out), "format": "gguf", "architecture": arch, "type": qtype,
            "tensors": len(tensors), "bytes": out.stat().st_size,
            "tokenizer_pre": vocab["pre"], "vocab": len(vocab["tokens"])}


def _head_count_kv(cfg: ModelConfig, family: str) -> int | list[int]:
    """KV heads: one number, or for LFM2 one per layer, 0 in a conv layer (how llama.cpp tells
    the layer kinds apart)."""
    if family == "lfm2":
        return [0 if kind == "conv" else cfg.n_kv_head for kind in cfg.attn_layers]
    return cfg.n_kv_head
def _write_family_metadata(w: Any, cfg: ModelConfig, family: str) -> None:
    """The keys of Gemma 2 (its two soft-caps), of Mistral as granite_swa (every layer windowed,
    Granite's logit scale 1: its other scales are off when absent) and of the mixtures of
    experts (expert counts and widths; Qwen2-MoE's shared expert) that `write_gguf` does not
    write for every family."""
    if family == "mistral":
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern([True] * cfg.n_layer)
        w.add_logit_scale(1.0)
    if family == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_softcap)
        w.add_final_logit_softcapping(cfg.logit_softcap)
    if family in MOE_FAMILIES:
        w.add_expert_count(cfg.n_expert)
        w.add_expert_used_count(cfg.n_expert_active)
        if family in ("qwen3_moe", "qwen2_moe", "gpt_oss"):
            w.add_expert_feed_forward_length(cfg.expert_hidden)
        if family == "qwen2_moe":
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_hidden)


def export_gguf(ckpt: str | Path, out: str | Path, qtype: str = "f16",
                overwrite: bool = False) -> dict[str, Any]:
    """Any model directory `bardlm.load` reads -> one GGUF file (the `bardlm export` command)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise BardlmError(f"{out} exists; pass --overwrite to replace it")
    if kind_of(ckpt) in ("int8", "int4"):
        raise BardlmError(f"{ckpt} holds bardlm {kind_of(ckpt)} weights; export the float checkpoint "
                          "saved before `bardlm quantize` (use --type q8_0 or q4_0 for a quantized GGUF)")
    model, tokenizer = load(ckpt)
    check_exportable(model.config)  # shape errors before tokenizer errors
    return write_gguf(model, tokenizer, out, qtype, name=Path(ckpt).resolve().name,
                      meta=read_meta(ckpt, tokenizer))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """GGUF metadata as plain Python values (for tests and `bardlm info`-style checks)."""
    reader = _gguf().GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}


__all__ = ["TYPES", "check_exportable", "export_gguf", "gguf_name", "permute_rope",
           "quantize_q8_0", "dequantize_q8_0", "quantize_q4_0", "dequantize_q4_0", "read_metadata",
           "write_gguf"]
