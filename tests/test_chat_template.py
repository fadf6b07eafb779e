"""Chat templates: Hugging Face templates render token for token as transformers renders them;
the built-in templates; which tokens count in the finetuning loss; bad chat JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bardlm.errors import BardlmError
from bardlm.infer.chat import (
    builtin_template,
    encode_chat,
    prepare_vocab,
    prompt_ids,
)
from bardlm.io.hf import load_hf_tokenizer
from bardlm.io.metadata import hf_chat_template, template_for
from bardlm.tokenizers import CharTokenizer, train_bpe
from bardlm.train.sft import encode_examples, pad_rows, read_chat_jsonl

jinja2 = pytest.importorskip("jinja2")

# A Qwen-style template that leans on what transformers' environment provides: trim_blocks and
# lstrip_blocks (indented tags, newlines after tags), raise_exception, tojson, namespace,
# loop controls, a {% generation %} block and the bos_token variable.
TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role ' + message['role']) }}
    {% endif %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are helpful. {{ {"k": "<&>"} | tojson }}<|im_end|>
    {% endif %}
    {% if message['role'] == 'assistant' %}
        {% set ns.n = ns.n + 1 %}
<|im_start|>assistant
{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}

    {% else %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

CONVS = [
    [{"role": "user", "content": "Hello there, how are you?"},
     {"role": "assistant", "content": "Fine, thanks!  And you?"},
     {"role": "user", "content": "  Good. Tell me a joke.  "}],
    [{"role": "system", "content": "Be terse."},
     {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "4"}],
]


def hf_dir(tmp_path: Path) -> Path:
    """A Hugging Face tokenizer folder: byte-level BPE with special tokens and the template."""
    tok = train_bpe("Hello there, how are you? Fine thanks. Tell me a joke, be terse. " * 30, 320)
    tok.hf.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    d = tmp_path / "hf"
    d.mkdir()
    (d / "tokenizer.json").write_text(tok.hf.to_str())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE,
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False}))
    return d


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_hf_template_matches_transformers(tmp_path: Path, generation_prompt: bool) -> None:
    transformers = pytest.importorskip("transformers")
    d = hf_dir(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    tok = load_hf_tokenizer(d)
    template = hf_chat_template(d)
    assert template is not None and template.end == "<|im_end|>"
    for conv in CONVS:
        text = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=generation_prompt)
        assert template.render(conv, add_generation_prompt=generation_prompt) == text
        expected = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=generation_prompt,
                                           return_dict=False)
        ours = prompt_ids(template, tok, conv) if generation_prompt else encode_chat(template, tok, conv)[0]
        assert ours == list(expected)
    with pytest.raises(BardlmError, match="bad role tool"):
        template.render([{"role": "tool", "content": "x"}])


def test_assistant_tokens_match_transformers_mask(tmp_path: Path) -> None:
    """Our assistant tokens are those transformers marks with {% generation %} (its mask),
    plus the end-of-turn newline our spans include."""
    transformers = pytest.importorskip("transformers")
    d = hf_dir(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    conv = CONVS[1]
    out = ref.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mine = encode_chat(hf_chat_template(d), load_hf_tokenizer(d), conv)
    assert ids == list(out["input_ids"])
    theirs = [bool(m) for m in out["assistant_masks"]]
    # Both mark "4<|im_end|>"; our span also holds the newline the template writes after it.
    assert [i for i, m in enumerate(theirs) if m] == [i for i, m in enumerate(mine) if m][: sum(theirs)]
    assert sum(theirs) >= 2


def test_template_for_prefers_saved_then_hf_then_builtin(tmp_path: Path) -> None:
    d = hf_dir(tmp_path)
    tok = load_hf_tokenizer(d)
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert template_for(d, tok).kind == "hf"
    assert template_for(tmp_path, CharTokenizer(list("ab"))).kind == "plain"


def test_builtin_special_template_adds_tokens() -> None:
    tok = train_bpe("some text to learn a few merges from " * 20, 300)
    template = builtin_template(tok)
    tok, added = prepare_vocab(template, tok)
    assert added == 4 and tok.token_id("<|end|>") == tok.vocab_size - 1
    conv = CONVS[1]
    ids, mine = encode_chat(template, tok, conv)
    answer = "".join(tok.decode([i]) for i, m in zip(ids, mine) if m)
    assert answer == "4<|end|>\n"
    assert template.stop_ids(tok) == (tok.token_id("<|end|>"),)


def test_loss_counts_assistant_tokens_only() -> None:
    """The targets are -1 except where the next token is the assistant's (located here by
    searching the rendered text), and the loss's gradient reaches no other position."""
    tok = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ:\n?+24.")))
    template = builtin_template(tok)
    conv = [{"role": "user", "content": "shout abc"}, {"role": "assistant", "content": "ABC"},
            {"role": "user", "content": "shout de"}, {"role": "assistant", "content": "DE"}]
    text = template.render(conv)
    rows, _ = encode_examples([conv], template, tok, block_size=256)
    x, y = pad_rows(rows)
    counted = {t + 1 for t in range(y.shape[1]) if y[0, t] >= 0}  # char positions predicted
    want = set()
    for answer in ("ASSISTANT:\nABC\n\n", "ASSISTANT:\nDE\n\n"):
        start = text.find(answer) + len("ASSISTANT:\n")
        want |= set(range(start, start + len(answer) - len("ASSISTANT:\n")))
    assert counted == want
    ids = rows[0][0]
    assert all(y[0, t] == ids[t + 1] for t in range(y.shape[1]) if y[0, t] >= 0)  # the next id
    from bardlm import GPT, ModelConfig

    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    logits, _ = model(x)
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), ignore_index=-1)
    _, model_loss = model(x, y)
    assert torch.allclose(loss, model_loss)
    loss.backward()
    user_rows = (y[0] < 0).nonzero().view(-1)
    assert logits.grad[0, user_rows].abs().max() == 0  # a user token's target changes nothing
    assert logits.grad[0, (y[0] >= 0).nonzero().view(-1)].abs().sum() > 0


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', "not valid JSON"),
    ('{"msgs": []}', 'expected an object {"messages"'),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "string 'content'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
])
def test_bad_jsonl_is_one_line_error(tmp_path: Path, line: str, message: str) -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path = tmp_path / "chat.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(BardlmError) as e:
        read_chat_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)
    assert "\n" not in str(e.value)
