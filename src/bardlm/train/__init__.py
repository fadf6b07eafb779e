"""Training: corpora and batches (`data`), optimizers and the schedule (`optim`), the one training
step and evaluation (`loop`), run state (`state`: save, resume, signals), torchrun
(`distributed`), and language-model runs (`trainer`)."""

from ..config import TRAIN_PRESETS, TrainConfig, train_config_keys
from .loop import Diverged, Loop, evaluate, window_batches
from .optim import MuonAdamW, lr_at, make_optimizer
from .state import OPTIMIZER_FILE, STATE_FILE, RunState
from .trainer import METRICS_FILE, Trainer, bits_per_char, plot_losses, prepare_out

__all__ = [
    "METRICS_FILE", "OPTIMIZER_FILE", "STATE_FILE", "TRAIN_PRESETS", "Diverged", "Loop",
    "MuonAdamW", "RunState", "TrainConfig", "Trainer", "bits_per_char", "evaluate", "lr_at",
    "make_optimizer", "plot_losses", "prepare_out", "train_config_keys", "window_batches",
]
