"""The one training step and the one evaluation of bardlm.

Every model bardlm trains goes through `Loop.train_step`: language-model pretraining
(`trainer.Trainer`), the reversal probe, the encoder-decoder tasks and the concept experiments.
A model is anything called as `model(*batch) -> (logits, loss)`.

    lr <- schedule(step) --> for each of grad_accum micro-batches: forward (autocast) -> loss
    -> backward(loss x weight) --> [average across ranks] --> clip --> optimizer step

The weight of a micro-batch is 1 / grad_accum, or, given `targets` (how many target tokens a
micro-batch has), its share of the target tokens of the whole step on every rank: then a step's
gradient is that of the mean loss over all its target tokens, whatever the accumulation and the
number of processes (masked, padded chat data has unequal counts; transformers 4.46 made the
same fix).

With `step_in_backward` (PyTorch's "optimizer step in backward" recipe) the update of each
parameter runs as soon as its gradient has been accumulated, and frees that gradient: a full
finetune then never holds the whole model's gradients (2.2 GiB for Qwen3-0.6B in fp32). The
update is the normal step's, exactly; there is no global norm to clip by, and no second
micro-batch to accumulate, so the config refuses both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from ..config import TrainConfig
from ..errors import BardlmError
from ..infer.device import enable_tf32, to_device
from ..nn.moe import balance_routers
from .optim import lr_at, make_optimizer

Batch = Sequence[torch.Tensor]


class Diverged(BardlmError):
    """The loss became NaN or infinite; no update was applied."""

    def __init__(self, message: str, loss: float) -> None:
        super().__init__(message)
        self.loss = loss


def amp_dtype(cfg: TrainConfig, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of `cfg.dtype == "bf16"` on `device`: bf16, except on a CUDA GPU
    without bf16 (before Ampere), where it is fp16 and `Loop` adds a gradient scaler; None
    for fp32."""
    if cfg.dtype != "bf16":
        return None
    if torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(cfg: TrainConfig, device: torch.device | str) -> AbstractContextManager:
    """Mixed-precision autocast when `cfg.dtype == "bf16"` (weights and optimizer stay fp32)."""
    dtype = amp_dtype(cfg, device)
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class Loop:
    """Optimizer steps of one model under one `TrainConfig`.

    model:     the module whose parameters are optimized and clipped.
    forward:   what a step calls (the model itself, or its DDP / compiled wrapper).
    grad_sync: micro-batch -> context; with DDP/FSDP, gradients are averaged only after the last.
    reduce:    the step's mean loss (a 0-d tensor) -> float, e.g. averaged across ranks.
    targets:   micro-batch -> its number of target tokens (a 0-d tensor); None: all weigh alike.
    all_sum:   a 0-d tensor -> its sum over the ranks (in place); world: the number of ranks.
    After a step, `grad_norm` is the gradients' global L2 norm before clipping.

    On CUDA: TF32 matmuls, batches copied from pinned memory without blocking, and fp16 autocast
    with a gradient scaler where the GPU lacks bf16. `train_step(sync=False)` never waits for
    the GPU: the loss is read (and checked) only at the steps a caller logs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        optimizer: torch.optim.Optimizer | None = None,
        forward: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        grad_sync: Callable[[bool], AbstractContextManager] | None = None,
        reduce: Callable[[torch.Tensor], float] | None = None,
        device: torch.device | str | None = None,
        targets: Callable[[Batch], torch.Tensor] | None = None,
        all_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
        world: int = 1,
    ) -> None:
        self.model, self.cfg = model, cfg
        self.forward = forward if forward is not None else model  # (a compiled module has no truth value)
        self.optimizer = optimizer if optimizer is not None else make_optimizer(model, cfg)
        self.grad_sync = grad_sync or (lambda last: nullcontext())
        self.reduce = reduce or (lambda loss: loss.item())
        self.device = torch.device(device or cfg.device)
        self.targets, self.all_sum, self.world = targets, all_sum, world
        enable_tf32(self.device)
        # fp16 gradients underflow: scale the loss up, unscale before clipping, skip inf steps.
        fp16 = amp_dtype(cfg, self.device) == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.step = 0
        self._grad_norm: torch.Tensor | None = None
        if cfg.step_in_backward and (world > 1 or self.scaler is not None):
            raise BardlmError("train: step_in_backward updates each parameter before gradients are averaged "
                              "across processes or unscaled (fp16): run one process on bf16 or fp32, or drop "
                              "step_in_backward")

    @property
    def grad_norm(self) -> float:
        """The last step's gradient L2 norm before clipping (NaN before the first step)."""
        norm = self._grad_norm
        if norm is None:
            return float("nan")
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor

    def lr(self) -> float:
        return lr_at(self.step, self.cfg)

    def train_step(self, batch: Callable[[int, int], Batch], sync: bool = True) -> float:
        """One optimizer step; `batch(step, micro)` gives the model's arguments for one
        micro-batch. Returns the step's mean loss; raises `Diverged` on a non-finite loss.

        sync=False: no host-device synchronisation at all; the loss is neither reduced nor
        read (NaN is returned). A divergence then shows at the next synced step, whose loss is
        non-finite too, since the weights are.
        """
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr()
        micros = [[to_device(t, self.device) for t in batch(self.step, m)] for m in range(cfg.grad_accum)]
        weights = self._weights(micros)
        loss_sum = torch.zeros((), device=self.device)
        for micro, (args, weight) in enumerate(zip(micros, weights)):
            with self.grad_sync(micro == cfg.grad_accum - 1):
                with autocast(cfg, self.device):
                    loss = self.forward(*args)[1]  # (the logits, (B, T, V), are not kept alive)
                scaled = loss * weight
                if cfg.step_in_backward:
                    if sync:  # before backward: the updates it applies cannot be taken back
                        self._check_finite(loss.detach().float().item())
                    with self._updates_in_backward():
                        scaled.backward()
                else:
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach().float() * weight
        total = self.reduce(loss_sum) if sync else math.nan
        if sync:
            self._check_finite(total)
        if cfg.step_in_backward:  # already applied, parameter by parameter
            self._end_step()
            return total
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip (and log) the true gradients
        # The norm is computed either way (to log it); max_norm=inf leaves the gradients as they
        # are. It stays a tensor: reading it (`grad_norm`) is a host-device sync.
        self._grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.grad is not None],
            cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when a gradient is inf/NaN
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._end_step()
        return total

    def _end_step(self) -> None:
        balance_routers(self.model, self.all_sum)  # DeepSeek-V3's correction biases, if counting
        self.step += 1

    def _check_finite(self, loss: float) -> None:
        """Raise `Diverged` (dropping any gradients: no update is applied) on a non-finite loss."""
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise Diverged(
                f"loss became {loss} at step {self.step}; lower the learning rate "
                "(--set lr=...), lengthen the warm-up (--set warmup_iters=...) or use fp32", loss
            )

    @contextmanager
    def _updates_in_backward(self) -> Iterator[None]:
        """While a backward pass runs inside: each trainable parameter is updated as soon as its
        gradient has been accumulated (a tied weight once, after both uses), and that gradient
        is freed. `optimizer.step()` updates only parameters that have a gradient, and at that
        moment this parameter is the only one: the others have not been reached yet or were
        updated and freed. So every parameter gets exactly the normal step's update, with the
        same optimizer state (saved and resumed as usual). The gradients' global norm is summed
        on the way, for the log.

        For the one call, each group's parameter list holds just this parameter (or nothing):
        `step()` walks every listed parameter, so over all P hooks the full lists would cost
        O(P^2) Python work a step (bench/step_in_backward.py, 580 parameters: 123 -> 91 ms)."""
        norm_sq = torch.zeros((), device=self.device)
        groups = self.optimizer.param_groups
        group_of = {id(q): i for i, g in enumerate(groups) for q in g["params"]}

        def update(p: torch.Tensor) -> None:
            norm_sq.add_(torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32).square())  # no temporary copy
            full = [g["params"] for g in groups]
            for i, g in enumerate(groups):
                g["params"] = [p] if i == group_of.get(id(p)) else []
            try:
                self.optimizer.step()
            finally:
                for g, params in zip(groups, full):
                    g["params"] = params
            p.grad = None

        params = {id(p): p for p in self.model.parameters() if p.requires_grad}.values()
        hooks = [p.register_post_accumulate_grad_hook(update) for p in params]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
        self._grad_norm = norm_sq.sqrt()

    def _weights(self, micros: list[list[torch.Tensor]]) -> list[torch.Tensor | float]:
        """Each micro-batch's weight in the step's loss (see the module docstring). With ranks,
        DDP/FSDP average the gradients, so a rank's weights sum to world x its share."""
        if self.targets is None:
            return [1.0 / len(micros)] * len(micros)
        counts = [self.targets(m).float() for m in micros]
        total = self.all_sum(torch.stack(counts).sum()).clamp(min=1)
        return [c * self.world / total for c in counts]


def count_rows(batch: Batch) -> int:
    """Rows of a batch: the weight of its mean loss in `evaluate` by default."""
    return len(batch[0])


def count_targets(batch: Batch) -> torch.Tensor:
    """Target tokens of an (x, y) batch, y = -1 where ignored: the weight of its mean loss."""
    return (batch[1] >= 0).sum()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterable[Batch], device: torch.device | str = "cpu",
    context: Callable[[], AbstractContextManager] = nullcontext,
    count: Callable[[Batch], int | torch.Tensor] = count_rows,
) -> float:
    """Mean loss of `model(*batch) -> (_, loss)` over batches, each batch's mean weighted by
    `count` (its rows; `count_targets` for a mean over target tokens); the model is in eval
    mode meanwhile (dropout off) and put back in the mode it had."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for batch in batches:
            args = [t.to(device) for t in batch]
            with context():
                _, loss = model(*args)
            k = int(count(args))
            total += loss.item() * k
            n += k
    finally:
        model.train(was_training)
    if n == 0:
        raise BardlmError("nothing to evaluate: no validation batches")
    return total / n


def window_batches(windows: torch.Tensor, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of next-token windows (N, T + 1): x = w[:, :-1], y = w[:, 1:]."""
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size]
        yield w[:, :-1], w[:, 1:]
