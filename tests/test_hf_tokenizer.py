"""BOS and EOS of Hugging Face model directories: the tokenizer knows them, prompts start with
BOS when the directory asks for it, and generation stops at EOS. Compared with `transformers`'
AutoTokenizer on the same directory (all local: nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from bardlm import GPT, BardlmError, ModelConfig  # noqa: E402
from bardlm.infer.generate import encode_prompt, generate, generate_batch, generate_text  # noqa: E402
from bardlm.io.hf import load_hf_tokenizer  # noqa: E402
from bardlm.tokenizers import CharTokenizer, HFTokenizer  # noqa: E402

TEXT = "hello world, the quick brown fox jumps over the lazy dog. " * 20
PROMPT = "the quick fox"


def hf_dir(path: Path, tok_cfg: dict, gen_cfg: dict | None = None, template: bool = False,
           specials: tuple[str, ...] = ("<s>", "</s>")) -> Path:
    """A model directory's tokenizer files: a byte-level BPE trained here + the JSON configs."""
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if template:  # as Llama 3's tokenizer.json: the post-processor adds BOS
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    if gen_cfg is not None:
        (path / "generation_config.json").write_text(json.dumps(gen_cfg))
    return path


LLAMA = {"add_bos_token": True, "bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}


def test_llama_style_directory_adds_bos_once(tmp_path: Path) -> None:
    tok = load_hf_tokenizer(hf_dir(tmp_path, LLAMA, {"bos_token_id": 0, "eos_token_id": [1]}))
    assert isinstance(tok, HFTokenizer)
    bos, eos = tok.token_id("<s>"), tok.token_id("</s>")
    assert (tok.bos_id, tok.add_bos, tok.eos_ids) == (bos, True, (eos,))
    ids = tok.encode(PROMPT)
    assert ids[0] != bos  # encode itself adds nothing: training data is unchanged
    assert encode_prompt(tok, PROMPT) == [bos, *ids]
    assert encode_prompt(tok, "<s>" + PROMPT) == [bos, *ids]  # not twice


def test_template_post_processor_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    # No add_bos_token: tokenizer.json's template decides, as for Llama 3.
    src = hf_dir(tmp_path, {"bos_token": "<s>", "eos_token": "</s>"}, template=True)
    tok = load_hf_tokenizer(src)
    ref = transformers.AutoTokenizer.from_pretrained(str(src))
    assert encode_prompt(tok, PROMPT) == ref(PROMPT)["input_ids"]
    assert encode_prompt(tok, PROMPT)[0] == ref.bos_token_id == tok.bos_id
    assert tok.eos_ids == (ref.eos_token_id,)


def test_qwen_style_directory_adds_no_bos(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    src = hf_dir(tmp_path, {"bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False},
                 {"eos_token_id": [0, 1]}, specials=("<|endoftext|>", "<|im_end|>"))
    tok = load_hf_tokenizer(src)
    assert (tok.bos_id, tok.add_bos, tok.eos_ids) == (None, False, (0, 1))
    ref = transformers.AutoTokenizer.from_pretrained(str(src))
    assert encode_prompt(tok, PROMPT) == tok.encode(PROMPT) == ref(PROMPT)["input_ids"]


def test_bare_tokenizer_json_and_bardlm_tokenizers_keep_their_behaviour(tmp_path: Path) -> None:
    src = hf_dir(tmp_path, LLAMA, template=True)
    bare = HFTokenizer.from_file(src / "tokenizer.json")  # not a model directory: no BOS facts
    assert (bare.bos_id, bare.add_bos, bare.eos_ids) == (None, False, ())
    assert encode_prompt(bare, PROMPT) == bare.encode(PROMPT)
    char = CharTokenizer.train("abc ")
    assert encode_prompt(char, "ab c") == char.encode("ab c")


def test_add_bos_without_a_known_bos_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BardlmError, match="bos_token"):
        load_hf_tokenizer(hf_dir(tmp_path, {"add_bos_token": True, "bos_token": "<nope>"}))


def test_generation_stops_at_eos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = load_hf_tokenizer(hf_dir(tmp_path, LLAMA, {"eos_token_id": 1}))
    eos, word = tok.token_id("</s>"), tok.encode(" fox")[0]
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                            n_embd=16, pos="rope")).eval()
    k = 3  # the model says " fox" k times, then EOS, then " fox" again

    def forward(idx: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        logits = torch.zeros(idx.shape[0], 1, tok.vocab_size)
        logits[:, :, eos if forward.calls == k else word] = 1.0
        forward.calls += 1
        return logits, None

    monkeypatch.setattr(model, "forward", forward)
    forward.calls = 0
    pieces: list[str] = []
    text = generate_text(model, tok, PROMPT, max_new_tokens=10, temperature=0, on_text=pieces.append)
    assert text == " fox" * k and "".join(pieces) == text  # EOS is neither printed nor returned
    assert forward.calls == k + 1  # nothing is computed after EOS
    forward.calls = 0
    out = generate(model, torch.tensor([[5, 6]]), 10, temperature=0, eos_ids=[eos])
    assert out[0, 2:].tolist() == [word] * k + [eos]
    forward.calls = 0
    assert generate_batch(model, [[5, 6], [7]], 10, temperature=0, eos_ids=[eos]) == [[word] * k] * 2


def test_convert_keeps_bos_and_eos(tmp_path: Path) -> None:
    """`bardlm convert` HF -> bardlm carries the directory's BOS/EOS facts into the checkpoint,
    so the converted model prompts and stops exactly as the Hugging Face one."""
    import bardlm
    from bardlm.io.hf import convert, save_pretrained

    src = hf_dir(tmp_path / "hf", LLAMA, {"bos_token_id": 0, "eos_token_id": [1]})
    vocab = HFTokenizer.from_file(src / "tokenizer.json").vocab_size
    model = GPT(ModelConfig(vocab_size=vocab, block_size=32, n_layer=1, n_head=2, n_embd=32,
                            pos="rope", norm="rmsnorm", ffn="swiglu", bias=False))
    save_pretrained(model, tmp_path / "weights")
    for name in ("config.json", "model.safetensors"):
        (src / name).write_bytes((tmp_path / "weights" / name).read_bytes())
    convert(src, tmp_path / "ours")
    _, direct = bardlm.load(src)
    _, converted = bardlm.load(tmp_path / "ours")
    assert (converted.bos_id, converted.add_bos, converted.eos_ids) == (
        direct.bos_id, direct.add_bos, direct.eos_ids) == (direct.token_id("<s>"), True, (1,))
    assert encode_prompt(converted, PROMPT) == encode_prompt(direct, PROMPT)
