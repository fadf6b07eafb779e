"""The decoder-only transformer (GPT), assembled from the pieces in this package.

idx (B, T) --wte--> (B, T, C) [+ learned/sinusoidal positions] --Block x n_layer--> ln_f
--lm_head--> logits (B, T, V). RoPE positions enter inside attention instead.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import STATE_KINDS, ModelConfig
from ..errors import BardlmError
from .attention import AttentionScore
from .block import Block
from .cache import KVCache, LatentCache, RingKVCache, StateCache
from .deltanet import GatedDeltaNet
from .dropout import Dropout
from .loss import chunked_cross_entropy, chunked_token_nll
from .moe import MoE, router_losses
from .norm import LayerNorm, RMSNorm, make_norm
from .position import rope_attention_factor, rope_cos_sin, rope_inv_freq, sinusoidal_table
from .shortconv import ShortConv


class GPT(nn.Module):
    """A config-driven decoder-only language model (GPT-2, Llama-style, Qwen3-style, ...)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # The one draw from the global RNG, before any submodule's default init (which a model
        # built on meta skips): every parameter's initial values derive from it.
        self.init_seed = int(torch.randint(2**62, (), device="cpu"))
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                drop=Dropout(cfg.emb_dropout, cfg.fast_dropout),  # on token + position sum
                # share_layers (ALBERT): one block, applied n_layer times in `forward`.
                h=nn.ModuleList([Block(cfg, layer=i) for i in range(1 if cfg.share_layers else cfg.n_layer)]),
                ln_f=make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias, cfg.fused_ops,
                               cfg.norm_unit_offset),
            )
        )
        if cfg.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        if cfg.per_layer_input_dim:  # Gemma 4's per-layer inputs, all layers' in one table
            width = cfg.n_layer * cfg.per_layer_input_dim
            self.transformer["wte_layer"] = nn.Embedding(cfg.per_layer_vocab_size, width)
            self.transformer["ple_proj"] = nn.Linear(cfg.n_embd, width, bias=False)
            self.transformer["ln_ple"] = make_norm(cfg.norm, cfg.per_layer_input_dim, cfg.norm_eps,
                                                   cfg.bias, cfg.fused_ops, cfg.norm_unit_offset)
        for name, buf in self.buffers_for(cfg).items():  # fixed tables, not saved with weights
            self.register_buffer(name, buf, persistent=False)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # One matrix maps tokens to vectors and vectors back to token scores.
            self.lm_head.weight = self.transformer.wte.weight
        # Memory switches of training (`train.memory.configure` sets them from the TrainConfig):
        # they change what is kept for backward, never what is computed, so they are not part
        # of the config or the checkpoint.
        self.checkpoint_every = 0  # k > 0: blocks 0, k, 2k, ... recompute their activations in backward
        self.loss_chunk = 0  # n > 0: the loss over n tokens at a time, never the whole logits
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, unit norm gains, and residual
        projections scaled by 1/sqrt(2 * n_layer) so the residual stream's variance does not
        grow with depth. Also called after a model built on the meta device is materialised.

        Each parameter is drawn whole on the CPU from its own generator, seeded by `init_seed`
        and its name: the values do not depend on the device or on sharding. An FSDP rank draws
        one parameter at a time and keeps its shard, and gets the weights of GPT(cfg) exactly.
        """
        if self.config.tie_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.transformer.wte.weight  # `to_empty()` unties them
        modules = dict(self.named_modules())
        for name, p in self.named_parameters():  # a tied head is wte.weight, listed once
            if p.is_meta:
                continue  # built on meta: called again once materialised
            owner_name, _, attr = name.rpartition(".")
            owner = modules[owner_name]
            if isinstance(owner, (AttentionScore, GatedDeltaNet, ShortConv)):  # their own initial values
                full = owner.initial(attr, self._generator(name))
            elif isinstance(owner, (LayerNorm, RMSNorm)) and attr == "weight":
                full = torch.full(p.shape, getattr(owner, "initial_value", 1.0), device="cpu")
            elif attr == "bias":
                full = torch.zeros(p.shape, device="cpu")
            elif attr in ("layer_scalar", "router_scale", "expert_scale"):  # Gemma 4: scales of 1
                full = torch.ones(p.shape, device="cpu")
            else:  # Linear and Embedding weights
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else 0.02
                full = torch.randn(p.shape, generator=self._generator(name), device="cpu") * std
            _copy_whole(p, full)
        for m in self.modules():  # DeepSeek's correction bias: a buffer, starting at 0
            if isinstance(m, MoE) and m.sigmoid and not m.correction_bias.is_meta:
                m.correction_bias.zero_()

    def _generator(self, name: str) -> torch.Generator:
        """A CPU generator seeded by `init_seed` and a stable hash of a parameter's name."""
        digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        return torch.Generator().manual_seed((self.init_seed + digest) % 2**63)

    @staticmethod
    def buffers_for(cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Position tables computed from the config: sinusoidal (P, C) or RoPE inv_freq (D/2,)
        of the global layers' head size, and the local layers' own RoPE inv_freq when they
        have another base (Gemma 3) or another head size (Gemma 4)."""
        if cfg.pos == "sinusoidal":
            return {"pos_table": sinusoidal_table(cfg.block_size, cfg.n_embd)}
        if cfg.pos == "rope":
            out = {"rope_inv_freq": rope_inv_freq(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)}
            own = cfg.rope_local_theta is not None or cfg.global_head_dim != cfg.head_dim
            if own and "local" in cfg.attn_layers:
                # A local base is unscaled; a local table only for its head size keeps the scaling.
                theta, scaling = ((cfg.rope_local_theta, None) if cfg.rope_local_theta is not None
                                  else (cfg.rope_theta, cfg.rope_scaling))
                out["rope_local_inv_freq"] = rope_inv_freq(int(cfg.head_dim * cfg.partial_rotary_factor), theta, scaling)
            return out
        return {}

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        """`.to()`, `.cuda()`, `.to_empty()`, ...: the position tables are recomputed in fp32 on
        the new device, never cast. A bf16 RoPE table is off by 0.18 rad at position 1,000, and
        tables built on the meta device hold no values at all."""
        super()._apply(fn, recurse)
        for name, buf in self.buffers_for(self.config).items():
            device = getattr(self, name).device
            if device.type != "meta":
                self.register_buffer(name, buf.to(device), persistent=False)
        return self

    # Positions ------------------------------------------------------------------------------
    def _positions(self, T: int, start_pos: int | torch.Tensor, positions: torch.Tensor | None, device) -> torch.Tensor:  # noqa: ANN001
        """The positions (T,) or (B, T) of this pass, checked against the context: the one
        check, with or without a cache. Only a position table (learned, sinusoidal) has an end;
        rotary and position-free models run past `block_size` (up to the cache they are given)."""
        table = self.config.pos in ("learned", "sinusoidal")
        if isinstance(start_pos, torch.Tensor):
            # The static step: positions are the cache indices unless given. No range check:
            # it would read a tensor (a device sync and a graph break); callers size the cache.
            return start_pos if positions is None else positions
        if positions is None:
            # The last position is known without reading a tensor: no device sync, and no
            # graph break under torch.compile.
            last = start_pos + T - 1
            positions = torch.arange(start_pos, start_pos + T, device=device)
        else:
            last = int(positions.max()) if table else 0
        if table and last >= self.config.block_size:
            raise BardlmError(
                f"position {last} is past the context length "
                f"{self.config.block_size}; crop the input to the last {self.config.block_size} tokens"
            )
        return positions

    def rope(self, positions: torch.Tensor, inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `positions` (T,) -> (T, D) or (B, T) -> (B, 1, T, D); the global table
        (inv_freq None) times YaRN's attention factor when rope_scaling is YaRN."""
        cos, sin = rope_cos_sin(positions, self.rope_inv_freq if inv_freq is None else inv_freq)
        factor = rope_attention_factor(self.config.rope_scaling) if inv_freq is None else 1.0
        if factor != 1.0:
            cos, sin = cos * factor, sin * factor
        return (cos, sin) if positions.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))

    def layer_ropes(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Each layer's (cos, sin): None for a layer without rotary positions (NoPE), the local
        table for a local layer when local layers have their own base. Each table is computed
        once per pass."""
        cfg = self.config
        if cfg.pos != "rope":
            return [None] * cfg.n_layer
        tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def table(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            if name not in tables:
                tables[name] = self.rope(positions, None if name == "rope_inv_freq" else getattr(self, name))
            return tables[name]

        local = "rope_local_inv_freq" if hasattr(self, "rope_local_inv_freq") else "rope_inv_freq"
        return [None if not rotary or kind in STATE_KINDS
                else table(local if kind == "local" else "rope_inv_freq")
                for rotary, kind in zip(cfg.rope_layers, cfg.attn_layers)]

    def embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token (+ absolute position) embeddings: idx (B, T) -> (B, T, C)."""
        x = self.transformer.wte(idx)
        if self.config.embed_scale:  # Gemma: sqrt(C), rounded to the activations' dtype first
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(positions)
        elif self.config.pos == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        return self.transformer.drop(x)

    def per_layer_inputs(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gemma 4's per-layer inputs (B, T, L, P) of token ids idx (B, T) and their embeddings
        x (B, T, C): (the token's own per-layer embedding * sqrt(P) + RMSNorm(W x / sqrt(C)))
        / sqrt(2), block i reading [:, :, i]."""
        cfg = self.config
        shape = (*idx.shape, cfg.n_layer, cfg.per_layer_input_dim)
        own = self.transformer.wte_layer(idx)
        own = (own * torch.tensor(cfg.per_layer_input_dim**0.5, dtype=own.dtype)).view(shape)
        context = self.transformer.ple_proj(x) * cfg.n_embd**-0.5
        context = self.transformer.ln_ple(context.view(shape))
        return (context + own) * 2.0**-0.5

    # Forward --------------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        start_pos: int | torch.Tensor = 0,
        cache: list[KVCache] | None = None,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        logits_rows: int | None = None,
        loss_reduction: str = "mean",
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, V), loss or None).

        start_pos: absolute position of idx[:, 0] (tokens already in `cache`); or, for the
              static-shape step, a tensor of cache indices (T,) or (B, T) where the new keys
              are written: attention then reads the cache (or the prefix a `SlotView` gives)
              under a mask, so no shape depends on how far decoding has got (nn/cache.py).
              Positions default to those indices.
        cache: one `KVCache` per layer, from `make_cache` (or a `SlotView` of one).
        mask: extra bool attention mask, True = may attend, broadcastable to (B, 1, T, S), e.g.
              to hide left padding; positions: (T,) or (B, T) ids overriding start_pos's.
        targets: (B, T) next-token ids; -1 marks positions that do not count in the loss. In
              training mode a MoE model's loss adds the router losses its config weights
              (router_aux_loss_coef, router_z_loss_coef); in eval mode it is cross-entropy only.
        logits_rows: compute logits (B, logits_rows, V) for the last positions only. Decoding
              reads one row: a 2k-token prompt on a 128k vocabulary is ~1 GB of fp32 logits
              otherwise. None (all rows) is the only choice with targets.
        loss_reduction: "mean" over counted targets, or "none": the per-token losses (B, T), 0
              where the target is -1 (no router losses), for DPO/GRPO's log-probabilities.
        With `loss_chunk` set and targets given, the loss goes through the head in chunks of
        tokens (nn/loss.py) and the logits returned are None.
        """
        if logits_rows is not None and targets is not None:
            raise BardlmError("logits_rows with targets: the loss needs every row; pass logits_rows=None")
        if logits_rows is not None and logits_rows <= 0:
            raise BardlmError(f"logits_rows must be positive, got {logits_rows}; pass None for all rows")
        B, T = idx.shape
        x, router_logits = self._trunk(idx, start_pos, cache, mask, positions)
        if logits_rows is not None:
            x = x[:, -logits_rows:]  # ln_f and lm_head act on each position alone
        x = self.transformer.ln_f(x)
        logits, loss = None, None
        # (A LoRA or inference-quantized head computes its logits itself, and a soft-cap acts on
        # whole logits: those take the plain path. QLoRA's frozen quantized head hands the loss
        # its rows, `dequantized_rows`, a block at a time.)
        head = self.lm_head.weight if type(self.lm_head) is nn.Linear else self.lm_head
        chunked = targets is not None and self.loss_chunk > 0 and self.config.logit_softcap is None and (
            type(self.lm_head) is nn.Linear or getattr(self.lm_head, "frozen_base", False))
        if chunked:
            loss_fn = chunked_token_nll if loss_reduction == "none" else chunked_cross_entropy
            loss = loss_fn(x, head, targets, self.loss_chunk)
        else:
            logits = self.head(x)
        if targets is not None and not chunked:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1, reduction=loss_reduction)
            loss = loss.view(B, T) if loss_reduction == "none" else loss
        if loss is not None and loss_reduction == "mean" and self.training and router_logits:
            loss = loss + router_losses(self.config, router_logits)  # MoE: load balance, z-loss
        return logits, loss

    def _trunk(
        self, idx: torch.Tensor, start_pos: int | torch.Tensor = 0, cache: list[KVCache] | None = None,
        mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """idx (B, T) -> (the last block's output (B, T, C), before ln_f; the router logits of
        each MoE layer). The arguments are `forward`'s."""
        T = idx.shape[1]
        positions = self._positions(T, start_pos, positions, idx.device)
        x = self.embed(idx, positions)
        ple = self.per_layer_inputs(idx, x) if self.config.per_layer_input_dim else None
        ropes = self.layer_ropes(positions)
        router_logits = []  # (B*T, E) per MoE layer, for the auxiliary losses of training
        k = self.checkpoint_every if self.training and cache is None and torch.is_grad_enabled() else 0
        # The cache holds the layers that own keys and values (`cache_layers`): KV-shared
        # layers read their source layer's from `shared_kv` instead (Gemma 4).
        n_cached = len(self.config.cache_layers())
        shared_kv: dict[str, tuple] = {}
        for i in range(self.config.n_layer):
            block = self.transformer.h[0 if self.config.share_layers else i]
            layer_cache = None if cache is None or i >= n_cached else cache[i]
            extra = (None if ple is None else ple[:, :, i], shared_kv)
            if k and i % k == 0:
                # Activation checkpointing: keep only the block's input; backward runs the block
                # again (same dropout masks: the RNG state is replayed) to get the rest.
                x, routed = checkpoint(_run_block, block, x, ropes[i], mask, layer_cache, start_pos,
                                       *extra, use_reentrant=False)
            else:
                x, routed = _run_block(block, x, ropes[i], mask, layer_cache, start_pos, *extra)
            if routed is not None:
                router_logits.append(routed)
        return x, router_logits

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> the final normalised hidden states (B, T, C), what the head reads: a
        scorer applies `head` to a few positions at a time instead of holding (B, T, V) logits."""
        return self.transformer.ln_f(self._trunk(idx)[0])

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., C) -> logits (..., V), soft-capped where the config says."""
        logits = self.lm_head(h)
        if self.config.logit_softcap is not None:  # Gemma 2: logits kept in (-cap, cap)
            cap = self.config.logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def make_cache(
        self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> list[KVCache | RingKVCache | StateCache]:
        """One preallocated cache per layer that owns keys and values (every layer but the
        KV-shared ones: `ModelConfig.cache_layers`) for `batch` rows of up to `max_len`
        positions: a `KVCache` of max_len positions, for a local layer whose window is shorter a
        `RingKVCache` of `sliding_window` (`ModelConfig.layer_cache_lengths`), for a linear or
        conv layer a `StateCache` (its fixed state, the same size at any length); under latent attention a
        `LatentCache` (latent + RoPE key per position)."""
        p = next(self.parameters())
        cfg = self.config
        max_len = max_len or cfg.block_size
        dtype = dtype or self.cache_dtype()
        if cfg.attn_type == "mla":
            return [LatentCache(batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, p.device)
                    for _ in cfg.cache_layers()]
        caches: list[KVCache | RingKVCache | StateCache] = []
        for i, n in zip(cfg.cache_layers(), cfg.layer_cache_lengths(max_len)):
            if cfg.attn_layers[i] == "linear":
                caches.append(StateCache(
                    batch, max_len, 2 * cfg.linear_k_heads * cfg.linear_k_head_dim
                    + cfg.linear_v_heads * cfg.linear_v_head_dim, cfg.linear_conv_kernel,
                    cfg.linear_v_heads, cfg.linear_k_head_dim, cfg.linear_v_head_dim, dtype, p.device))
                continue
            if cfg.attn_layers[i] == "conv":  # the conv-only form: the last inputs, no matrices
                caches.append(StateCache(batch, max_len, cfg.n_embd, cfg.linear_conv_kernel,
                                         dtype=dtype, device=p.device))
                continue
            H, D = cfg.layer_kv_heads(i), cfg.layer_head_dim(i)
            caches.append(RingKVCache(batch, n, max_len, H, D, dtype, p.device) if n < max_len
                          else KVCache(batch, max_len, H, D, dtype, p.device))
        return caches

    def cache_dtype(self) -> torch.dtype:
        """The dtype `make_cache` stores keys and values in: the weights' (fp32 when integer)."""
        p = next(self.parameters())
        return p.dtype if p.is_floating_point() else torch.float32

    # Counting -------------------------------------------------------------------------------
    def num_params(self, count_tied_head_twice: bool = False) -> int:
        """Unique parameters; optionally as if the tied head were a separate matrix."""
        n = sum(p.numel() for p in self.parameters())
        if count_tied_head_twice and self.config.tie_embeddings:
            n += self.lm_head.weight.numel()
        return n

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:  # noqa: ANN003
        """Continue each row of idx (B, T): returns (B, T + max_new_tokens) ids.

        Keyword arguments are those of `bardlm.infer.generate.generate` (temperature, top_k,
        top_p, seed, use_cache, ...). Runs in eval mode (no dropout) and leaves the model in the
        mode it was in.
        """
        from ..infer.generate import generate

        return generate(self, idx, max_new_tokens, **kwargs)


def _run_block(block: Block, x: torch.Tensor, rope, mask, cache, start_pos,  # noqa: ANN001
               per_layer_input=None, shared_kv=None) -> tuple[torch.Tensor, torch.Tensor | None]:  # noqa: ANN001
    """One block: (its output (B, T, C), its router logits (B*T, E) or None for a dense FFN).
    The router logits are taken, not left on the module: a kept graph would pin memory and
    break deepcopy of the model (and a checkpointed block sets them again in backward)."""
    x = block(x, rope, mask, cache, start_pos, per_layer_input=per_layer_input, shared_kv=shared_kv)
    moe = block.moe if block.moe is not None else block.mlp  # "dense+moe": the mixture beside
    routed = getattr(moe, "router_logits", None)
    if routed is not None:
        moe.router_logits = None
    return x, routed


def _copy_whole(p: torch.Tensor, full: torch.Tensor) -> None:
    """p <- full; a DTensor parameter (FSDP) keeps only this rank's shard of it."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        # Every rank holds the same `full`: each takes its own shard, with no communication.
        full = distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
    p.copy_(full)


__all__ = ["GPT"]
