"""The numbers and claims of the source material (docs/sources.md), checked on bardlm's own code:
parameter counts of GPT-2 and of "LLMs from scratch" GPT_CONFIG_124M from meta-device models,
the q/k/v bias and the three dropout sites as config fields, LayerNorm's biased variance over the
features, and SwiGLU's SiLU gate."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from bardlm import BardlmError
from bardlm.cli import main
from bardlm.config import ModelConfig, parse_overrides, preset
from bardlm.io.checkpoint import load_checkpoint, save_checkpoint
from bardlm.io.hf import family_of
from bardlm.nn.dropout import Dropout
from bardlm.nn.feedforward import SwiGLU
from bardlm.nn.model import GPT
from bardlm.nn.norm import LayerNorm
from bardlm.tokenizers import CharTokenizer


def meta_count(cfg: ModelConfig) -> int:
    """Unique parameters of GPT(cfg), built on the meta device (no memory, exact integers)."""
    with torch.device("meta"):
        return GPT(cfg).num_params()


# Parameter counts -----------------------------------------------------------------------------
def test_lfs_gpt_config_124m_counts() -> None:
    """The book's 163,009,536 (untied head, no q/k/v bias) and 124,412,160 (tied), and its
    "621.83 MB", which is 652,038,144 bytes / 2^20: MiB, or 652.04 MB of 10^6 bytes."""
    lfs = preset("gpt2-124m-lfs")
    assert (lfs.block_size, lfs.n_layer, lfs.n_head, lfs.n_embd) == (1024, 12, 12, 768)
    assert (lfs.qkv_bias, lfs.attn_bias, lfs.bias, lfs.tie_embeddings) == (False, True, True, False)
    assert (lfs.emb_dropout, lfs.attn_dropout, lfs.resid_dropout) == (0.1, 0.1, 0.1)
    n = meta_count(lfs)
    assert n == 163_009_536
    assert meta_count(lfs.replace(tie_embeddings=True)) == 124_412_160
    # Released GPT-2 small: the same shape with 12 x 2,304 q/k/v biases and a tied head.
    assert meta_count(preset("gpt2-124m")) - meta_count(lfs.replace(tie_embeddings=True)) == 27_648 == 12 * 3 * 768
    assert n * 4 == 652_038_144 and round(n * 4 / 2**20, 2) == 621.83 and round(n * 4 / 1e6, 2) == 652.04


@pytest.mark.parametrize("name, count", [("gpt2-124m", 124_439_808), ("gpt2-medium", 354_823_168),
                                         ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_gpt2_parameter_formula(name: str, count: int) -> None:
    """12 L C^2 + 13 L C + V C + P C + 2 C (tied head): per layer c_attn 3C^2 + 3C, c_proj
    C^2 + C, c_fc 4C^2 + 4C, mlp c_proj 4C^2 + C, two LayerNorms 4C; then wte, wpe, ln_f."""
    cfg = preset(name)
    L, C, V, P = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size
    assert 12 * L * C * C + 13 * L * C + V * C + P * C + 2 * C == meta_count(cfg) == count


def test_info_prints_the_book_numbers(capsys) -> None:  # noqa: ANN001
    assert main(["info", "--preset", "gpt2-124m-lfs"]) == 0
    out = capsys.readouterr().out
    assert "163,009,536 (separate output head)" in out and "124,412,160" in out
    assert "652,038,144 B = 652.04 MB = 621.83 MiB" in out and "q/k/v no" in out
    assert main(["info", "--preset", "gpt2-124m-lfs", "--set", "tie_embeddings=true"]) == 0
    assert "124,412,160 (head tied" in capsys.readouterr().out


# qkv_bias ------------------------------------------------------------------------------------
def test_qkv_bias_resolves_and_reaches_c_attn_only() -> None:
    assert ModelConfig().qkv_bias is True  # GPT-2: bias -> attn_bias -> qkv_bias
    assert ModelConfig(bias=False).qkv_bias is False
    assert ModelConfig(bias=False, attn_bias=True).qkv_bias is True
    qwen2 = ModelConfig(n_layer=1, n_embd=32, n_head=4, vocab_size=11, block_size=8, bias=False,
                        qkv_bias=True)  # Qwen2-style: q/k/v biases, none elsewhere
    attn = GPT(qwen2).transformer.h[0].attn
    assert attn.c_attn.bias is not None and attn.c_proj.bias is None
    lfs = GPT(preset("gpt2-124m-lfs", n_layer=1, n_embd=32, n_head=4, vocab_size=11, block_size=8))
    assert lfs.transformer.h[0].attn.c_attn.bias is None and lfs.transformer.h[0].attn.c_proj.bias is not None
    # replace(): a derived value follows the field it derives from; an explicit one stays.
    assert ModelConfig().replace(attn_bias=False).qkv_bias is False
    assert preset("gpt2-124m-lfs").replace(bias=False).qkv_bias is False
    assert preset("gpt2-124m-lfs").replace(attn_bias=True).qkv_bias is False
    # A checkpoint written before the field existed has no key: c_attn keeps following attn_bias.
    old = {k: v for k, v in ModelConfig(bias=False, attn_bias=True).to_dict().items() if k != "qkv_bias"}
    assert ModelConfig.from_dict(old).qkv_bias is True
    with pytest.raises(BardlmError, match="qkv_bias must be a boolean"):
        ModelConfig(qkv_bias="no")  # type: ignore[arg-type]


@pytest.mark.parametrize("base, qkv", [(dict(name="char-tiny", bias=True), False),
                                       (dict(name="qwen3-tiny"), True)])
def test_export_refuses_a_qkv_bias_the_family_cannot_express(base, qkv) -> None:  # noqa: ANN001
    family_of(preset(**base))  # exportable as it is
    with pytest.raises(BardlmError, match=f"qkv_bias={str(qkv).lower()}") as err:
        family_of(preset(**base, qkv_bias=qkv))
    assert "\n" not in str(err.value)
    assert family_of(preset("llama-tiny", attn_bias=True)) == "llama"  # q/k/v/o together: fine
    # A Llama with biases on q, k and v only is Qwen2's block (was refused before Qwen2 mapped).
    assert family_of(preset("llama-tiny", qkv_bias=True)) == "qwen2"


def test_hf_configs_give_the_right_qkv_bias() -> None:
    from bardlm.io.hf import config_from_hf

    assert config_from_hf({"model_type": "gpt2"}).qkv_bias is True
    llama = {"model_type": "llama", "attention_bias": True, "mlp_bias": False}
    cfg = config_from_hf(llama)
    assert (cfg.qkv_bias, cfg.attn_bias, cfg.bias) == (True, True, False)


# Dropout sites -------------------------------------------------------------------------------
def tiny(**kw) -> ModelConfig:  # noqa: ANN003
    return ModelConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16, **kw)


def test_dropout_defaults_to_dropout_and_each_site_gets_its_rate() -> None:
    cfg = tiny(dropout=0.3, attn_dropout=0.0, resid_dropout=0.2)
    assert (cfg.emb_dropout, cfg.attn_dropout, cfg.resid_dropout) == (0.3, 0.0, 0.2)
    model = GPT(cfg)
    block = model.transformer.h[0]
    assert model.transformer.drop.p == 0.3
    assert block.attn.dropout == 0.0  # the attention weights
    assert block.attn.resid_dropout.p == 0.2 and block.mlp.dropout.p == 0.2
    assert cfg.replace(dropout=0.1).emb_dropout == 0.1  # derived: follows dropout
    assert cfg.replace(dropout=0.1).resid_dropout == 0.2  # explicit: stays


SITES = ("emb_dropout", "attn_dropout", "resid_dropout")


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("site", SITES)
def test_each_rate_reaches_exactly_its_module(site: str, fast: bool) -> None:
    """One site at 0.5, the others 0: in training mode only that site changes activations."""
    torch.manual_seed(3)
    model = GPT(tiny(**{s: 0.5 if s == site else 0.0 for s in SITES}, fast_dropout=fast))
    block = model.transformer.h[0]
    changed: dict[str, bool] = {}

    def watch(name: str):  # noqa: ANN202
        def hook(module, inputs, output) -> None:  # noqa: ANN001
            changed[name] = changed.get(name, False) or not torch.equal(inputs[0], output)
        return hook

    for name, module in [("emb_dropout", model.transformer.drop),
                         ("resid_dropout", block.attn.resid_dropout),
                         ("resid_dropout_mlp", block.mlp.dropout)]:
        module.register_forward_hook(watch(name))
    seen: list[torch.Tensor] = []  # c_proj's input: attention's output, weights dropped or not
    block.attn.c_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    idx = torch.randint(0, 13, (4, 8))
    model.eval()
    ref, _ = model(idx)
    assert not any(changed.values())  # eval: no site drops anything
    model.train()
    out, _ = model(idx)
    assert not torch.equal(out, ref)
    assert changed["emb_dropout"] == (site == "emb_dropout")
    assert changed["resid_dropout"] == changed["resid_dropout_mlp"] == (site == "resid_dropout")
    # With no embedding dropout the attention input is the same in both modes, so its output
    # differs exactly when the attention weights are dropped.
    if site != "emb_dropout":
        assert torch.equal(seen[0], seen[1]) == (site != "attn_dropout")


@pytest.mark.parametrize("name", ("dropout", *SITES))
@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_dropout_rates_are_validated(name: str, value: float) -> None:
    with pytest.raises(BardlmError, match=f"{name} must be in \\[0, 1\\)"):
        tiny(**{name: value})


def test_set_parses_the_new_fields_by_type() -> None:
    over = parse_overrides(["attn_dropout=0.25", "emb_dropout=null", "qkv_bias=false", "resid_dropout=0"])
    assert over == {"attn_dropout": 0.25, "emb_dropout": None, "qkv_bias": False, "resid_dropout": 0.0}
    with pytest.raises(BardlmError, match="is not a number"):
        parse_overrides(["attn_dropout=lots"])


def test_checkpoint_round_trips_the_new_fields(tmp_path) -> None:  # noqa: ANN001
    cfg = tiny(dropout=0.1, emb_dropout=0.0, attn_dropout=0.2, bias=True, qkv_bias=False)
    model = GPT(cfg)
    save_checkpoint(tmp_path, model, CharTokenizer.train("abcdefghijklm"))
    back, _, _ = load_checkpoint(tmp_path)
    assert back.config == cfg
    assert json.loads((tmp_path / "config.json").read_text())["model"]["qkv_bias"] is False
    assert back.transformer.h[0].attn.c_attn.bias is None and back.transformer.h[0].attn.dropout == 0.2
    assert isinstance(back.transformer.drop, Dropout) and back.transformer.drop.p == 0.0


# Claims about the layers ---------------------------------------------------------------------
def test_layernorm_uses_the_biased_variance_over_features() -> None:
    """Divide by C, not C - 1 (as nn.LayerNorm / F.layer_norm), and per position: each row is
    normalised on its own, never across the batch (that is BatchNorm)."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6) * 3 + 1
    ln = LayerNorm(6, eps=1e-5, fused=False)
    y = ln(x)
    torch.testing.assert_close(y, F.layer_norm(x, (6,), eps=1e-5), rtol=0, atol=1e-6)
    biased = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    unbiased = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=True, keepdim=True) + 1e-5)
    torch.testing.assert_close(y, biased, rtol=0, atol=1e-6)
    assert (y - unbiased).abs().max() > 0.05  # sqrt(6/5): the other convention is visibly off
    torch.testing.assert_close(ln(x[:1]), y[:1])  # the rest of the batch does not matter
    torch.testing.assert_close(y.mean(-1), torch.zeros(4, 5), rtol=0, atol=1e-6)


def test_swiglu_gate_is_silu_not_sigmoid() -> None:
    """SwiGLU(x) = W2(silu(W1 x) * W3 x), silu(z) = z * sigmoid(z) (Swish with beta = 1)."""
    torch.manual_seed(0)
    ffn = SwiGLU(tiny(ffn="swiglu", ffn_hidden=24, bias=False))
    x = torch.randn(2, 3, 16)
    gate, up = x @ ffn.c_fc.weight[:24].T, x @ ffn.c_fc.weight[24:].T
    expected = (gate * torch.sigmoid(gate) * up) @ ffn.c_proj.weight.T
    torch.testing.assert_close(ffn(x), expected)
    sigmoid_gated = (torch.sigmoid(gate) * up) @ ffn.c_proj.weight.T  # the GLU of Dauphin et al.
    assert not torch.allclose(ffn(x), sigmoid_gated, atol=1e-3)
