"""The encoder-decoder Transformer of "Attention Is All You Need", built from the GPT's own parts.

    src (B, S) --embed*sqrt(C) + sinusoid--> Block(causal=False) x n_enc_layer --> memory (B, S, C)
    tgt (B, T) --embed*sqrt(C) + sinusoid--> Block(causal=True, cross=True) x n_dec_layer
              (each block: causal self-attention, cross-attention over memory, feed-forward)
              --> lm_head --> logits (B, T, V_tgt)

The differences from the decoder-only `GPT` are all here in a few lines: the encoder's blocks are
bidirectional and see a padding mask, the decoder's blocks gain a cross-attention sub-layer, and the
same `Attention` module serves all three kinds of attention. Post-norm (the paper) is the default;
pre-norm adds a final norm after each stack, as pre-norm models need.

Decoding computes the encoder output and every layer's cross-attention keys/values once per
source, and keeps the decoder's self-attention keys/values in a `KVCache`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, check_types, from_dict
from ..errors import BardlmError
from ..nn.block import Block
from ..nn.cache import KVCache
from ..nn.dropout import Dropout
from ..nn.norm import make_norm
from ..nn.position import sinusoidal_table

PAD, BOS, EOS = 0, 1, 2  # reserved ids: padding, start of target, end of target


@dataclass
class Seq2SeqConfig:
    """The shape of an encoder-decoder model; defaults follow the paper's choices (ReLU FFN,
    post-norm, sinusoidal positions, output layer tied to the target embedding)."""

    src_vocab_size: int = 16
    tgt_vocab_size: int = 16
    max_len: int = 64  # longest source or target sequence (rows of the sinusoid table)
    n_enc_layer: int = 2
    n_dec_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    ffn_hidden: int | None = None  # None -> 4 * n_embd (the paper: 2048 for 512)
    ffn: str = "relu"
    norm: str = "layernorm"
    norm_placement: str = "post"  # "post" (the paper) or "pre"
    dropout: float = 0.0
    fast_dropout: bool = True  # see ModelConfig.fast_dropout
    bias: bool = True
    share_embeddings: bool = False  # one matrix for source and target tokens (a shared vocab)
    tie_output: bool = True  # the output layer reuses the target embedding matrix
    attn_impl: str = "sdpa"

    def __post_init__(self) -> None:
        check_types(self, "seq2seq config")
        for name in ("src_vocab_size", "tgt_vocab_size", "n_enc_layer", "n_dec_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise BardlmError(f"seq2seq config: {name} must be a positive integer, got {value!r}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise BardlmError(
                f"seq2seq config: share_embeddings needs one vocabulary, but src_vocab_size is "
                f"{self.src_vocab_size} and tgt_vocab_size {self.tgt_vocab_size}; make them equal "
                "or set share_embeddings=false"
            )
        self.layer_config()  # validates the shared fields (heads, norm, ffn, ...)

    def layer_config(self) -> ModelConfig:
        """The `ModelConfig` the blocks read: the same fields a GPT layer is built from."""
        return ModelConfig(
            vocab_size=self.tgt_vocab_size, block_size=self.max_len, n_layer=self.n_dec_layer,
            n_head=self.n_head, n_embd=self.n_embd, ffn_hidden=self.ffn_hidden, ffn=self.ffn,
            norm=self.norm, norm_placement=self.norm_placement, pos="sinusoidal",
            bias=self.bias, dropout=self.dropout, fast_dropout=self.fast_dropout,
            attn_impl=self.attn_impl,
            tie_embeddings=self.tie_output,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Seq2SeqConfig:
        return from_dict(cls, data, "seq2seq config")


def padding_mask(ids: torch.Tensor) -> torch.Tensor:
    """ids (B, S) -> bool (B, 1, 1, S), True at real tokens: every query may attend them only."""
    return (ids != PAD)[:, None, None, :]


class EncoderDecoder(nn.Module):
    """Encoder and decoder stacks of `Block`s joined by cross-attention."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = cfg
        layer = cfg.layer_config()
        C = cfg.n_embd
        self.src_emb = nn.Embedding(cfg.src_vocab_size, C)
        self.tgt_emb = self.src_emb if cfg.share_embeddings else nn.Embedding(cfg.tgt_vocab_size, C)
        self.register_buffer("pos_table", sinusoidal_table(cfg.max_len, C), persistent=False)
        self.drop = Dropout(cfg.dropout, cfg.fast_dropout)
        self.encoder = nn.ModuleList([Block(layer, causal=False) for _ in range(cfg.n_enc_layer)])
        self.decoder = nn.ModuleList(
            [Block(layer, causal=True, cross=True) for _ in range(cfg.n_dec_layer)]
        )
        # Post-norm outputs are already normalised; a pre-norm stack ends on an un-normed sum.
        pre = cfg.norm_placement == "pre"
        def final_norm() -> nn.Module:
            return make_norm(cfg.norm, C, layer.norm_eps, cfg.bias, layer.fused_ops) if pre else nn.Identity()

        self.enc_norm, self.dec_norm = final_norm(), final_norm()
        self.lm_head = nn.Linear(C, cfg.tgt_vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_output:
            self.lm_head.weight = self.tgt_emb.weight

    def _init_weights(self) -> None:
        # Embeddings ~ N(0, 1/C), scaled by sqrt(C) in `embed`: unit-variance token vectors the
        # size of the sinusoid, and unit-variance logits through the tied output layer.
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=self.config.n_embd**-0.5)
            elif isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, emb: nn.Embedding, ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """ids (B, T) -> (B, T, C): token vectors * sqrt(C) plus the sinusoid of each position."""
        T = ids.shape[1]
        if start_pos + T > self.config.max_len:
            raise BardlmError(
                f"sequence of {start_pos + T} tokens is longer than max_len {self.config.max_len}; "
                "shorten it or build the model with a larger max_len"
            )
        x = emb(ids) * math.sqrt(self.config.n_embd) + self.pos_table[start_pos : start_pos + T]
        return self.drop(x)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) ids, right-padded with PAD -> (memory (B, S, C), src_mask (B, 1, 1, S)).

        Padded keys are masked out of every attention, so a real position's output does not
        depend on how much padding follows it.
        """
        src_mask = padding_mask(src)
        if not bool(src_mask.any(-1).all()):
            raise BardlmError("a source sequence is empty (all padding); give every row a token")
        x = self.embed(self.src_emb, src)
        for block in self.encoder:
            x = block(x, mask=src_mask)
        return self.enc_norm(x), src_mask

    def decode(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor | list[tuple[torch.Tensor, torch.Tensor]],
        src_mask: torch.Tensor,
        cache: list[KVCache] | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """tgt (B, T) ids at positions start_pos.. -> logits (B, T, V_tgt).

        memory: the encoder output (B, S, C), or per-layer cross (k, v) from `cross_kv`.
        cache: per-layer self-attention `KVCache` from `make_cache` (incremental decoding).
        """
        x = self.embed(self.tgt_emb, tgt, start_pos)
        for i, block in enumerate(self.decoder):
            mem = memory[i] if isinstance(memory, list) else memory
            x = block(x, cache=None if cache is None else cache[i], start_pos=start_pos,
                      memory=mem, memory_mask=src_mask)
        return self.lm_head(self.dec_norm(x))

    def forward(
        self, src: torch.Tensor, tgt: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: src (B, S), tgt (B, T) decoder inputs (BOS y...) -> (logits (B, T, V),
        loss or None); targets (B, T) are the next tokens (y... EOS), PAD where they do not count."""
        memory, src_mask = self.encode(src)
        logits = self.decode(tgt, memory, src_mask)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=PAD
            )
        return logits, loss

    # Decoding helpers -----------------------------------------------------------------------
    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys/values of memory (B, S, C), computed once."""
        return [block.cross_attn.project_kv(memory) for block in self.decoder]

    def make_cache(self, batch: int, max_len: int | None = None) -> list[KVCache]:
        """One self-attention `KVCache` per decoder layer."""
        p = next(self.parameters())
        layer = self.config.layer_config()
        return [
            KVCache(batch, max_len or self.config.max_len, layer.n_kv_head, layer.head_dim,
                    p.dtype, p.device)
            for _ in self.decoder
        ]


# Decoding ---------------------------------------------------------------------------------
@torch.no_grad()
def greedy_decode(model: EncoderDecoder, src: torch.Tensor, max_len: int) -> torch.Tensor:
    """src (B, S) -> (B, max_len) target ids (without BOS), PAD after each row's EOS."""
    return beam_search(model, src, max_len, beam=1)


@torch.no_grad()
def beam_search(
    model: EncoderDecoder,
    src: torch.Tensor,
    max_len: int,
    beam: int = 4,
    length_penalty: float = 0.0,
) -> torch.Tensor:
    """The highest-scoring target of each source: src (B, S) -> (B, max_len) ids, PAD after EOS.

    A hypothesis's score is its summed log-probability, divided by ((5 + len) / 6)^length_penalty
    (GNMT) when choosing among the final beams. Finished hypotheses stay in the beam with their
    score frozen (they can only emit PAD at no cost), so beam=1 is exactly greedy decoding.
    The encoder runs once per source and its cross-attention keys/values are computed once;
    the beams of one source share them.
    """
    if beam < 1:
        raise BardlmError(f"beam width must be at least 1, got {beam}")
    if max_len > model.config.max_len:  # the decoder reads positions 0 .. max_len - 1
        raise BardlmError(
            f"cannot decode {max_len} tokens: the model's max_len is {model.config.max_len}"
        )
    was_training = model.training
    model.eval()
    B, K = src.shape[0], beam
    memory, src_mask = model.encode(src)
    # Beams of one source are adjacent rows: row b * K + k.
    cross = [(k.repeat_interleave(K, 0), v.repeat_interleave(K, 0)) for k, v in model.cross_kv(memory)]
    src_mask = src_mask.repeat_interleave(K, 0)
    cache = model.make_cache(B * K, max_len)
    scores = torch.full((B, K), float("-inf"), device=src.device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first at step 0
    finished = torch.zeros(B, K, dtype=torch.bool, device=src.device)
    lengths = torch.zeros(B, K, dtype=torch.long, device=src.device)
    out = torch.full((B, K, max_len), PAD, dtype=torch.long, device=src.device)
    token = torch.full((B * K, 1), BOS, dtype=torch.long, device=src.device)
    for t in range(max_len):
        logits = model.decode(token, cross, src_mask, cache, start_pos=t)[:, -1]
        logp = F.log_softmax(logits.float(), dim=-1).view(B, K, -1)
        V = logp.shape[-1]
        logp[..., [PAD, BOS]] = float("-inf")  # never generated: PAD only follows an EOS
        # A finished hypothesis may only continue with PAD, at no cost.
        done = torch.full_like(logp[0, 0], float("-inf"))
        done[PAD] = 0.0
        logp = torch.where(finished[..., None], done, logp)
        total = (scores[..., None] + logp).view(B, K * V)
        scores, flat = total.topk(K, dim=-1)  # (B, K): best K continuations of all beams
        parent, tok = flat // V, flat % V
        rows = (parent + torch.arange(B, device=src.device)[:, None] * K).view(-1)
        for c in cache if K > 1 else []:  # each hypothesis takes its parent's keys/values
            c.k[:, :, : t + 1] = c.k[:, :, : t + 1].index_select(0, rows)
            c.v[:, :, : t + 1] = c.v[:, :, : t + 1].index_select(0, rows)
        out = out.gather(1, parent[..., None].expand(-1, -1, max_len))
        out[:, :, t] = tok
        was_done = finished.gather(1, parent)
        lengths = lengths.gather(1, parent) + (~was_done).long()
        finished = was_done | (tok == EOS)
        token = tok.view(-1, 1)
        if bool(finished.all()):
            break
    norm = ((5.0 + lengths.float()) / 6.0) ** length_penalty
    best = (scores / norm).argmax(-1)  # (B,)
    model.train(was_training)
    return out[torch.arange(B, device=src.device), best]


@torch.no_grad()
def sequence_logprob(model: EncoderDecoder, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of tgt (B, T) (ids ending in EOS, then PAD) given src -> (B,)."""
    dec_in = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], dim=1)
    logits, _ = model(src, dec_in)
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, tgt[..., None]).squeeze(-1)
    return (logp * (tgt != PAD)).sum(-1)


def strip(ids: torch.Tensor) -> list[list[int]]:
    """(B, T) decoded ids -> each row's tokens before its first EOS (PAD dropped)."""
    rows = []
    for row in ids.tolist():
        cut = row.index(EOS) if EOS in row else len(row)
        rows.append([t for t in row[:cut] if t != PAD])
    return rows


# Saving -----------------------------------------------------------------------------------
def _unique_tensors(model: EncoderDecoder) -> dict[str, torch.Tensor]:
    """The state dict with each tied matrix (shared embeddings, tied output) stored once."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensors[name] = t
    return tensors


def save_seq2seq(out: str | Path, model: EncoderDecoder, meta: dict[str, Any] | None = None) -> None:
    """config.json + model.safetensors in `out`, written all or nothing with one save_id."""
    from ..io.atomic import atomic_write_many, tensors_writer, text_writer
    from ..io.checkpoint import CONFIG_FILE, MODEL_FILE, new_save_id

    out, save_id = Path(out), new_save_id()
    config = {"kind": "seq2seq", "model": model.config.to_dict(), **(meta or {}), "save_id": save_id}
    atomic_write_many([
        (out / MODEL_FILE, tensors_writer(_unique_tensors(model), {"format": "pt", "save_id": save_id})),
        (out / CONFIG_FILE, text_writer(json.dumps(config, indent=2))),
    ])


def load_seq2seq(ckpt: str | Path) -> EncoderDecoder:
    """The model `save_seq2seq` wrote into `ckpt`, in eval mode."""
    from ..io.checkpoint import MODEL_FILE, load_tensors, read_config

    meta = read_config(ckpt)
    if meta.get("kind") != "seq2seq":
        raise BardlmError(f"{ckpt} holds a decoder-only model, not a seq2seq one; use `bardlm generate`")
    model = EncoderDecoder(Seq2SeqConfig.from_dict(meta["model"]))
    tensors = load_tensors(Path(ckpt) / MODEL_FILE, meta.get("save_id"))
    expected = _unique_tensors(model)
    if set(tensors) != set(expected):
        raise BardlmError(
            f"{ckpt} does not match its config: missing {sorted(set(expected) - set(tensors))[:3]} "
            f"unexpected {sorted(set(tensors) - set(expected))[:3]}"
        )
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise BardlmError(f"{ckpt}: {name} has shape {tuple(t.shape)}, the config needs "
                              f"{tuple(expected[name].shape)}; config and weights differ")
    model.load_state_dict(tensors, strict=False)  # tied matrices arrive through their owner
    return model.eval()


__all__ = [
    "EncoderDecoder", "Seq2SeqConfig", "beam_search", "greedy_decode", "sequence_logprob",
    "save_seq2seq", "load_seq2seq", "PAD", "BOS", "EOS",
]
