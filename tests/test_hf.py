"""Parity with Hugging Face `transformers`: GPT-2, Llama, Qwen3 and the mixtures of experts
Qwen3-MoE, Qwen2-MoE and Mixtral built from small configs with
random weights (nothing is downloaded), loaded into bardlm, compared logit by logit and token by
token, and written back."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402, I001
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3Config,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from hf_checks import assert_same_logits  # noqa: E402

import bardlm  # noqa: E402
from bardlm import BardlmError, preset  # noqa: E402
from bardlm.cli import main  # noqa: E402
from bardlm.io.hf import (  # noqa: E402
    config_from_hf,
    config_to_hf,
    family_of,
    from_pretrained,
    save_pretrained,
)
from bardlm.nn.model import GPT  # noqa: E402
from bardlm.nn.position import rope_inv_freq  # noqa: E402

V = 97  # vocabulary of the toy models
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def gpt2(tied: bool = True, act: str = "gelu_new") -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=V, n_positions=64, n_embd=48, n_layer=2, n_head=4, activation_function=act,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0))


def llama(n_head: int = 4, n_kv: int = 4, tied: bool = False, theta: float = 10000.0,
          scaling: dict | None = None, bias: bool = False) -> LlamaForCausalLM:
    rope = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=n_head, num_key_value_heads=n_kv, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=tied,
        attention_bias=bias, mlp_bias=bias, bos_token_id=1, eos_token_id=2))


def qwen3(n_head: int = 4, n_kv: int = 2, head_dim: int = 32, tied: bool = True,
          theta: float = 1e6) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=n_head, num_key_value_heads=n_kv, head_dim=head_dim,
        max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=tied))


def qwen3_moe(renorm: bool = True, **layout) -> Qwen3MoeForCausalLM:  # noqa: ANN003
    """4 experts, top 2; `layout` is mlp_only_layers / decoder_sparse_step (dense vs MoE layers)."""
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=renorm, max_position_embeddings=128,
        tie_word_embeddings=False, **layout))


def qwen2_moe(qkv_bias: bool = True) -> Qwen2MoeForCausalLM:
    """A shared expert (sigmoid-gated) beside 4 routed experts; layer 1 dense."""
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
        qkv_bias=qkv_bias, max_position_embeddings=128, tie_word_embeddings=False))
    with torch.no_grad():  # HF starts biases at zero: random ones show a dropped bias
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.endswith("shared_expert_gate.weight"):
                p.normal_(0.0, 0.5)
    return model


def mixtral() -> MixtralForCausalLM:
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=V, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, tie_word_embeddings=True))


def randomise_norms(model: torch.nn.Module) -> None:
    """HF initialises norm gains to 1 (and LayerNorm shifts to 0); random values make a
    swapped or dropped norm tensor visible in the logits. MoE routers get N(0, 1) weights, so
    that tokens spread over the experts and each expert's weights show in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gate.weight"):  # a router (gate_proj is an expert's)
                p.normal_(0.0, 1.0)
            if "norm" in name or "ln_" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))


CASES = {
    "gpt2-tied": lambda: gpt2(),
    "gpt2-untied-relu": lambda: gpt2(tied=False, act="relu"),
    "llama-mha-untied": lambda: llama(4, 4),  # GQA ratio 1
    "llama-gqa2-tied-llama3": lambda: llama(4, 2, tied=True, theta=500000.0, scaling=LLAMA3),
    "llama-gqa4-bias": lambda: llama(8, 2, bias=True),  # ratio 4, head_dim 8
    "llama-mqa": lambda: llama(4, 1, theta=500000.0),
    "qwen3-gqa2-hd32-tied": lambda: qwen3(),  # head_dim 32 != 64 / 4
    "qwen3-mqa-untied-hd8": lambda: qwen3(8, 1, head_dim=8, tied=False, theta=10000.0),
    "qwen3moe-dense-then-moe": lambda: qwen3_moe(mlp_only_layers=[0]),
    "qwen3moe-sparse-step2-raw-topk": lambda: qwen3_moe(renorm=False, decoder_sparse_step=2),
    "qwen3moe-all-moe": lambda: qwen3_moe(),
    "qwen2moe-shared-qkv-bias": lambda: qwen2_moe(),
    "qwen2moe-shared-no-bias": lambda: qwen2_moe(qkv_bias=False),
    "mixtral-tied": lambda: mixtral(),
}


@pytest.fixture(params=list(CASES))
def hf_pair(request, tmp_path):  # noqa: ANN001, ANN201
    """(HF reference model, our model loaded from its save_pretrained directory, directory)."""
    torch.manual_seed(hash(request.param) % 1000)
    ref = CASES[request.param]().eval()
    randomise_norms(ref)
    ref.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    return ref, ours, tmp_path


def test_logits_match_transformers(hf_pair) -> None:  # noqa: ANN001
    ref, ours, _ = hf_pair
    idx = torch.randint(0, V, (3, 40))
    assert_same_logits(ref, ours, idx)


def test_greedy_tokens_match_transformers(hf_pair) -> None:  # noqa: ANN001
    ref, ours, _ = hf_pair
    idx = torch.randint(0, V, (2, 5))
    ref.generation_config.eos_token_id = None  # greedy all the way: no early stop at EOS
    want = ref.generate(idx, max_new_tokens=32, do_sample=False, pad_token_id=0,
                        attention_mask=torch.ones_like(idx))
    got = ours.generate(idx, 32, temperature=0.0)
    assert got.shape == want.shape == (2, 37)
    assert torch.equal(got, want)


def test_round_trip_through_transformers(hf_pair) -> None:  # noqa: ANN001
    ref, ours, tmp = hf_pair
    save_pretrained(ours, tmp / "back")
    again = AutoModelForCausalLM.from_pretrained(tmp / "back").eval()
    assert type(again) is type(ref)
    ref_sd, again_sd = ref.state_dict(), again.state_dict()
    assert ref_sd.keys() == again_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], again_sd[k]), k
    ours2 = from_pretrained(tmp / "back")
    assert ours2.config == ours.config
    sd, sd2 = ours.state_dict(), ours2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert (ours2.lm_head.weight is ours2.transformer.wte.weight) == ours.config.tie_embeddings


def test_sharded_checkpoint_loads(tmp_path) -> None:
    torch.manual_seed(3)
    ref = qwen3().eval()
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    idx = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        assert (from_pretrained(tmp_path)(idx)[0] - ref(idx).logits).abs().max() < 1e-4


def test_original_gpt2_file_layout(tmp_path) -> None:
    """The hub's GPT-2 file has no `transformer.` prefix and carries causal-mask buffers."""
    from safetensors.torch import save_file

    torch.manual_seed(4)
    ref = gpt2().eval()
    ref.save_pretrained(tmp_path)
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in ref.state_dict().items()
          if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    idx = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        assert (from_pretrained(tmp_path)(idx)[0] - ref(idx).logits).abs().max() < 1e-4


def test_llama3_rope_scaling_matches_transformers() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072,
                      rope_parameters={**scaling, "rope_theta": 500000.0})
    want, factor = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    got = rope_inv_freq(64, 500000.0, scaling)
    assert factor == 1.0 and got.shape == want.shape == (32,)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    # Scaling changed the low frequencies (and left the highest alone): the test is not vacuous.
    plain = rope_inv_freq(64, 500000.0)
    assert plain[0] == got[0] and (plain[-1] / got[-1]).item() == pytest.approx(32.0)


@pytest.mark.parametrize("name, count, ref_cls, hf_type", [
    ("llama-3.2-1b", 1_235_814_400, LlamaForCausalLM, "llama"),
    ("qwen3-0.6b", 596_049_920, Qwen3ForCausalLM, "qwen3"),
])
def test_preset_parameter_counts(name, count, ref_cls, hf_type) -> None:  # noqa: ANN001
    cfg = preset(name)
    hf_config = ref_cls.config_class(**config_to_hf(cfg))
    assert hf_config.model_type == hf_type
    with torch.device("meta"):  # shapes only: no memory, no init time
        ours, ref = GPT(cfg), ref_cls(hf_config)
    assert ours.num_params() == count
    assert sum(p.numel() for p in ref.parameters()) == count  # unique params (tied head once)
    # ... and the preset reads back from its transformers config unchanged.
    assert config_from_hf(hf_config.to_dict()).replace(extra={}) == cfg


def test_unsupported_and_incomplete_checkpoints(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(BardlmError, match="FalconForCausalLM|falcon.*not supported"):
        from_pretrained(tmp_path)
    torch.manual_seed(5)
    llama(4, 2).save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BardlmError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        from_pretrained(tmp_path / "m")
    os.remove(tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(BardlmError, match="pickle"):
        from_pretrained(tmp_path / "m")
    with pytest.raises(BardlmError, match="no transformers equivalent"):
        save_pretrained(GPT(preset("char-tiny", norm_placement="post")), tmp_path / "x")
    cfg = LlamaConfig(rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}).to_dict()
    with pytest.raises(BardlmError, match="dynamic"):
        config_from_hf(cfg)


def test_convert_cli_both_ways(tmp_path, capsys) -> None:  # noqa: ANN001
    from bardlm.io.checkpoint import load_checkpoint, save_checkpoint
    from bardlm.tokenizers import CharTokenizer

    torch.manual_seed(6)
    model = GPT(preset("qwen3-tiny"))
    tok = CharTokenizer.train("hello world")
    save_checkpoint(tmp_path / "ours", model, tok)
    assert main(["convert", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["direction"] == "bardlm->hf" and summary["architecture"] == "Qwen3ForCausalLM"
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 65, (2, 20))
    with torch.no_grad():
        assert (model.eval()(idx)[0] - ref(idx).logits).abs().max() < 1e-4
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert json.loads(capsys.readouterr().out)["direction"] == "hf->bardlm"
    back, back_tok, _ = load_checkpoint(tmp_path / "back")
    assert back_tok.chars == tok.chars
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    # Refuses to overwrite; unknown directories are a one-line error with exit code 2.
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nowhere"), "--out", str(tmp_path / "z")]) == 2


def test_package_level_api(tmp_path) -> None:
    torch.manual_seed(7)
    ref = llama(4, 2)
    ref.save_pretrained(tmp_path)
    model, tok = bardlm.from_pretrained(tmp_path, with_tokenizer=True)
    assert tok is None and model.config.n_kv_head == 2 and not model.training
    assert bardlm.from_pretrained(tmp_path, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_transformers_4_style_config_json() -> None:
    """The Llama 3.2 1B config.json as the hub ships it (transformers 4.x keys: rope_theta and
    rope_scaling with "rope_type") reads as our preset."""
    hub = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 128000,
        "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
        "low_freq_factor": 1.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "vocab_size": 128256,
    }
    cfg = config_from_hf(hub)
    assert cfg.extra == {"hf": {"bos_token_id": 128000, "eos_token_id": 128001}}
    assert cfg.replace(extra={}) == preset("llama-3.2-1b")
    back = config_to_hf(cfg)
    assert back["rope_parameters"]["rope_theta"] == 500000.0 and back["eos_token_id"] == 128001
    with pytest.raises(BardlmError, match="sliding-window"):
        config_from_hf({"model_type": "qwen3", "use_sliding_window": True})


# Bug 2: options no transformers family has used to export as a plain GPT-2/Llama, i.e. a
# different model with the same weights. Each must be refused, by the API and by the CLI.
NO_HF_EQUIVALENT = [dict(share_layers=True), dict(residual=False)] + [
    dict(attn_score=s) for s in ("dot_unscaled", "additive", "bilinear", "cosine")]


# Bases that export fine without the option: GPT-2 style (char-tiny with biases) and Llama.
EXPORTABLE = {"gpt2": dict(name="char-tiny", bias=True), "llama": dict(name="llama-tiny")}


@pytest.mark.parametrize("base", list(EXPORTABLE))
@pytest.mark.parametrize("option", NO_HF_EQUIVALENT, ids=lambda o: "{}={}".format(*next(iter(o.items()))))
def test_export_refuses_configs_transformers_cannot_express(tmp_path, capsys, base, option) -> None:  # noqa: ANN001
    from bardlm.io.checkpoint import save_checkpoint
    from bardlm.tokenizers import CharTokenizer

    torch.manual_seed(8)
    assert family_of(preset(**EXPORTABLE[base])) == base
    model = GPT(preset(**EXPORTABLE[base], n_layer=2, n_embd=32, **option))
    with pytest.raises(BardlmError, match="no transformers equivalent") as err:
        save_pretrained(model, tmp_path / "api")
    assert "\n" not in str(err.value) and f"{next(iter(option))}=" in str(err.value)
    assert not (tmp_path / "api" / "config.json").exists()
    save_checkpoint(tmp_path / "ours", model, CharTokenizer.train("to be or not to be"))
    assert main(["convert", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bardlm: error: ") \
        and "no transformers equivalent" in lines[0], lines
    assert not (tmp_path / "hf" / "config.json").exists()


def _byte_bpe(text: str, vocab_size: int = 300):  # noqa: ANN202
    """A small byte-level BPE trained with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"]))
    return tok


def test_convert_then_load_with_string_merges(tmp_path, capsys) -> None:  # noqa: ANN001
    """Bug 3: a tokenizer.json whose merges are in the older "a b" string form (many hub
    models) converted, then never loaded: the identity check hashed the JSON as re-serialised
    (merges as ["a", "b"] lists), which differs from the stored file. The fingerprint now covers
    what defines the tokenizer, so it loads; another tokenizer copied in is still refused."""
    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n" * 20
    hf_dir = tmp_path / "hf"
    tok = _byte_bpe(text)
    data = json.loads(tok.to_str())
    assert data["model"]["merges"] and all(isinstance(m, list) for m in data["model"]["merges"])
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]  # the older form
    torch.manual_seed(9)
    ref = LlamaForCausalLM(LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0))
    ref.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")

    ours = tmp_path / "ours"
    assert main(["convert", str(hf_dir), "--out", str(ours)]) == 0
    assert json.loads(capsys.readouterr().out)["direction"] == "hf->bardlm"
    model, loaded = bardlm.load(ours)
    ids = loaded.encode("Shall I compare thee")
    assert ids == tok.encode("Shall I compare thee").ids and loaded.decode(ids) == "Shall I compare thee"
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - ref.eval()(torch.tensor([ids])).logits).abs().max() < 1e-4

    # A different tokenizer (same size, other text) copied over the run's own is refused.
    other = _byte_bpe("To be, or not to be, that is the question: whether 'tis nobler.\n" * 20)
    assert other.get_vocab_size() <= tok.get_vocab_size()
    (ours / "tokenizer.json").write_text(other.to_str(), encoding="utf-8")
    with pytest.raises(BardlmError, match="not the tokenizer this model was trained with"):
        bardlm.load(ours)
