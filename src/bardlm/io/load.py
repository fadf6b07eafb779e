"""`bardlm.load`: one loader for every model directory bardlm reads.

    model, tokenizer = bardlm.load(path, dtype=None, device=None)

`path` is a bardlm run directory (float), an INT8 or INT4 directory from `bardlm quantize`, a LoRA
adapter directory from `bardlm finetune --lora-rank` (loaded onto its base), or a Hugging
Face directory (GPT-2, Llama, Qwen3; `config.json` + safetensors). The model comes back in eval
mode; `dtype` ("fp32", "bf16", "int8", "int4", or None for the weights as trained) lays it out
for fast inference (`bardlm.infer.layouts`). An INT8 (INT4) directory always runs int8 (int4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import BardlmError
from ..infer.device import resolve_device
from ..infer.int4 import METHOD as INT4_METHOD
from ..infer.int4 import check_group_size, quantize_model4
from ..infer.layouts import prepare_for_inference
from ..infer.quantize import quantize_model, weight_bytes
from ..nn.model import GPT
from ..tokenizers import Tokenizer
from .adapter import load_adapter
from .checkpoint import (
    CONFIG_FILE,
    check_dir,
    claim_out,
    load_checkpoint,
    read_config,
    save_checkpoint,
    tokenizer_fingerprint,
)
from .hf import config_from_hf, from_pretrained, is_hf_dir, read_hf_config
from .metadata import ModelMeta

DTYPES = ("fp32", "bf16", "int8", "int4")


def kind_of(path: str | Path) -> str:
    """"hf", "int8", "int4", "adapter" or "bardlm": what `load` will read at `path` (checked,
    one-line errors)."""
    path = check_dir(path)
    if is_hf_dir(path):
        return "hf"
    meta = read_config(path)
    if "adapter" in meta:
        return "adapter"
    q = meta.get("quantization")
    if not q:
        return "bardlm"
    return "int4" if q.get("method") == INT4_METHOD else "int8"


def read_model_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of any model directory, without reading its weights."""
    if kind_of(path) == "hf":
        return config_from_hf(read_hf_config(path), str(Path(path) / CONFIG_FILE))
    return ModelConfig.from_dict(read_config(path)["model"])


def load(
    path: str | Path, dtype: str | None = None, device: str | torch.device | None = None
) -> tuple[GPT, Tokenizer | None]:
    """(model in eval mode, tokenizer or None) from any model directory bardlm reads."""
    if dtype is not None and dtype not in DTYPES:
        raise BardlmError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = resolve_device(device or "cpu")  # "auto", or a device this machine lacks: one line
    kind = kind_of(path)
    if "int4" in (dtype, kind) and device.type != "cpu":  # the kernel is aten's CPU int4 matmul
        raise BardlmError(f"int4 weights run on the CPU only (PyTorch's CPU int4 kernel); on "
                          f"{device} use --dtype int8 or bf16, or pass --device cpu")
    if kind == "hf":
        model, tokenizer = from_pretrained(path, device=device, with_tokenizer=True)
    elif kind == "adapter":  # a LoRA adapter: its base with the adapters merged in
        model, tokenizer, _ = load_adapter(path, device=device)
    else:
        model, tokenizer, _ = load_checkpoint(path, device)
    if getattr(model, "quantization", None):
        dtype = "int4" if model.quantization["method"] == INT4_METHOD else "int8"
    if dtype is not None:
        prepare_for_inference(model, dtype)
    return model, tokenizer


def load_draft(draft: str, tokenizer: Tokenizer, dtype: str | None = None,
               device: str | torch.device | None = None) -> str | GPT:
    """The drafter `--draft` names: "ngram" (prompt lookup) as is, else the model directory
    `draft` loaded like the model, refused in one line unless its tokenizer is `tokenizer`."""
    if draft == "ngram":
        return draft
    model, draft_tok = load(draft, dtype, device)
    if draft_tok is None or tokenizer_fingerprint(draft_tok) != tokenizer_fingerprint(tokenizer):
        raise BardlmError(f"--draft {draft}: its tokenizer is not the model's; a draft "
                          "model must share the tokenizer (or use --draft ngram)")
    return model


def read_meta(path: str | Path, tokenizer: Tokenizer | None) -> ModelMeta:
    """The `ModelMeta` (special ids and tokens, chat template, generation defaults) of any model
    directory; `tokenizer` is the one `load` returned for it."""
    if kind_of(path) == "hf":
        return ModelMeta.from_hf_dir(path, tokenizer)
    return ModelMeta.from_checkpoint(read_config(path))


def quantize_checkpoint(ckpt: str | Path, out: str | Path, embeddings: bool = True,
                        overwrite: bool = False, bits: int = 8,
                        group_size: int | None = None) -> dict[str, Any]:
    """Write an INT8 (bits=8) or INT4 (bits=4, `group_size` 32/64/128) copy of a float model
    directory (bardlm or Hugging Face) into `out`, as a bardlm checkpoint (a folder holding a
    model already is replaced only with `overwrite`); returns a summary (sizes in bytes)."""
    if bits not in (4, 8):
        raise BardlmError(f"--bits must be 4 or 8, got {bits}")
    if bits == 8 and group_size is not None:
        raise BardlmError("--group-size applies to --bits 4 only (int8 has one scale per row)")
    if bits == 4:
        group_size = 32 if group_size is None else group_size
        check_group_size(group_size)
    ckpt, out = Path(ckpt), Path(out)
    if out.resolve() == ckpt.resolve():
        raise BardlmError("--out must differ from --ckpt; the float checkpoint is kept as it is")
    claim_out(out, overwrite)
    if kind_of(ckpt) in ("int8", "int4"):
        raise BardlmError(f"{ckpt} is already quantized; pass the float checkpoint")
    model, tokenizer = load(ckpt)
    meta = {} if kind_of(ckpt) == "hf" else read_config(ckpt)
    fp32_bytes = weight_bytes(model)
    if bits == 4:
        quantize_model4(model, group_size, embeddings)
    else:
        quantize_model(model, embeddings)
    keep = {k: v for k, v in meta.items()
            if k not in ("model", "save_id", "tokenizer_fingerprint", "adapter")}
    keep.update(read_meta(ckpt, tokenizer).to_checkpoint())  # what it stops at, how it chats
    save_checkpoint(out, model, tokenizer, {**keep, "source": str(ckpt)})
    q_bytes = weight_bytes(model)
    return {"out": str(out), "bits": bits, "group_size": group_size, "fp32_bytes": fp32_bytes,
            f"int{bits}_bytes": q_bytes, "bytes_ratio": round(q_bytes / fp32_bytes, 4),
            "embeddings": embeddings, "step": meta.get("step")}
