"""LoRA adapter directories: the adapter alone, and the base model it refers to.

A finetune with `--lora-rank` writes a directory like a bardlm checkpoint, except that
`model.safetensors` holds only what trained (each adapted layer's lora_A (r, in) and lora_B
(out, r), plus embedding rows when the vocabulary grew) and config.json has an "adapter" entry:

    {"rank": 8, "alpha": 16, "targets": ["c_attn", ...], "base": "/abs/path/of/the/base",
     "train_also": [...]}

`bardlm.load` reads such a directory by loading the base, putting the adapters on and merging
them (`merge=False` keeps them separate); `merge_adapter` writes the merged model as an ordinary
bardlm checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import BardlmError
from ..nn.lora import apply_lora, merge_lora
from ..nn.model import GPT
from ..nn.resize import resize_vocab
from ..tokenizers import load as load_tokenizer
from .checkpoint import (
    MODEL_FILE,
    TOKENIZER_FILE,
    check_dir,
    claim_out,
    load_checkpoint,
    load_tensors,
    read_config,
    save_checkpoint,
)
from .hf import from_pretrained, is_hf_dir
from .metadata import ModelMeta


def is_adapter_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and not is_hf_dir(path) and "adapter" in read_config(path)


def load_base(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Any]:
    """(float model, tokenizer) of a base: a bardlm checkpoint or a Hugging Face directory."""
    path = check_dir(path)
    if is_hf_dir(path):
        return from_pretrained(path, device=device, with_tokenizer=True)
    if "adapter" in read_config(path):
        raise BardlmError(f"{path} is itself an adapter; merge it first (bardlm merge) to use it as a base")
    model, tokenizer, meta = load_checkpoint(path, device)
    if meta.get("quantization"):
        raise BardlmError(f"{path} is quantized; LoRA needs the float checkpoint as its base")
    return model, tokenizer


# The fields that fix a model's weight shapes (the adapter's vocabulary may have grown).
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "n_kv_head", "head_dim", "ffn_hidden", "ffn", "norm",
                "pos", "bias", "tie_embeddings")


def check_base(base_cfg: ModelConfig, adapter_cfg: ModelConfig, base: Path, adapter: Path) -> None:
    """Refuse a base model of another shape than the one the adapter was trained on."""
    for name in SHAPE_FIELDS:
        was, now = getattr(adapter_cfg, name, None), getattr(base_cfg, name, None)
        if was != now:
            raise BardlmError(f"{base} is not the base of adapter {adapter}: its {name} is {now}, "
                              f"the adapter's base had {was}; pass the base it was trained on with --base")
    if base_cfg.vocab_size > adapter_cfg.vocab_size:
        raise BardlmError(f"{base} is not the base of adapter {adapter}: its vocabulary has "
                          f"{base_cfg.vocab_size} tokens, the adapter's {adapter_cfg.vocab_size}; "
                          "pass the base it was trained on with --base")


def load_adapter(path: str | Path, base: str | Path | None = None, merge: bool = True,
                 device: str | torch.device = "cpu") -> tuple[GPT, Any, dict[str, Any]]:
    """(model in eval mode, the adapter's tokenizer, its config.json) of an adapter directory.

    base: where the base model is (default: the path the adapter recorded). merge: fold the
    adapters into the weights (inference at the base model's speed); False keeps them apart.
    """
    path = check_dir(path)
    meta = read_config(path)
    a = meta.get("adapter")
    if not isinstance(a, dict):
        raise BardlmError(f"{path}/config.json has no 'adapter' entry; it is not a LoRA adapter")
    base = Path(base or a["base"])
    if not base.is_dir():
        raise BardlmError(f"the base model {base} of adapter {path} is not there; pass --base DIR")
    model, _ = load_base(base, device)
    cfg = ModelConfig.from_dict(meta["model"])
    check_base(model.config, cfg, base, path)
    resize_vocab(model, cfg.vocab_size)
    apply_lora(model, a["rank"], a["alpha"], tuple(a["targets"]), tuple(a.get("train_also", ())))
    tensors = load_tensors(path / MODEL_FILE, meta.get("save_id"))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        raise BardlmError(f"{path / MODEL_FILE} does not fit base {base}: expected adapter tensors "
                          f"like {sorted(expected - set(tensors))[:2]}, found {sorted(set(tensors) - expected)[:2]}")
    state = model.state_dict()
    for k, v in tensors.items():
        if v.shape != state[k].shape:
            raise BardlmError(f"{path}: adapter tensor {k} is {tuple(v.shape)} but base {base} "
                              f"needs {tuple(state[k].shape)}; the adapter belongs to another base")
    model.load_state_dict({k: v.to(state[k].device) for k, v in tensors.items()}, strict=False)
    if merge:
        merge_lora(model)
    tokenizer = load_tokenizer(path / TOKENIZER_FILE) if (path / TOKENIZER_FILE).is_file() else None
    ModelMeta.from_checkpoint(meta).apply(tokenizer)
    return model.to(device).eval(), tokenizer, meta


def merge_adapter(adapter: str | Path, out: str | Path, base: str | Path | None = None,
                  overwrite: bool = False) -> dict[str, Any]:
    """Write base + adapter, merged, as an ordinary bardlm checkpoint in `out` (a folder holding
    a model already is replaced only with `overwrite`)."""
    out = Path(out)
    if out.resolve() == Path(adapter).resolve():
        raise BardlmError("--out must differ from the adapter directory")
    claim_out(out, overwrite)
    model, tokenizer, meta = load_adapter(adapter, base, merge=True)
    keep = {k: v for k, v in meta.items()
            if k not in ("model", "adapter", "save_id", "tokenizer_fingerprint", "train")}
    save_checkpoint(out, model, tokenizer, {**keep, "merged_from": str(adapter)})
    return {"out": str(out), "parameters": model.num_params(), "base": meta["adapter"]["base"]}
