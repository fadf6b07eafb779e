"""The bad-input matrix (docs/errors.md): every row gets exit status 2 and one line on stderr.

Each case is (id, setup, argv, expected fragment). `setup` prepares files in a temporary folder
and returns a dict of names used in argv as {placeholders}.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bardlm import BardlmError, ModelConfig
from bardlm.cli import main
from bardlm.infer.sampling import check_sampling, filter_logits, sample
from bardlm.io.checkpoint import save_tokenizer as save
from bardlm.tokenizers import CharTokenizer, WordTokenizer
from bardlm.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 30
SMALL = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=16",
         "--no-progress"]


def _trainer(out: Path, tokenizer=None, **kw) -> Trainer:
    cfg = ModelConfig(vocab_size=1, block_size=16, n_layer=1, n_head=2, n_embd=32)
    tcfg = TrainConfig(**{**dict(batch_size=4, max_iters=2, eval_interval=2, eval_batches=1), **kw})
    tok = tokenizer or CharTokenizer.train(TEXT)
    return Trainer(cfg, tcfg, tok, TEXT, out, progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    _trainer(out).fit()
    return out


@pytest.fixture(scope="module")
def word_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wckpt") / "run"
    _trainer(out, WordTokenizer.train(TEXT)).fit()
    return out


def _file(tmp: Path, name: str, content: bytes) -> str:
    (tmp / name).write_bytes(content)
    return str(tmp / name)


def _copy_ckpt(ckpt: Path, tmp: Path) -> Path:
    dst = tmp / "copy"
    dst.mkdir()
    for f in ckpt.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _truncated(ckpt: Path, tmp: Path) -> str:
    d = _copy_ckpt(ckpt, tmp)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    return str(d)


def _missing_weights(ckpt: Path, tmp: Path) -> str:
    d = _copy_ckpt(ckpt, tmp)
    (d / "model.safetensors").unlink()
    return str(d)


def _mismatched_config(ckpt: Path, tmp: Path) -> str:
    d = _copy_ckpt(ckpt, tmp)
    meta = json.loads((d / "config.json").read_text())
    meta["model"]["n_embd"] = 64
    (d / "config.json").write_text(json.dumps(meta))
    return str(d)


def _other_tokenizer(ckpt: Path, tmp: Path) -> str:
    d = _copy_ckpt(ckpt, tmp)
    save(CharTokenizer.train(TEXT.upper()), d / "tokenizer.json")
    return str(d)


def _pickle(tmp: Path) -> str:
    import pickle

    return _file(tmp, "model.pt", pickle.dumps({"weights": [1, 2, 3]}))


def _edited(ckpt: Path, tmp: Path, name: str, edit) -> str:  # noqa: ANN001
    """A copy of the run with one of its JSON files changed by `edit(text) -> text`."""
    d = _copy_ckpt(ckpt, tmp)
    (d / name).write_text(edit((d / name).read_text()))
    return str(d)


def _lr_nan(text: str) -> str:
    meta = json.loads(text)
    meta["train"]["lr"] = float("nan")
    return json.dumps(meta)  # writes NaN, which json.loads reads back


def _data(tmp: Path) -> str:
    return _file(tmp, "d.txt", TEXT.encode())


def _under_file(tmp: Path, *rest: str) -> str:
    """A path inside a regular file: no folder can be made there (unlike a chmod, this holds
    for root too)."""
    return str(Path(_file(tmp, "plain", b"x"), *rest))


def _chat(tmp: Path, *lines: bytes) -> str:
    ok = b'{"messages": [{"role": "user", "content": "hear"}, {"role": "assistant", "content": "me"}]}'
    return _file(tmp, "c.jsonl", b"\n".join([ok, *lines]) + b"\n")


def _finetune(t: Path, c: Path, data: str, *extra: str) -> list[str]:
    return ["finetune", "--init-from", str(c), "--data", data, "--out", str(t / "ft"), "--max-iters", "1", *extra]


def _train(t: Path, *sets: str) -> list[str]:
    return ["train", "--data", _data(t), "--out", str(t / "r"), *SMALL, *[a for k in sets for a in ("--set", k)]]


# (id, argv builder (tmp, ckpt, word_ckpt) -> argv, expected fragment of the one-line message)
CASES = [
    ("config-heads", lambda t, c, w: ["info", "--preset", "char-tiny", "--set", "n_embd=100", "--set", "n_head=3"],
     "n_embd (100) must be divisible by n_head (3)"),
    ("config-kv-heads", lambda t, c, w: ["info", "--preset", "char-tiny", "--set", "n_kv_head=3"],
     "n_head (4) must be divisible by n_kv_head (3)"),
    ("config-rope-odd", lambda t, c, w: ["info", "--preset", "char-tiny", "--set", "pos=rope", "--set", "head_dim=7"],
     "head_dim must be even"),
    ("config-moe-layers", lambda t, c, w: ["info", "--preset", "moe-tiny", "--set", 'ffn_layers=["moe"]'],
     'ffn_layers must list "dense", "moe" or "dense+moe" for each of the 4 layers'),
    ("config-moe-ffn", lambda t, c, w: ["info", "--preset", "char-tiny", "--set", "n_expert=4"],
     "n_expert > 0 needs ffn=swiglu, swiglu_clamped or geglu"),
    ("config-moe-topk", lambda t, c, w: ["info", "--preset", "moe-tiny", "--set", "n_expert_active=5"],
     "n_expert_active must be in [1, n_expert=4]"),
    ("config-mla-sizes", lambda t, c, w: ["info", "--preset", "mla-tiny", "--set", "kv_lora_rank=null"],
     "attn_type=mla needs kv_lora_rank"),
    ("config-mla-kv-heads", lambda t, c, w: ["info", "--preset", "mla-tiny", "--set", "n_kv_head=2"],
     "so n_kv_head must equal n_head, got 2"),
    ("config-mla-scaling", lambda t, c, w: ["info", "--preset", "mla-tiny", "--set",
                                            'rope_scaling={"rope_type": "linear", "factor": 2.0}'],
     "attn_type=mla supports rope_scaling yarn (DeepSeek-V3's) only"),
    ("config-router-groups", lambda t, c, w: ["info", "--preset", "mla-tiny", "--set", "router_groups=3"],
     "router_groups must divide n_expert (8)"),
    ("config-router-aux", lambda t, c, w: ["info", "--preset", "mla-tiny", "--set", "router_aux_loss_coef=0.01"],
     "with router_score=sigmoid set router_aux_loss_coef=0"),
    ("config-router-bias-rate", lambda t, c, w: ["info", "--preset", "moe-tiny", "--set", "correction_bias_rate=0.001"],
     "correction_bias_rate moves the correction bias of router_score=sigmoid routers"),
    ("config-attn-layers", lambda t, c, w: ["info", "--preset", "gemma3-tiny", "--set", 'attn_layers=["local"]'],
     'attn_layers must list "global", "local", "linear" or "conv" for each of the 4 layers'),
    ("config-kv-shared", lambda t, c, w: ["info", "--preset", "gemma4-tiny", "--set", "kv_shared_layers=6"],
     "kv_shared_layers must be in [0, n_layer=6)"),
    ("config-kv-shared-kind", lambda t, c, w: ["info", "--preset", "gemma4-tiny", "--set", "kv_shared_layers=4"],
     "the KV-shared layers have global attention but none of the first 2 layers does"),
    ("config-local-no-window", lambda t, c, w: ["info", "--preset", "llama-tiny", "--set",
                                                'attn_layers=["local","global","global","global"]'],
     'attn_layers has "local" layers but sliding_window is null; set sliding_window'),
    ("config-window", lambda t, c, w: ["info", "--preset", "llama-tiny", "--set", "sliding_window=0"],
     "sliding_window must be a positive integer or null, got 0"),
    ("config-rope-layers", lambda t, c, w: ["info", "--preset", "char-tiny", "--set", "rope_layers=[true,true,true,true]"],
     "rope_layers has rotary layers but pos=learned; set pos=rope or rope_layers=null"),
    ("config-zero", lambda t, c, w: ["info", "--preset", "char-tiny", "--set", "n_layer=0"],
     "n_layer must be a positive integer"),
    ("config-negative", lambda t, c, w: ["info", "--preset", "char-tiny", "--set", "n_embd=-128"],
     "n_embd must be a positive integer"),
    ("config-unknown-key", lambda t, c, w: ["train", "--out", str(t / "r"), "--set", "n_layers=3"],
     "unknown key 'n_layers' (did you mean 'n_layer'?)"),
    ("config-unknown-preset", lambda t, c, w: ["info", "--preset", "gpt3"],
     "valid presets: gpt2-124m"),
    ("data-missing", lambda t, c, w: ["train", "--data", str(t / "nope.txt"), "--out", str(t / "r")],
     "does not exist; check the --data path"),
    ("data-directory", lambda t, c, w: ["train", "--data", str(t), "--out", str(t / "r")],
     "is a folder without meta.json"),
    ("prepare-not-utf8", lambda t, c, w: ["prepare", "--data", _file(t, "l.txt", "caf\xe9 ".encode("latin-1")), "--tokenizer", "char", "--out", str(t / "p")],
     "l.txt: not UTF-8 (bad byte at offset 3)"),
    ("prepare-not-json", lambda t, c, w: ["prepare", "--data", _file(t, "d.jsonl", b'{"text": "a"}\n{oops\n'), "--tokenizer", "char", "--out", str(t / "p")],
     "d.jsonl:2: not JSON"),
    ("prepare-no-field", lambda t, c, w: ["prepare", "--data", _file(t, "d.jsonl", b'{"body": "a"}\n'), "--tokenizer", "char", "--out", str(t / "p")],
     "d.jsonl:1: no string field 'text'"),
    ("prepare-empty", lambda t, c, w: ["prepare", "--data", _file(t, "e.txt", b""), "--tokenizer", "char", "--out", str(t / "p")],
     "e.txt: empty (no text)"),
    ("data-empty", lambda t, c, w: ["train", "--data", _file(t, "e.txt", b""), "--out", str(t / "r")],
     "is empty"),
    ("data-binary", lambda t, c, w: ["train", "--data", _file(t, "b.bin", b"\x7fELF\x00\x01"), "--out", str(t / "r")],
     "looks binary"),
    ("data-not-utf8", lambda t, c, w: ["train", "--data", _file(t, "l.txt", "caf\xe9 ".encode("latin-1") * 50), "--out", str(t / "r")],
     "is not UTF-8"),
    ("data-too-short", lambda t, c, w: ["train", "--data", _file(t, "s.txt", b"tiny text"), "--out", str(t / "r"), *SMALL],
     "fewer than one sequence"),
    ("data-no-val-sequence", lambda t, c, w: ["train", "--data", _file(t, "v.txt", b"abcdefgh" * 20), "--out", str(t / "r"), *SMALL],
     "validation split has"),
    ("tokenizer-unknown-char", lambda t, c, w: ["generate", "--ckpt", str(c), "--prompt", "hear Zed"],
     "character 'Z' at position 5 is not in the vocabulary"),
    ("tokenizer-unknown-word", lambda t, c, w: ["generate", "--ckpt", str(w), "--prompt", "hear zebras"],
     "word 'zebras' at character 5 is not in the vocabulary"),
    ("tokenizer-empty-prompt", lambda t, c, w: ["generate", "--ckpt", str(c), "--prompt", ""],
     "the prompt is empty"),
    ("tokenizer-unknown-spec", lambda t, c, w: ["train", "--data", _file(t, "d.txt", TEXT.encode()), "--tokenizer", "sentencepiece", "--out", str(t / "r")],
     "unknown tokenizer 'sentencepiece'"),
    ("ckpt-missing-dir", lambda t, c, w: ["generate", "--ckpt", str(t / "nowhere")],
     "does not exist; check the --ckpt path"),
    ("ckpt-missing-weights", lambda t, c, w: ["generate", "--ckpt", _missing_weights(c, t)],
     "model.safetensors is missing"),
    ("ckpt-truncated", lambda t, c, w: ["generate", "--ckpt", _truncated(c, t)],
     "may be truncated"),
    ("ckpt-config-mismatch", lambda t, c, w: ["generate", "--ckpt", _mismatched_config(c, t)],
     "the config and weights come from different models"),
    ("ckpt-foreign-tokenizer", lambda t, c, w: ["generate", "--ckpt", _other_tokenizer(c, t)],
     "comes from another run"),
    ("ckpt-pickle", lambda t, c, w: ["generate", "--ckpt", _pickle(t)],
     "bardlm never unpickles"),
    ("gen-prompt-too-long", lambda t, c, w: ["generate", "--ckpt", str(c), "--prompt", "hear " * 4],
     "longer than the context of 16"),
    ("gen-max-new-zero", lambda t, c, w: ["generate", "--ckpt", str(c), "--prompt", "hear", "--max-new-tokens", "0"],
     "max_new_tokens must be positive"),
    ("gen-max-new-negative", lambda t, c, w: ["generate", "--ckpt", str(c), "--prompt", "hear", "--max-new-tokens", "-5"],
     "max_new_tokens must be positive"),
    ("gen-temperature", lambda t, c, w: ["generate", "--ckpt", str(c), "--prompt", "hear", "--temperature", "-0.5"],
     "temperature must be >= 0"),
    ("gen-top-p-zero", lambda t, c, w: ["generate", "--ckpt", str(c), "--prompt", "hear", "--top-p", "0"],
     "top_p must be in (0, 1]"),
    ("gen-top-p-big", lambda t, c, w: ["generate", "--ckpt", str(c), "--prompt", "hear", "--top-p", "1.5"],
     "top_p must be in (0, 1]"),
    ("gen-top-k-big", lambda t, c, w: ["generate", "--ckpt", str(c), "--prompt", "hear", "--top-k", "1000"],
     "top_k must be between 1 and the vocabulary size"),
    ("gen-max-context-table", lambda t, c, w: ["generate", "--ckpt", str(c), "--prompt", "hear", "--max-context", "64"],
     "learned positions end at the context length 16"),
    ("serve-cache-too-big", lambda t, c, w: ["serve", "--ckpt", str(c), "--max-context", "16", "--max-batch", str(10**11)],
     "does not fit in the"),
    ("serve-cache-too-small", lambda t, c, w: ["serve", "--ckpt", str(c), "--max-batch", str(10**11)],
     "do not fit in 50% of the"),
    ("train-existing-out", lambda t, c, w: ["train", "--out", str(c)],
     "already holds a run; pass --resume to continue it or --overwrite"),
    ("train-resume-nothing", lambda t, c, w: ["train", "--resume", "--out", str(t / "fresh")],
     "holds no checkpoint to resume"),
    ("dpo-missing-chosen", lambda t, c, w: ["dpo", "--init-from", str(c), "--out", str(t / "d"), "--data",
                                            _file(t, "p.jsonl", b'{"prompt": "hear", "rejected": "me"}\n')],
     'p.jsonl:1: missing "chosen"; each line needs "prompt", "chosen" and "rejected"'),
    ("dpo-empty-completion", lambda t, c, w: ["dpo", "--init-from", str(c), "--out", str(t / "d"), "--data",
                                              _file(t, "p.jsonl", b'{"prompt": "hear", "chosen": "", "rejected": "me"}\n')],
     '"chosen" is empty; each completion needs some text'),
    ("rl-unknown-task", lambda t, c, w: ["rl", "--init-from", str(c), "--out", str(t / "r"), "--task", "chess"],
     "use one of arithmetic, arithmetic-lsb, reverse, sort or module.py:function"),
    ("finetune-fsdp-lora", lambda t, c, w: ["finetune", "--init-from", str(c), "--out", str(t / "f"), "--fsdp",
                                            "--lora-rank", "2", "--data", _file(t, "c.jsonl", b'{"messages": []}\n')],
     "fsdp with --lora-rank is not supported"),
    ("finetune-base-dtype-without-lora", lambda t, c, w: _finetune(t, c, _chat(t), "--base-dtype", "int8"),
     "--merge, --lora-alpha and --base-dtype need --lora-rank"),
    # issue 32: every verb that writes a model folder refuses an existing one the same way (3)
    ("out-quantize-existing", lambda t, c, w: ["quantize", "--ckpt", str(c), "--out", str(_copy_ckpt(c, t))],
     "already holds a model; pass --overwrite to replace it"),
    ("out-merge-existing", lambda t, c, w: ["merge", "--adapter", str(t / "any"), "--out", str(_copy_ckpt(c, t))],
     "already holds a model; pass --overwrite to replace it"),
    # (5)
    ("prepare-sample-mb", lambda t, c, w: ["prepare", "--data", _data(t), "--tokenizer", "bpe:300", "--out", str(t / "p"), "--sample-mb", "0"],
     "--sample-mb 0.0 must be a positive number of megabytes"),
    ("prepare-sample-mb-negative", lambda t, c, w: ["prepare", "--data", _data(t), "--tokenizer", "bpe:300", "--out", str(t / "p"), "--sample-mb", "-1"],
     "--sample-mb -1.0 must be a positive number of megabytes"),
    # (6, 8) values refused by TrainConfig
    ("train-beta1", lambda t, c, w: _train(t, "beta1=1.5"), "train: beta1 must be in [0, 1)"),
    ("train-beta2", lambda t, c, w: _train(t, "beta2=1.5"), "train: beta2 must be in [0, 1)"),
    ("train-eps", lambda t, c, w: _train(t, "eps=-1"), "train: eps must be positive"),
    ("train-weight-decay", lambda t, c, w: _train(t, "weight_decay=-0.1"), "train: weight_decay must be >= 0"),
    ("train-grad-clip", lambda t, c, w: _train(t, "grad_clip=-1"), "train: grad_clip must be >= 0"),
    ("train-lr-decay-iters", lambda t, c, w: _train(t, "lr_decay_iters=-5"), "train: lr_decay_iters must be >= 0"),
    ("train-decay-fraction", lambda t, c, w: _train(t, "decay_fraction=0"), "train: decay_fraction must be in (0, 1]"),
    ("train-loss-chunk", lambda t, c, w: _train(t, "loss_chunk=-1"), "train: loss_chunk must be >= 0"),
    ("info-int8-without-lora", lambda t, c, w: ["info", "--preset", "char-tiny", "--train", "--base-dtype", "int8"],
     "--base-dtype int8 is a frozen base under LoRA: add --lora-rank R"),
    ("train-checkpoint-every", lambda t, c, w: _train(t, "checkpoint_every=0"), "train: checkpoint_every must be positive"),
    ("train-step-in-backward-clip", lambda t, c, w: _train(t, "step_in_backward=true"),
     "train: step_in_backward updates each parameter before the others' gradients exist"),
    ("train-vocab-size", lambda t, c, w: _train(t, "vocab_size=100"), "the vocabulary size comes from the tokenizer"),
    ("resume-config-nan", lambda t, c, w: ["train", "--resume", "--out", _edited(c, t, "config.json", _lr_nan)],
     "train: lr must be a finite number, got nan"),
    ("resume-state-corrupt", lambda t, c, w: ["train", "--resume", "--data", _data(t), "--no-progress", "--out", _edited(c, t, "trainer_state.json", lambda s: s[:40])],
     "trainer_state.json is damaged"),
    ("gen-temperature-nan", lambda t, c, w: ["generate", "--ckpt", str(c), "--temperature", "nan"],
     "temperature must be >= 0 and finite"),
    ("gen-temperature-inf", lambda t, c, w: ["generate", "--ckpt", str(c), "--temperature", "inf"],
     "temperature must be >= 0 and finite"),
    ("chat-temperature-nan", lambda t, c, w: ["chat", "--ckpt", str(c), "--temperature", "nan"],
     "temperature must be >= 0 and finite"),
    ("gen-penalty-nan", lambda t, c, w: ["generate", "--ckpt", str(c), "--repetition-penalty", "nan"],
     "repetition_penalty must be in [0.01, 100]"),
    ("gen-penalty-tiny", lambda t, c, w: ["chat", "--ckpt", str(c), "--repetition-penalty", "1e-38"],
     "repetition_penalty must be in [0.01, 100]"),
    ("gen-seed-big", lambda t, c, w: ["generate", "--ckpt", str(c), "--seed", "18446744073709551616"],
     "seed must be an integer in [0, 2**63)"),
    ("finetune-not-utf8", lambda t, c, w: _finetune(t, c, _chat(t, b"\xff")),
     "c.jsonl:2: not UTF-8 (bad byte at column 1)"),
    ("out-under-file", lambda t, c, w: ["train", "--data", _data(t), "--out", _under_file(t, "sub"), *SMALL],
     "is a file, so no folder can be made in it"),
    ("prepare-out-under-file", lambda t, c, w: ["prepare", "--data", _data(t), "--tokenizer", "char", "--out", _under_file(t, "sub")],
     "is a file, so no folder can be made in it"),
    ("tokenizer-out-under-file", lambda t, c, w: ["tokenizer", "train", "--data", _data(t), "--kind", "char", "--out", _under_file(t, "sub", "t.json")],
     "Not a directory; check that the path exists"),
    ("quantize-out-file", lambda t, c, w: ["quantize", "--ckpt", str(c), "--out", _file(t, "f", b"x")],
     "is a file; pass a folder (or remove the file)"),
    ("export-out-file", lambda t, c, w: ["export", "--format", "hf", "--ckpt", str(c), "--out", _file(t, "f", b"x")],
     "is a file; pass a folder (or remove the file)"),
    # (8)
    ("finetune-lora-alpha-nan", lambda t, c, w: _finetune(t, c, _chat(t, b""), "--lora-rank", "2", "--lora-alpha", "nan"),
     "--lora-alpha must be a positive finite number"),
    # (9)
    ("finetune-unknown-char", lambda t, c, w: _finetune(t, c, _chat(t, b"", b'{"messages": [{"role": "user", "content": "Zed"}, {"role": "assistant", "content": "me"}]}')),
     "c.jsonl:3: character 'Z'"),
    ("finetune-data-folder", lambda t, c, w: _finetune(t, c, str(t)),
     "is a folder; pass a .jsonl file of conversations"),
    ("eval-not-gzip", lambda t, c, w: ["eval", "--ckpt", str(c), "--data", _file(t, "x.txt.gz", TEXT.encode())],
     "is not valid gzip; decompress it or pass the plain text file"),
    ("device-bogus", lambda t, c, w: ["generate", "--ckpt", str(c), "--device", "bogus"],
     "--device 'bogus' is not a device; use --device auto, cpu, cuda, cuda:N or mps"),
    # No CUDA build, or no 100th GPU: one line either way (the message says which).
    ("device-missing", lambda t, c, w: ["train", "--out", str(t / "r"), "--device", "cuda:99"],
     "--device cuda:99: "),
]


@pytest.mark.parametrize(("case", "argv", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_cli_error_is_one_line(case, argv, fragment, tmp_path, ckpt, word_ckpt, capsys) -> None:
    code = main(argv(tmp_path, ckpt, word_ckpt))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("bardlm: error: ") and "\n" not in err, err
    assert fragment in err, err
    assert "Traceback" not in err


def test_every_case_is_documented() -> None:
    doc = (REPO / "docs" / "errors.md").read_text(encoding="utf-8")
    missing = [case for case, _, fragment in CASES if f"`{case}`" not in doc or fragment not in doc]
    assert not missing, f"docs/errors.md lacks rows for {missing}"


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    tr = _trainer(tmp_path, max_iters=4)
    tr.fit(until=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    import bardlm.io.atomic as ck

    real = ck.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second file of the checkpoint hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", full_disk)
    with pytest.raises(BardlmError, match="No space left on device.*previous files are intact"):
        tr.fit()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name in before}
    # metrics.jsonl got step 4's line before the save (so a completed save never lacks its
    # line); resuming from step 2 drops it again
    assert {k: v for k, v in after.items() if k != "metrics.jsonl"} == {
        k: v for k, v in before.items() if k != "metrics.jsonl"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    _trainer(tmp_path, max_iters=4).resume()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]


def test_interrupt_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    tr = _trainer(tmp_path, max_iters=4)
    tr.fit(until=2)
    before = (tmp_path / "model.safetensors").read_bytes()
    import bardlm.io.atomic as ck

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_sigint_saves_and_says_how_to_resume(tmp_path) -> None:
    import os
    import signal

    tr = _trainer(tmp_path, max_iters=50)
    real_step = tr.train_step

    def step_then_ctrl_c(sync: bool = True) -> float:
        loss = real_step(sync)
        if tr.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    tr.train_step = step_then_ctrl_c
    with pytest.raises(BardlmError, match=r"interrupted at step 3; checkpoint saved, continue with: bardlm train --resume --out "):
        tr.fit()
    assert json.loads((tmp_path / "trainer_state.json").read_text())["step"] == 3


def test_prepare_counts_a_dangling_symlink(tmp_path, capsys) -> None:
    """A broken link among the sources is an unreadable source: one line, or with --skip-bad
    a count in `skipped` (it used to vanish from both)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(TEXT)
    (src / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    argv = ["prepare", "--data", str(src), "--tokenizer", "char", "--workers", "1"]
    assert main([*argv, "--out", str(tmp_path / "p1")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bardlm: error: ") and "gone.txt: cannot read it" in err and "\n" not in err
    assert main([*argv, "--out", str(tmp_path / "p2"), "--skip-bad"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == {"unreadable": 1} and summary["documents"] == 1


def test_damaged_token_cache_is_encoded_again(tmp_path, monkeypatch) -> None:
    """A cache file that cannot be read (cut short by a crash, or garbage) is replaced, not a
    traceback."""
    import numpy as np

    from bardlm.train.data import token_cache_path, token_ids

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    corpus = Path(_file(tmp_path, "d.txt", TEXT.encode()))
    tok = CharTokenizer.train(TEXT)
    want = np.asarray(tok.encode(TEXT))
    cache = token_cache_path(corpus, corpus.read_bytes(), tok.to_dict())
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"\x93NUMPY garbage")
    assert np.array_equal(token_ids(corpus, TEXT, tok), want)
    assert np.array_equal(np.load(cache), want)  # and the cache is whole again


def test_nan_loss_before_any_save_says_there_is_no_checkpoint(tmp_path) -> None:
    """A NaN at the first step: no "last good checkpoint is kept", since none was saved."""
    from bardlm.train.loop import Diverged

    tr = _trainer(tmp_path / "run")

    def nan_step(batch, sync: bool = True) -> float:  # noqa: ANN001
        raise Diverged("loss became nan at step 1", float("nan"))

    tr.loop.train_step = nan_step
    with pytest.raises(BardlmError, match="no checkpoint was saved before it") as e:
        tr.fit()
    assert "is kept" not in str(e.value)
    tr = _trainer(tmp_path / "saved", max_iters=4)
    tr.fit(until=2)
    tr.loop.train_step = nan_step
    with pytest.raises(BardlmError, match="the last good checkpoint in .* is kept"):
        tr.fit()


# Property tests: arbitrary input either works or raises BardlmError, nothing else.
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_tokenizers_never_fail_otherwise(text: str) -> None:
    for tok in (CharTokenizer.train(TEXT), WordTokenizer.train(TEXT)):
        try:
            ids = tok.encode(text, strict=True) if tok.kind == "word" else tok.encode(text)
        except BardlmError as e:
            assert re.search(r"at (position|character) \d+", str(e))
        else:
            assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(
    temperature=st.floats(-2, 5, allow_nan=False),
    top_k=st.one_of(st.none(), st.integers(-3, 40)),
    top_p=st.one_of(st.none(), st.floats(-1, 2, allow_nan=False)),
    min_p=st.one_of(st.none(), st.floats(-1, 2, allow_nan=False)),
    seed=st.integers(0, 2**31),
)
def test_sampler_never_fails_otherwise(temperature, top_k, top_p, min_p, seed) -> None:
    logits = torch.randn(3, 32, generator=torch.Generator().manual_seed(seed))
    try:
        check_sampling(temperature, top_k, top_p, 32, min_p)
    except BardlmError:
        return
    out = sample(logits, temperature, top_k, top_p, min_p, torch.Generator().manual_seed(seed))
    assert out.shape == (3,) and ((out >= 0) & (out < 32)).all()
    if temperature < 1e-5:  # greedy
        assert torch.equal(out, logits.argmax(-1))
        return
    scaled = (logits - logits.max(-1, keepdim=True).values) / temperature
    kept = torch.isfinite(filter_logits(scaled, top_k, top_p, min_p))
    assert kept.any(-1).all()  # never an empty set to sample from
    assert kept.gather(-1, out[:, None]).all()
