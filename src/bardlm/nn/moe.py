"""Mixture of experts: a router picks, for each token, k of E SwiGLU experts and mixes their outputs.

    logits = router(x)                     (N, E)   one linear map (a bias only in gpt-oss)
    p      = softmax(logits)               (N, E)   in fp32
    w, e   = top-k(p)                      (N, k)   weights and expert ids
    w      = w / sum(w)   if router_renorm         (Mixtral, Qwen3-MoE; OLMoE keeps raw p)
    y[n]   = sum_j w[n, j] * expert_{e[n, j]}(x[n])   [+ sigmoid(g . x[n]) * shared(x[n])]

DeepSeek-V3 (router_score="sigmoid") routes differently:

    p      = sigmoid(logits)               (N, E)   each expert scored alone, in fp32
    e      = top-k(p + b) over the best router_topk_groups groups   b: the correction bias,
             a group's worth the sum of its two best p + b          used to choose only
    w      = p[e] (/ (sum + eps), if router_renorm) * routed_scale        (LFM2-MoE: the same,
             with no groups and no shared expert)
    y[n]   = sum_j w[n, j] * expert_{e[n, j]}(x[n]) + shared(x[n])     (shared: no gate)

Only the chosen experts run. Tokens are grouped by expert: the N*k (token, expert) pairs are
sorted by expert id, each expert runs once on the rows sent to it, and the weighted outputs are
scattered back to their tokens with one `index_add_`. Decoding one token therefore reads the weights of k experts
only (and skips the sort: `_one_token`), and a batch pays one matmul per used expert, not one per token.

A compiled decode step (`generate(..., compile=True)`, `bardlm serve --compile`) cannot run that
loop: reading the chosen ids into Python (`tolist`) breaks the graph. For it, `stack_experts` gives
each mixture one storage per weight kind, fc (E, 2I, C) and proj (E, C, I) (and the biases), and
makes every expert's parameters views of it: no second copy, and state_dict, HF/GGUF export, LoRA
and int8/int4 still see one nn.Linear per expert. `_few_tokens_stacked` applies the chosen
experts as gpt-fast's compiled MoE does, with each product written as multiply + sum over the
gathered rows fc[ids]: inductor fuses the gather into the reduction, so the chosen experts'
weights are read in place (no copy) by one generated kernel per product, the routing and the
weighted sum fused around them. It is used only while compiling, without gradients, for at most
STACKED_MAX_TOKENS tokens; LoRA-wrapped or quantized experts keep the loop. (Measured on one
layer, bench/moe_layer.py: eager, that gather copies the weights and is ~3x slower than the
loop; compiled, ~3x faster than it; compiled with the ids read one by one into views of the
stacks, no faster than the loop. docs/benchmarks.md.)

Training adds two losses on the router logits of every MoE layer (`router_losses`):
* load balancing (Switch Transformer, eqs. 4-6): E * sum_e f_e * P_e, with f_e the fraction of
  top-k assignments to expert e and P_e its mean router probability, both over the tokens of
  all layers together, as transformers' `load_balancing_loss_func` computes it;
* z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2, which keeps the logits small.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .dropout import Dropout
from .feedforward import MLP, SwiGLU
from .norm import RMSNorm


class MoE(nn.Module):
    """A sparse mixture of SwiGLU experts (plus an optional gated shared expert); x (B, T, C) ->
    (B, T, C). In training mode the last forward's router logits (B*T, E) stay in
    `router_logits` for the auxiliary losses; in eval mode they are not kept."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_expert, self.top_k, self.renorm = cfg.n_expert, cfg.n_expert_active, cfg.router_renorm
        self.router = nn.Linear(cfg.n_embd, cfg.n_expert, bias=cfg.router_bias)  # gpt-oss: a bias
        self.sigmoid = cfg.router_score == "sigmoid"
        self.groups, self.topk_groups, self.routed_scale = cfg.router_groups, cfg.router_topk_groups, cfg.routed_scale
        self.renorm_eps = cfg.router_renorm_eps  # transformers': DeepSeek-V3 1e-20, LFM2-MoE 1e-6
        # DeepSeek-V3's correction bias: added to the scores to choose experts, never to weigh
        # them. Trained by a rule outside backprop (the load-balancing update), so a buffer.
        if self.sigmoid:
            self.register_buffer("correction_bias", torch.zeros(cfg.n_expert))
        # Auxiliary-loss-free balancing: the training forwards of a step count each expert's
        # tokens here, and `balance_routers` moves the bias once the step is done.
        self.bias_rate = cfg.correction_bias_rate
        self.load: torch.Tensor | None = None
        self.experts = nn.ModuleList(
            [SwiGLU(cfg, cfg.expert_hidden, dropout=False) for _ in range(cfg.n_expert)]
        )
        if cfg.shared_expert_hidden > 0:  # every token also runs a shared MLP (Qwen2-MoE, DeepSeek)
            self.shared = SwiGLU(cfg, cfg.shared_expert_hidden, dropout=False)
            # Qwen2-MoE gates it by sigmoid(g . x); DeepSeek-V3 adds it as is.
            self.shared_gate = nn.Linear(cfg.n_embd, 1, bias=False) if cfg.shared_expert_gate else None
        else:
            self.shared, self.shared_gate = None, None
        self.dropout = Dropout(cfg.resid_dropout, cfg.fast_dropout)  # before the residual add
        self.router_logits: torch.Tensor | None = None
        # Gemma 4's router: its input normalised (no weight) times a learned vector and
        # 1/sqrt(C); the chosen experts' weights times a learned scale per expert.
        if cfg.router_norm:
            self.router_in_norm = RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.fused_ops, scale=False)
            self.router_scale = nn.Parameter(torch.ones(cfg.n_embd))
            self.expert_scale = nn.Parameter(torch.ones(cfg.n_expert))
        else:
            self.router_in_norm, self.router_scale, self.expert_scale = None, None, None
        # The experts' weights stacked, for the compiled decode step (`stack_experts`): None
        # until a compiled step asks for them.
        self.stacked: Stacked | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> (logits (N, E), weights (N, k) in x's dtype, expert ids (N, k))."""
        if self.router_in_norm is not None:
            x = self.router_in_norm(x) * self.router_scale * x.shape[-1] ** -0.5
        logits = self.router(x)
        if self.sigmoid:
            return logits, *self._route_sigmoid(logits, x.dtype)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renorm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.expert_scale is not None:
            weights = weights * self.expert_scale[experts]
        return logits, weights.to(x.dtype), experts

    def _route_sigmoid(self, logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-V3: logits (N, E) -> (weights (N, k) in `dtype`, expert ids (N, k))."""
        scores = logits.float().sigmoid()  # (N, E)
        choice = scores + self.correction_bias.float()  # the bias picks experts, never weighs them
        if self.groups > 1:  # keep the topk_groups groups whose two best experts score highest
            N = choice.shape[0]
            grouped = choice.view(N, self.groups, -1)  # (N, G, E/G)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
            kept = group_score.topk(self.topk_groups, dim=-1).indices  # (N, topk_groups)
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, -1)
        experts = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, experts)
        if self.renorm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self.renorm_eps)
        return (weights * self.routed_scale).to(dtype), experts

    def forward(self, x: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); route (B, T, C): what the router reads, when not x (Gemma 4
        routes on the residual stream and runs the experts on its normalised copy)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        logits, weights, experts = self.route(x if route is None else route.reshape(-1, shape[-1]))
        self.router_logits = logits if self.training else None
        if self.training and self.bias_rate > 0:
            load = torch.bincount(experts.reshape(-1), minlength=self.n_expert)
            self.load = load if self.load is None else self.load + load
        if self.stacked is not None and x.shape[0] <= STACKED_MAX_TOKENS and torch.compiler.is_compiling() \
                and not torch.is_grad_enabled():
            out = self._few_tokens_stacked(x, weights, experts)  # a compiled decode step: no graph break
        elif x.shape[0] == 1:
            out = self._one_token(x, weights[0], experts[0])
        else:
            out = self._grouped(x, weights, experts)
        if self.shared is not None:
            shared = self.shared(x)
            out = out + (shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(x)) * shared)
        return self.dropout(out.view(shape))

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x (N, C), weights and expert ids (N, k) -> (N, C): each used expert runs once."""
        # Group the N*k (token, expert) pairs by expert: after a stable sort, expert e's pairs
        # are one contiguous run of counts[e] entries.
        flat = experts.reshape(-1)  # (N*k,)
        order = flat.argsort(stable=True)
        tokens = order // self.top_k  # the token of each sorted pair
        pair_weights = weights.reshape(-1)[order]
        counts = torch.bincount(flat, minlength=self.n_expert).tolist()  # one sync per layer
        ys, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue  # an expert no token chose: its weights are never read
            ys.append(self.experts[e](x[tokens[start : start + n]]))
            start += n
        # Weighted outputs in sorted order (N*k, C), summed into their tokens in one scatter.
        y = torch.cat(ys) * pair_weights[:, None]
        return torch.zeros_like(x).index_add_(0, tokens, y.to(x.dtype))

    def _one_token(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Decoding one token, x (1, C), its k weights and expert ids (k,): the chosen experts
        applied in turn, in expert order as `_grouped` sums them, without its sort, bincount
        and scatter (most of a MoE layer's small-op time at B=1)."""
        out = torch.zeros_like(x)
        for e, w in sorted(zip(experts.tolist(), weights.unbind())):
            out = out + w * self.experts[e](x)
        return out

    def _few_tokens_stacked(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The mixture of a few tokens, x (N, C), weights and expert ids (N, k), from the stacked
        weights, with nothing data-dependent in Python, so torch.compile traces it whole. Each
        product is written as multiply + sum over the gathered rows: inductor fuses the gather
        into the reduction and reads each chosen expert's weights in place (in eager mode the
        gather would copy them, which is why eager decoding keeps `_one_token`)."""
        st = self.stacked
        assert st is not None
        h = (st.fc[experts] * x[:, None, None, :]).sum(-1)  # (N, k, 2I, C) -> (N, k, 2I)
        if st.fc_bias is not None:
            h = h + st.fc_bias[experts]
        a = self.experts[0].unit(h)  # (N, k, I): every expert's gated unit is the same function
        y = (st.proj[experts] * a[:, :, None, :]).sum(-1)  # (N, k, C, I) -> (N, k, C)
        if st.proj_bias is not None:
            y = y + st.proj_bias[experts]
        return (y * weights[..., None]).sum(1)  # (N, C)

    def stack_experts(self) -> bool:
        """Give the experts' weights one stacked storage each, fc (E, 2I, C) and proj (E, C, I)
        (and their biases (E, 2I), (E, C)), every expert's parameters becoming views of it: no
        second copy, and state_dict, export, LoRA and quantization still see one nn.Linear per
        expert. Kept until a parameter no longer points into the stack (say, after
        `model.to(dtype)`): then stacked anew. False, and no stack, when the experts are not
        plain nn.Linear (LoRA-wrapped, quantized, transposed by `prepare_for_inference`): those
        keep the per-expert loop."""
        lins = [(ex.c_fc, ex.c_proj) for ex in self.experts]
        if not all(type(a) is nn.Linear and type(b) is nn.Linear for a, b in lins):
            self.stacked = None
            return False
        names = ("weight", "bias")
        params = [[getattr(a, n) for a, _ in lins] for n in names] + [[getattr(b, n) for _, b in lins] for n in names]
        st = self.stacked
        if st is not None and all(
            p is None if s is None else all(q.data_ptr() == s[e].data_ptr() and q.shape == s[e].shape
                                            for e, q in enumerate(p))
            for p, s in zip(params, (st.fc, st.fc_bias, st.proj, st.proj_bias))):
            return True  # still the storage of every expert
        stacks = []
        with torch.no_grad():
            for p in params:
                if p[0] is None:
                    stacks.append(None)
                    continue
                stack = torch.stack([q.detach() for q in p])
                for e, q in enumerate(p):
                    q.data = stack[e]  # the parameter now lives in the stack; its old storage is freed
                stacks.append(stack)
        self.stacked = Stacked(*stacks)
        return True


    def __getstate__(self) -> dict:
        """A copy (deepcopy, pickle) leaves the stacks out: its parameters are copied apart from
        them, so it would hold the experts twice; it restacks from its own when asked."""
        return {**self.__dict__, "stacked": None}


class Stacked(NamedTuple):
    """A mixture's expert weights, stacked (`MoE.stack_experts`): fc (E, 2I, C), fc_bias
    (E, 2I) or None, proj (E, C, I), proj_bias (E, C) or None."""

    fc: torch.Tensor
    fc_bias: torch.Tensor | None
    proj: torch.Tensor
    proj_bias: torch.Tensor | None


# The compiled step uses the stacked path for at most this many tokens (a decode step's batch,
# `bardlm serve`'s default --max-batch): each token reads its k experts' weights, so past a few
# tokens reading each used expert once for all its tokens (`_grouped`) reads less.
STACKED_MAX_TOKENS = 8


def stack_experts(model: nn.Module) -> int:
    """`MoE.stack_experts` on every mixture of `model`; returns how many are stacked."""
    return sum(m.stack_experts() for m in model.modules() if isinstance(m, MoE))


@torch.no_grad()
def balance_routers(model: nn.Module, all_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing, once per training step: each counting MoE
    layer's correction bias moves by correction_bias_rate * sign(mean load - load of e), so an
    expert chosen less than the mean is chosen more often next time. `all_sum` sums the counts
    over the ranks, so every rank moves its copy of the bias alike. (A block whose activations
    are recomputed counts its tokens twice: every expert's load doubles, the signs do not change.)"""
    for m in model.modules():
        if isinstance(m, MoE) and m.load is not None:
            load = all_sum(m.load.float())
            m.correction_bias += m.bias_rate * torch.sign(load.mean() - load).to(m.correction_bias.dtype)
            m.load = None


def active_params(model: nn.Module) -> int:
    """Parameters one token runs through: all but the experts its router does not pick (each
    MoE layer skips n_expert - n_expert_active experts). A tied head is counted once."""
    skipped = sum((m.n_expert - m.top_k) * sum(p.numel() for p in m.experts[0].parameters())
                  for m in model.modules() if isinstance(m, MoE))
    return sum(p.numel() for p in model.parameters()) - skipped


def load_balancing_loss(router_logits: list[torch.Tensor], n_expert: int, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss over the router logits of all MoE layers, each
    (N, E): E * sum_e f_e * P_e, f_e = (top-k assignments to e) / rows, P_e = (sum of p_e) / rows,
    rows counted over all layers together. The counts carry no gradient; P does."""
    counts = torch.zeros(n_expert, device=router_logits[0].device)
    prob_sum = torch.zeros(n_expert, device=router_logits[0].device)
    rows = 0
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices.reshape(-1)
        counts = counts + torch.bincount(chosen, minlength=n_expert).float()
        prob_sum = prob_sum + probs.sum(dim=0)
        rows += logits.shape[0]
    return n_expert * torch.sum((counts / rows) * (prob_sum / rows))


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE's z-loss: mean over the tokens of all layers of logsumexp(logits)^2."""
    z = torch.cat([torch.logsumexp(logits.float(), dim=-1) for logits in router_logits])
    return z.pow(2).mean()


def router_losses(cfg: ModelConfig, router_logits: list[torch.Tensor]) -> torch.Tensor:
    """The weighted sum of the auxiliary losses the config asks for (a 0-d tensor)."""
    total = torch.zeros((), device=router_logits[0].device)
    if cfg.router_aux_loss_coef > 0:
        total = total + cfg.router_aux_loss_coef * load_balancing_loss(
            router_logits, cfg.n_expert, cfg.n_expert_active)
    if cfg.router_z_loss_coef > 0:
        total = total + cfg.router_z_loss_coef * router_z_loss(router_logits)
    return total


__all__ = ["MoE", "Stacked", "active_params", "balance_routers", "stack_experts", "load_balancing_loss", "router_z_loss", "router_losses"]


def make_ffn(cfg: ModelConfig, layer: int = 0) -> nn.Module:
    """Layer `layer`'s feed-forward network: a mixture of experts where `cfg.ffn_layers` says
    "moe" (it also records router logits for the auxiliary losses), else a dense MLP. (Here, not
    in feedforward.py: the mixture is built from the dense SwiGLU, so it sits above it.)"""
    if cfg.ffn_layers[layer] == "moe":
        return MoE(cfg)  # ("dense+moe": this is the dense one; the block adds the mixture)
    gated = cfg.ffn in ("swiglu", "geglu", "swiglu_clamped")
    return SwiGLU(cfg, cfg.layer_ffn_hidden(layer)) if gated else MLP(cfg)
