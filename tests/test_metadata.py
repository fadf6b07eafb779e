"""What a model carries besides its weights survives every conversion: BOS/EOS/PAD ids, the
special tokens, the chat template and the generation defaults, along

    HF -> bardlm (convert) -> int8 (quantize) ;  HF -> int8 ;  bardlm -> HF (convert, export) ;
    bardlm -> GGUF

checked at each step against `transformers` reading the source directory: the chat prompt ids
(its `apply_chat_template`), the BOS/EOS/PAD ids (its tokenizer and GenerationConfig), and that
generation stops at each EOS id. Everything is built here (random weights, a tokenizer trained
on a few sentences): nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")
from tokenizers import processors  # noqa: E402

import bardlm  # noqa: E402
from bardlm.infer.chat import prompt_ids  # noqa: E402
from bardlm.infer.generate import encode_prompt, generate_text  # noqa: E402
from bardlm.io.hf import convert, export_hf  # noqa: E402
from bardlm.io.load import quantize_checkpoint  # noqa: E402
from bardlm.io.metadata import template_for  # noqa: E402
from bardlm.tokenizers import train_bpe  # noqa: E402

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
# A Qwen-style template that writes the bos_token variable (so a lost special token shows).
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONV = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "No."}, {"role": "user", "content": "How are you?"}]
DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20}
PROMPT = "Tell me"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The source HF directory and every directory made from it, by name."""
    root = tmp_path_factory.mktemp("meta")
    tok = train_bpe("Hello there, how are you? Fine thanks. Tell me a joke, be terse. " * 30, 320)
    tok.hf.add_special_tokens(list(SPECIALS))
    bos, _, eos, pad = (tok.token_id(t) for t in SPECIALS)
    # As Llama 3's tokenizer.json: the post-processor starts every text with BOS.
    tok.hf.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    endoftext = bos
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad))
    src = root / "hf"
    model.save_pretrained(src)
    (src / "tokenizer.json").write_text(tok.hf.to_str())
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE,
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}))
    # Two stop ids (as Llama 3 instruct): the end of turn and the end of text.
    (src / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": [eos, endoftext], "pad_token_id": pad, **DEFAULTS}))
    paths = {"hf": src}
    convert(src, root / "bardlm")
    quantize_checkpoint(root / "bardlm", root / "int8")
    quantize_checkpoint(src, root / "int8_from_hf")
    convert(root / "bardlm", root / "hf_back")
    export_hf(root / "bardlm", root / "hf_export")
    for name in ("bardlm", "int8", "int8_from_hf", "hf_back", "hf_export"):
        paths[name] = root / name
    return paths


STEPS = ("hf", "bardlm", "int8", "int8_from_hf", "hf_back", "hf_export")


@pytest.mark.parametrize("step", STEPS)
def test_chat_prompt_and_special_ids_match_transformers(chain: dict[str, Path], step: str) -> None:
    ref = transformers.AutoTokenizer.from_pretrained(str(chain["hf"]))
    expected = list(ref.apply_chat_template(CONV, tokenize=True, add_generation_prompt=True,
                                            return_dict=False))
    _, tok = bardlm.load(chain[step])
    template = template_for(chain[step], tok)
    assert prompt_ids(template, tok, CONV) == expected
    assert template.end == "<|im_end|>"
    eos = [ref.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert (tok.bos_id, tok.add_bos, tok.eos_ids) == (ref.bos_token_id, True, tuple(eos))
    assert encode_prompt(tok, PROMPT) == ref(PROMPT)["input_ids"]  # BOS added, once


@pytest.mark.parametrize("step", ("hf_back", "hf_export"))
def test_hf_outputs_read_back_in_transformers(chain: dict[str, Path], step: str) -> None:
    """transformers itself reads the same template, special tokens and generation defaults."""
    ref = transformers.AutoTokenizer.from_pretrained(str(chain["hf"]))
    back = transformers.AutoTokenizer.from_pretrained(str(chain[step]))
    for prompt in (True, False):
        assert back.apply_chat_template(CONV, tokenize=False, add_generation_prompt=prompt) == \
            ref.apply_chat_template(CONV, tokenize=False, add_generation_prompt=prompt)
    assert back(PROMPT)["input_ids"] == ref(PROMPT)["input_ids"]
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "bos_token", "eos_token", "pad_token"):
        assert getattr(back, attr) == getattr(ref, attr), attr
    theirs = transformers.GenerationConfig.from_pretrained(str(chain["hf"]))
    ours = transformers.GenerationConfig.from_pretrained(str(chain[step]))
    assert ours.to_diff_dict() == theirs.to_diff_dict()
    assert {k: getattr(ours, k) for k in DEFAULTS} == DEFAULTS


@pytest.mark.parametrize("step", STEPS)
def test_generation_stops_at_each_eos(chain: dict[str, Path], step: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The model says one word k times then an EOS id: the reply is the k words and nothing
    after the EOS is computed, for every EOS id of the source."""
    model, tok = bardlm.load(chain[step])
    word, k = tok.encode(" joke")[0], 3
    ref = transformers.GenerationConfig.from_pretrained(str(chain["hf"]))
    for eos in ref.eos_token_id:
        calls = []

        def forward(idx: torch.Tensor, *args, eos=eos, calls=calls, **kwargs):  # noqa: ANN002, ANN003, ANN202
            logits = torch.zeros(idx.shape[0], 1, model.config.vocab_size)
            logits[:, :, eos if len(calls) == k else word] = 1.0
            calls.append(1)
            return logits, None

        monkeypatch.setattr(model, "forward", forward)
        assert generate_text(model, tok, PROMPT, max_new_tokens=10, temperature=0) == " joke" * k
        assert len(calls) == k + 1


def test_checkpoint_keeps_generation_defaults_and_pad(chain: dict[str, Path]) -> None:
    """The bardlm and int8 checkpoints hold what generation_config.json and tokenizer_config.json
    said, so a later export can write it back."""
    from bardlm.io.checkpoint import read_config

    pad = transformers.AutoTokenizer.from_pretrained(str(chain["hf"])).pad_token_id
    for step in ("bardlm", "int8", "int8_from_hf"):
        meta = read_config(chain[step])
        assert meta["generation_config"] == DEFAULTS
        assert meta["special_tokens"]["pad_id"] == pad
        assert meta["special_tokens"]["tokens"]["pad_token"] == "<|pad|>"


def test_gguf_carries_template_and_ids(chain: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from bardlm.io.gguf import export_gguf, read_metadata

    ref = transformers.AutoTokenizer.from_pretrained(str(chain["hf"]))
    for step in ("hf", "bardlm"):
        out = tmp_path / f"{step}.gguf"
        export_gguf(chain[step], out, "f32")
        md = read_metadata(out)
        assert md["tokenizer.chat_template"] == TEMPLATE
        assert md["tokenizer.ggml.bos_token_id"] == ref.bos_token_id
        assert md["tokenizer.ggml.eos_token_id"] == ref.convert_tokens_to_ids("<|im_end|>")
        assert md["tokenizer.ggml.eot_token_id"] == ref.convert_tokens_to_ids("<|endoftext|>")
        assert md["tokenizer.ggml.padding_token_id"] == ref.pad_token_id
        assert md["tokenizer.ggml.add_bos_token"] is True


def test_finetuned_template_exports_with_its_end_of_turn(tmp_path: Path) -> None:
    """A bardlm finetune's built-in template (<|end|> ends a turn, no tokenizer_config names it)
    exports so that transformers renders the same prompt and stops at <|end|>."""
    from bardlm import GPT, ModelConfig
    from bardlm.infer.chat import builtin_template, prepare_vocab
    from bardlm.io.checkpoint import save_checkpoint
    from bardlm.io.metadata import ModelMeta
    from bardlm.tokenizers import HFTokenizer

    bpe = train_bpe("Hello there, how are you? Fine thanks. Tell me a joke, be terse. " * 30, 300)
    template = builtin_template(bpe)
    bpe, _ = prepare_vocab(template, bpe)
    tok = HFTokenizer(bpe.hf)  # a tokenizer.json, which transformers reads
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2,
                            n_embd=32, pos="rope", norm="rmsnorm", ffn="swiglu", bias=False))
    meta = ModelMeta(chat_template=template).to_checkpoint()
    save_checkpoint(tmp_path / "ft", model, tok, meta)
    export_hf(tmp_path / "ft", tmp_path / "hf")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    expected = list(ref.apply_chat_template(CONV, tokenize=True, add_generation_prompt=True,
                                            return_dict=False))
    assert prompt_ids(template, tok, CONV) == expected
    end = tok.token_id("<|end|>")
    assert transformers.GenerationConfig.from_pretrained(str(tmp_path / "hf")).eos_token_id == end
    _, back = bardlm.load(tmp_path / "hf")
    assert back.eos_ids == (end,) and template_for(tmp_path / "hf", back).end == "<|end|>"


@pytest.mark.parametrize("gen", [
    DEFAULTS,
    {"do_sample": True, "temperature": 0.6},  # unset fields: transformers' defaults (top_k 50)
    {"do_sample": False, "temperature": 0.6, "repetition_penalty": 1.2},  # greedy, as transformers
    {"temperature": 0.6},  # no do_sample: transformers decodes greedily
    {"do_sample": True, "top_k": 0},  # 0 turns top-k off
])
def test_sampling_defaults_read_as_transformers_does(gen: dict) -> None:
    """What generation_config.json asks of the sampler, read against transformers' own
    GenerationConfig (its defaults, and greedy unless do_sample)."""
    from bardlm.io.metadata import ModelMeta

    config = transformers.GenerationConfig(**gen)
    unset = config._get_default_generation_params()  # what generate() fills in (transformers 5)
    ref = {k: getattr(config, k) if getattr(config, k) is not None else unset[k]
           for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")}
    ours = ModelMeta(generation=dict(gen)).sampling_defaults()
    assert ours["repetition_penalty"] == ref["repetition_penalty"]
    if not ref["do_sample"]:
        assert ours["temperature"] == 0.0
        return
    assert (ours["temperature"], ours["top_p"]) == (ref["temperature"], ref["top_p"])
    assert ours["top_k"] == (ref["top_k"] or None)


@pytest.mark.parametrize("step", ["hf", "int8", "hf_export"])
def test_generate_chat_and_serve_use_the_models_defaults(chain: dict[str, Path], step: str,
                                                         monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    """Sampler flags left unset take generation_config.json's values (said on stderr), in
    `generate`, `chat` and a server request; a flag or a request field overrides each."""
    import bardlm.infer.chat as chat_mod
    import bardlm.infer.generate as gen_mod
    from bardlm.cli import main
    from bardlm.io.load import read_meta
    from bardlm.serve.app import ChatRequest, CompletionRequest, sampling_of

    seen: list[dict] = []
    monkeypatch.setattr(gen_mod, "generate_text", lambda *a, **kw: seen.append(kw) or "")
    model_says = {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": None, "repetition_penalty": 1.0}
    args = ["--ckpt", str(chain[step]), "--max-new-tokens", "2"]
    assert main(["generate", *args, "--prompt", PROMPT]) == 0
    assert {k: seen[-1][k] for k in model_says} == model_says
    assert "the model's generation_config: temperature 0.7" in capsys.readouterr().err
    assert main(["generate", *args, "--prompt", PROMPT, "--temperature", "0", "--top-k", "5"]) == 0
    assert (seen[-1]["temperature"], seen[-1]["top_k"], seen[-1]["top_p"]) == (0.0, 5, 0.9)

    class Session:  # records what `bardlm chat` would sample with
        def __init__(self, *a, **kw) -> None:  # noqa: ANN002, ANN003
            seen.append(kw)

    monkeypatch.setattr(chat_mod, "ChatSession", Session)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(""))
    assert main(["chat", *args]) == 0
    assert {k: seen[-1][k] for k in model_says} == model_says

    defaults = read_meta(chain[step], None if step == "hf" else bardlm.load(chain[step])[1]).sampling_defaults()
    assert sampling_of(CompletionRequest(prompt="x"), defaults) == {**model_says, "seed": None}
    req = ChatRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.0)
    assert sampling_of(req, defaults)["temperature"] == 0.0 and sampling_of(req, defaults)["top_k"] == 20
    assert sampling_of(req, {})["top_p"] == 1.0  # no model defaults: the OpenAI API's
