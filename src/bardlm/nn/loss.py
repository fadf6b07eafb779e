"""Cross-entropy through the output head in chunks of tokens: the loss and its gradients without
ever holding the (tokens x vocabulary) logits.

    h (N, C) final hidden states, W (V, C) the head, y (N,) targets (-1: not counted)
    logits_i = h_i W^T,   nll_i = logsumexp(logits_i) - logits_i[y_i]
    d nll_i / d logits_i = softmax(logits_i) - onehot(y_i)
    d/dh = G W,   d/dW = G^T h            (G: the (chunk, V) gradient of the logits)

A Qwen3 vocabulary (151,936) at 1,024 tokens is 0.6 GB of fp32 logits, as much again for their
log-softmax kept for backward and again for their gradient. Here only `chunk` rows of logits
exist at a time (chunk x V x 4 bytes, plus the same for their gradient).

`chunked_cross_entropy` (the mean over counted tokens) works out the gradients during its forward
pass, chunk by chunk, as Liger-Kernel's fused linear cross-entropy does: the loss is a mean, so
its upstream gradient is one number that backward only multiplies in, and no logit is computed
twice. `chunked_token_nll` (one loss per token, for DPO/GRPO's log-probabilities, whose upstream
gradients differ per token) keeps each row's logsumexp and recomputes a chunk's logits in backward.

Logits are fp32 whatever the compute dtype (under bf16 autocast the matmuls run in bf16 and their
output is widened to fp32, as the plain path's `logits.float()` does).

The head W is a float tensor, or a frozen quantized head (QLoRA's int8 embedding and tied head):
any module with `weight` (V, ...) and `dequantized_rows(start, end, dtype)` -> (end - start, C).
Its rows are dequantized VOCAB_BLOCK at a time, for each chunk, and never kept, so no float copy
of the (V, C) head ever exists; it gets no gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd import Function

VOCAB_BLOCK = 8192  # rows of a quantized head dequantized at once (32 MiB in fp32 at C = 1,024)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """bf16 (or fp16) under autocast, as `nn.Linear` would run; else the hidden states' dtype."""
    kind = h.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype


def _cast(w: Any, dtype: torch.dtype) -> Any:
    """A float head in the compute dtype; a quantized head as it is (dequantized per block)."""
    return w.to(dtype) if isinstance(w, torch.Tensor) else w


def _logits(hc: torch.Tensor, w: Any) -> torch.Tensor:
    """(n, C) x (V, C) -> (n, V) fp32 logits of one chunk (inputs already in the compute dtype)."""
    if isinstance(w, torch.Tensor):
        return (hc @ w.t()).float()
    vocab = w.weight.shape[0]
    out = torch.empty(hc.shape[0], vocab, dtype=torch.float32, device=hc.device)
    for s in range(0, vocab, VOCAB_BLOCK):
        out[:, s : s + VOCAB_BLOCK] = hc @ w.dequantized_rows(s, s + VOCAB_BLOCK, hc.dtype).t()
    return out


def _input_grad(g: torch.Tensor, w: Any) -> torch.Tensor:
    """(n, V) gradient of the logits -> (n, C) gradient of the hidden states: g W."""
    if isinstance(w, torch.Tensor):
        return g @ w
    out = None
    for s in range(0, g.shape[1], VOCAB_BLOCK):
        part = g[:, s : s + VOCAB_BLOCK] @ w.dequantized_rows(s, s + VOCAB_BLOCK, g.dtype)
        out = part if out is None else out.add_(part)
    return out


def _logits_grad(logits: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight_i * (softmax(logits_i) - onehot(y_i)) (n, V), in place of `logits` (no second
    (n, V) tensor). weight (n,) is 0 where the target is not counted."""
    g = logits.sub_(lse[:, None]).exp_()
    rows = torch.arange(len(y), device=y.device)
    g[rows, y.clamp(min=0)] -= 1.0
    return g.mul_(weight[:, None])


class _MeanCrossEntropy(Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:  # noqa: ANN001
        dtype = _compute_dtype(h)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):
            wc = _cast(w, dtype)
            valid = y >= 0
            count = valid.sum().clamp(min=1).float()
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            for s in range(0, h.shape[0], chunk):
                hc, yc = h[s : s + chunk].to(dtype), y[s : s + chunk]
                logits = _logits(hc, wc)
                lse = logits.logsumexp(-1)
                picked = logits.gather(1, yc.clamp(min=0)[:, None])[:, 0]
                total += ((lse - picked) * valid[s : s + chunk]).sum()
                if need_h or need_w:
                    g = _logits_grad(logits, lse, yc, valid[s : s + chunk] / count).to(dtype)
                    if need_h:
                        grad_h[s : s + chunk] = _input_grad(g, wc)
                    if need_w:
                        grad_w += (g.t() @ hc).float()
                    del g
                # Freed before the next chunk's logits exist: two (chunk, V) tensors at a time
                # (the logits and logsumexp's temporary), not three.
                del logits
        # Kept on ctx, not saved: backward scales them in place and hands them on, so the head's
        # gradient (V x C, as large as the head) exists once, not twice.
        ctx.grads, ctx.w_dtype = [grad_h, grad_w], w.dtype if need_w else None
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205, ANN001
        grad_h, grad_w = ctx.grads
        ctx.grads = [None, None]  # (backward runs once: a second call has nothing to return)
        return (None if grad_h is None else grad_h.mul_(grad.to(grad_h.dtype)),
                None if grad_w is None else grad_w.mul_(grad).to(ctx.w_dtype), None, None)


class _TokenNLL(Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:  # noqa: ANN001
        dtype = _compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            wc = _cast(w, dtype)
            nll = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            lse = torch.empty_like(nll)
            for s in range(0, h.shape[0], chunk):
                yc = y[s : s + chunk]
                logits = _logits(h[s : s + chunk].to(dtype), wc)
                lse[s : s + chunk] = logits.logsumexp(-1)
                picked = logits.gather(1, yc.clamp(min=0)[:, None])[:, 0]
                nll[s : s + chunk] = (lse[s : s + chunk] - picked) * (yc >= 0)
                del logits  # before the next chunk's (see _MeanCrossEntropy)
        quantized = not isinstance(w, torch.Tensor)
        ctx.save_for_backward(h, y, lse, *(() if quantized else (w,)))
        ctx.chunk, ctx.dtype, ctx.head = chunk, dtype, w if quantized else None
        return nll

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205, ANN001
        h, y, lse, *w = ctx.saved_tensors
        w = w[0] if w else ctx.head
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        chunk, dtype = ctx.chunk, ctx.dtype
        wc = _cast(w, dtype)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s : s + chunk].to(dtype), y[s : s + chunk]
            g = _logits_grad(_logits(hc, wc), lse[s : s + chunk], yc, grad[s : s + chunk].float() * (yc >= 0))
            g = g.to(dtype)
            if need_h:
                grad_h[s : s + chunk] = _input_grad(g, wc)
            if need_w:
                grad_w += (g.t() @ hc).float()
            del g  # before the next chunk's logits
        return grad_h, None if grad_w is None else grad_w.to(w.dtype), None, None


def chunked_cross_entropy(h: torch.Tensor, w: Any, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy (0-d, fp32) of logits h W^T over targets y >= 0, `chunk` tokens at a
    time: what `F.cross_entropy(h @ w.T, y, ignore_index=-1)` gives, and its gradients for h
    (..., C) and w (V, C); y (...,) has h's leading shape."""
    return _MeanCrossEntropy.apply(h.reshape(-1, h.shape[-1]), w, y.reshape(-1), chunk)


def chunked_token_nll(h: torch.Tensor, w: Any, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-token negative log-likelihoods (..., fp32) of targets y, 0 where y < 0, `chunk`
    tokens at a time: `F.cross_entropy(h @ w.T, y, ignore_index=-1, reduction="none")`."""
    return _TokenNLL.apply(h.reshape(-1, h.shape[-1]), w, y.reshape(-1), chunk).view(y.shape)
