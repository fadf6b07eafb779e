import pytest

from bardlm import BardlmError, ModelConfig, TrainConfig, preset
from bardlm.cli import main
from bardlm.config import parse_overrides, train_config_keys


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


# Typed --set (bug 1): values parse by the field's type ---------------------------------------
# Before, values were read as JSON else kept as text: `qk_norm=False` (not JSON) became the
# truthy string "False" and turned QK-norm on; `dropout=abc` reached `0.0 <= "abc"` (TypeError).
@pytest.mark.parametrize("raw", ["true", "True", "TRUE", "1", "yes", "Yes", "YES"])
def test_set_booleans_true(raw: str) -> None:
    assert parse_overrides([f"qk_norm={raw}"]) == {"qk_norm": True}


@pytest.mark.parametrize("raw", ["false", "False", "FALSE", "0", "no", "No", "NO"])
def test_set_booleans_false(raw: str) -> None:
    assert parse_overrides([f"qk_norm={raw}"]) == {"qk_norm": False}
    assert preset("qwen3-tiny", **parse_overrides([f"qk_norm={raw}"])).qk_norm is False


def test_set_numbers_and_null() -> None:
    got = parse_overrides(["n_layer=3", "dropout=0.1", "rope_theta=5e5", "n_kv_head=null",
                           "head_dim=None", "norm_eps=1"])
    assert got == {"n_layer": 3, "dropout": 0.1, "rope_theta": 500000.0, "n_kv_head": None,
                   "head_dim": None, "norm_eps": 1.0}
    assert type(got["n_layer"]) is int and type(got["norm_eps"]) is float
    train = parse_overrides(["lr=3e-4", "compile=Yes", "batch_size=8", "lr_decay_iters=null"],
                            train_config_keys())
    assert train == {"lr": 3e-4, "compile": True, "batch_size": 8, "lr_decay_iters": None}


@pytest.mark.parametrize(
    ("pair", "keys", "expected"),
    [
        ("dropout=abc", None, "a number"),
        ("qk_norm=maybe", None, "a boolean"),
        ("n_layer=2.5", None, "an integer"),
        ("n_kv_head=two", None, "an integer or null"),
        ("compile=maybe", "train", "a boolean"),
        ("lr=abc", "train", "a number"),
        ("batch_size=1.5", "train", "an integer"),
        ("lr=nan", "train", "a number"),
    ],
)
def test_set_bad_values_name_key_value_and_type(pair: str, keys: str | None, expected: str) -> None:
    key, value = pair.split("=")
    with pytest.raises(BardlmError) as err:
        parse_overrides([pair], train_config_keys() if keys else None)
    msg = str(err.value)
    assert "\n" not in msg and key in msg and repr(value) in msg and expected in msg, msg


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run `bardlm ARGV`, expect exit status 2, return its one stderr line."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bardlm: error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    ("pair", "expected"),
    [("dropout=abc", "a number"), ("qk_norm=maybe", "a boolean"), ("compile=maybe", "a boolean"),
     ("lr=abc", "a number"), ("batch_size=1.5", "an integer")],
)
def test_cli_train_bad_set_is_one_line(tmp_path, capsys, pair: str, expected: str) -> None:
    line = _cli_error(["train", "--out", str(tmp_path / "r"), "--set", pair], capsys)
    assert pair in line and expected in line


@pytest.mark.parametrize(
    ("pair", "expected"),
    [("n_enc_layer=abc", "an integer"), ("tie_output=maybe", "a boolean"),
     ("dropout=abc", "a number"), ("beam=1.5", "an integer"), ("lr=abc", "a number"),
     ("min_length=x", "an integer or null")],
)
def test_cli_seq2seq_bad_set_is_one_line(tmp_path, capsys, pair: str, expected: str) -> None:
    line = _cli_error(["seq2seq", "--task", "reverse", "--out", str(tmp_path / "r"), "--set", pair],
                      capsys)
    assert pair in line and expected in line


def test_cli_seq2seq_set_parses_seq2seq_fields(tmp_path, capsys) -> None:
    """Fields only the seq2seq dataclasses have (n_enc_layer, tie_output, n_test) parse by their
    own types; they used to stay strings, so `--set n_enc_layer=1` was refused as "not an int"."""
    import json

    out = tmp_path / "s2s"
    assert main(["seq2seq", "--task", "reverse", "--length", "4", "--out", str(out),
                 "--max-iters", "1", "--set", "n_enc_layer=1", "--set", "n_dec_layer=1",
                 "--set", "tie_output=FALSE", "--set", "n_embd=16", "--set", "n_test=4",
                 "--set", "eval_pairs=4", "--set", "beam=1", "--set", "min_length=null"]) == 0
    capsys.readouterr()
    saved = json.dumps(json.loads((out / "config.json").read_text()))
    assert '"n_enc_layer": 1' in saved and '"tie_output": false' in saved


def test_config_types_are_checked() -> None:
    with pytest.raises(BardlmError, match="n_layer must be .*integer.*'3'"):
        ModelConfig(n_layer="3")
    with pytest.raises(BardlmError, match="qk_norm must be a boolean"):
        ModelConfig(qk_norm="False")
    with pytest.raises(BardlmError, match="compile must be a boolean"):
        TrainConfig(compile="no")


def test_replace_rederives_derived_fields_but_keeps_explicit_ones() -> None:
    cfg = ModelConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=128)
    assert (cfg.head_dim, cfg.ffn_hidden, cfg.n_kv_head) == (32, 512, 4)
    wider = cfg.replace(n_embd=256)
    assert (wider.head_dim, wider.ffn_hidden, wider.n_kv_head) == (64, 1024, 4)
    explicit = ModelConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=128,
                           head_dim=48, ffn_hidden=300)
    kept = explicit.replace(n_embd=256)
    assert (kept.head_dim, kept.ffn_hidden) == (48, 300)
