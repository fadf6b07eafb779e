"""Growing a model's vocabulary: new token ids get embedding (and head) rows.

A tokenizer that gains tokens (a chat template's special tokens, `infer.chat.prepare_vocab`)
gives them the next ids, so the old rows stay where they are. A new row starts at the mean of
the old rows: a typical token, not a random one that the softmax over the head would single out.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BardlmError


@torch.no_grad()
def resize_vocab(model: nn.Module, vocab_size: int) -> nn.Module:
    """Give `model` (a GPT) `vocab_size` token rows: wte (V, C) and an untied lm_head (V, C)."""
    cfg = model.config
    old = cfg.vocab_size
    if vocab_size < old:
        raise BardlmError(f"the vocabulary can only grow ({old} -> {vocab_size})")
    if vocab_size == old:
        return model

    def grown(weight: torch.Tensor) -> nn.Parameter:
        extra = weight.mean(0, keepdim=True).expand(vocab_size - old, -1)
        return nn.Parameter(torch.cat([weight, extra], 0), requires_grad=weight.requires_grad)

    wte = model.transformer.wte
    wte.weight = grown(wte.weight)
    wte.num_embeddings = vocab_size
    if cfg.tie_embeddings:
        model.lm_head.weight = wte.weight
    else:
        model.lm_head.weight = grown(model.lm_head.weight)
    model.lm_head.out_features = vocab_size
    model.config = cfg.replace(vocab_size=vocab_size)
    return model
