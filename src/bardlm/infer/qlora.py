"""QLoRA's frozen bases: a model's linear layers held in int8 or int4 under LoRA adapters.

Each quantized layer computes through `quantize.FrozenQuantMatmul`, which dequantizes its weight
for the one matmul that needs it (forward, and again in backward for the input's gradient) and
keeps none, so a training step holds at most one layer's float weight at a time. (Here, above
both quantize.py and int4.py, because it chooses between them.)
"""

from __future__ import annotations

from torch import nn

from ..errors import BardlmError
from .int4 import Int4Linear
from .quantize import Int8Embedding, Int8Linear, swap_int8, swap_weights

# Frozen bases LoRA trains over (`bardlm finetune --base-dtype`).
BASE_DTYPES = ("fp32", "int8", "int4")


def quantize_base(model: nn.Module, base_dtype: str, embeddings: bool = True) -> nn.Module:
    """Hold a model's linear layers (not MoE routers) in `base_dtype` as frozen quantized layers,
    for LoRA on top (QLoRA); "fp32" leaves it as it is. int8: one scale per row (quantize.py);
    int4: groups of 32 (int4.py's rule). With `embeddings` (unless they train, e.g. rows added to
    the vocabulary) the token embedding and the head (tied: one table) are held in int8 too, a
    scale per token: at Qwen3-0.6B's vocabulary that table is 0.58 GiB in fp32, more than all
    28 blocks in int4. The chunked loss reads the head a block of rows at a time."""
    if base_dtype == "int4":
        swap_weights(model, False, lambda full, child: Int4Linear.frozen(child), lambda child: child)
    elif base_dtype not in ("fp32", "int8"):
        raise BardlmError(f"--base-dtype must be one of {', '.join(BASE_DTYPES)}, got {base_dtype!r}")
    if base_dtype != "fp32":  # int8: the blocks' layers; both: the embedding and head
        swap_int8(model, embeddings=embeddings, convert=True)
        for m in model.modules():
            if isinstance(m, (Int8Linear, Int8Embedding)):
                m.frozen_base = True
    return model
