"""bardlm checkpoints: `config.json` + `model.safetensors` (+ `tokenizer.json`) in a directory.

No pickle anywhere: safetensors holds only tensors, JSON holds everything else. A save is all or
nothing as a whole (`atomic.py`), and every file of one save carries the same `save_id`, so a
folder whose files come from two saves (copied by hand, or written by an older version that
crashed between renames) is refused on load instead of silently mixing two steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..config import ModelConfig
from ..errors import BardlmError
from ..infer.int4 import GROUP_SIZES, Int4Linear, swap_int4, tie_int4_head
from ..infer.int4 import METHOD as INT4_METHOD
from ..infer.quantize import (
    COMPUTE_DTYPE,
    quantized_state_dict,
    swap_int8,
    tie_int8_head,
)
from ..nn.model import GPT
from ..tokenizers import Tokenizer
from ..tokenizers import load as load_tokenizer
from .atomic import (
    Writer,
    atomic_write_many,
    atomic_write_text,
    recover,
    tensors_writer,
    text_writer,
)
from .metadata import CONFIG_FILE, ModelMeta

MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
# What a training run keeps beside its checkpoint (train/); a new model in the folder drops them,
# or `train --resume` would pair the new weights with the old run's optimizer.
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
RUN_FILES = (OPTIMIZER_FILE, STATE_FILE, METRICS_FILE, "loss.png")


def check_writable(out: str | Path) -> Path:
    """Refuse an --out folder that cannot be made or written, before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BardlmError(f"--out {out} is a file; pass a folder (or remove the file)")
    there = out  # the folder that exists: `out`, or the one its missing folders are made in
    while not there.exists() and there != there.parent:
        there = there.parent
    if not there.is_dir():
        raise BardlmError(f"--out {out}: {there} is a file, so no folder can be made in it; choose another --out")
    if not os.access(there, os.W_OK | os.X_OK):
        raise BardlmError(f"--out {out}: {there} is not writable; fix its permissions or choose another --out")
    return out


def claim_out(out: str | Path, overwrite: bool, held: str = "a model",
              also: str = "") -> Path:
    """The one rule of every verb that writes a model folder (train, finetune, convert, export,
    quantize, merge): `out` must not be a file, and a folder already holding a checkpoint is
    refused unless `overwrite`; overwriting drops the run files of the old model with it.
    held: what the folder is said to hold; also: other ways out, e.g. "--resume to continue it or ".
    """
    out = check_writable(out)
    if (out / CONFIG_FILE).exists():
        if not overwrite:
            raise BardlmError(f"{out} already holds {held}; pass {also}--overwrite to replace it")
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    return out


# Writing --------------------------------------------------------------------------------------
def new_save_id() -> str:
    return uuid.uuid4().hex


def state_dict_for_save(
    model: torch.nn.Module, sd: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's tensors (or `sd`, e.g. gathered from FSDP shards) with tied weights stored
    once (safetensors refuses shared memory)."""
    if getattr(model, "quantization", None) and sd is None:
        return quantized_state_dict(model)
    sd = dict(model.state_dict() if sd is None else sd)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def checkpoint_writes(
    out: str | Path,
    model: torch.nn.Module,
    tokenizer: Tokenizer | None = None,
    meta: dict[str, Any] | None = None,
    sd: dict[str, torch.Tensor] | None = None,
    save_id: str | None = None,
) -> list[tuple[Path, Writer]]:
    """The (path, writer) pairs of a checkpoint: weights (`sd` if given), config and tokenizer,
    all stamped with one `save_id`."""
    out = Path(out)
    save_id = save_id or new_save_id()
    meta = dict(meta or {})
    step = str(meta.get("step", 0))
    tensors = state_dict_for_save(model, sd)
    writes = [(out / MODEL_FILE, tensors_writer(tensors, {"format": "pt", "step": step, "save_id": save_id}))]
    config = {"model": model.config.to_dict(), **meta, "save_id": save_id}
    if getattr(model, "quantization", None):
        config["quantization"] = model.quantization
    if tokenizer is not None:
        writes.append((out / TOKENIZER_FILE, text_writer(json.dumps(tokenizer.to_dict(), ensure_ascii=False))))
        config["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    writes.append((out / CONFIG_FILE, text_writer(json.dumps(config, indent=2))))
    return writes


def save_checkpoint(
    out: str | Path,
    model: torch.nn.Module,
    tokenizer: Tokenizer | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write model weights, config and tokenizer into `out`, all or nothing."""
    atomic_write_many(checkpoint_writes(out, model, tokenizer, meta))
    return Path(out)


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write a tokenizer as JSON (atomically); `bardlm.tokenizers.load` reads it back."""
    atomic_write_text(Path(path), json.dumps(tok.to_dict(), ensure_ascii=False))


# Reading --------------------------------------------------------------------------------------
def check_dir(ckpt: str | Path) -> Path:
    ckpt = Path(ckpt)
    if ckpt.is_file() and ckpt.suffix in PICKLE_SUFFIXES:
        raise BardlmError(
            f"{ckpt} looks like a pickle file; bardlm never unpickles (it can run arbitrary code). "
            "Convert it to safetensors with the tool that made it"
        )
    if not ckpt.exists():
        raise BardlmError(f"checkpoint directory {ckpt} does not exist; check the --ckpt path")
    if not ckpt.is_dir():
        raise BardlmError(f"{ckpt} is a file, not a checkpoint directory; pass the directory")
    return ckpt


def read_config(ckpt: str | Path) -> dict[str, Any]:
    ckpt = check_dir(ckpt)
    recover(ckpt)  # finish a save that a crash interrupted after its commit point
    path = ckpt / CONFIG_FILE
    if not path.is_file():
        raise BardlmError(f"{ckpt} has no {CONFIG_FILE}; is it a bardlm checkpoint directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BardlmError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(data, dict) or "model" not in data:
        raise BardlmError(f"{path} has no 'model' section; is it a bardlm checkpoint?")
    return data


def load_tensors(path: Path, save_id: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; with `save_id`, refuse a file from another save."""
    if not path.is_file():
        raise BardlmError(f"{path} is missing; the checkpoint is incomplete (re-save or re-train)")
    try:
        if save_id is not None:
            with safe_open(str(path), "pt") as f:
                found = (f.metadata() or {}).get("save_id")
            if found != save_id:
                raise BardlmError(
                    f"{path} comes from another save than {path.parent / CONFIG_FILE} (save_id "
                    f"{found} vs {save_id}): the folder mixes two checkpoints; restore it whole"
                )
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BardlmError(
            f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
            "it may be truncated: re-save or re-train"
        ) from None


def load_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str, assign: bool = False) -> None:
    """Copy tensors into the model (or, `assign`, make them its tensors: no second copy), naming
    any missing, unexpected or mis-shaped tensor."""
    expected = state_dict_for_save(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise BardlmError(
            f"{where} does not match its config: missing {missing[:3]} unexpected {unexpected[:3]}"
        )
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise BardlmError(
                f"{where}: tensor {k} has shape {tuple(v.shape)} but the config needs "
                f"{tuple(expected[k].shape)}; the config and weights come from different models"
            )
    model.load_state_dict(tensors, strict=False, assign=assign)


def build_model(
    cfg: ModelConfig, tensors: dict[str, torch.Tensor], where: str,
    quantization: dict[str, Any] | None = None, dtype: torch.dtype | None = None,
) -> GPT:
    """The one way a `GPT` is made from stored tensors (bardlm, INT8 and Hugging Face files).

    Built on the meta device (no random init of weights about to be overwritten), then given the
    stored tensors themselves, each cast to its parameter's dtype (`dtype`, else the model's
    fp32) one at a time, so loading holds the weights about once, not twice; or given int8 modules
    that adopt the stored tensors as they are (no float copy ever exists). Position tables are
    recomputed; a tied head is re-tied. `tensors` is consumed: its entries become the model's.
    """
    with torch.device("meta"):
        model = GPT(cfg)
    if any(t.dtype == torch.int8 for t in tensors.values()) or quantization:
        return _adopt_int8(model, tensors, where, quantization or {})
    if dtype is not None:
        model = model.to(dtype)
    want, seen = model.state_dict(), set()
    for k, v in tensors.items():
        w = want.get(k)
        if w is not None and ((v.dtype != w.dtype and v.is_floating_point()) or not v.is_contiguous()):
            v = tensors[k] = v.to(w.dtype if v.is_floating_point() else v.dtype).contiguous()
        place = (v.data_ptr(), v.shape, v.stride())
        if place in seen:  # one stored tensor read into two weights: each gets its own (as a copy would)
            v = tensors[k] = v.clone()
        seen.add((v.data_ptr(), v.shape, v.stride()))
    load_state(model, tensors, where, assign=True)
    for name, buf in model.buffers_for(cfg).items():  # recomputed in fp32, never loaded or cast
        model.register_buffer(name, buf, persistent=False)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise BardlmError(f"{where}: no stored values for {left[:3]}; the checkpoint is incomplete")
    return model


def _check_quantized(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str,
                     kind: str) -> None:
    """The saved tensors of a quantized checkpoint are the ones its config builds: the same names,
    shapes and dtypes (`expected` from the modules on meta), else one line."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise BardlmError(f"{where}: the {kind} checkpoint does not match its config: missing "
                          f"{missing[:3]} unexpected {unexpected[:3]}; re-run `bardlm quantize`")
    for k, v in tensors.items():
        if v.shape != expected[k].shape or v.dtype != expected[k].dtype:
            raise BardlmError(
                f"{where}: {kind} tensor {k} is {v.dtype} {tuple(v.shape)} but the config needs "
                f"{expected[k].dtype} {tuple(expected[k].shape)}; re-run `bardlm quantize`")


def _adopt_int8(model: GPT, tensors: dict[str, torch.Tensor], where: str, q: dict[str, Any]) -> GPT:
    if q.get("method") == INT4_METHOD:
        return _adopt_int4(model, tensors, where, q)
    if q.get("method") != "int8-weight-only":
        raise BardlmError(
            f"{where} holds int8 tensors but its config.json has no int8-weight-only "
            "'quantization' entry; re-run `bardlm quantize` on the float checkpoint"
        )
    embeddings = bool(q.get("embeddings", True))
    swap_int8(model, embeddings, convert=False)
    model = model.to(COMPUTE_DTYPE)  # still on meta: costs nothing; int8 buffers stay int8
    _check_quantized(tensors, quantized_state_dict(model), where, "int8")
    # Adopt the loaded tensors rather than copying them; the int8 kernel uses aligned vector loads
    # and crashes on tensors that sit at an odd offset of the file, so only those are re-homed.
    tensors = {k: v if v.data_ptr() % 64 == 0 else v.clone() for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    if model.config.tie_embeddings:
        if embeddings:
            tie_int8_head(model)
        else:
            model.lm_head.weight = model.transformer.wte.weight
    for name, table in GPT.buffers_for(model.config).items():  # the position tables, fp32, on CPU
        model.register_buffer(name, table, persistent=False)
    model.quantization = {"method": "int8-weight-only", "embeddings": embeddings}
    return model.eval()


def _adopt_int4(model: GPT, tensors: dict[str, torch.Tensor], where: str, q: dict[str, Any]) -> GPT:
    """An INT4 checkpoint: int4 modules on meta, then filled (each linear layer repacks its
    stored nibbles into the CPU kernel's layout as it loads them)."""
    group_size, embeddings = q.get("group_size"), bool(q.get("embeddings", True))
    if group_size not in GROUP_SIZES:
        raise BardlmError(f"{where}: int4 group size {group_size!r} is not one of {GROUP_SIZES}; "
                          "re-run `bardlm quantize --bits 4`")
    swap_int4(model, group_size, embeddings, convert=False)
    model = model.to(COMPUTE_DTYPE)  # still on meta; uint8 codes stay uint8
    _check_quantized(tensors, quantized_state_dict(model), where, "int4")
    for module in model.modules():  # kernel buffers are built, not loaded: give them memory
        if isinstance(module, Int4Linear):
            module.to_empty(device="cpu")
    model.load_state_dict(tensors, strict=False, assign=True)
    if model.config.tie_embeddings:
        if embeddings:
            tie_int4_head(model)
        else:
            model.lm_head.weight = model.transformer.wte.weight
    for name, table in GPT.buffers_for(model.config).items():
        model.register_buffer(name, table, persistent=False)
    model.quantization = {"method": INT4_METHOD, "group_size": group_size, "embeddings": embeddings}
    return model.eval()


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """A hash of what defines a tokenizer (its kind's vocabulary, merges and special tokens),
    not of how a library version happens to serialise it: merges written as "a b" or as
    ["a", "b"] give the same fingerprint."""
    data = tok.to_dict()
    hf = data.get("tokenizer", data) if isinstance(data, dict) else data
    if isinstance(hf, dict) and "model" in hf:
        model = hf["model"]
        merges = [m if isinstance(m, list) else m.split(" ", 1) for m in model.get("merges") or []]
        added = sorted((t["id"], t["content"]) for t in hf.get("added_tokens") or [])
        data = {"kind": data.get("kind", "hf"), "vocab": model.get("vocab"), "merges": merges,
                "added": added}
    text = json.dumps(data, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_checkpoint(ckpt: str | Path, device: str | torch.device = "cpu"):  # noqa: ANN201
    """(model in eval mode, tokenizer or None, config dict) from a bardlm checkpoint directory
    (float or INT8). Most callers want `bardlm.load`, which reads every format."""
    meta = read_config(ckpt)
    ckpt = Path(ckpt)
    cfg = ModelConfig.from_dict(meta["model"])
    tensors = load_tensors(ckpt / MODEL_FILE, meta.get("save_id"))
    model = build_model(cfg, tensors, str(ckpt / MODEL_FILE), meta.get("quantization"))
    tok_path = ckpt / TOKENIZER_FILE
    tokenizer = load_tokenizer(tok_path) if tok_path.is_file() else None
    if tokenizer is not None:
        expected = meta.get("tokenizer_fingerprint")
        if tokenizer.vocab_size > cfg.vocab_size or (expected and expected != tokenizer_fingerprint(tokenizer)):
            raise BardlmError(
                f"{tok_path} is not the tokenizer this model was trained with (it comes from "
                "another run); copy the run's own tokenizer.json back"
            )
        ModelMeta.from_checkpoint(meta).apply(tokenizer)  # BOS/EOS of a converted HF directory
    return model.to(device).eval(), tokenizer, meta
