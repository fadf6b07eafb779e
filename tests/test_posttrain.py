"""Preference tuning (`bardlm dpo`) and RL (`bardlm rl`): the objectives against TRL's own code
on the same model and log-probabilities, log-probabilities against transformers, learning on toy
tasks, exact resume and one-line refusals. Models are built from configs; nothing is downloaded."""

from __future__ import annotations

import json
import shlex
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_sft import base_ckpt

from bardlm.cli import main
from bardlm.errors import BardlmError
from bardlm.io.hf import from_pretrained
from bardlm.train.dpo import dpo_loss, read_pref_jsonl, sft_term
from bardlm.train.grpo import (
    builtin_prompts,
    builtin_reward,
    group_advantages,
    grpo_loss,
    make_task,
    spread_share,
)
from bardlm.train.logps import sequence_logps, token_logps

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread():  # noqa: ANN202
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_gpt2(tmp_path: Path):  # noqa: ANN201
    """A random GPT-2 from a config, and the same model converted to bardlm."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "gpt2")
    return hf, from_pretrained(tmp_path / "gpt2").eval()


def pairs_batch(B: int = 3, L: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's DPO batch: ids (2B, L) [chosen rows, then rejected], attention and completion masks:
    prompt, then completion, then right padding, of varying lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (2 * B, L), generator=g)
    att, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for b in range(2 * B):
        p, n = 2 + b % 3, L - 1 - (b % 4)
        att[b, :n], comp[b, p:n] = 1, 1
    return ids * att, att, comp


def ours_xy(ids: torch.Tensor, comp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our (x, y): next-token targets where the next token is the completion's, else -1."""
    return ids[:, :-1], torch.where(comp[:, 1:].bool(), ids[:, 1:], -1)


# log-probabilities ---------------------------------------------------------------------------
def test_sequence_logps_match_transformers(tmp_path: Path) -> None:
    hf, ours = hf_gpt2(tmp_path)
    ids, att, comp = pairs_batch()
    x, y = ours_xy(ids, comp)
    logp, n = sequence_logps(ours, x, y)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=att).logits[:, :-1]
    ref = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * comp[:, 1:]
    assert torch.equal(n, comp[:, 1:].sum(1))
    torch.testing.assert_close(logp.detach(), ref.sum(1), atol=1e-5, rtol=1e-5)


# DPO against TRL ------------------------------------------------------------------------------
def trl_dpo(hf: torch.nn.Module, ids, att, comp, ref_c, ref_r, beta: float, kind: str,  # noqa: ANN001, ANN201
            sft_weight: float = 0.0):
    """TRL's DPOTrainer loss computation itself, on `hf` (its fused head added), with the
    reference log-probabilities precomputed. Returns (loss, metrics)."""
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    acc = SimpleNamespace(device=ids.device, gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=hf, accelerator=acc, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[kind, "sft"], loss_weights=[1.0, sft_weight], beta=beta,
        use_weighting=False, label_smoothing=0.0, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": ids, "attention_mask": att, "completion_mask": comp,
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = DPOTrainer._compute_loss(trainer, hf, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize(("kind", "trl_kind", "sft_weight"),
                         [("sigmoid", "sigmoid", 0.0), ("ipo", "ipo", 0.0), ("norm", "sigmoid_norm", 0.0),
                          ("sigmoid", "sigmoid", 0.5)])
def test_dpo_loss_rewards_and_gradients_match_trl(tmp_path: Path, kind: str, trl_kind: str,
                                                  sft_weight: float) -> None:
    pytest.importorskip("trl", reason="the DPO reference: pip install trl (dev extra)")
    hf, ours = hf_gpt2(tmp_path)
    hf.train()  # no dropout in this config; TRL logs under "train"
    ids, att, comp = pairs_batch()
    B = ids.shape[0] // 2
    ref_c, ref_r = -torch.rand(B) * 3 - 30, -torch.rand(B) * 3 - 30
    beta = 0.3
    loss_trl, metrics = trl_dpo(hf, ids, att, comp, ref_c, ref_r, beta, trl_kind, sft_weight)
    loss_trl.backward()

    x, y = ours_xy(ids, comp)
    logp, n = sequence_logps(ours, x, y)
    losses, r_c, r_r = dpo_loss(logp[:B], logp[B:], ref_c, ref_r, beta, kind, n[:B], n[B:])
    loss = losses.mean() + sft_weight * sft_term(logp[:B], n[:B])
    loss.backward()

    torch.testing.assert_close(loss, loss_trl, atol=1e-5, rtol=1e-5)
    assert abs(r_c.mean().item() - metrics["rewards/chosen"]) < 1e-5
    assert abs(r_r.mean().item() - metrics["rewards/rejected"]) < 1e-5
    assert abs((r_c - r_r).mean().item() - metrics["rewards/margins"]) < 1e-5
    assert abs((r_c > r_r).float().mean().item() - metrics["rewards/accuracies"]) < 1e-6
    # Gradients: the tied embedding, and one MLP weight (transformers' Conv1D stores it transposed).
    torch.testing.assert_close(ours.transformer.wte.weight.grad, hf.transformer.wte.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.transformer.h[1].mlp.c_fc.weight.grad,
                               hf.transformer.h[1].mlp.c_fc.weight.grad.t(), atol=1e-5, rtol=1e-4)


# GRPO against TRL -----------------------------------------------------------------------------
def trl_grpo(logp, old, ref, adv, mask, beta: float, epsilon: float) -> torch.Tensor:  # noqa: ANN001
    """TRL's GRPOTrainer loss ("grpo" type) itself, given per-token log-probabilities."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    N, C = logp.shape
    args = SimpleNamespace(use_bias_correction_kl=False, delta=None)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, args=args, loss_type="grpo", epsilon_low=epsilon,
        epsilon_high=epsilon, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=SimpleNamespace(gather=lambda t: t, reduce=lambda t, reduction: t))
    inputs = {"prompt_ids": torch.zeros(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2, dtype=torch.long),
              "completion_ids": torch.zeros(N, C, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref}
    return GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_and_gradient_match_trl(beta: float) -> None:
    pytest.importorskip("trl", reason="the GRPO reference: pip install trl (dev extra)")
    g = torch.Generator().manual_seed(0)
    N, C = 6, 7
    base = -torch.rand(N, C, generator=g) * 4
    old = base + torch.randn(N, C, generator=g) * 0.3  # ratios away from 1: clipping acts
    ref = base + torch.randn(N, C, generator=g) * 0.3
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0]])
    adv = group_advantages(rewards).view(-1)
    mask = torch.ones(N, C)
    mask[1, 5:], mask[4, 2:] = 0, 0
    a = base.clone().requires_grad_()
    b = base.clone().requires_grad_()
    loss_trl = trl_grpo(a, old, ref, adv, mask, beta, 0.2)
    loss, _ = grpo_loss(b, old, adv, mask, 0.2, None, beta, ref)
    loss_trl.backward()
    loss.backward()
    torch.testing.assert_close(loss, loss_trl, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-6)
    assert (b.grad[mask == 0] == 0).all() and (b.grad != 0).any()


def test_group_advantages_match_trl() -> None:
    pytest.importorskip("trl")
    from trl.trainer.utils import nanstd

    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.9, 0.4, 0.4]])
    want = (r - r.mean(1, keepdim=True)) / (nanstd(r, dim=1).unsqueeze(1) + 1e-4)
    torch.testing.assert_close(group_advantages(r), want)


def test_spread_share_counts_the_groups_that_teach() -> None:
    """The logged share of groups with a spread of rewards is the share with nonzero advantages."""
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [0.2, 0.9, 0.4, 0.4]])
    teaches = (group_advantages(r) != 0).any(1).float().mean().item()
    assert spread_share(r) == teaches == 0.5


# learning on toy tasks -------------------------------------------------------------------------
def shout_pairs(path: Path, n: int = 60, seed: int = 0) -> Path:
    """'shout w' -> chosen 'W', rejected 'w' (a plausible wrong answer)."""
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            w = "".join(rng.choice("abcd") for _ in range(3))
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"shout {w}"}],
                                "chosen": [{"role": "assistant", "content": w.upper()}],
                                "rejected": [{"role": "assistant", "content": w}]}) + "\n")
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


CLOCK = ("elapsed_s", "tokens_per_sec", "flops_per_sec", "mfu", "peak_mem_gib")  # differ run to run


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in rows]


def test_dpo_raises_preference_accuracy_and_resumes_exactly(tmp_path: Path) -> None:
    base, data = base_ckpt(tmp_path / "base"), shout_pairs(tmp_path / "p.jsonl")
    from bardlm.config import TrainConfig
    from bardlm.train.dpo import DPOTuner

    cfg = TrainConfig.from_dict(dict(max_iters=6, lr=3e-3, batch_size=8, eval_interval=3, weight_decay=0.0,
                                     val_fraction=0.2, warmup_iters=1))
    before = DPOTuner(base, data, tmp_path / "x", cfg, log=lambda m: None).eval_metrics()
    assert before["pref_accuracy"] == 0.0 and abs(before["margin"]) < 1e-6  # policy = reference
    common = ["dpo", "--init-from", str(base), "--data", str(data), "--set", "eval_interval=3",
              "--set", "batch_size=8", "--set", "lr=3e-3", "--set", "val_fraction=0.2", "--set", "warmup_iters=1",
              "--set", "lr_decay_iters=6"]  # one schedule for the whole and the interrupted run
    assert main([*common, "--out", str(tmp_path / "a"), "--max-iters", "6"]) == 0
    a = metrics(tmp_path / "a")
    assert a[-1]["pref_accuracy"] >= 0.9 and a[-1]["margin"] > 0, a
    assert a[-1]["reward_chosen"] > a[-1]["reward_rejected"]
    assert main([*common, "--out", str(tmp_path / "b"), "--max-iters", "3"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--max-iters", "6", "--resume"]) == 0
    assert untimed(metrics(tmp_path / "b")) == untimed(a)
    assert main([*common, "--out", str(tmp_path / "b"), "--resume", "--beta", "0.5"]) == 2


def test_dpo_lora_and_ipo_run(tmp_path: Path) -> None:
    base, data = base_ckpt(tmp_path / "base"), shout_pairs(tmp_path / "p.jsonl")
    rc = main(["dpo", "--init-from", str(base), "--data", str(data), "--out", str(tmp_path / "l"),
               "--max-iters", "4", "--set", "eval_interval=4", "--set", "lr=1e-2", "--lora-rank", "2",
               "--loss", "ipo"])
    assert rc == 0
    row = metrics(tmp_path / "l")[-1]
    assert row["margin"] > 0


def test_dpo_bad_data_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(BardlmError, match=r'bad.jsonl:1: missing "rejected"'):
        read_pref_jsonl(p)
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": "  "}\n')
    with pytest.raises(BardlmError, match=r'"rejected" is empty'):
        read_pref_jsonl(p)
    p.write_text('{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": ""}], '
                 '"rejected": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(BardlmError, match=r'"chosen" has no non-empty assistant message'):
        read_pref_jsonl(p)
    p.write_text('{"prompt": "ab", "chosen": "c", "rejected": "d"}\n')
    assert read_pref_jsonl(p)[0].conversational is False


def test_builtin_tasks_rewards() -> None:
    for task in ("arithmetic", "reverse", "sort"):
        qs = builtin_prompts(task, 2, 50, 0)
        assert len({q for q, _ in qs}) == len(qs) == 50
        reward = builtin_reward(task)
        for q, a in qs:
            assert reward(q, f" {a} ") == 1.0 and reward(q, a + "x") == 0.0
    assert builtin_reward("arithmetic")("12-34", "-22") == 1.0
    t = make_task("sort", 1, n_val=3)
    assert not set(t.train) & set(t.val)


def _lsb_by_columns(a: int, b: int, op: str) -> str:
    """a op b written least significant digit first, computed column by column from the ones
    (an independent reference: the carry or borrow flows left to right with the output), the
    sign last."""
    big, small = (a, b) if op == "+" or a >= b else (b, a)
    digits, carry = [], 0
    while big or small or carry:
        d = big % 10 + (small % 10 if op == "+" else -(small % 10)) + carry
        carry = (d >= 10) - (d < 0)
        digits.append(d % 10)
        big, small = big // 10, small // 10
    while len(digits) > 1 and digits[-1] == 0:  # no leading zeros (at the end, reversed)
        digits.pop()
    return "".join(map(str, digits or [0])) + ("-" if op == "-" and a < b else "")


def test_arithmetic_lsb_task_answers_reward_and_questions() -> None:
    """`arithmetic-lsb`: every one- and two-digit question's answer is the column-by-column
    value, digits least significant first, sign last; its reward takes exactly that (not the
    usual order), and it draws the same questions as `arithmetic`."""
    from bardlm.train.grpo import eval_arithmetic, format_answer

    lsb, msb = builtin_reward("arithmetic-lsb"), builtin_reward("arithmetic")
    for a in range(100):
        for b in range(100):
            for op in "+-":
                q = f"{a}{op}{b}"
                want = _lsb_by_columns(a, b, op)
                assert format_answer(eval_arithmetic(q), "arithmetic-lsb") == want, q
                assert lsb(q, f" {want} ") == 1.0, q
                usual = str(eval_arithmetic(q))
                assert lsb(q, usual) == float(usual == want) and msb(q, want) == float(usual == want), q
    assert format_answer(57 + 68, "arithmetic-lsb") == "521" and format_answer(27 - 52, "arithmetic-lsb") == "52-"
    for digits in (1, 2, 3):
        pairs = builtin_prompts("arithmetic-lsb", digits, 60, 5)
        assert [q for q, _ in pairs] == [q for q, _ in builtin_prompts("arithmetic", digits, 60, 5)]
        assert all(a == format_answer(eval_arithmetic(q), "arithmetic-lsb") for q, a in pairs)
    assert make_task("arithmetic-lsb", 2, seed=3).val == make_task("arithmetic", 2, seed=3).val


def test_demo_writes_every_answer_in_the_tasks_order(monkeypatch) -> None:  # noqa: ANN001
    """With `arithmetic-lsb`, the SFT teacher, DPO's pairs and the exact-match scorer all write
    answers as the task's reward wants them: a right teacher answer and every chosen answer
    earn reward 1, a forgotten carry and every rejected answer 0."""
    import random

    import bardlm.lab.post_training as pt
    from bardlm.train.grpo import eval_arithmetic, format_answer

    reward = builtin_reward("arithmetic-lsb")
    qs = [q for q, _ in builtin_prompts("arithmetic", 2, 300, 1)]
    rng = random.Random(0)
    for q in qs:
        assert reward(q, pt.teacher_answer(q, 0.0, rng, "arithmetic-lsb")) == 1.0
        assert reward(q, pt.teacher_answer(q, 1.0, rng, "arithmetic-lsb")) == float(not pt.needs_carry(q))
    assert pt.teacher_answer("57+68", 1.0, rng, "arithmetic-lsb") == "511"  # 115, the carry forgotten
    for row in pt.preference_rows(qs, 0, "arithmetic-lsb"):
        q = row["prompt"][0]["content"]
        assert reward(q, row["chosen"][0]["content"]) == 1.0 and reward(q, row["rejected"][0]["content"]) == 0.0
    seen = []
    monkeypatch.setattr(pt, "exact_match", lambda model, tok, template, convs: seen.extend(convs) or 1.0)
    assert pt.split_exact_match(None, None, None, qs, "arithmetic-lsb")["all"] == 1.0
    assert sorted(c[0]["content"] for c in seen) == sorted(qs)
    assert all(c[1]["content"] == format_answer(eval_arithmetic(c[0]["content"]), "arithmetic-lsb") for c in seen)


def test_grpo_raises_reward_and_resumes_exactly(tmp_path: Path) -> None:
    """A reward the random model rarely earns (the share of 'a' in its answer) rises."""
    base = base_ckpt(tmp_path / "base")
    (tmp_path / "r.py").write_text("def share_a(prompt, completion):\n"
                                   "    return completion.count('a') / max(len(completion), 1)\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in ["ab", "cd", "abc", "bcd", "dd"] * 4))
    common = ["rl", "--init-from", str(base), "--task", f"{tmp_path / 'r.py'}:share_a", "--prompts", str(prompts),
              "--group", "4", "--max-new-tokens", "5", "--kl", "0.05", "--set", "lr=1e-2",
              "--set", "eval_interval=4", "--set", "warmup_iters=1", "--set", "val_fraction=0.2",
              "--set", "lr_decay_iters=16"]
    assert main([*common, "--out", str(tmp_path / "a"), "--max-iters", "16"]) == 0
    a = metrics(tmp_path / "a")
    assert a[-1]["reward"] > 2 * a[0]["reward"] + 0.05, a
    assert a[-1]["kl"] > 0 and a[-1]["completion_len"] > 0
    assert (tmp_path / "a" / "rl.png").is_file()
    assert main([*common, "--out", str(tmp_path / "b"), "--max-iters", "8"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--max-iters", "16", "--resume"]) == 0
    b = metrics(tmp_path / "b")
    assert untimed(a) == untimed(b)


def test_grpo_lora_kl_uses_base_with_adapters_off(tmp_path: Path) -> None:
    from bardlm.io.load import load
    from bardlm.nn.lora import adapters_off, apply_lora, lora_layers

    model, _ = load(base_ckpt(tmp_path / "base"))
    x = torch.randint(0, model.config.vocab_size, (2, 6))
    y = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        want = token_logps(model, x, y)
        apply_lora(model, 2, 4.0)
        for layer in lora_layers(model).values():
            layer.lora_B.normal_()
        moved = token_logps(model, x, y)
        with adapters_off(model):
            off = token_logps(model, x, y)
    assert not torch.allclose(moved, want)
    torch.testing.assert_close(off, want)
    assert torch.equal(token_logps(model, x, y), moved)  # adapters back on


def test_reward_function_failures_are_one_line(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    base = base_ckpt(tmp_path / "base")
    (tmp_path / "r.py").write_text("def boom(p, c):\n    raise ValueError('no')\n"
                                   "def nan(p, c):\n    return float('nan')\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in ["ab", "cd", "abc"]))
    for fn, said in (("boom", "failed on prompt"), ("nan", "returned nan")):
        rc = main(["rl", "--init-from", str(base), "--task", f"{tmp_path / 'r.py'}:{fn}", "--prompts", str(prompts),
                   "--out", str(tmp_path / fn), "--group", "2", "--max-new-tokens", "2", "--max-iters", "1"])
        assert rc == 2
        assert said in capsys.readouterr().err
    assert main(["rl", "--init-from", str(base), "--task", f"{tmp_path / 'r.py'}:missing", "--prompts", str(prompts),
                 "--out", str(tmp_path / "m")]) == 2
    assert "has no function 'missing'" in capsys.readouterr().err
    assert main(["rl", "--init-from", str(base), "--task", "sort", "--group", "1", "--out", str(tmp_path / "g")]) == 2


# the demonstration, tiny -----------------------------------------------------------------------
@pytest.mark.slow
def test_post_training_demo_runs_end_to_end(tmp_path: Path, tiny_text: str) -> None:
    """The whole chain of bench/post_training.py at a toy budget: every stage writes its run,
    the figures are in range, the held-out questions are the same for SFT and GRPO."""
    from bardlm.lab.post_training import run_post_training_demo

    model = dict(vocab_size=80, block_size=32, n_layer=1, n_head=2, n_embd=32, bias=False)
    pre = dict(max_iters=4, batch_size=8, eval_interval=4, eval_batches=1)
    stage = dict(max_iters=4, batch_size=8, eval_interval=2, lr=1e-3, warmup_iters=1, weight_decay=0.0)
    sft = dict(stage, optimizer="muon")  # the demo's SFT optimizer
    r = run_post_training_demo(tmp_path, tiny_text[:20_000], model, pre, sft, stage, dict(stage, batch_size=2),
                               digits=1, n_sft=40, n_pairs=20, n_val=10, group=2, task="arithmetic-lsb",
                               log=lambda m: None)
    for run in ("pretrained", "sft", "dpo", "rl"):
        assert (tmp_path / run / "config.json").is_file()
    assert (tmp_path / "rl" / "rl.png").is_file() and (tmp_path / "post_training.png").is_file()
    assert [row["step"] for row in r["dpo_curve"]] == [2, 4]  # DPO's held-out pairs at each evaluation
    assert r["dpo_curve"][-1]["pref_accuracy"] == r["dpo_split_pref_accuracy"]
    assert r["rl_before_pass_at_1"] == r["sft_exact_match"]  # the same questions, greedy both times
    assert len(r["rl_curve"]) == 2 and all(0 <= row["reward"] <= 1 for row in r["rl_curve"])
    # SFT scored held-out exact match at each evaluation (steps 2 and 4), the last one the figure's
    assert [row["step"] for row in r["sft_curve"]] == [2, 4]
    assert r["sft_curve"][-1]["exact_match_all"] == r["sft_exact_match"]
    assert 0 <= r["dpo_pref_accuracy"] <= 1 and r["n_val"] == 10
    # every stage on the task's answer order: SFT's answers and GRPO's task are arithmetic-lsb's
    from bardlm.train.grpo import eval_arithmetic, format_answer

    sft = [json.loads(line)["messages"] for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert all(m[1]["content"] == format_answer(eval_arithmetic(m[0]["content"]), "arithmetic-lsb") for m in sft)
    assert any(m[1]["content"] != str(eval_arithmetic(m[0]["content"])) for m in sft)
    assert json.loads((tmp_path / "rl" / "config.json").read_text())["rl"]["task"] == "arithmetic-lsb"


@pytest.mark.parametrize("digits, n_sft", [(2, 100), (2, 8000), (1, 40)])
def test_demo_holds_out_grpos_questions(digits: int, n_sft: int) -> None:
    """The demo's held-out questions are the ones GRPO draws for itself (as GRPOTuner does),
    and no SFT or DPO question is among them, however few SFT questions there are (100
    two-digit ones with 50 held out used to shrink the demo's held-out set to 30 and train SFT
    on the other 20 of GRPO's)."""
    from bardlm.lab.post_training import demo_task
    from bardlm.train.grpo import make_task

    n_val, seed = 50, 7
    task = demo_task(digits, n_sft, n_pairs=30, n_val=n_val, seed=seed)
    grpo = make_task("arithmetic", digits, None, seed=seed, n_val=n_val)  # GRPOTuner's call
    assert task.val == grpo.val and len(task.val) == min(n_val, 40 if digits == 1 else n_val)
    assert not set(task.val) & set(task.train[:n_sft])


def test_demo_refuses_more_held_out_than_grpo_draws(tmp_path: Path) -> None:
    """2000 held-out two-digit questions: GRPO's pool (5000 + 2000) holds out at most 1400, the
    demo's (8000 + 2000) would hold out 2000: refused in one line before anything trains."""
    from bardlm.lab.post_training import run_post_training_demo

    with pytest.raises(BardlmError, match=r"--n-val 2000: GRPO can hold out only 1400 .* use --n-val 1400"):
        run_post_training_demo(tmp_path / "d", "text", {}, {}, {}, {}, {}, n_sft=8000, n_val=2000)
    assert not (tmp_path / "d").exists()


def _column_slip(a: int, b: int, op: str) -> int:
    """The slip written column by column (an independent reference): the ones column as a
    digit, its carry (or borrow) dropped, the tens column done as if there were none."""
    if op == "+":
        return (a % 10 + b % 10) % 10 + 10 * (a // 10 + b // 10)
    big, small = max(a, b), min(a, b)
    ones = big % 10 - small % 10
    value = ones % 10 + 10 * (big // 10 - small // 10)  # borrowed for the ones, not paid back
    return value if a >= b else -value


def test_forgot_carry_is_the_column_slip_and_rejected_answers_are_wrong() -> None:
    """Every one- and two-digit question: `forgot_carry` equals the slip written column by
    column, differs from the value exactly when `needs_carry`, and the DPO rejected answer is
    never the value."""
    import random

    from bardlm.lab.post_training import forgot_carry, needs_carry, wrong_answer
    from bardlm.train.grpo import eval_arithmetic

    rng, carries = random.Random(0), 0
    for a in range(100):
        for b in range(100):
            for op in "+-":
                q = f"{a}{op}{b}"
                assert forgot_carry(q) == _column_slip(a, b, op), q
                assert needs_carry(q) == (forgot_carry(q) != eval_arithmetic(q)), q
                assert int(wrong_answer(q, rng)) != eval_arithmetic(q), q
                carries += needs_carry(q)
    # Sums: 45 of the 100 pairs of ones digits carry. Differences: the larger number's ones digit
    # is the smaller one in 45 of 100 pairs when the tens differ (9,000 questions), never when
    # they are equal.
    assert carries == 4500 + 4050


def test_rl_ctrl_c_saves_and_resumes(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """SIGINT in the middle of a step (here: from the reward function) finishes the step, saves
    it and says how to resume; --resume then continues from that step."""
    base = base_ckpt(tmp_path / "base")
    flag = tmp_path / "sent"  # once only: the resumed run loads the module afresh
    (tmp_path / "r.py").write_text("import os, signal, pathlib\n"
                                   f"flag = pathlib.Path({str(flag)!r})\n"
                                   "def f(p, c):\n    if not flag.exists():\n        flag.touch()\n"
                                   "        os.kill(os.getpid(), signal.SIGINT)\n    return float(len(c))\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in ["ab", "cd", "abc", "bcd"]))
    argv = ["rl", "--init-from", str(base), "--task", f"{tmp_path / 'r.py'}:f", "--prompts", str(prompts),
            "--out", str(tmp_path / "run"), "--group", "2", "--max-new-tokens", "2", "--max-iters", "3",
            "--set", "batch_size=2", "--set", "val_fraction=0.25"]
    assert main(argv) == 130  # an interruption, not an error
    err = capsys.readouterr().err
    assert "interrupted at step 1; checkpoint saved" in err
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["step"] == 1
    said = shlex.split(err.split("continue with: ")[1].splitlines()[0])
    assert said[:2] == ["bardlm", "rl"] and "--resume" in said
    assert main(said[1:]) == 0  # the command it says works as it is
    assert "resumed" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["step"] == 3
