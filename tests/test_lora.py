"""LoRA: our adapters compute what peft's compute on the same weights (GPT-2 and Llama models
built by transformers and converted with io.hf), merging changes nothing, adapters save alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bardlm.io.hf import from_pretrained
from bardlm.nn.lora import apply_lora, count_trainable, lora_layers, merge_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="the LoRA reference: pip install peft (dev extra)")

RANK, ALPHA = 4, 8.0


def _randomize_peft(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _peft_ab(ref: torch.nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    m = ref.get_submodule(name)
    return m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()


def test_lora_matches_peft_gpt2(tmp_path: Path) -> None:
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "gpt2")
    ours = from_pretrained(tmp_path / "gpt2")
    targets = ["c_attn", "c_proj", "c_fc"]
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets,
                                                  lora_dropout=0.0, fan_in_fan_out=True))
    _randomize_peft(ref)
    names = apply_lora(ours, RANK, ALPHA, targets)
    assert len(names) == 2 * 4
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            a, b = _peft_ab(ref, "base_model.model." + name)  # the same module names as GPT-2's
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
    idx = torch.randint(0, 97, (2, 16))
    expected = ref(idx).logits
    got, _ = ours(idx)
    assert (expected - got).abs().max() < 1e-5
    trainable, total = count_trainable(ours)
    assert trainable == sum(p.numel() for n, p in ref.named_parameters() if p.requires_grad)
    print(f"trainable parameters: {trainable:,} of {total:,}")
    merge_lora(ours)
    merged, _ = ours(idx)
    assert (merged - got).abs().max() < 1e-5
    assert not lora_layers(ours)


def test_lora_matches_peft_llama(tmp_path: Path) -> None:
    """peft adapts q_proj, k_proj, v_proj (and gate/up) apart; our fused c_attn (c_fc) takes them
    as one adapter of rank 3r (2r): A stacked, B block-diagonal, alpha scaled to keep alpha/r."""
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "llama")
    ours = from_pretrained(tmp_path / "llama")
    parts = {"attn.c_attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             "attn.c_proj": ["self_attn.o_proj"],
             "mlp.c_fc": ["mlp.gate_proj", "mlp.up_proj"], "mlp.c_proj": ["mlp.down_proj"]}
    ref = peft.get_peft_model(hf, peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    _randomize_peft(ref)
    for short in ("c_attn", "c_fc", "attn.c_proj", "mlp.c_proj"):
        k = len(next(v for n, v in parts.items() if n.endswith(short)))
        apply_lora(ours, RANK * k, ALPHA * k, [short])
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            i = name.split(".")[2]
            theirs = next(v for n, v in parts.items() if name.endswith(n))
            ab = [_peft_ab(ref, f"base_model.model.model.layers.{i}.{t}") for t in theirs]
            layer.lora_A.copy_(torch.cat([a for a, _ in ab]))
            layer.lora_B.copy_(torch.block_diag(*[b for _, b in ab]))
    idx = torch.randint(0, 101, (2, 12))
    got, _ = ours(idx)
    assert (ref(idx).logits - got).abs().max() < 1e-5
    merge_lora(ours)
    assert (ours(idx)[0] - got).abs().max() < 1e-5


def test_base_frozen_and_adapter_starts_at_base() -> None:
    from bardlm import GPT, ModelConfig

    model = GPT(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(0, 50, (1, 8))
    before, _ = model(idx)
    apply_lora(model, 2, 4.0, ["c_attn"])
    after, _ = model(idx)
    assert torch.equal(before, after)  # B = 0: the adapted model starts as the base
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    with pytest.raises(Exception, match="no linear layer matches"):
        apply_lora(model, 2, 4.0, ["q_proj"])
