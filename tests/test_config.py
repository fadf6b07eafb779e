import pytest

from bardlm import BardlmError, ModelConfig, preset
from bardlm.config import parse_overrides


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(n_embd=100, n_head=3), "divisible by n_head"),
        (dict(n_head=4, n_kv_head=3), "divisible by n_kv_head"),
        (dict(pos="rope", n_embd=12, n_head=4), "head_dim must be even"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(n_embd=-8), "n_embd must be a positive integer"),
        (dict(norm="batchnorm"), "norm must be one of"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_bad_configs_name_the_problem(kw: dict, match: str) -> None:
    with pytest.raises(BardlmError, match=match):
        ModelConfig(**{**dict(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_embd=32), **kw})


def test_unknown_preset_lists_valid_ones() -> None:
    with pytest.raises(BardlmError, match="valid presets: .*gpt2-124m"):
        preset("gpt2-small")


def test_unknown_set_key_suggests_closest() -> None:
    with pytest.raises(BardlmError, match="did you mean 'n_layer'"):
        parse_overrides(["n_layers=3"])
    assert parse_overrides(["n_layer=3", "pos=rope", "dropout=0.1"]) == {"n_layer": 3, "pos": "rope", "dropout": 0.1}


def test_round_trip_dict() -> None:
    cfg = preset("qwen3-0.6b")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
