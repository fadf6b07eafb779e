"""Checkpoints: `config.json` + `model.safetensors` (+ `tokenizer.json`) in a directory.

No pickle anywhere: safetensors holds only tensors, JSON holds everything else. Every file is
written to a temporary name and renamed into place, so a crash or a full disk mid-write leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import BardlmError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def atomic_write_many(writes: list[tuple[Path, Callable[[str], None]]]) -> None:
    """Write several files so that either all of them are replaced or none is.

    Each writer fills a temporary file beside its target; only when every one has been written
    and flushed (a full disk fails here, before anything is replaced) are they renamed into
    place, and a rename needs no space.
    """
    temps: list[tuple[str, Path]] = []
    try:
        for path, write in writes:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            temps.append((tmp, path))
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
    except BaseException as e:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise BardlmError(
                f"could not write {path} ({e.strerror or e}); the previous files are intact. "
                "Free disk space (or fix permissions) and save again"
            ) from None
        raise
    for tmp, path in temps:
        os.replace(tmp, path)


def text_writer(text: str) -> Callable[[str], None]:
    return lambda tmp: Path(tmp).write_text(text, encoding="utf-8")


def tensors_writer(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Callable[[str], None]:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    return lambda tmp: save_file(tensors, tmp, metadata=metadata)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_many([(path, text_writer(text))])


def state_dict_for_save(
    model: torch.nn.Module, sd: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's tensors (or `sd`, e.g. gathered from FSDP shards) with tied weights stored
    once (safetensors refuses shared memory)."""
    sd = dict(model.state_dict() if sd is None else sd)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def checkpoint_writes(
    out: str | Path,
    model: torch.nn.Module,
    tokenizer: Any = None,
    meta: dict[str, Any] | None = None,
    sd: dict[str, torch.Tensor] | None = None,
) -> list[tuple[Path, Callable[[str], None]]]:
    """The (path, writer) pairs of a checkpoint: weights (`sd` if given), config and tokenizer."""
    out = Path(out)
    step = str((meta or {}).get("step", 0))
    tensors = state_dict_for_save(model, sd)
    writes = [(out / MODEL_FILE, tensors_writer(tensors, {"format": "pt", "step": step}))]
    config = {"model": model.config.to_dict(), **(meta or {})}
    if tokenizer is not None:
        tok_json = json.dumps(tokenizer.to_dict(), ensure_ascii=False)
        writes.append((out / TOKENIZER_FILE, text_writer(tok_json)))
        config["tokenizer_sha256"] = _sha256(tok_json)
    writes.append((out / CONFIG_FILE, text_writer(json.dumps(config, indent=2))))
    return writes


def save_checkpoint(
    out: str | Path,
    model: torch.nn.Module,
    tokenizer: Any = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write model weights, config and tokenizer into `out`, all or nothing."""
    atomic_write_many(checkpoint_writes(out, model, tokenizer, meta))
    return Path(out)


def read_config(ckpt: str | Path) -> dict[str, Any]:
    ckpt = check_dir(ckpt)
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


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BardlmError(f"{path} is missing; the checkpoint is incomplete (re-save or re-train)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BardlmError(
            f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
            "it may be truncated: re-save or re-train"
        ) from None


def load_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy tensors into the model, naming any missing, unexpected or mis-shaped tensor."""
    expected = {k: v for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        expected.pop("lm_head.weight", None)
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
    model.load_state_dict(tensors, strict=False)


def load_checkpoint(ckpt: str | Path, device: str | torch.device = "cpu"):  # noqa: ANN201
    """(model, tokenizer or None, config dict) from a checkpoint directory."""
    from .model import GPT
    from .tokenizers import load as load_tokenizer

    meta = read_config(ckpt)
    ckpt = Path(ckpt)
    cfg = ModelConfig.from_dict(meta["model"])
    tensors = load_tensors(ckpt / MODEL_FILE)
    if any(t.dtype == torch.int8 for t in tensors.values()):
        from .quantize import load_quantized  # an int8 checkpoint from `bardlm quantize`

        model = load_quantized(cfg, tensors, meta)
    else:
        with torch.device("meta"):
            model = GPT(cfg)
        model = model.to_empty(device="cpu")
        _reinit_buffers(model)
        load_state(model, tensors, str(ckpt / MODEL_FILE))
        if cfg.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
    tok_path = ckpt / TOKENIZER_FILE
    tokenizer = load_tokenizer(tok_path) if tok_path.is_file() else None
    if tokenizer is not None:
        expected = meta.get("tokenizer_sha256")
        actual = _sha256(json.dumps(tokenizer.to_dict(), ensure_ascii=False))
        if tokenizer.vocab_size > cfg.vocab_size or (expected and expected != actual):
            raise BardlmError(
                f"{tok_path} is not the tokenizer this model was trained with (it comes from "
                "another run); copy the run's own tokenizer.json back"
            )
    return model.to(device).eval(), tokenizer, meta


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _reinit_buffers(model: torch.nn.Module) -> None:
    """Recompute the non-persistent buffers (position tables) lost by building on `meta`."""
    from .model import GPT

    fresh = GPT.buffers_for(model.config)
    for name, buf in fresh.items():
        model.register_buffer(name, buf, persistent=False)
