"""Resuming a run: the plan is kept (bug 6), and a crash mid-save never mixes two steps (bug 7)."""

from __future__ import annotations

import json
import shutil

import pytest

from bardlm.cli import main
from bardlm.config import TrainConfig
from bardlm.train.optim import lr_at

TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east.\n" * 40
# A checkpoint and a metrics row after every step: the row of step s holds the lr of step s - 1.
RUN = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=16",
       "--set", "batch_size=4", "--set", "eval_interval=1", "--set", "eval_batches=1",
       "--set", "warmup_iters=2", "--no-progress"]


@pytest.fixture
def run8(tmp_path):
    """An 8-step run trained through the command line; returns (corpus, run folder)."""
    data = tmp_path / "romeo.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--max-iters", "8", *RUN]) == 0
    return data, out


def _lrs(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in rows if not r.get("final")]


def _resume(out, *args: str) -> int:
    return main(["train", "--resume", "--out", str(out), "--no-progress", *args])


def test_longer_resume_keeps_the_planned_schedule(run8, capsys) -> None:
    """8 steps, then --resume --max-iters 12: steps 0..7 ran the 8-step plan, and the lr never
    rises afterwards (it stays at min_lr) instead of re-planning a decay to step 12."""
    _, out = run8
    plan = TrainConfig.from_dict(json.loads((out / "config.json").read_text())["train"])
    capsys.readouterr()
    assert _resume(out, "--max-iters", "12") == 0
    assert "keeps its planned decay to step 8" in capsys.readouterr().err
    lrs = _lrs(out)
    assert len(lrs) == 12
    assert lrs[:8] == pytest.approx([lr_at(s, plan) for s in range(8)], rel=1e-12)
    assert all(b <= a for a, b in zip(lrs[7:], lrs[8:]))
    assert lrs[8:] == pytest.approx([plan.min_lr] * 4)
    # A second resume keeps the same horizon without a new note or a refusal.
    assert _resume(out, "--max-iters", "13") == 0
    assert _lrs(out)[12] == pytest.approx(plan.min_lr)


@pytest.mark.parametrize(("change", "field"), [
    (["--set", "batch_size=8"], "global batch"),
    (["--seed", "7"], "seed"),
    (["--set", "grad_accum=2"], "grad_accum"),
    (["--set", "lr=0.01"], "lr"),
    (["--set", "dropout=0.2"], "dropout"),  # a model field
])
def test_changed_plan_or_model_is_refused_in_one_line(run8, capsys, change, field) -> None:
    _, out = run8
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert _resume(out, "--max-iters", "10", *change) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("bardlm: error:")]
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert f"--resume: {field}" in errors[0] or f"model's {field}" in errors[0], errors[0]
    assert (out / "model.safetensors").read_bytes() == before  # nothing trained, nothing saved


def test_changing_only_what_does_not_alter_the_arithmetic_is_allowed(run8) -> None:
    _, out = run8
    assert _resume(out, "--max-iters", "9", "--set", "eval_interval=2", "--set", "eval_batches=2") == 0


def test_mixed_folder_is_refused(run8, tmp_path, capsys) -> None:
    """model.safetensors copied from another save: loading and resuming refuse in one line."""
    data, out = run8
    other = tmp_path / "other"
    shutil.copytree(out, other)
    assert _resume(other, "--max-iters", "9") == 0  # same shapes, another save
    shutil.copy(other / "model.safetensors", out / "model.safetensors")
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(out), "--max-new-tokens", "3"]) == 2
    assert _resume(out, "--max-iters", "9") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bardlm: error:")]
    assert len(err) == 2 and all("mixes two checkpoints" in line for line in err), err


# Crash-safe saves (bug 7) ---------------------------------------------------------------------
class Crash(BaseException):
    """The process dying mid-save (not an error the save could handle)."""


def _trainer(out):  # noqa: ANN202
    from bardlm.config import ModelConfig
    from bardlm.tokenizers import CharTokenizer
    from bardlm.train import Trainer

    tok = CharTokenizer.train(TEXT)
    mc = ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32,
                     dropout=0.1)
    tc = TrainConfig(batch_size=4, max_iters=8, eval_interval=100, eval_batches=1, warmup_iters=2)
    return Trainer(mc, tc, tok, TEXT, out, progress=False, log=lambda m: None)


def _snapshot(trainer) -> dict:  # noqa: ANN001
    """Everything a resume must bring back: step, weights and optimizer state."""
    import copy

    return {"step": trainer.step,
            "weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()["state"])}


def _assert_resumes_to(out, snap: dict) -> None:  # noqa: ANN001
    import torch

    from bardlm.io.checkpoint import load_checkpoint

    model, _, meta = load_checkpoint(out)
    assert meta["step"] == snap["step"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snap["weights"][k], rtol=0, atol=0, msg=k)
    resumed = _trainer(out)
    resumed.resume()
    assert resumed.step == snap["step"]
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, snap["weights"][k], rtol=0, atol=0, msg=k)
    got = resumed.optimizer.state_dict()["state"]
    assert got.keys() == snap["optimizer"].keys()
    for i, s in snap["optimizer"].items():
        for name, t in s.items():
            torch.testing.assert_close(got[i][name], t, rtol=0, atol=0, msg=f"{i}.{name}")


def _trained(out, steps: int):  # noqa: ANN001, ANN202
    t = _trainer(out)
    t.fit(until=2)  # saves step 2: the "old" checkpoint
    old = _snapshot(t)
    for _ in range(steps):
        t.train_step()
    return t, old


def test_crash_between_renames_gives_the_new_save_whole(tmp_path, monkeypatch) -> None:
    """The process dies after the first checkpoint file is renamed into place (the journal is
    written): whoever opens the folder next finishes the save, so weights, optimizer and step
    all come from the new save."""
    import os

    import bardlm.io.atomic

    t, old = _trained(tmp_path, 2)
    new = _snapshot(t)
    assert new["step"] == 4 and old["step"] == 2
    real_replace, renamed = os.replace, []

    def replace_then_die(src, dst) -> None:  # noqa: ANN001
        if not str(dst).endswith(bardlm.io.atomic.JOURNAL):
            if renamed:
                raise Crash
            renamed.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(bardlm.io.atomic.os, "replace", replace_then_die)
    with pytest.raises(Crash):
        t.save()
    monkeypatch.undo()
    assert len(renamed) == 1  # one file of the new save is in place, the others are not
    _assert_resumes_to(tmp_path, new)


def test_crash_before_the_commit_point_keeps_the_old_save_whole(tmp_path, monkeypatch) -> None:
    """Writing a file fails (full disk) before the journal exists: nothing is replaced."""
    import bardlm.io.atomic
    from bardlm.errors import BardlmError

    t, old = _trained(tmp_path, 2)
    real_save = bardlm.io.atomic.save_file

    def full_disk(tensors, path, metadata=None) -> None:  # noqa: ANN001
        if "optimizer" in str(path):
            raise OSError(28, "No space left on device")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(bardlm.io.atomic, "save_file", full_disk)
    with pytest.raises(BardlmError, match="No space left.*previous files are intact"):
        t.save()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    _assert_resumes_to(tmp_path, old)


# Issue 32, item 4: kill -9 mid-save, and the metrics line of a saved step ----------------------
def test_kill_9_mid_save_leaves_no_temp_files_after_the_next_load(tmp_path) -> None:
    """A save killed (os._exit, as kill -9) after writing some temporary files and before its
    journal: the next reader deletes those files, while a live writer's are left alone."""
    import os
    import subprocess
    import sys

    t, old = _trained(tmp_path, 2)
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from bardlm.io.atomic import atomic_write_many, text_writer\n"
        "def die(tmp):\n"
        "    Path(tmp).write_text('partial')\n"
        "    os._exit(9)\n"
        "out = Path(sys.argv[1])\n"
        "atomic_write_many([(out / 'config.json', text_writer('{}')), (out / 'model.safetensors', die)])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for _ in range(3):
        assert subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env).returncode == 9
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 2  # each save cleared the files of the save killed before it
    old_style = tmp_path / ".optimizer.safetensors.k2j4x9.tmp"  # named before pids were
    old_style.write_text("x")
    live = tmp_path / f".model.safetensors.{os.getppid()}-abc123.tmp"  # a save under way
    live.write_text("x")
    _assert_resumes_to(tmp_path, old)  # loading (read_config) clears them
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == [live.name]


class _Killed(BaseException):
    """The process killed at some point of `_record` (not an error the trainer handles)."""


def _rows(out) -> list[dict]:  # noqa: ANN001
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_line_of_a_saved_step_survives_a_kill_after_the_save(tmp_path, monkeypatch) -> None:
    """Killed right after step 2's save completed: metrics.jsonl has step 2's line."""
    from bardlm.train.state import RunState

    real_save = RunState.save

    def save_then_die(self, *a, **k) -> None:  # noqa: ANN001, ANN002, ANN003
        real_save(self, *a, **k)
        raise _Killed

    t = _trainer(tmp_path)
    t.cfg.eval_interval = t.loop.cfg.eval_interval = 2
    monkeypatch.setattr(RunState, "save", save_then_die)
    with pytest.raises(_Killed):
        t.fit()
    assert [r["step"] for r in _rows(tmp_path)] == [2]


def test_metrics_line_past_the_checkpoint_is_dropped_on_resume(tmp_path, monkeypatch) -> None:
    """Killed after step 4's line, before its save: resuming from step 2 drops that line, so
    the finished run has one line per evaluated step."""
    from bardlm.train.state import RunState

    real_save, saves = RunState.save, []

    def die_at_second_save(self, *a, **k) -> None:  # noqa: ANN001, ANN002, ANN003
        saves.append(1)
        if len(saves) == 2:
            raise _Killed
        real_save(self, *a, **k)

    t = _trainer(tmp_path)
    t.cfg.eval_interval = t.loop.cfg.eval_interval = 2
    monkeypatch.setattr(RunState, "save", die_at_second_save)
    with pytest.raises(_Killed):
        t.fit()
    monkeypatch.undo()
    assert [r["step"] for r in _rows(tmp_path)] == [2, 4]  # step 4 has no checkpoint
    resumed = _trainer(tmp_path)
    resumed.resume()
    assert resumed.step == 2
    assert [r["step"] for r in _rows(tmp_path)] == [2]


def test_wsd_resumed_across_the_decay_boundary_gets_the_same_rates(tmp_path) -> None:
    """wsd over 8 steps decays over its last half (from step 5, after a 2-step warm-up): a run
    stopped at step 4 (still stable) and resumed to 8 logs the lrs of the uninterrupted run,
    and those are lr_at's, which the decay has started to lower."""
    data = tmp_path / "romeo.txt"
    data.write_text(TEXT)
    wsd = [*RUN, "--set", "schedule=wsd", "--set", "decay_fraction=0.5", "--set", "lr_decay_iters=8"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "a"), "--max-iters", "8", *wsd]) == 0
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "b"), "--max-iters", "4", *wsd]) == 0
    assert _resume(tmp_path / "b", "--max-iters", "8") == 0
    plan = TrainConfig.from_dict(json.loads((tmp_path / "a" / "config.json").read_text())["train"])
    whole, resumed = _lrs(tmp_path / "a"), _lrs(tmp_path / "b")
    assert resumed == whole == pytest.approx([lr_at(s, plan) for s in range(8)], rel=1e-12)
    assert whole[4] == whole[5] == plan.lr > whole[6] > whole[7]  # the decay began after the stop
    # Changing the decay on resume would change the plan: refused.
    assert _resume(tmp_path / "b", "--max-iters", "9", "--set", "decay_fraction=0.3") == 2
