"""Qwen2/2.5, OLMo 2, Phi-3 and OLMoE against `transformers`: random-weight models built from small
configs (nothing is downloaded) load into bardlm with equal fp32 logits, greedy decoding with our
KV cache gives transformers' ids for 64 tokens, and our HF export loads back in transformers with
the same tensors and logits. OLMoE also runs int8 (router kept float) and a LoRA finetune."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402, I001
    Olmo2Config,
    Olmo2ForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_checks import assert_export_round_trip, assert_same_greedy, assert_same_logits  # noqa: E402

import bardlm  # noqa: E402
from bardlm import BardlmError, ModelConfig  # noqa: E402
from bardlm.cli import main  # noqa: E402
from bardlm.infer.quantize import Int8Linear  # noqa: E402
from bardlm.io.gguf import check_exportable  # noqa: E402
from bardlm.io.hf import config_from_hf, family_of, from_pretrained  # noqa: E402
from bardlm.nn.model import GPT  # noqa: E402
from bardlm.tokenizers import CharTokenizer  # noqa: E402

V = 83
# Shared small shape: 2 layers, GQA 4/2, ids in range (the families' own defaults are not).
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)


def qwen2(tied: bool = True) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=tied, rope_theta=1e6))


def olmo2(bias: bool = False) -> Olmo2ForCausalLM:
    return Olmo2ForCausalLM(Olmo2Config(**SMALL, attention_bias=bias, rope_theta=5e5))


def phi3(window: int | None = None) -> Phi3ForCausalLM:
    return Phi3ForCausalLM(Phi3Config(**SMALL, sliding_window=window))


def olmoe(renorm: bool = False, vocab: int = V) -> OlmoeForCausalLM:
    return OlmoeForCausalLM(OlmoeConfig(**{**SMALL, "intermediate_size": 32, "vocab_size": vocab},
                                        num_experts=4, num_experts_per_tok=2, norm_topk_prob=renorm))


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Norm gains away from 1, biases away from 0 (HF starts them there: a dropped or swapped
    one would not show), and N(0, 1) routers so that tokens spread over every expert."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gate.weight"):  # a router (gate_proj is an expert's)
                p.normal_(0.0, 1.0)
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model.eval()


CASES = {
    "qwen2-tied": lambda: qwen2(),
    "qwen2-untied": lambda: qwen2(tied=False),
    "olmo2": lambda: olmo2(),
    "olmo2-attention-bias": lambda: olmo2(bias=True),
    "phi3": lambda: phi3(),
    "phi3-window-as-long-as-context": lambda: phi3(window=128),
    "olmoe-raw-topk": lambda: olmoe(),
    "olmoe-renorm": lambda: olmoe(renorm=True),
}


@pytest.fixture(params=list(CASES), scope="module")
def pair(request, tmp_path_factory):  # noqa: ANN001, ANN201
    """(HF reference model, ours loaded from its save_pretrained directory, a scratch dir)."""
    torch.manual_seed(sum(map(ord, request.param)))
    ref = randomise(CASES[request.param]())
    tmp = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(tmp / "hf")
    return ref, from_pretrained(tmp / "hf"), tmp


def test_logits_match_transformers(pair) -> None:  # noqa: ANN001
    ref, ours, _ = pair
    idx = torch.randint(0, V, (2, 48))
    assert_same_logits(ref, ours, idx)


def test_greedy_64_tokens_match_transformers(pair) -> None:  # noqa: ANN001
    ref, ours, _ = pair
    idx = torch.randint(0, V, (2, 5))
    assert_same_greedy(ref, ours, idx)


def test_export_loads_in_transformers_with_equal_logits(pair) -> None:  # noqa: ANN001
    ref, ours, tmp = pair
    assert_export_round_trip(ref, ours, tmp / "back", torch.randint(0, V, (2, 24)))


def test_family_fields_on_import() -> None:
    """What each family fixes beyond config.json: the parity tests above fail without it."""
    cfg = config_from_hf(Qwen2Config(**SMALL).to_dict())
    assert (cfg.qkv_bias, cfg.attn_bias, cfg.bias) == (True, False, False)
    cfg = config_from_hf(Olmo2Config(**SMALL).to_dict())
    assert (cfg.norm_placement, cfg.qk_norm, cfg.qk_norm_scope) == ("output", True, "proj")
    cfg = config_from_hf(OlmoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2).to_dict())
    assert (cfg.norm_placement, cfg.qk_norm_scope, cfg.router_renorm) == ("pre", "proj", False)
    assert cfg.ffn_layers == ["moe", "moe"] and cfg.expert_hidden == 96
    model = GPT(cfg)
    assert model.transformer.h[0].attn.q_norm.weight.shape == (64,)  # n_head * head_dim
    assert model.transformer.h[0].attn.k_norm.weight.shape == (32,)  # n_kv_head * head_dim


def test_bardlm_models_export_to_the_family_that_computes_them() -> None:
    base = dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                ffn="swiglu", norm="rmsnorm", pos="rope", bias=False)
    assert family_of(ModelConfig(**base, qkv_bias=True)) == "qwen2"
    assert family_of(ModelConfig(**base)) == "llama"  # without the q/k/v biases
    olmo = dict(base, norm_placement="output", qk_norm=True, qk_norm_scope="proj")
    assert family_of(ModelConfig(**olmo)) == "olmo2"
    moe = dict(base, qk_norm=True, qk_norm_scope="proj", n_expert=4, expert_hidden=16)
    assert family_of(ModelConfig(**moe)) == "olmoe"
    assert family_of(ModelConfig(**dict(moe, qk_norm_scope="head"))) == "qwen3_moe"
    refused = [(dict(olmo, qk_norm_scope="head"), "OLMo 2 needs norm_placement=output"),
               (dict(base, qk_norm=True, qk_norm_scope="proj"), "OLMo 2 needs"),
               (dict(moe, ffn_layers=["dense", "moe"]), "OLMoE\\): every layer MoE"),
               (dict(moe, head_dim=16), "head_dim \\* n_head == n_embd")]
    for fields, message in refused:
        with pytest.raises(BardlmError, match=message):
            family_of(ModelConfig(**fields))
    assert check_exportable(ModelConfig(**olmo)) == "olmo2"  # llama.cpp parity: test_gguf.py
    with pytest.raises(BardlmError, match="llama.cpp's olmo2 has no q/k/v/o or MLP biases"):
        check_exportable(ModelConfig(**olmo, attn_bias=True))


def test_phi3_export_keeps_phi3_and_gguf_writes_it_as_llama(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(3)
    phi3().save_pretrained(tmp_path)
    cfg = from_pretrained(tmp_path).config
    assert family_of(cfg) == "phi3" and family_of(cfg.replace(extra={})) == "llama"
    assert check_exportable(cfg) == "llama"  # llama.cpp's Llama computes the same function


@pytest.mark.parametrize("hf,message", [
    ({**Phi3Config(**SMALL).to_dict(), "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
      "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}},
     "'longrope' \\(Phi-3 long-context\\) is not supported"),
    ({**Phi3Config(**SMALL).to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
      "partial_rotary_factor": 0.75}}, "partial_rotary_factor is not supported"),
    (Phi3Config(**SMALL, sliding_window=32).to_dict(), "sliding-window attention is not supported"),
    (OlmoeConfig(**SMALL, clip_qkv=8.0).to_dict(), "clip_qkv .* is not supported"),
])
def test_family_refusals(hf, message) -> None:  # noqa: ANN001
    with pytest.raises(BardlmError, match=message) as err:
        config_from_hf(hf)
    assert "\n" not in str(err.value)


def test_olmoe_int8_and_lora_finetune_from_the_cli(tmp_path, capsys) -> None:  # noqa: ANN001
    """`--dtype int8` quantizes the experts but not the router; `finetune --lora-rank` trains
    adapters on an OLMoE directory and the adapter loads."""
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,;:!?<>|/ABCDEFGHIJKLMNOPQRSTUVWXYZ\n")
    torch.manual_seed(4)
    ref = randomise(olmoe(vocab=tok.vocab_size))
    ref.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "bardlm_tokenizer.json").write_text(json.dumps(tok.to_dict()))
    fp32, _ = bardlm.load(tmp_path / "hf")
    q, _ = bardlm.load(tmp_path / "hf", dtype="int8")
    moe = q.transformer.h[0].mlp
    assert type(moe.router) is torch.nn.Linear and moe.router.weight.is_floating_point()
    assert isinstance(moe.experts[0].c_fc, Int8Linear)
    idx = torch.randint(0, tok.vocab_size, (1, 20))
    with torch.no_grad():
        want, got = fp32(idx)[0], q(idx)[0].float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert main(["generate", "--ckpt", str(tmp_path / "hf"), "--dtype", "int8", "--prompt", "to be",
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("to be")
    chat = tmp_path / "chat.jsonl"
    turn = [{"role": "user", "content": "soft"}, {"role": "assistant", "content": "light"}]
    chat.write_text("".join(json.dumps({"messages": turn}) + "\n" for _ in range(8)))
    out = tmp_path / "adapter"
    assert main(["finetune", "--init-from", str(tmp_path / "hf"), "--data", str(chat), "--out", str(out),
                 "--max-iters", "2", "--set", "batch_size=2", "--lora-rank", "2", "--no-progress"]) == 0
    tuned, _ = bardlm.load(out)
    with torch.no_grad():
        assert tuned(idx)[0].shape == want.shape
