"""`bardlm eval`: sliding-window perplexity and bits per byte, against `transformers` running the
Hugging Face perplexity guide's loop (labels -100 for the context) on the converted model."""

from __future__ import annotations

import json
import math
import string

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from bardlm import GPT, ModelConfig  # noqa: E402
from bardlm.cli import main  # noqa: E402
from bardlm.eval.perplexity import sliding_windows  # noqa: E402
from bardlm.infer.quantize import quantize_model  # noqa: E402
from bardlm.io.checkpoint import save_checkpoint  # noqa: E402
from bardlm.io.hf import save_pretrained  # noqa: E402
from bardlm.tokenizers import CharTokenizer  # noqa: E402

CHARS = sorted(set(string.ascii_letters + " .,;:!?'\n-é"))  # é: 2 UTF-8 bytes, so bytes != chars
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "Café patrons: you are all resolved rather to die than to famish?\n")
STYLES = {
    "gpt2": dict(n_layer=2, n_head=4, n_embd=32, bias=True),
    "llama": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, bias=False, pos="rope",
                  norm="rmsnorm", ffn="swiglu", ffn_hidden=48, tie_embeddings=False),
}
BLOCK = 64


def hf_reference(hf_model: torch.nn.Module, ids: list[int], L: int, S: int) -> tuple[float, int]:
    """The guide's loop (huggingface.co/docs/transformers/perplexity), summing the NLL of the
    tokens each window actually scores: (total NLL in nats, tokens scored)."""
    input_ids = torch.tensor([ids])
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, S):
        end_loc = min(begin_loc + L, seq_len)
        trg_len = end_loc - prev_end_loc
        window = input_ids[:, begin_loc:end_loc]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(window, labels=target_ids).loss  # mean over the shifted labels
        n = int((target_ids[:, 1:] != -100).sum())  # labels shift by one inside the model
        nll_sum += loss.item() * n
        n_tokens += n
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


@pytest.fixture(scope="module", params=list(STYLES))
def converted(request, tmp_path_factory):  # noqa: ANN001, ANN201
    """(bardlm run dir, HF dir, transformers model) of one random char model."""
    tmp = tmp_path_factory.mktemp(request.param)
    tok = CharTokenizer(CHARS)
    torch.manual_seed(7)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=BLOCK, **STYLES[request.param]))
    with torch.no_grad():  # larger weights: a far-from-uniform distribution, so errors show
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    run = save_checkpoint(tmp / "run", model, tok)
    hf_dir = save_pretrained(model, tmp / "hf", tok)
    return run, hf_dir, AutoModelForCausalLM.from_pretrained(hf_dir).eval(), tok


def unscored_after(n: int, L: int, S: int) -> set[int]:
    """Positions past the first that the guide's windows leave unscored: window starts when S = L."""
    return set(range(L, n, L)) if S == L else set()


def eval_json(capsys, *args: str) -> dict:  # noqa: ANN001
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("L,S", [(BLOCK, BLOCK), (BLOCK, 16), (32, 11), (20, 20)])
def test_matches_transformers_guide(converted, tmp_path, capsys, L, S) -> None:  # noqa: ANN001
    run, hf_dir, hf_model, tok = converted
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    ids = tok.encode(TEXT)
    nll, n = hf_reference(hf_model, ids, L, S)
    n_bytes = len(TEXT.encode("utf-8"))
    assert n_bytes > len(TEXT)
    for ckpt in (hf_dir, run):  # the converted HF directory and the bardlm run
        got = eval_json(capsys, "--ckpt", str(ckpt), "--data", str(data), "--max-length", str(L),
                        "--stride", str(S), "--batch-size", "3")
        assert got["tokens"] == len(ids) and got["bytes"] == n_bytes and got["scored_tokens"] == n
        assert got["loss"] == pytest.approx(nll / n, rel=1e-4)
        assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
        # Bits over the bytes of the scored characters only (the unscored ones carry no bits).
        scored = [i for i in range(1, len(ids)) if i not in unscored_after(len(ids), L, S)]
        scored_bytes = sum(len(TEXT[i].encode("utf-8")) for i in scored)
        assert got["scored_bytes"] == scored_bytes <= n_bytes
        assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / scored_bytes, rel=1e-4)
    # The check can fail: the model is far from uniform, and context changes the answer.
    assert abs(nll / n - math.log(tok.vocab_size)) > 0.1
    if S < L:
        assert n == len(ids) - 1  # every token but the first is scored once


def test_stride_gives_context(converted) -> None:  # noqa: ANN001
    """Overlapping windows score the same tokens with more context: a different number."""
    _, _, hf_model, tok = converted
    ids = tok.encode(TEXT)
    a, _ = hf_reference(hf_model, ids, 32, 32)
    b, _ = hf_reference(hf_model, ids, 32, 16)
    assert abs(a - b) > 1e-3


def test_windows_cover_each_token_once() -> None:
    for n, L, S in [(7, 4, 2), (100, 10, 3), (100, 10, 10), (5, 8, 8), (9, 3, 1)]:
        scored = [t for _, end, first in sliding_windows(n, L, S) for t in range(first, end)]
        assert scored == sorted(set(scored))
        if S < L:
            assert scored == list(range(1, n))
        for begin, end, first in sliding_windows(n, L, S):
            assert end - begin <= L and first - begin <= max(L - S, 1)


def test_int8_and_bf16_run(converted, tmp_path, capsys) -> None:  # noqa: ANN001
    run, hf_dir, hf_model, _ = converted
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    ref = eval_json(capsys, "--ckpt", str(run), "--data", str(data))
    from bardlm.io.load import load

    runs = [eval_json(capsys, "--ckpt", str(hf_dir), "--data", str(data), "--dtype", "bf16")]
    # INT8 directories of rotary models do not load on main yet (a meta-tensor error in
    # io/checkpoint.py's _adopt_int8, not in eval), so INT8 is checked on the GPT-2 style.
    if hf_model.config.model_type == "gpt2":
        model, tok = load(run)
        quantize_model(model)
        save_checkpoint(tmp_path / "int8", model, tok)
        runs.append(eval_json(capsys, "--ckpt", str(tmp_path / "int8"), "--data", str(data)))
    for got in runs:
        assert got["tokens"] == ref["tokens"]
        assert got["loss"] == pytest.approx(ref["loss"], rel=0.05)


@pytest.mark.parametrize("args,message", [
    (["--data", "MISSING"], "does not exist; check the --data path"),
    (["--data", "EMPTY"], "empty"),
    (["--max-length", str(BLOCK + 1)], "context of 64"),
    (["--max-length", "16", "--stride", "17"], "larger than --max-length"),
    (["--stride", "0"], "--stride must be positive"),
    (["--stride", "-3"], "--stride must be positive"),
    (["--data", "UNKNOWN"], "not in the vocabulary"),
    (["--data", "ONE"], "at least 2"),
])
def test_errors_are_one_line(converted, tmp_path, capsys, args, message) -> None:  # noqa: ANN001
    run = converted[0]
    files = {"MISSING": tmp_path / "nope.txt", "EMPTY": tmp_path / "empty.txt",
             "UNKNOWN": tmp_path / "unknown.txt", "ONE": tmp_path / "one.txt",
             "TEXT": tmp_path / "text.txt"}
    files["EMPTY"].write_text("", encoding="utf-8")
    files["UNKNOWN"].write_text("hello 42", encoding="utf-8")  # digits are not in CHARS
    files["ONE"].write_text("a", encoding="utf-8")
    files["TEXT"].write_text(TEXT, encoding="utf-8")
    if "--data" not in args:
        args = ["--data", "TEXT", *args]
    args = [str(files[a]) if a in files else a for a in args]
    assert main(["eval", "--ckpt", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bardlm: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_training_summary_reports_bits_per_byte(tmp_path) -> None:
    """train/trainer.py's final line: val_bpb_full = NLL of the validation tokens / ln 2 / UTF-8
    bytes of the validation text (val_bpc_full divides by characters, as before)."""
    from bardlm.config import TrainConfig
    from bardlm.train.trainer import Trainer

    text = ("naïve café résumé — " * 40) + ("plain ascii words here. " * 40)
    text = text[::-1] + "éé" * 30  # the validation tail holds 2-byte characters
    tok = CharTokenizer.train(text)
    cfg = TrainConfig(max_iters=1, eval_interval=1, batch_size=2, eval_batches=1)
    tr = Trainer(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2,
                             n_embd=16), cfg, tok, text, tmp_path, progress=False, log=lambda m: None)
    final = tr.fit()
    val_text = text[len(tr.train_split.ids):]  # char tokens: the split is exact
    n_bytes = len(val_text.encode("utf-8"))
    assert n_bytes > len(val_text)
    nats = final["val_loss_full"] * len(tr.val_split.ids)
    assert final["val_bpb_full"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-9)
    assert final["val_bpc_full"] == pytest.approx(nats / math.log(2) / len(val_text), rel=1e-9)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_scoring_in_chunks_equals_the_full_log_softmax(monkeypatch, softcap) -> None:  # noqa: ANN001
    """score_rows makes the logits SCORE_CHUNK positions at a time (issue 28): its log-probs and
    greedy flags equal a plain log_softmax over the whole (B, T, V) logits, for rows of several
    chunks, a row shorter than one, and a row with nothing to score; Gemma 2's soft-cap included."""
    import torch.nn.functional as F

    from bardlm.eval import score

    monkeypatch.setattr(score, "SCORE_CHUNK", 7)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32, pos="rope",
                      norm="rmsnorm", ffn="swiglu", logit_softcap=softcap)
    model = GPT(cfg).eval()
    rows = [torch.randint(0, 97, (n,)).tolist() for n in (40, 5, 23, 3)]
    starts = [1, 2, 10, 3]
    got = score.score_rows(model, rows, starts, batch_size=2)
    for row, start, s in zip(rows, starts, got):
        with torch.no_grad():
            logits, _ = model(torch.tensor([row[:-1]]))
        logp = F.log_softmax(logits[0].float(), -1)[start - 1 :]  # position t-1 predicts row[t]
        target = torch.tensor(row[start:])
        assert s.first == start and len(s.logprobs) == len(target)
        torch.testing.assert_close(s.logprobs, logp.gather(1, target[:, None])[:, 0], atol=1e-5, rtol=1e-5)
        assert torch.equal(s.greedy, logp.argmax(-1) == target)
