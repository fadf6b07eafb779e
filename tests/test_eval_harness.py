"""lm-evaluation-harness: `bardlm lm-eval` (our `BardlmLM`) against the harness's own Hugging Face
model (`--model hf`) on the same converted model, with two tasks written here (local JSONL)."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install 'bardlm[eval]'")
pytest.importorskip("transformers")
# The harness loads task data with `datasets`; keep its cache out of the home directory.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="bardlm-datasets-"))

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

from bardlm.cli import main  # noqa: E402
from bardlm.eval.harness import BardlmLM, split_tokens  # noqa: E402
from bardlm.tokenizers import WordTokenizer  # noqa: E402

CORPUS = ("the cat sat on the mat . the dog ran in the park . a bird sang in the tree . "
          "what is the capital of france ? paris is the capital . the sun is hot and the snow "
          "is cold . she reads a book every night before she sleeps . ") * 4
MC = [
    {"question": "The cat sat on the", "choices": [" mat", " sun", " capital of france"], "label": 0},
    {"question": "What is the capital of france?", "choices": [" paris", " cold", " a bird"], "label": 0},
    {"question": "The snow is", "choices": [" hot", " cold and white", " a book"], "label": 1},
    {"question": "She reads a book every", "choices": [" night", " park", " tree"], "label": 0},
    {"question": "A bird sang in the", "choices": [" tree", " mat .", " dog"], "label": 2},
]
DOCS = [{"text": CORPUS[i * 37 : i * 37 + 260]} for i in range(3)]  # longer than the context: windows


def write_tasks(folder) -> None:  # noqa: ANN001
    """Two harness tasks over local JSONL files: multiple choice and rolling loglikelihood."""
    folder.mkdir()
    for name, rows in (("mc", MC), ("docs", DOCS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = lambda name: f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}\ntest_split: test\n"  # noqa: E731
    (folder / "toy_mc.yaml").write_text(
        "task: toy_mc\n" + data("mc.jsonl") + "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "toy_ppl.yaml").write_text(
        "task: toy_ppl\n" + data("docs.jsonl") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):  # noqa: ANN201
    """A random GPT-2 with a small byte-level BPE tokenizer, as transformers saves them."""
    out = tmp_path_factory.mktemp("hf")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    eos = tok.eos_token_id
    torch.manual_seed(5)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2,
                                       n_head=4, bos_token_id=eos, eos_token_id=eos))
    with torch.no_grad():  # a peaked distribution: choices get clearly different scores
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def reference(hf_dir, tasks_dir) -> dict:  # noqa: ANN001
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32",
                          tasks=["toy_mc", "toy_ppl"], device="cpu", batch_size=4,
                          task_manager=TaskManager(include_path=str(tasks_dir)))
    return res["results"]


def test_scores_equal_lm_eval_hf(hf_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    tasks = tmp_path / "tasks"
    write_tasks(tasks)
    want = reference(hf_dir, tasks)
    assert main(["lm-eval", "--ckpt", str(hf_dir), "--tasks", "toy_mc,toy_ppl",
                 "--include-path", str(tasks), "--batch-size", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    for task, metrics in (("toy_mc", ("acc,none", "acc_norm,none")),
                          ("toy_ppl", ("word_perplexity,none", "byte_perplexity,none",
                                       "bits_per_byte,none"))):
        for m in metrics:
            assert got[task][m] == pytest.approx(want[task][m], rel=1e-4), (task, m)
    # The check can fail: the perplexity is far from a uniform model's, and acc is not a tie.
    assert want["toy_ppl"]["bits_per_byte,none"] > 1.0
    assert 0.0 <= want["toy_mc"]["acc,none"] <= 1.0


def test_loglikelihood_values_match_hf_requests(hf_dir) -> None:  # noqa: ANN001
    """Request by request, (logprob, greedy) of ours and of the harness's hf model."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    reqs = [Instance("loglikelihood", {}, (d["question"], c), 0) for d in MC for c in d["choices"]]
    reqs.append(Instance("loglikelihood", {}, ("", "the cat sat"), 0))  # empty context: prefix token
    reqs.append(Instance("loglikelihood", {}, ("the cat sat on the ", "mat"), 0))  # trailing space
    long_ctx = CORPUS[:400]  # longer than the 32-token context: cropped on the left
    reqs.append(Instance("loglikelihood", {}, (long_ctx, " the mat"), 0))
    ours = BardlmLM(ckpt=str(hf_dir), batch_size=4).loglikelihood(reqs)
    theirs = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=4, device="cpu").loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5) and ga == gb
    assert len({round(a, 3) for a, _ in ours}) > len(ours) // 2  # varied, so a shift would show


def test_word_tokenizer_split_at_tokens(tmp_path) -> None:
    """With a word tokenizer "the cat" + " sat" may tokenize differently at the seam; the
    continuation is every token from the first that differs, and never empty."""
    tok = WordTokenizer.train("the cat sat on the mat .  two spaces")
    assert split_tokens(tok.encode("the cat"), tok.encode("the cat sat")) == 3
    # "mat . " + "  two": the seam's " . " and "  " merge into one (unknown) token " .   ",
    # so both sides hold an <unk> there: ids alike, words not. The split goes by words.
    lm = BardlmLM.__new__(BardlmLM)
    lm.tokenizer, lm.prefix = tok, None
    ctx, cont = lm.pair("mat .", "   two")  # (trailing spaces of a context move across too)
    assert ctx == tok.encode("mat") and cont == tok.encode(" .   two")
    assert split_tokens([1, 2, 3], [1, 2, 3]) == 2  # the continuation keeps one token
