"""The Hugging Face bridge: load `transformers` checkpoints into `GPT` and write them back.

The families: `GPT2LMHeadModel`, `LlamaForCausalLM`, `Qwen2ForCausalLM` (Qwen2 and 2.5),
`Qwen3ForCausalLM`, `Olmo2ForCausalLM`, `Phi3ForCausalLM`, the mixtures of experts
`Qwen3MoeForCausalLM`, `Qwen2MoeForCausalLM`, `MixtralForCausalLM` and `OlmoeForCausalLM`,
the sliding-window families `MistralForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM`
(text), `Gemma4ForCausalLM` (text: per-layer inputs, KV sharing, K = V, its MoE block),
`SmolLM3ForCausalLM` (with NoPE layers), `GptOssForCausalLM` (both: experts, sinks, alternating
windows), `DeepseekV3ForCausalLM` (latent attention, group-limited sigmoid routing), and the
linear-attention hybrids `Qwen3_5ForCausalLM` (Qwen3.5 text, dense) and `Qwen3NextForCausalLM` (a
MoE with a shared expert): three gated delta rule layers to one gated, partially rotary attention
layer, and `Lfm2ForCausalLM` (LFM2: gated short-convolution layers between GQA layers with
QK-norm) with its mixture of experts `Lfm2MoeForCausalLM`. The bridge
is two tables and two config translators:

* NAME TABLES map each of our tensors to the HF tensors it is made of. Our attention projection
  `c_attn` is fused (rows [q | k | v]) and SwiGLU's `c_fc` is fused (rows [gate | up]), so one of
  our tensors may be several HF tensors concatenated along dim 0. GPT-2's HF `Conv1D` stores
  weights as (in, out), the transpose of `nn.Linear`, so those entries are marked `transpose`.
  Phi-3 fuses the same way (qkv_proj, gate_up_proj), so its fused tensors map one to one.
  A MoE layer's experts are numbered ("{e}"): the files hold one gate/up/down per expert (the
  Hub layout, which transformers 5 also writes), so they map one to one onto our experts.
  gpt-oss is the exception: its files stack each layer's experts into one tensor per kind,
  transposed, gate and up interleaved; `_unstack_experts` / `_stack_experts` turn that into the
  per-expert names (and back) around the same table.
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
                 "gemma4_text": "Gemma4ForCausalLM",
                 "smollm3": "SmolLM3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "olmo2": "Olmo2ForCausalLM", "phi3": "Phi3ForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "gpt_oss": "GptOssForCausalLM", "olmo3": "Olmo3ForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM",
                 "qwen3_5_text": "Qwen3_5ForCausalLM", "qwen3_next": "Qwen3NextForCausalLM",
                 "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
                 "lfm2": "Lfm2ForCausalLM", "lfm2_moe": "Lfm2MoeForCausalLM"}
GEMMA_FAMILIES = ("gemma2", "gemma3_text", "gemma4_text")
# Families whose attention may be sliding-window (per layer); the others refuse windows.
WINDOW_FAMILIES = ("mistral", "smollm3", "gpt_oss", "olmo3", *GEMMA_FAMILIES)
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss", "lfm2_moe")
# Linear-attention hybrids: gated delta rule layers and gated attention layers (nn/deltanet.py).
HYBRID_FAMILIES = ("qwen3_5_text", "qwen3_next", "qwen3_5_moe_text")
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
    # A HF tensor holding every expert along dim 0 (Gemma 4's experts.gate_up_proj): ours is
    # row `index` of it (set by `name_map`).
    stacked: bool = False
    index: int | None = None
    splits: tuple[int, ...] | None = None  # rows of each HF part (set by `name_map`); None: halves
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


def _gpt_oss_table() -> list[Entry]:
    """Llama's attention and norm names (q/k/v/o with biases), a sink logit per head, a router
    with a bias, and experts with biases under the per-expert names `_unstack_experts` makes."""
    h, t = "transformer.h.{i}.", "model.layers.{i}."
    x = t + "mlp.experts.{e}."
    experts = [Entry(h + "attn.sinks", (t + "self_attn.sinks",)),
               Entry(h + "mlp.router.bias", (t + "mlp.router.bias",))]
    for p in ("weight", "bias"):
        experts += [Entry(h + f"mlp.experts.{{e}}.c_fc.{p}", (x + f"gate_proj.{p}", x + f"up_proj.{p}")),
                    Entry(h + f"mlp.experts.{{e}}.c_proj.{p}", (x + f"down_proj.{p}",))]
    moe = _moe_table("mlp", "router", "gate_proj", "up_proj", "down_proj")
    return [e for e in moe if ".experts." not in e.ours] + experts


def _unstack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gpt-oss's stacked experts -> one tensor per expert, in nn.Linear's (out, in) layout.

    Per layer the files hold gate_up_proj (E, C, 2F) with gate in the even columns and up in
    the odd ones, gate_up_proj_bias (E, 2F), down_proj (E, F, C) and down_proj_bias (E, C);
    they become experts.{e}.{gate,up}_proj.{weight (F, C), bias (F,)} and
    experts.{e}.down_proj.{weight (C, F), bias (C,)}."""
    out = {}
    for name, t in tensors.items():
        head, sep, kind = name.rpartition(".experts.")
        if not sep or kind not in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
            out[name] = t
            continue
        for e, te in enumerate(t):
            x = f"{head}.experts.{e}."
            if kind == "gate_up_proj":
                out[x + "gate_proj.weight"], out[x + "up_proj.weight"] = te[:, 0::2].t(), te[:, 1::2].t()
            elif kind == "gate_up_proj_bias":
                out[x + "gate_proj.bias"], out[x + "up_proj.bias"] = te[0::2], te[1::2]
            elif kind == "down_proj":
                out[x + "down_proj.weight"] = te.t()
            else:
                out[x + "down_proj.bias"] = te
    return out


def _unstack_qwen_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen3.5-MoE's experts as transformers holds them in memory (a checkpoint may store them
    so: experts.gate_up_proj (E, 2F, C), rows [gate | up], and experts.down_proj (E, C, F)) ->
    the numbered experts.{e}.{gate,up,down}_proj.weight that save_pretrained writes."""
    out = {}
    for name, t in tensors.items():
        head, sep, kind = name.rpartition(".experts.")
        if not sep or kind not in ("gate_up_proj", "down_proj"):
            out[name] = t
            continue
        for e, te in enumerate(t):
            x = f"{head}.experts.{e}."
            if kind == "gate_up_proj":
                out[x + "gate_proj.weight"], out[x + "up_proj.weight"] = te.chunk(2, dim=0)
            else:
                out[x + "down_proj.weight"] = te
    return out


def _stack_experts(tensors: dict[str, torch.Tensor], n_expert: int) -> dict[str, torch.Tensor]:
    """The inverse of `_unstack_experts`: per-expert tensors -> gpt-oss's stacked layout."""
    out = {k: v for k, v in tensors.items() if ".experts." not in k}
    heads = sorted({k.partition(".experts.")[0] for k in tensors if ".experts." in k})
    for head in heads:
        def each(proj: str, p: str, head: str = head) -> torch.Tensor:  # (E, ...): every expert's
            return torch.stack([tensors[f"{head}.experts.{e}.{proj}.{p}"] for e in range(n_expert)])
        # (E, F, C) gate and up -> (E, C, F, 2) -> (E, C, 2F): column 2j is gate j, 2j + 1 up j
        gate_up = torch.stack([each("gate_proj", "weight"), each("up_proj", "weight")], dim=-1)
        out[f"{head}.experts.gate_up_proj"] = gate_up.transpose(1, 2).reshape(n_expert, -1, 2 * gate_up.shape[1]).contiguous()
        out[f"{head}.experts.gate_up_proj_bias"] = torch.stack(
            [each("gate_proj", "bias"), each("up_proj", "bias")], dim=-1).reshape(n_expert, -1).contiguous()
        out[f"{head}.experts.down_proj"] = each("down_proj", "weight").transpose(1, 2).contiguous()
        out[f"{head}.experts.down_proj_bias"] = each("down_proj", "bias")
    return out


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


def _shared_expert_table(module: str) -> list[Entry]:
    """A shared expert's SwiGLU (`module` its HF name under mlp.: shared_expert, shared_experts)."""
    h, t = "transformer.h.{i}.mlp.shared.", f"model.layers.{{i}}.mlp.{module}."
    return [Entry(h + "c_fc.weight", (t + "gate_proj.weight", t + "up_proj.weight")),
            Entry(h + "c_proj.weight", (t + "down_proj.weight",))]


def _deepseek_v3_table() -> list[Entry]:
    """DeepSeek-V3: latent attention (nn/mla.py, HF's names but our norms' and output's), dense
    first layers under Llama's MLP names, then MoE layers whose router keeps its correction bias
    beside its weight and whose shared experts are one SwiGLU."""
    h, t = "transformer.h.{i}.attn.", "model.layers.{i}.self_attn."
    attn = [Entry(h + ours, (t + theirs,)) for ours, theirs in (
        ("q_proj.weight", "q_proj.weight"), ("q_a_norm.weight", "q_a_layernorm.weight"),
        ("q_b_proj.weight", "q_b_proj.weight"), ("kv_a_norm.weight", "kv_a_layernorm.weight"),
        ("kv_b_proj.weight", "kv_b_proj.weight"),
        *((f"{ours}.{p}", f"{theirs}.{p}") for p in ("weight", "bias") for ours, theirs in (
            ("q_a_proj", "q_a_proj"), ("kv_a_proj", "kv_a_proj_with_mqa"), ("c_proj", "o_proj"))))]
    correction_bias = Entry("transformer.h.{i}.mlp.correction_bias",
                            ("model.layers.{i}.mlp.gate.e_score_correction_bias",))
    return (_moe_table("mlp", "gate", "gate_proj", "up_proj", "down_proj") + attn + [correction_bias]
            + _shared_expert_table("shared_experts"))


def _gemma4_table() -> list[Entry]:
    """Gemma 4 (text): Gemma 3's names (a KV-shared layer has only q_proj, a K = V layer no
    v_proj: `name_map` keeps the parts a layer has), plus the per-layer inputs, the layer scalar
    and the MoE block beside the MLP: its norms, router (proj, scale, per_expert_scale) and the
    experts stacked in two 3-D tensors (gate_up_proj rows [gate | up], down_proj)."""
    h, t = "transformer.h.{i}.", "model.layers.{i}."
    pairs = [("ple_gate.weight", "per_layer_input_gate.weight"),
             ("ple_proj.weight", "per_layer_projection.weight"),
             ("ln_ple.weight", "post_per_layer_input_norm.weight"),
             ("layer_scalar", "layer_scalar"),
             ("ln_mlp_post.weight", "post_feedforward_layernorm_1.weight"),
             ("ln_moe.weight", "pre_feedforward_layernorm_2.weight"),
             ("ln_moe_post.weight", "post_feedforward_layernorm_2.weight"),
             ("moe.router.weight", "router.proj.weight"),
             ("moe.router_scale", "router.scale"),
             ("moe.expert_scale", "router.per_expert_scale")]
    layer = [Entry(h + ours, (t + theirs,)) for ours, theirs in pairs] + [
        Entry(h + "moe.experts.{e}.c_fc.weight", (t + "experts.gate_up_proj",), stacked=True),
        Entry(h + "moe.experts.{e}.c_proj.weight", (t + "experts.down_proj",), stacked=True)]
    top = [Entry("transformer.wte_layer.weight", ("model.embed_tokens_per_layer.weight",)),
           Entry("transformer.ple_proj.weight", ("model.per_layer_model_projection.weight",)),
           Entry("transformer.ln_ple.weight", ("model.per_layer_projection_norm.weight",))]
    return _gemma_table() + top + layer


def _hybrid_table(family: str) -> list[Entry]:
    """Qwen3.5 (text), Qwen3-Next and Qwen3.5-MoE: Llama's names ((1 + w) norms store w, as we
    do) with the attention entries on "global" layers only, c_attn gated (q_proj holds each
    head's query then gate rows), and a linear layer's `linear_attn` tensors (Qwen3-Next's
    in_proj fused per key head, Qwen3.5's four in_proj apart); the MoE ones (Qwen3-Next,
    Qwen3.5-MoE) add Qwen2-MoE's numbered experts (what transformers writes; Qwen3.5-MoE's
    stacked experts are unstacked on reading, `_normalise_hf_names`), router and gated shared
    expert."""
    h, t = "transformer.h.{i}.", "model.layers.{i}."
    attn, lin = ("global",), ("linear",)
    out = []
    for e in (_moe_table("mlp", "gate", "gate_proj", "up_proj", "down_proj") + _SHARED_EXPERT
              if family != "qwen3_5_text" else _llama_table()):
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


def _lfm2_table() -> list[Entry]:
    """LFM2: Llama's embedding and head; operator_norm / ffn_norm around each block's mixer
    and MLP (feed_forward.w1 gate, w3 up, w2 down); attention layers' q/k/v_proj, out_proj and
    per-head q/k_layernorm; conv layers' in_proj (rows [B | C | x]), depthwise conv and
    out_proj. The final norm is called embedding_norm (it acts after the last layer)."""
    h, t = "transformer.h.{i}.", "model.layers.{i}."
    attn, conv = ("global",), ("conv",)
    return [
        Entry("transformer.wte.weight", ("model.embed_tokens.weight",)),
        Entry("transformer.ln_f.weight", ("model.embedding_norm.weight",)),
        Entry("lm_head.weight", ("lm_head.weight",)),
        Entry(h + "ln_1.weight", (t + "operator_norm.weight",)),
        Entry(h + "ln_2.weight", (t + "ffn_norm.weight",)),
        Entry(h + "mlp.c_fc.weight", (t + "feed_forward.w1.weight", t + "feed_forward.w3.weight")),
        Entry(h + "mlp.c_proj.weight", (t + "feed_forward.w2.weight",)),
        Entry(h + "attn.c_attn.weight", tuple(t + f"self_attn.{x}_proj.weight" for x in "qkv"), kinds=attn),
        Entry(h + "attn.c_proj.weight", (t + "self_attn.out_proj.weight",), kinds=attn),
        Entry(h + "attn.q_norm.weight", (t + "self_attn.q_layernorm.weight",), kinds=attn),
        Entry(h + "attn.k_norm.weight", (t + "self_attn.k_layernorm.weight",), kinds=attn),
        Entry(h + "attn.c_in.weight", (t + "conv.in_proj.weight",), kinds=conv),
        Entry(h + "attn.conv_weight", (t + "conv.conv.weight",), kinds=conv),
        Entry(h + "attn.c_proj.weight", (t + "conv.out_proj.weight",), kinds=conv),
    ]


def _lfm2_moe_table() -> list[Entry]:
    """LFM2-MoE: LFM2's names (the first num_dense_layers keep the dense MLP), then MoE layers:
    the router `feed_forward.gate`, its correction bias `expert_bias`, and numbered experts with
    the dense MLP's names (w1 gate, w3 up, w2 down: the Hub layout transformers 5 writes)."""
    h, t = "transformer.h.{i}.mlp.", "model.layers.{i}.feed_forward."
    return _lfm2_table() + [
        Entry(h + "router.weight", (t + "gate.weight",)),
        Entry(h + "correction_bias", (t + "expert_bias",)),
        Entry(h + "experts.{e}.c_fc.weight", (t + "experts.{e}.w1.weight", t + "experts.{e}.w3.weight")),
        Entry(h + "experts.{e}.c_proj.weight", (t + "experts.{e}.w2.weight",)),
    ]


# Qwen2-MoE's (and Qwen3-Next's) shared expert, gated by sigmoid(g . x).
_SHARED_EXPERT = _shared_expert_table("shared_expert") + [
    Entry("transformer.h.{i}.mlp.shared_gate.weight", ("model.layers.{i}.mlp.shared_expert_gate.weight",))]

TABLES = {"gpt2": _gpt2_table(), "llama": _llama_table(), "qwen3": _llama_table(),
          "mistral": _llama_table(), "smollm3": _llama_table(),
          "gemma2": _gemma_table(), "gemma3_text": _gemma_table(), "gemma4_text": _gemma4_table(),
          "qwen3_moe": _moe_table("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
          "qwen2_moe": _moe_table("mlp", "gate", "gate_proj", "up_proj", "down_proj") + _SHARED_EXPERT,
          "mixtral": _moe_table("block_sparse_moe", "gate", "w1", "w3", "w2"),
          "qwen2": _llama_table(), "olmo2": _olmo2_table(), "phi3": _phi3_table(),
          "olmoe": _moe_table("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
          "gpt_oss": _gpt_oss_table(), "olmo3": _olmo2_table(), "deepseek_v3": _deepseek_v3_table(),
          "qwen3_5_text": _hybrid_table("qwen3_5_text"), "qwen3_next": _hybrid_table("qwen3_next"),
          "qwen3_5_moe_text": _hybrid_table("qwen3_5_moe_text"),
          "lfm2": _lfm2_table(), "lfm2_moe": _lfm2_moe_table()}


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
                theirs, splits = tuple(n.format(i=i, e=x) for n in e.theirs), None
                if ".attn.c_attn." in name and e.layout is None:  # fewer parts in a Gemma 4 layer
                    splits = _qkv_rows(cfg, i)
                    theirs = theirs[: len(splits)]
                out.append(Entry(name, theirs, e.transpose, e.stacked, x if e.stacked else None,
                                 splits, e.layout))
    return out


def _qkv_rows(cfg: ModelConfig, layer: int) -> tuple[int, ...]:
    """Rows of layer `layer`'s fused c_attn: (q, k, v); (q, k) when its values are its keys
    (Gemma 4's K = V); (q,) when it reads another layer's keys and values (KV sharing)."""
    q = cfg.n_head * cfg.layer_head_dim(layer)
    kv = cfg.layer_kv_heads(layer) * cfg.layer_head_dim(layer)
    if cfg.kv_source(layer) != layer:
        return (q,)
    if cfg.attn_k_eq_v and cfg.attn_layers[layer] == "global":
        return (q, kv)
    return (q, kv, kv)


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
    splits = e.splits or row_splits(cfg, len(e.theirs), len(t))
    return list(t.split(list(splits), dim=0)) if len(e.theirs) > 1 else [t]


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
# Gemma4TextConfig's defaults; its RoPE defaults are `GEMMA4_ROPE`.
GEMMA4_DEFAULTS = dict(vocab_size=262144, hidden_size=2304, intermediate_size=9216,
                       num_hidden_layers=30, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=256, global_head_dim=512, num_global_key_value_heads=None,
                       hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
                       sliding_window=512, layer_types=None, final_logit_softcapping=None,
                       use_bidirectional_attention=None, vocab_size_per_layer_input=262144,
                       hidden_size_per_layer_input=256, attention_k_eq_v=False,
                       num_kv_shared_layers=0, enable_moe_block=False, use_double_wide_mlp=False,
                       num_experts=None, top_k_experts=None, moe_intermediate_size=None)
GEMMA4_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
               "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                  "rope_theta": 1000000.0}}
QWEN2_DEFAULTS = dict(LLAMA_DEFAULTS, vocab_size=151936, intermediate_size=22016,
                      max_position_embeddings=32768, use_sliding_window=False)
OLMO2_DEFAULTS = dict(LLAMA_DEFAULTS, vocab_size=50304, rms_norm_eps=1e-5)
OLMO3_DEFAULTS = dict(OLMO2_DEFAULTS, rope_theta=500000.0, sliding_window=4096, layer_types=None)
PHI3_DEFAULTS = dict(LLAMA_DEFAULTS, vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                     max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=None)
# gpt-oss-20b's shape is 24 layers of 32 experts; these are transformers' GptOssConfig defaults.
GPT_OSS_DEFAULTS = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                        num_hidden_layers=36, num_attention_heads=64, num_key_value_heads=8,
                        head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, rope_theta=150000.0, sliding_window=128,
                        layer_types=None, num_local_experts=128, num_experts_per_tok=4,
                        swiglu_alpha=1.702, swiglu_limit=7.0, router_aux_loss_coef=0.001,
                        attention_bias=True)
# What transformers puts in a gpt-oss config.json that names no RoPE scaling.
GPT_OSS_YARN = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                    original_max_position_embeddings=4096)
OLMOE_DEFAULTS = dict(OLMO2_DEFAULTS, hidden_size=2048, intermediate_size=2048,
                      num_hidden_layers=16, num_attention_heads=16, max_position_embeddings=4096,
                      clip_qkv=None, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
                      router_aux_loss_coef=0.01)
DEEPSEEK_V3_DEFAULTS = dict(LLAMA_DEFAULTS, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                           moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                           num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
                           routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
                           qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
                           topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
                           norm_topk_prob=True, max_position_embeddings=4096, rope_interleave=True)
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
# Qwen3_5MoeTextConfig's (Qwen3.5-35B-A3B's shape): every layer MoE, no dense MLP width.
QWEN3_5_MOE_DEFAULTS = dict({k: v for k, v in QWEN3_5_DEFAULTS.items() if k != "intermediate_size"},
                            hidden_size=2048, num_hidden_layers=40, num_key_value_heads=2,
                            moe_intermediate_size=512, shared_expert_intermediate_size=512,
                            num_experts_per_tok=8, num_experts=256, router_aux_loss_coef=0.001)
# Lfm2Config's defaults (LFM2-2.6B's shape); intermediate_size is adjusted (`_lfm2_ffn_hidden`).
LFM2_DEFAULTS = dict(vocab_size=65536, hidden_size=2560, intermediate_size=12288, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=128000,
                     norm_eps=1e-5, tie_word_embeddings=True, rope_theta=1000000.0, conv_bias=False,
                     conv_L_cache=3, block_multiple_of=256, block_ffn_dim_multiplier=1.0,
                     block_auto_adjust_ff_dim=True, full_attn_idxs=None, layer_types=None)
LFM2_MOE_RENORM_EPS = 1e-6  # Lfm2MoeTopKRouter: weights / (sum + 1e-6)
# Lfm2MoeConfig's (LFM2-8B-A1B's shape): the MLP width as given, no block_* adjustment.
LFM2_MOE_DEFAULTS = dict(vocab_size=65536, hidden_size=2048, intermediate_size=7168,
                         moe_intermediate_size=1792, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=128000, norm_eps=1e-5,
                         tie_word_embeddings=True, rope_theta=1000000.0, conv_bias=False, conv_L_cache=3,
                         num_dense_layers=2, num_experts_per_tok=4, num_experts=32, use_expert_bias=True,
                         routed_scaling_factor=1.0, norm_topk_prob=True, layer_types=None,
                         full_attn_idxs=None)
DEFAULTS = {"gpt2": GPT2_DEFAULTS, "llama": LLAMA_DEFAULTS, "qwen3": QWEN3_DEFAULTS,
            "qwen3_moe": QWEN3_MOE_DEFAULTS, "qwen2_moe": QWEN2_MOE_DEFAULTS,
            "mixtral": MIXTRAL_DEFAULTS, "mistral": MISTRAL_DEFAULTS, "smollm3": SMOLLM3_DEFAULTS,
            "gemma2": GEMMA2_DEFAULTS, "gemma3_text": GEMMA3_DEFAULTS,
            "gemma4_text": GEMMA4_DEFAULTS, "qwen2": QWEN2_DEFAULTS,
            "olmo2": OLMO2_DEFAULTS, "phi3": PHI3_DEFAULTS, "olmoe": OLMOE_DEFAULTS,
            "gpt_oss": GPT_OSS_DEFAULTS, "olmo3": OLMO3_DEFAULTS,
            "deepseek_v3": DEEPSEEK_V3_DEFAULTS,
            "qwen3_5_text": QWEN3_5_DEFAULTS, "qwen3_next": QWEN3_NEXT_DEFAULTS, "lfm2": LFM2_DEFAULTS,
            "qwen3_5_moe_text": QWEN3_5_MOE_DEFAULTS,
            "lfm2_moe": LFM2_MOE_DEFAULTS}
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
    if family == "gemma4_text":
        return _gemma4_config(c, extra, where)
    if family in GEMMA_FAMILIES:
        return _gemma_config(hf, c, family, extra, where)
    if family == "gpt_oss":
        return _gpt_oss_config(hf, c, extra, where)
    if family in HYBRID_FAMILIES:
        return _hybrid_config(hf, c, family, extra, where)
    if family in ("lfm2", "lfm2_moe"):
        return _lfm2_config(hf, c, family, extra, where)
    if c["hidden_act"] != "silu":
        raise BardlmError(f"{where}: hidden_act {c['hidden_act']!r} is not supported; SwiGLU needs 'silu'")
    if family == "deepseek_v3":
        return _deepseek_v3_config(hf, c, extra, where)
    # Mixtral and Phi-3 slide whenever sliding_window is set (a window as long as the context
    # never hides a key, so it is full attention).
    window = c.get("sliding_window") if family in ("mixtral", "phi3") else None
    if family not in WINDOW_FAMILIES and (
            c.get("use_sliding_window") or "sliding_attention" in (c.get("layer_types") or [])
            or (window is not None and window < c["max_position_embeddings"])):
        raise BardlmError(f"{where}: sliding-window attention is not supported for {family}; "
                          "use full attention (bardlm has windows for Mistral, Gemma 2/3, SmolLM3, "
                          "OLMo 3 and gpt-oss)")
    if family == "olmoe" and c["clip_qkv"] is not None:
        raise BardlmError(f"{where}: clip_qkv (clamping q, k and v) is not supported; only "
                          "OLMoE models with clip_qkv null load")
    if family == "olmo3":  # the global layers' RoPE; the local layers' base is in _window_from_hf
        hf = {"rope_theta": c["rope_theta"], **_per_type_rope(hf, c, where)[0]}
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


def _per_type_rope(hf: dict[str, Any], c: dict[str, Any], where: str) -> tuple[dict[str, Any], float | None]:
    """transformers 5 gives Gemma 3 and OLMo 3 one RoPE per layer type in `rope_parameters`:
    (hf with the global layers' RoPE as its rope_parameters, the local layers' base), or (hf,
    None) for a config.json with one RoPE (transformers 4)."""
    params = c.get("rope_parameters") or {}
    if "full_attention" not in params:
        return hf, None
    local = dict(params.get("sliding_attention") or {})
    if local.get("rope_type", "default") != "default":
        raise BardlmError(f"{where}: scaled RoPE on sliding-window layers is not supported")
    return {**hf, "rope_parameters": params["full_attention"]}, float(local.get("rope_theta", 10000.0))


def _window_from_hf(c: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    """Mistral's sliding window (every layer), SmolLM3's per-layer windows and NoPE layers,
    OLMo 3's local layers (three of every four by default) and their unscaled RoPE."""
    if family == "mistral":  # an explicit null is full attention, not the default window
        return dict(sliding_window=_given(c, "sliding_window"))
    if family == "olmo3":
        n = c["num_hidden_layers"]
        kinds = _layer_types(c, where) or ["local" if (i + 1) % 4 else "global" for i in range(n)]
        if "local" not in kinds:
            return dict(attn_layers=kinds)
        local_theta = _per_type_rope(c["_hf"], c, where)[1]
        return dict(attn_layers=kinds, sliding_window=_given(c, "sliding_window"),
                    rope_local_theta=local_theta if local_theta is not None else float(c["rope_theta"]))
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
    local_theta = None
    if family == "gemma3_text":
        hf, local_theta = _per_type_rope(hf, c, where)
        if local_theta is None:  # transformers 4
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
    """Qwen3.5 (text), Qwen3-Next and Qwen3.5-MoE: linear_attention layers (gated delta rule)
    and full_attention layers (gated, QK-normed, partially rotary attention); (1 + w) RMSNorms;
    SwiGLU MLPs, or (Qwen3-Next, Qwen3.5-MoE) Qwen2-MoE-style experts with a gated shared
    expert."""
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
    moe = _moe_from_hf(c, family) if family != "qwen3_5_text" else {}
    if family != "qwen3_5_text":  # exported back to this family, not to the other MoE hybrid
        extra["hf_family"] = family  # (and a dense Qwen3-Next, no experts, as Qwen3-Next)
    return ModelConfig(
        vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=n,
        n_head=n_head, n_embd=n_embd, n_kv_head=c["num_key_value_heads"] or n_head,
        head_dim=None if head_dim in (None, n_embd // n_head) and n_embd % n_head == 0 else head_dim,
        # Qwen3.5-MoE has no dense MLP (intermediate_size): the experts' width stands in, unused
        ffn_hidden=c["moe_intermediate_size" if family == "qwen3_5_moe_text" else "intermediate_size"],
        ffn="swiglu", norm="rmsnorm", norm_eps=c["rms_norm_eps"], norm_unit_offset=True, pos="rope", rope_theta=theta, rope_scaling=scaling,
        partial_rotary_factor=_partial_rotary(hf, c), qk_norm=True, attn_gate=True, bias=False,
        attn_bias=bool(c["attention_bias"]), attn_layers=[kinds[t] for t in types],
        linear_k_heads=c["linear_num_key_heads"], linear_v_heads=c["linear_num_value_heads"],
        linear_k_head_dim=c["linear_key_head_dim"], linear_v_head_dim=c["linear_value_head_dim"],
        linear_conv_kernel=c["linear_conv_kernel_dim"],
        tie_embeddings=bool(c["tie_word_embeddings"]), extra=extra, **moe,
    )


def _lfm2_config(hf: dict[str, Any], c: dict[str, Any], family: str, extra: dict[str, Any],
                 where: str) -> ModelConfig:
    """LFM2: "conv" layers (gated short convolution, nn/shortconv.py) and "full_attention"
    layers (GQA with per-head QK-norm, plain RoPE); pre-norm RMSNorms, SwiGLU MLPs whose width
    transformers derives from intermediate_size (`_lfm2_ffn_hidden`), tied embeddings.
    LFM2-MoE: the first num_dense_layers MLPs dense (intermediate_size as given), the others
    experts behind DeepSeek-V3's sigmoid router (`_lfm2_moe_from_hf`)."""
    if c["conv_bias"]:
        raise BardlmError(f"{where}: conv_bias=true (biases in LFM2's short-convolution layers) is "
                          "not supported; only LFM2 models with conv_bias false load")
    n = c["num_hidden_layers"]
    c = {**c, "tie_word_embeddings": c.get("tie_embedding", c["tie_word_embeddings"]),
         "intermediate_size": c.get("block_ff_dim", c["intermediate_size"])}  # older key names
    types = c["layer_types"]
    if types is None:  # transformers' rule: the layers in full_attn_idxs attend (default: all)
        full = c["full_attn_idxs"] if c["full_attn_idxs"] is not None else range(n)
        types = ["full_attention" if i in full else "conv" for i in range(n)]
    kinds = {"conv": "conv", "full_attention": "global"}
    if len(types) != n or not set(types) <= set(kinds):
        raise BardlmError(f"{where}: layer_types must list conv or full_attention for each of the "
                          f"{n} layers, got {types}")
    theta, scaling = _rope_from_hf({"rope_theta": c["rope_theta"], **hf}, where)
    return ModelConfig(
        vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=n,
        n_head=c["num_attention_heads"], n_embd=c["hidden_size"],
        n_kv_head=c["num_key_value_heads"] or c["num_attention_heads"], ffn_hidden=_lfm2_ffn_hidden(c) if family == "lfm2" else c["intermediate_size"],
        ffn="swiglu", norm="rmsnorm", norm_eps=c["norm_eps"], pos="rope", rope_theta=theta,
        rope_scaling=scaling, qk_norm=True, bias=False, attn_layers=[kinds[t] for t in types],
        linear_conv_kernel=c["conv_L_cache"], tie_embeddings=bool(c["tie_word_embeddings"]), extra=extra,
        **(_lfm2_moe_from_hf(c, where) if family == "lfm2_moe" else {}),
    )


def _lfm2_moe_from_hf(c: dict[str, Any], where: str) -> dict[str, Any]:
    """LFM2-MoE's expert fields: sigmoid scores, the top k chosen by score + expert_bias (our
    correction bias), their scores renormalised (norm_topk_prob) times routed_scaling_factor;
    no groups, no shared expert."""
    if not c["use_expert_bias"]:
        raise BardlmError(f"{where}: use_expert_bias=false is not supported; bardlm loads LFM2-MoE "
                          "models with an expert bias (as LFM2-8B-A1B)")
    n, dense = c["num_hidden_layers"], c["num_dense_layers"]
    return dict(n_expert=c["num_experts"], n_expert_active=c["num_experts_per_tok"],
                expert_hidden=c["moe_intermediate_size"], router_renorm=bool(c["norm_topk_prob"]),
                router_score="sigmoid", routed_scale=float(c["routed_scaling_factor"]),
                router_renorm_eps=LFM2_MOE_RENORM_EPS, ffn_layers=["dense" if i < dense else "moe" for i in range(n)])


def _lfm2_ffn_hidden(c: dict[str, Any]) -> int:
    """The MLP width transformers' Lfm2MLP builds: intermediate_size as is, or (with
    block_auto_adjust_ff_dim) 2/3 of it, times block_ffn_dim_multiplier and rounded up to a
    multiple of block_multiple_of when a multiplier is given."""
    width = c["intermediate_size"]
    if c["block_auto_adjust_ff_dim"]:
        width = int(2 * width / 3)
        multiplier = _given(c, "block_ffn_dim_multiplier")  # an explicit null: no rounding
        if multiplier is not None:
            width = int(multiplier * width)
            multiple = c["block_multiple_of"]
            width = multiple * ((width + multiple - 1) // multiple)
    return width


def _gpt_oss_config(hf: dict[str, Any], c: dict[str, Any], extra: dict[str, Any],
                    where: str) -> ModelConfig:
    """gpt-oss: a Llama attention with q/k/v/o biases and a sink logit per head, alternating
    sliding-window and full layers, YaRN RoPE, and every FFN a mixture of clamped-SwiGLU experts
    with biases behind a router with a bias (softmax over the top-k logits: renormalised)."""
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise BardlmError(f"{where}: quantized gpt-oss weights ({method}) are not supported; load a "
                          "copy saved in bf16 or fp32 (transformers: Mxfp4Config(dequantize=True))")
    n = c["num_hidden_layers"]
    kinds = _layer_types(c, where) or ["local" if (i + 1) % 2 else "global" for i in range(n)]
    if not (hf.get("rope_parameters") or hf.get("rope_scaling")):  # transformers' default
        hf = {**hf, "rope_parameters": {**GPT_OSS_YARN, "rope_theta": c["rope_theta"]}}
    theta, scaling = _rope_from_hf({"rope_theta": c["rope_theta"], **hf}, where)
    n_head, n_embd, head_dim = c["num_attention_heads"], c["hidden_size"], c["head_dim"]
    return ModelConfig(
        vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=n,
        n_head=n_head, n_embd=n_embd, n_kv_head=c["num_key_value_heads"] or n_head,
        head_dim=None if head_dim in (None, n_embd // n_head) and n_embd % n_head == 0 else head_dim,
        ffn_hidden=c["intermediate_size"], ffn="swiglu_clamped",
        swiglu_alpha=float(c["swiglu_alpha"]), swiglu_limit=float(c["swiglu_limit"]),
        norm="rmsnorm", norm_eps=c["rms_norm_eps"], pos="rope", rope_theta=theta,
        rope_scaling=scaling, bias=True, attn_bias=bool(c["attention_bias"]), attn_sinks=True,
        sliding_window=_given(c, "sliding_window") if "local" in kinds else None, attn_layers=kinds,
        n_expert=c["num_local_experts"], n_expert_active=c["num_experts_per_tok"],
        expert_hidden=c["intermediate_size"], router_renorm=True, router_bias=True,
        ffn_layers=["moe"] * n, router_aux_loss_coef=float(c["router_aux_loss_coef"]),
        tie_embeddings=bool(c["tie_word_embeddings"]), extra=extra,
    )


def _deepseek_v3_config(hf: dict[str, Any], c: dict[str, Any], extra: dict[str, Any],
                        where: str) -> ModelConfig:
    """DeepSeek-V3: latent attention (every head reads one latent; num_key_value_heads is not
    used), first_k_dense_replace dense layers, then MoE layers with sigmoid, group-limited
    routing and ungated shared experts. The multi-token-prediction layers are not run."""
    theta, scaling = _rope_from_hf(hf, where)
    n, k_dense = c["num_hidden_layers"], c["first_k_dense_replace"] or 0
    bias = bool(c["attention_bias"])  # on q_a, kv_a and o (never on q_proj, q_b, kv_b)
    n_expert = c.get("num_local_experts", c["n_routed_experts"]) or 0
    moe = dict(n_expert=n_expert, n_expert_active=c["num_experts_per_tok"],
               expert_hidden=c["moe_intermediate_size"], router_renorm=bool(c["norm_topk_prob"]),
               shared_expert_hidden=c["moe_intermediate_size"] * (c["n_shared_experts"] or 0),
               shared_expert_gate=False, router_score="sigmoid", router_groups=c["n_group"] or 1,
               router_topk_groups=c["topk_group"] or 1, routed_scale=float(c["routed_scaling_factor"]),
               router_aux_loss_coef=0.0) if n_expert and k_dense < n else {}
    return ModelConfig(
        vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=n,
        n_head=c["num_attention_heads"], n_embd=c["hidden_size"], ffn_hidden=c["intermediate_size"],
        ffn="swiglu", norm="rmsnorm", norm_eps=c["rms_norm_eps"], pos="rope", rope_theta=theta,
        rope_scaling=scaling, bias=False, attn_bias=bias, qkv_bias=bias,
        tie_embeddings=bool(c["tie_word_embeddings"]), attn_type="mla", q_lora_rank=_given(c, "q_lora_rank"),
        kv_lora_rank=c["kv_lora_rank"], qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"],
        rope_interleave=bool(c["rope_interleave"]),
        ffn_layers=["dense" if i < k_dense or not moe else "moe" for i in range(n)], extra=extra, **moe,
    )


def _gemma4_config(c: dict[str, Any], extra: dict[str, Any], where: str) -> ModelConfig:
    """Gemma 4 (text): Gemma 3's block with plain-w RMSNorms, values normalised, attention scale
    1, wider global heads with proportional partial RoPE, and optionally per-layer inputs, KV
    sharing, K = V on global layers, the double-wide MLP and the MoE block beside the MLP."""
    if c["hidden_activation"] not in GEMMA_ACTIVATIONS:
        raise BardlmError(f"{where}: hidden_activation {c['hidden_activation']!r} is not "
                          "supported; GeGLU needs 'gelu_pytorch_tanh'")
    if c.get("use_bidirectional_attention"):
        raise BardlmError(f"{where}: use_bidirectional_attention is not supported; bardlm "
                          "models are causal decoders")
    n = c["num_hidden_layers"]
    kinds = _layer_types(c, where) or ["local" if (i + 1) % 6 else "global" for i in range(n)]
    kinds[-1] = "global"  # transformers forces the last layer to full attention
    rope = {**GEMMA4_ROPE, **(c.get("rope_parameters") or {})}
    local, full = dict(rope["sliding_attention"]), dict(rope["full_attention"])
    if local.get("rope_type", "default") != "default":
        raise BardlmError(f"{where}: scaled RoPE on sliding-window layers is not supported")
    kind = full.pop("rope_type", "default")
    if kind not in ("default", "proportional"):
        raise BardlmError(f"{where}: Gemma 4 global-layer RoPE type {kind!r} is not supported; "
                          "bardlm implements 'default' and 'proportional'")
    theta = float(full.pop("rope_theta", 1000000.0))
    scaling = {"rope_type": "proportional", **full} if kind == "proportional" else None
    # Global layers' head size and KV heads: written out per layer by transformers 5
    # (`per_layer_config`), or as global_head_dim / num_global_key_value_heads (Google's files).
    per_layer = {int(k): v for k, v in (c.get("per_layer_config") or {}).items()}
    if per_layer:
        overrides = [per_layer.get(i, {}) for i in range(n) if kinds[i] == "global"]
        if any(per_layer.get(i) for i in range(n) if kinds[i] == "local") or \
                any(o != overrides[0] for o in overrides):
            raise BardlmError(f"{where}: per_layer_config must give every full-attention layer "
                              "the same head_dim and num_key_value_heads, and no other layer any")
        global_head_dim = overrides[0].get("head_dim", c["head_dim"])
        global_kv = overrides[0].get("num_key_value_heads")
    else:
        global_head_dim = c["global_head_dim"]
        global_kv = c["num_global_key_value_heads"] if c["attention_k_eq_v"] else None
    moe: dict[str, Any] = {}
    if c["enable_moe_block"]:
        moe = dict(n_expert=c["num_experts"], n_expert_active=c["top_k_experts"],
                   expert_hidden=c["moe_intermediate_size"], router_renorm=True, router_norm=True,
                   ffn_layers=["dense+moe"] * n)
    return ModelConfig(
        vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=n,
        n_head=c["num_attention_heads"], n_embd=c["hidden_size"],
        n_kv_head=c["num_key_value_heads"], head_dim=c["head_dim"],
        global_head_dim=global_head_dim, global_n_kv_head=global_kv,
        ffn_hidden=c["intermediate_size"], ffn="geglu", norm="rmsnorm", norm_eps=c["rms_norm_eps"],
        norm_placement="sandwich", embed_scale=True, pos="rope", rope_theta=theta,
        rope_scaling=scaling, rope_local_theta=float(local.get("rope_theta", 10000.0)),
        qk_norm=True, v_norm=True, attn_scale_dim=1.0, layer_scalar=True, bias=False,
        attn_bias=bool(c["attention_bias"]), attn_k_eq_v=bool(c["attention_k_eq_v"]),
        sliding_window=c["sliding_window"] if "local" in kinds else None, attn_layers=kinds,
        logit_softcap=_given(c, "final_logit_softcapping"),
        kv_shared_layers=c["num_kv_shared_layers"], double_wide_mlp=bool(c["use_double_wide_mlp"]),
        per_layer_input_dim=c["hidden_size_per_layer_input"] or 0,
        per_layer_vocab_size=c["vocab_size_per_layer_input"],
        tie_embeddings=bool(c["tie_word_embeddings"]), extra=extra, **moe,
    )


def _block_from_hf(family: str) -> dict[str, Any]:
    """The attention and norm fields each Llama-like family fixes (not read from config.json)."""
    if family in ("qwen3", "qwen3_moe"):  # RMSNorm on each head of q and k
        return dict(qk_norm=True)
    if family in ("olmo2", "olmo3", "olmoe"):  # RMSNorm over the whole q and k projections
        return dict(qk_norm=True, qk_norm_scope="proj",
                    norm_placement="pre" if family == "olmoe" else "output")
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
    if family == "qwen3_5_moe_text":  # every layer MoE; Qwen3-VL's router renormalises the top k
        return dict(n_expert=c["num_experts"], n_expert_active=c["num_experts_per_tok"],
                    expert_hidden=c["moe_intermediate_size"], router_renorm=True,
                    ffn_layers=["moe"] * c["num_hidden_layers"],
                    shared_expert_hidden=c["shared_expert_intermediate_size"],
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
    if "conv" in cfg.attn_layers:  # before the others: only LFM2 has short-convolution layers
        return _lfm2_family(cfg)
    if cfg.attn_sinks or cfg.ffn == "swiglu_clamped" or cfg.router_bias:
        return _gpt_oss_family(cfg)
    if cfg.attn_type == "mla":
        return _deepseek_v3_family(cfg)
    if "linear" in cfg.attn_layers or cfg.attn_gate or cfg.partial_rotary_factor != 1:
        return _hybrid_family(cfg)
    if cfg.norm_unit_offset or cfg.embed_scale or cfg.norm_placement == "sandwich" or cfg.ffn == "geglu":
        return _gemma_family(cfg)
    style = (cfg.pos, cfg.norm, cfg.ffn)
    proj_qk = cfg.qk_norm and cfg.qk_norm_scope == "proj"
    if style == ("rope", "rmsnorm", "swiglu") and (cfg.norm_placement == "output" or proj_qk) \
            and "moe" not in cfg.ffn_layers:
        return _olmo_family(cfg)
    _refuse(cfg, "Gemma-only options", {**_gemma4_traits(cfg),
        f"attn_softcap={cfg.attn_softcap}": cfg.attn_softcap is not None,
        f"logit_softcap={cfg.logit_softcap}": cfg.logit_softcap is not None,
        f"attn_scale_dim={cfg.attn_scale_dim}": cfg.attn_scale_dim is not None,
        f"rope_local_theta={cfg.rope_local_theta}": cfg.rope_local_theta is not None})
    pre = cfg.norm_placement == "pre"
    windows = {"local layers (sliding_window)": "local" in cfg.attn_layers,
               "layers without RoPE (rope_layers)": cfg.pos == "rope" and not all(cfg.rope_layers)}
    if style == ("rope", "rmsnorm", "swiglu") and pre and not cfg.qk_norm and any(windows.values()):
        return _windowed_llama_family(cfg)
    _refuse(cfg, "Mistral, SmolLM3 or Gemma", windows)
    if "moe" in cfg.ffn_layers:
        return _moe_family(cfg, style == ("rope", "rmsnorm", "swiglu") and pre)
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


def _deepseek_v3_family(cfg: ModelConfig) -> str:
    """deepseek_v3: latent attention in a Llama block, dense layers first, then DeepSeek's MoE."""
    moe = "moe" in cfg.ffn_layers
    k_dense = cfg.ffn_layers.index("moe") if moe else cfg.n_layer
    _refuse(cfg, "transformers' DeepSeek-V3 traits", {
        "a block other than RMSNorm + SwiGLU, pre-norm, no MLP bias":
            (cfg.norm, cfg.ffn, cfg.norm_placement, cfg.bias) != ("rmsnorm", "swiglu", "pre", False),
        "qkv_bias != attn_bias": cfg.qkv_bias != cfg.attn_bias,
        "Gemma-only options (norm_unit_offset, embed_scale, logit_softcap)":
            cfg.norm_unit_offset or cfg.embed_scale or cfg.logit_softcap is not None,
        "MoE layers before dense ones (only the first layers may be dense)":
            any(kind == "dense" for kind in cfg.ffn_layers[k_dense:]),
        "router_score=softmax (DeepSeek-V3 routes with sigmoid scores)": moe and cfg.router_score != "sigmoid",
        "a gated shared expert or none": moe and (cfg.shared_expert_gate or not cfg.shared_expert_hidden),
        "a shared expert not a multiple of expert_hidden wide":
            moe and cfg.shared_expert_hidden % cfg.expert_hidden != 0,
        "router_renorm_eps other than 1e-20": moe and cfg.router_renorm_eps != 1e-20})
    return "deepseek_v3"


def _deepseek_v3_config_to_hf(cfg: ModelConfig, out: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3 config.json. A model with no MoE layer is written with first_k_dense_replace
    = n_layer (transformers then builds no router)."""
    moe = "moe" in cfg.ffn_layers
    expert = cfg.expert_hidden if moe else cfg.ffn_hidden
    out.update(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.block_size, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head, hidden_size=cfg.n_embd,
        intermediate_size=cfg.ffn_hidden, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
        attention_bias=cfg.attn_bias, attention_dropout=0.0, rope_parameters=rope,
        rope_interleave=cfg.rope_interleave, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, first_k_dense_replace=cfg.ffn_layers.index("moe") if moe else cfg.n_layer,
        moe_intermediate_size=expert, n_routed_experts=cfg.n_expert if moe else 1,
        num_experts_per_tok=cfg.n_expert_active if moe else 1,
        n_shared_experts=cfg.shared_expert_hidden // expert if moe else 1,
        n_group=cfg.router_groups if moe else 1, topk_group=cfg.router_topk_groups if moe else 1,
        norm_topk_prob=cfg.router_renorm, routed_scaling_factor=cfg.routed_scale,
        num_nextn_predict_layers=0)  # no multi-token-prediction layers: none are written
    return out


def _gemma4_traits(cfg: ModelConfig) -> dict[str, bool]:
    """The Gemma 4 options (name -> whether this config has it) no other family has."""
    return {"v_norm=true": cfg.v_norm, "layer_scalar=true": cfg.layer_scalar,
            "per_layer_input_dim > 0": cfg.per_layer_input_dim > 0,
            "kv_shared_layers > 0": cfg.kv_shared_layers > 0, "attn_k_eq_v=true": cfg.attn_k_eq_v,
            "global_head_dim != head_dim": cfg.global_head_dim != cfg.head_dim,
            "global_n_kv_head != n_kv_head": cfg.global_n_kv_head != cfg.n_kv_head,
            "double_wide_mlp=true": cfg.double_wide_mlp, "router_norm=true": cfg.router_norm,
            "dense+moe layers": "dense+moe" in cfg.ffn_layers,
            "proportional RoPE": (cfg.rope_scaling or {}).get("rope_type") == "proportional"}


def _gemma4_family(cfg: ModelConfig) -> str:
    """gemma4_text: Gemma's sandwich block with plain-w RMSNorms (no unit offset), QK- and
    V-norm, attention scale 1 and the layer scalar, as transformers' Gemma 4 always has them."""
    kind = (cfg.rope_scaling or {}).get("rope_type", "default")
    moe = "dense+moe" in cfg.ffn_layers
    _refuse(cfg, "transformers' Gemma 4 traits", {
        "ffn other than geglu": cfg.ffn != "geglu", "norm other than rmsnorm": cfg.norm != "rmsnorm",
        "embed_scale=false": not cfg.embed_scale, "pos other than rope": cfg.pos != "rope",
        "norm_placement other than sandwich": cfg.norm_placement != "sandwich",
        "layers without RoPE": not all(cfg.rope_layers), "MLP biases": cfg.bias,
        "qkv_bias != attn_bias": cfg.qkv_bias != cfg.attn_bias,
        "qk_norm other than per head": not cfg.qk_norm or cfg.qk_norm_scope != "head",
        "v_norm=false": not cfg.v_norm, "layer_scalar=false": not cfg.layer_scalar,
        "attn_scale_dim other than 1": cfg.attn_scale_dim != 1.0,
        "attn_softcap": cfg.attn_softcap is not None, "attn_sinks=true": cfg.attn_sinks,
        "a last layer that is not global": cfg.attn_layers[-1] != "global",
        "rope_local_theta=null": "local" in cfg.attn_layers and cfg.rope_local_theta is None,
        f"rope_scaling type {kind}": kind not in ("default", "proportional"),
        "global_n_kv_head != n_kv_head without attn_k_eq_v":
            cfg.global_n_kv_head != cfg.n_kv_head and not cfg.attn_k_eq_v,
        "\"moe\" layers (Gemma 4 has \"dense+moe\")": "moe" in cfg.ffn_layers,
        "dense+moe in some layers only": moe and set(cfg.ffn_layers) != {"dense+moe"},
        "a mixture without router_norm and router_renorm":
            moe and not (cfg.router_norm and cfg.router_renorm),
        "router_norm without dense+moe layers": cfg.router_norm and not moe})
    return "gemma4_text"


def _gemma_family(cfg: ModelConfig) -> str:
    """gemma4_text (RMSNorms scaled by w, not 1 + w, and a Gemma 4 option), else gemma3_text
    (QK-norm) or gemma2, when the config has every trait of that family."""
    if not cfg.norm_unit_offset and any(_gemma4_traits(cfg).values()):
        return _gemma4_family(cfg)
    _refuse(cfg, "Gemma 4 (whose RMSNorms scale by w, not 1 + w)", _gemma4_traits(cfg))
    _refuse(cfg, "transformers' Gemma 2/3 traits (or no Gemma traits at all)", {
        "ffn other than geglu": cfg.ffn != "geglu", "norm other than rmsnorm": cfg.norm != "rmsnorm",
        "norm_unit_offset=false": not cfg.norm_unit_offset, "embed_scale=false": not cfg.embed_scale,
        "norm_placement other than sandwich": cfg.norm_placement != "sandwich",
        "pos other than rope": cfg.pos != "rope", "layers without RoPE": not all(cfg.rope_layers),
        "MLP biases": cfg.bias, "qkv_bias != attn_bias": cfg.qkv_bias != cfg.attn_bias,
        "mixture of experts": "moe" in cfg.ffn_layers,
        "rope_local_theta without qk_norm (Gemma 2 has one RoPE base)":
            not cfg.qk_norm and cfg.rope_local_theta not in (None, cfg.rope_theta)})
    return "gemma3_text" if cfg.qk_norm else "gemma2"


def _hybrid_family(cfg: ModelConfig) -> str:
    """qwen3_next (mixture of experts with a shared expert, or a model imported from it),
    qwen3_5_moe_text (a model imported from it that it still computes: every layer MoE, top-k
    renormalised) or qwen3_5_text (dense), when the config has every trait of their blocks."""
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
    if cfg.extra.get("hf_family") == "qwen3_5_moe_text" and cfg.ffn_layers == ["moe"] * cfg.n_layer \
            and cfg.router_renorm:
        return "qwen3_5_moe_text"
    return "qwen3_next" if moe or cfg.extra.get("hf_family") == "qwen3_next" else "qwen3_5_text"


def _lfm2_family(cfg: ModelConfig) -> str:
    """lfm2, when the config has every trait of its block: short-convolution ("conv") and
    global attention layers, pre-norm RMSNorms, SwiGLU, per-head QK-norm, plain full RoPE."""
    _refuse(cfg, "transformers' LFM2 block", {
        "ffn other than swiglu": cfg.ffn != "swiglu", "norm other than rmsnorm": cfg.norm != "rmsnorm",
        "norm_unit_offset=true": cfg.norm_unit_offset,
        "norm_placement other than pre": cfg.norm_placement != "pre", "embed_scale=true": cfg.embed_scale,
        "pos other than rope": cfg.pos != "rope", "layers without RoPE": not all(cfg.rope_layers),
        "partial_rotary_factor": cfg.partial_rotary_factor != 1,
        "qk_norm=false or over the projections": not cfg.qk_norm or cfg.qk_norm_scope != "head",
        "attn_gate=true": cfg.attn_gate, "local or linear layers": bool({"local", "linear"} & set(cfg.attn_layers)),
        "biases": cfg.bias or cfg.attn_bias or cfg.qkv_bias,
        "head_dim other than n_embd / n_head": cfg.head_dim * cfg.n_head != cfg.n_embd,
        "attn_sinks=true": cfg.attn_sinks, "soft-caps": bool(cfg.attn_softcap or cfg.logit_softcap),
        "attn_scale_dim": cfg.attn_scale_dim is not None, **_gemma4_traits(cfg)})
    if "moe" not in cfg.ffn_layers:
        return "lfm2"
    n_dense = cfg.ffn_layers.count("dense")
    _refuse(cfg, "transformers' LFM2-MoE block (sigmoid routing with an expert bias, dense layers first)", {
        "router_score=softmax": cfg.router_score != "sigmoid", "router_groups > 1": cfg.router_groups > 1,
        "a shared expert": cfg.shared_expert_hidden > 0, "router_bias=true": cfg.router_bias,
        "dense layers after MoE layers": cfg.ffn_layers[:n_dense] != ["dense"] * n_dense,
        f"router_renorm_eps other than {LFM2_MOE_RENORM_EPS:g}": cfg.router_renorm_eps != LFM2_MOE_RENORM_EPS})
    return "lfm2_moe"


def _gpt_oss_family(cfg: ModelConfig) -> str:
    """gpt_oss, when the config has every gpt-oss trait (sinks, clamped SwiGLU experts with
    biases, a router bias) and nothing transformers' GptOss lacks."""
    _refuse(cfg, "transformers' gpt-oss traits: attn_sinks, ffn=swiglu_clamped, router_bias, "
            "expert biases and every layer MoE (or none of them)", {
        "attn_sinks=false": not cfg.attn_sinks, "router_bias=false": not cfg.router_bias,
        f"ffn={cfg.ffn}": cfg.ffn != "swiglu_clamped", "dense FFN layers": "dense" in cfg.ffn_layers,
        "router_renorm=false": not cfg.router_renorm, "a shared expert": cfg.shared_expert_hidden > 0,
        "bias=false (experts without biases)": not cfg.bias, "qkv_bias != attn_bias": cfg.qkv_bias != cfg.attn_bias,
        "norm other than rmsnorm": cfg.norm != "rmsnorm", "pos other than rope": cfg.pos != "rope",
        "layers without RoPE": not all(cfg.rope_layers), "qk_norm=true": cfg.qk_norm,
        "norm_placement other than pre": cfg.norm_placement != "pre",
        "Gemma options (soft-caps, attn_scale_dim, embed_scale, norm_unit_offset, rope_local_theta)":
            any(v not in (None, False) for v in (cfg.attn_softcap, cfg.logit_softcap, cfg.attn_scale_dim,
                                                 cfg.embed_scale, cfg.norm_unit_offset, cfg.rope_local_theta))})
    return "gpt_oss"


def _olmo_family(cfg: ModelConfig) -> str:
    """olmo2: norm_placement="output" with QK-norm over the whole q and k projections; olmo3:
    the same with sliding-window layers, whose RoPE is never scaled (rope_local_theta)."""
    windowed = "local" in cfg.attn_layers
    _refuse(cfg, "OLMo 2/3", {
        f"attn_softcap={cfg.attn_softcap}": cfg.attn_softcap is not None,
        f"logit_softcap={cfg.logit_softcap}": cfg.logit_softcap is not None,
        f"attn_scale_dim={cfg.attn_scale_dim}": cfg.attn_scale_dim is not None,
        "layers without RoPE (rope_layers)": not all(cfg.rope_layers),
        "rope_local_theta without local layers": cfg.rope_local_theta is not None and not windowed,
        "local layers with the global layers' scaled RoPE (OLMo 3 needs rope_local_theta set)":
            windowed and cfg.rope_scaling is not None and cfg.rope_local_theta is None})
    if cfg.norm_placement != "output" or not cfg.qk_norm or cfg.qk_norm_scope != "proj" \
            or cfg.bias or cfg.qkv_bias != cfg.attn_bias:
        raise BardlmError(
            "this model has no transformers equivalent: OLMo 2 needs norm_placement=output, "
            "qk_norm=true with qk_norm_scope=proj, no MLP bias and one attention_bias for q, k, "
            f"v and o; got norm_placement={cfg.norm_placement}, qk_norm={cfg.qk_norm}, "
            f"qk_norm_scope={cfg.qk_norm_scope}; keep it as a bardlm checkpoint")
    return "olmo3" if windowed else "olmo2"


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
    if family == "gemma4_text":
        return _gemma4_config_to_hf(cfg, out, rope)
    if family in GEMMA_FAMILIES:
        return _gemma_config_to_hf(cfg, family, out, rope)
    if family == "deepseek_v3":
        return _deepseek_v3_config_to_hf(cfg, out, rope)
    if family in ("lfm2", "lfm2_moe"):
        return _lfm2_config_to_hf(cfg, family, out, rope)
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
    elif family == "olmo3":  # the local layers' RoPE: their own base, never scaled
        out.update(sliding_window=cfg.sliding_window, rope_parameters={
            "full_attention": rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}},
                   layer_types=[f"{'sliding' if k == 'local' else 'full'}_attention" for k in cfg.attn_layers])
    elif family == "gpt_oss":  # transformers wants a window even with no local layer
        out.update(intermediate_size=cfg.expert_hidden, num_local_experts=cfg.n_expert,
                   num_experts_per_tok=cfg.n_expert_active, swiglu_alpha=cfg.swiglu_alpha,
                   swiglu_limit=cfg.swiglu_limit, router_aux_loss_coef=cfg.router_aux_loss_coef,
                   sliding_window=cfg.sliding_window or cfg.block_size,
                   layer_types=[f"{'sliding' if k == 'local' else 'full'}_attention" for k in cfg.attn_layers])
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
    if family == "qwen3_5_moe_text":  # no dense MLP, no per-layer MoE options
        del out["intermediate_size"]
        out.update(moe_intermediate_size=cfg.expert_hidden, num_experts=cfg.n_expert,
                   num_experts_per_tok=cfg.n_expert_active,
                   shared_expert_intermediate_size=cfg.shared_expert_hidden,
                   router_aux_loss_coef=cfg.router_aux_loss_coef)
    if family in ("qwen3_moe", "qwen2_moe"):
        out.update(moe_intermediate_size=cfg.expert_hidden, num_experts=cfg.n_expert,
                   num_experts_per_tok=cfg.n_expert_active, norm_topk_prob=cfg.router_renorm,
                   decoder_sparse_step=1, router_aux_loss_coef=cfg.router_aux_loss_coef,
                   mlp_only_layers=[i for i, kind in enumerate(cfg.ffn_layers) if kind == "dense"])
    return out


def _lfm2_config_to_hf(cfg: ModelConfig, family: str, out: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
    """LFM2 config.json: the MLP width as is (block_auto_adjust_ff_dim false), the layer kinds
    both as layer_types and as full_attn_idxs (what older transformers read). LFM2-MoE: its
    expert fields instead of the block_* ones (its dense width is never adjusted)."""
    out.update(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.block_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
        norm_eps=cfg.norm_eps, rope_parameters=rope, conv_bias=False, conv_L_cache=cfg.linear_conv_kernel,
        layer_types=["conv" if k == "conv" else "full_attention" for k in cfg.attn_layers],
    )
    if family == "lfm2":
        out.update(block_auto_adjust_ff_dim=False,
                   full_attn_idxs=[i for i, k in enumerate(cfg.attn_layers) if k != "conv"])
    else:
        out.update(num_dense_layers=cfg.ffn_layers.count("dense"), num_experts=cfg.n_expert,
                   num_experts_per_tok=cfg.n_expert_active, moe_intermediate_size=cfg.expert_hidden,
                   use_expert_bias=True, routed_scaling_factor=cfg.routed_scale,
                   norm_topk_prob=cfg.router_renorm)
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


def _gemma4_config_to_hf(cfg: ModelConfig, out: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
    """Gemma 4 (text) config.json: every key written (its defaults are those of a 2B model);
    `rope` is the global layers' RoPE, the local layers' is unscaled."""
    moe = "dense+moe" in cfg.ffn_layers
    out.update(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.block_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
        global_head_dim=cfg.global_head_dim,
        num_global_key_value_heads=cfg.global_n_kv_head if cfg.attn_k_eq_v else None,
        hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=cfg.norm_eps,
        attention_bias=cfg.attn_bias, attention_dropout=0.0,
        sliding_window=cfg.sliding_window or cfg.block_size,  # transformers wants one
        layer_types=[f"{'sliding' if k == 'local' else 'full'}_attention" for k in cfg.attn_layers],
        final_logit_softcapping=cfg.logit_softcap, use_bidirectional_attention=None,
        rope_parameters={"full_attention": rope, "sliding_attention": {
            "rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}},
        hidden_size_per_layer_input=cfg.per_layer_input_dim,
        vocab_size_per_layer_input=cfg.per_layer_vocab_size,
        attention_k_eq_v=cfg.attn_k_eq_v, num_kv_shared_layers=cfg.kv_shared_layers,
        use_double_wide_mlp=cfg.double_wide_mlp, enable_moe_block=moe,
        num_experts=cfg.n_expert if moe else None,
        top_k_experts=cfg.n_expert_active if moe else None,
        moe_intermediate_size=cfg.expert_hidden if moe else None,
    )
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
    if family == "gpt_oss":
        out = _unstack_experts(out)
    if family == "qwen3_5_moe_text":
        out = _unstack_qwen_experts(out)
    return out


def state_dict_from_hf(
    tensors: dict[str, torch.Tensor], cfg: ModelConfig, family: str, ours: set[str], where: str
) -> dict[str, torch.Tensor]:
    """Our state dict from HF tensors: fuse, transpose, and name every missing or extra tensor."""
    tensors = _normalise_hf_names(tensors, family)
    if family == "deepseek_v3":  # layers past the last are multi-token-prediction modules: not run
        tensors = {k: v for k, v in tensors.items() if not _layer_at_least(k, cfg.n_layer)}
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
        if e.stacked:  # one expert's rows of the tensor of all experts
            parts = [p[e.index] for p in parts]
        out[e.ours] = to_ours(e, parts, cfg)
    return out


def _layer_at_least(name: str, n: int) -> bool:
    """Whether HF tensor `name` belongs to model.layers.{i} with i >= n."""
    parts = name.split(".")
    return name.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) >= n


def state_dict_to_hf(model: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    """HF tensors from our model: split fused rows, transpose Conv1D weights."""
    sd = model.state_dict()
    out = {}
    stacks: dict[str, list[torch.Tensor]] = {}  # HF name -> experts' tensors in order
    for e in name_map(model.config, family, set(sd)):
        parts = to_theirs(e, sd[e.ours].detach(), model.config)
        for name, part in zip(e.theirs, parts):
            if e.stacked:
                stacks.setdefault(name, []).append(part)
            else:
                out[name] = (part.t() if e.transpose else part).contiguous()
    out.update({name: torch.stack(parts) for name, parts in stacks.items()})
    return _stack_experts(out, model.config.n_expert) if family == "gpt_oss" else out


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
