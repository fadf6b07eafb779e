"""The encoder-decoder Transformer: against torch.nn's Transformer layers, padding invariance,
causality, cross-attention shapes, cached decoding, beam search, the toy tasks and the CLI."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bardlm.cli import main
from bardlm.errors import BardlmError
from bardlm.seq2seq.model import (
    BOS,
    EOS,
    PAD,
    EncoderDecoder,
    Seq2SeqConfig,
    beam_search,
    greedy_decode,
    load_seq2seq,
    save_seq2seq,
    sequence_logprob,
    strip,
)
from bardlm.seq2seq.tasks import PairSampler, TaskConfig, make_batch, target_of, train_seq2seq

V = 9  # PAD, BOS, EOS + 6 symbols


def tiny(**kw) -> Seq2SeqConfig:  # noqa: ANN003
    base = dict(src_vocab_size=V, tgt_vocab_size=V, max_len=12, n_enc_layer=2, n_dec_layer=2,
                n_head=4, n_embd=32)
    return Seq2SeqConfig(**{**base, **kw})


def random_src(B: int, S: int, lengths: list[int], gen: torch.Generator) -> torch.Tensor:
    src = torch.randint(3, V, (B, S), generator=gen)
    for b, n in enumerate(lengths):
        src[b, n:] = PAD
    return src


def perturbed(model: nn.Module) -> nn.Module:
    """Give every norm and bias non-trivial values so a swapped one cannot go unnoticed."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


# Against torch.nn ---------------------------------------------------------------------------
def torch_reference(model: EncoderDecoder) -> tuple[nn.Module, nn.Module]:
    """nn.TransformerEncoder/Decoder with our weights copied in (in_proj rows are q, k, v as
    our fused c_attn; norm1/2/3 are self, cross, feed-forward)."""
    cfg = model.config
    pre = cfg.norm_placement == "pre"
    kw = dict(d_model=cfg.n_embd, nhead=cfg.n_head, dim_feedforward=4 * cfg.n_embd, dropout=0.0,
              activation="relu", batch_first=True, norm_first=pre)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(**kw), cfg.n_enc_layer,
                                norm=nn.LayerNorm(cfg.n_embd) if pre else None,
                                enable_nested_tensor=False)
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(**kw), cfg.n_dec_layer,
                                norm=nn.LayerNorm(cfg.n_embd) if pre else None)

    def attn(ref: nn.MultiheadAttention, ours: nn.Module) -> None:
        ref.in_proj_weight.copy_(ours.c_attn.weight)
        ref.in_proj_bias.copy_(ours.c_attn.bias)
        ref.out_proj.weight.copy_(ours.c_proj.weight)
        ref.out_proj.bias.copy_(ours.c_proj.bias)

    def norm(ref: nn.LayerNorm, ours: nn.Module) -> None:
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)

    def ffn(ref: nn.Module, ours: nn.Module) -> None:
        for a, b in ((ref.linear1, ours.mlp.c_fc), (ref.linear2, ours.mlp.c_proj)):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)

    with torch.no_grad():
        for ref, ours in zip(enc.layers, model.encoder):
            attn(ref.self_attn, ours.attn)
            norm(ref.norm1, ours.ln_1)
            norm(ref.norm2, ours.ln_2)
            ffn(ref, ours)
        for ref, ours in zip(dec.layers, model.decoder):
            attn(ref.self_attn, ours.attn)
            attn(ref.multihead_attn, ours.cross_attn)
            norm(ref.norm1, ours.ln_1)
            norm(ref.norm2, ours.ln_cross)
            norm(ref.norm3, ours.ln_2)
            ffn(ref, ours)
        if pre:
            norm(enc.norm, model.enc_norm)
            norm(dec.norm, model.dec_norm)
    return enc, dec


def sinusoid(n: int, d: int) -> torch.Tensor:
    """The paper's PE table, written independently of bardlm.position."""
    pe = torch.zeros(n, d, dtype=torch.float64)
    for p in range(n):
        for i in range(0, d, 2):
            pe[p, i] = math.sin(p / 10000 ** (i / d))
            pe[p, i + 1] = math.cos(p / 10000 ** (i / d))
    return pe.float()


@pytest.mark.parametrize("placement", ["post", "pre"])
@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_matches_torch_transformer(placement: str, impl: str) -> None:
    cfg = tiny(norm_placement=placement, attn_impl=impl, share_embeddings=True)
    model = perturbed(EncoderDecoder(cfg)).eval()
    enc, dec = torch_reference(model)
    gen = torch.Generator().manual_seed(1)
    src = random_src(3, 7, [7, 4, 2], gen)
    tgt = torch.randint(3, V, (3, 5), generator=gen)
    logits, _ = model(src, tgt)

    C = cfg.n_embd
    E = model.src_emb.weight  # shared: source, target and output matrix
    pe = sinusoid(cfg.max_len, C)
    x_src = F.embedding(src, E) * math.sqrt(C) + pe[:7]
    x_tgt = F.embedding(tgt, E) * math.sqrt(C) + pe[:5]
    pad = src == PAD  # torch: True = ignore
    memory = enc(x_src, src_key_padding_mask=pad)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    h = dec(x_tgt, memory, tgt_mask=causal, memory_key_padding_mask=pad)
    ref = h @ E.T
    assert logits.shape == (3, 5, V)
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-4)
    ours_mem, _ = model.encode(src)
    real = ~pad
    torch.testing.assert_close(ours_mem[real], memory[real], atol=2e-5, rtol=1e-4)


def test_cross_attention_shapes_and_reference() -> None:
    """(B, T_tgt, C) out of (B, T_tgt, C) queries over (B, T_src, C) memory; = nn.MultiheadAttention."""
    model = perturbed(EncoderDecoder(tiny())).eval()
    cross = model.decoder[0].cross_attn
    x, memory = torch.randn(2, 3, 32), torch.randn(2, 7, 32)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    y = cross(x, mask=mask[:, None, None, :], kv_source=memory)
    assert y.shape == (2, 3, 32)
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(cross.c_attn.weight)
        ref.in_proj_bias.copy_(cross.c_attn.bias)
        ref.out_proj.weight.copy_(cross.c_proj.weight)
        ref.out_proj.bias.copy_(cross.c_proj.bias)
    expected, _ = ref(x, memory, memory, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)
    # Keys/values projected once (as decoding does) give the same output.
    k, v = cross.project_kv(memory)
    assert k.shape == v.shape == (2, 7, 32)
    torch.testing.assert_close(cross(x, mask=mask[:, None, None, :], kv_source=(k, v)), y)


def test_one_attention_class_serves_all_three() -> None:
    model = EncoderDecoder(tiny())
    kinds = {type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__}
    assert kinds == {"Attention"}
    assert not model.encoder[0].attn.causal and model.decoder[0].attn.causal
    assert not model.decoder[0].cross_attn.causal


# Masks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["post", "pre"])
def test_source_padding_never_changes_real_outputs(placement: str) -> None:
    model = perturbed(EncoderDecoder(tiny(norm_placement=placement))).eval()
    gen = torch.Generator().manual_seed(2)
    src = random_src(2, 5, [5, 3], gen)
    tgt = torch.randint(3, V, (2, 4), generator=gen)
    logits, _ = model(src, tgt)
    mem, _ = model.encode(src)
    for extra in (1, 6):  # more padding after every row
        longer = torch.cat([src, torch.full((2, extra), PAD)], dim=1)
        logits2, _ = model(longer, tgt)
        mem2, _ = model.encode(longer)
        torch.testing.assert_close(logits2, logits, atol=1e-5, rtol=1e-5)
        real = src != PAD
        torch.testing.assert_close(mem2[:, :5][real], mem[real], atol=1e-5, rtol=1e-5)
    # Row 1 alone, without padding, decodes identically too.
    alone, _ = model(src[1:, :3], tgt[1:])
    torch.testing.assert_close(alone, logits[1:], atol=1e-5, rtol=1e-5)
    # The check can fail: a real token changed does move the outputs.
    changed = src.clone()
    changed[1, 0] = 3 + (int(src[1, 0]) - 2) % (V - 3)
    assert not torch.allclose(model(changed, tgt)[0][1], logits[1], atol=1e-3)


def test_decoder_is_causal() -> None:
    model = perturbed(EncoderDecoder(tiny())).eval()
    gen = torch.Generator().manual_seed(3)
    src = random_src(2, 6, [6, 6], gen)
    tgt = torch.randint(3, V, (2, 7), generator=gen)
    logits, _ = model(src, tgt)
    for j in range(7):
        changed = tgt.clone()
        changed[:, j] = 3 + (tgt[:, j] - 2) % (V - 3)
        logits2, _ = model(src, changed)
        torch.testing.assert_close(logits2[:, :j], logits[:, :j], atol=1e-6, rtol=0)
        assert (logits2[:, j:] - logits[:, j:]).abs().amax() > 1e-3  # later positions do see it


def test_empty_source_and_long_input_are_clear_errors() -> None:
    model = EncoderDecoder(tiny())
    with pytest.raises(BardlmError, match="empty"):
        model.encode(torch.tensor([[PAD, PAD], [3, 4]]))
    with pytest.raises(BardlmError, match="max_len"):
        model.encode(torch.full((1, 13), 3))
    with pytest.raises(BardlmError, match="share_embeddings"):
        tiny(share_embeddings=True, tgt_vocab_size=V + 1)


# Decoding --------------------------------------------------------------------------------
def test_cached_decoding_matches_full_forward() -> None:
    model = perturbed(EncoderDecoder(tiny())).eval()
    gen = torch.Generator().manual_seed(4)
    src = random_src(2, 6, [6, 2], gen)
    tgt = torch.randint(3, V, (2, 8), generator=gen)
    full, _ = model(src, tgt)
    memory, mask = model.encode(src)
    cross, cache = model.cross_kv(memory), model.make_cache(2)
    steps = [model.decode(tgt[:, t : t + 1], cross, mask, cache, start_pos=t) for t in range(8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_is_beam_one_and_argmax_by_hand() -> None:
    model = perturbed(EncoderDecoder(tiny(max_len=6))).eval()
    gen = torch.Generator().manual_seed(5)
    src = random_src(3, 4, [4, 2, 3], gen)
    greedy = greedy_decode(model, src, max_len=6)
    assert torch.equal(greedy, beam_search(model, src, max_len=6, beam=1))
    # Greedy by hand, without any cache: the argmax of a full forward pass at each step.
    seq = torch.full((3, 1), BOS)
    for _ in range(6):
        logits, _ = model(src, seq)
        logits[..., [PAD, BOS]] = float("-inf")  # tokens a decoder never emits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    for row, ref in zip(strip(greedy), seq[:, 1:].tolist()):
        cut = ref.index(EOS) if EOS in ref else len(ref)
        assert row == ref[:cut]


def test_beam_search_finds_the_exhaustive_best() -> None:
    """With a beam wider than all prefixes, beam search must return the brute-force argmax."""
    cfg = tiny(src_vocab_size=5, tgt_vocab_size=5, max_len=3)  # 2 symbols + PAD BOS EOS
    model = perturbed(EncoderDecoder(cfg)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # sharper, more varied distributions
    src = torch.tensor([[3, 4, 4], [4, 3, PAD]])
    found = beam_search(model, src, max_len=3, beam=64)
    # Every target: 0-2 symbols then EOS, or 3 symbols (no room for EOS within max_len 3).
    cands = [list(s) + [EOS] for n in range(3) for s in itertools.product([3, 4], repeat=n)]
    cands += [list(s) for s in itertools.product([3, 4], repeat=3)]
    padded = torch.tensor([c + [PAD] * (3 - len(c)) for c in cands])
    for b in range(2):
        scores = sequence_logprob(model, src[b : b + 1].expand(len(cands), -1), padded)
        assert torch.equal(found[b], padded[scores.argmax()])
    # And a narrow beam is never worse than greedy here, and beam 1 is greedy.
    greedy = greedy_decode(model, src, 3)
    assert (sequence_logprob(model, src, found) >= sequence_logprob(model, src, greedy) - 1e-6).all()


@torch.no_grad()
def reference_beam(model: EncoderDecoder, src: torch.Tensor, max_len: int, K: int) -> list[int]:
    """Beam search as plain lists, re-running the full model for every hypothesis (no cache)."""
    beams = [([], 0.0, False)]  # (tokens, summed log-prob, finished)
    for _ in range(max_len):
        cands = []
        for seq, score, done in beams:
            if done:
                cands.append((seq + [PAD], score, True))
                continue
            logits, _ = model(src, torch.tensor([[BOS] + seq]))
            logp = F.log_softmax(logits[0, -1], dim=-1)
            for tok in range(logp.shape[0]):
                if tok not in (PAD, BOS):
                    cands.append((seq + [tok], score + float(logp[tok]), tok == EOS))
        beams = sorted(cands, key=lambda c: -c[1])[:K]
        if all(done for _, _, done in beams):
            break
    best = beams[0][0]
    return best + [PAD] * (max_len - len(best))


def chatty_model(seed: int) -> EncoderDecoder:
    """A random model whose next token depends on the previous one (the output layer is a
    permuted target embedding), so beams really diverge and get reordered."""
    torch.manual_seed(seed)
    model = perturbed(EncoderDecoder(tiny(max_len=7, tie_output=False))).eval()
    with torch.no_grad():
        W = model.tgt_emb.weight[torch.randperm(V)]
        model.lm_head.weight.copy_(0.5 * W + 0.3 * torch.randn_like(W))
    return model


@torch.no_grad()
@pytest.mark.parametrize("K", [2, 3])
def test_beam_search_matches_a_plain_reference(K: int) -> None:
    """Batched beam search (shared encoder, cross K/V, reordered KV cache) = the list version."""
    model = chatty_model(2)
    gen = torch.Generator().manual_seed(6)
    src = random_src(3, 5, [5, 3, 4], gen)
    found = beam_search(model, src, max_len=7, beam=K)
    assert not torch.equal(found, greedy_decode(model, src, 7))  # the search matters here
    for b in range(3):
        n = int((src[b] != PAD).sum())
        assert found[b].tolist() == reference_beam(model, src[b : b + 1, :n], 7, K)


# Tasks and training ----------------------------------------------------------------------
def test_task_targets() -> None:
    src = np.array([[5, 3, 4, 0], [6, 4, 0, 0]])
    assert target_of("reverse", src).tolist() == [[4, 3, 5, 0], [4, 6, 0, 0]]
    assert target_of("sort", src).tolist() == [[3, 4, 5, 0], [4, 6, 0, 0]]
    assert target_of("copy", src).tolist() == src.tolist()
    s, dec_in, targets = make_batch("reverse", src)
    assert dec_in.tolist() == [[BOS, 4, 3, 5, 0], [BOS, 4, 6, 0, 0]]
    assert targets.tolist() == [[4, 3, 5, EOS, 0], [4, 6, EOS, 0, 0]]


def test_held_out_sources_never_trained_on() -> None:
    cfg = TaskConfig(task="copy", length=3, vocab=3, min_length=1, n_test=15, batch_size=64)
    data = PairSampler(cfg)
    held = {tuple(r) for r in data.test.tolist()}
    assert len(held) == 15
    seen = {tuple(r) for _ in range(20) for r in data.train_batch()[0].tolist()}
    assert not seen & held and len(seen) == 39 - 15  # every other source does appear


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_both_norm_placements_train(placement: str) -> None:
    cfg = TaskConfig(task="reverse", length=6, vocab=6, n_test=200, batch_size=64, max_iters=250,
                     lr=2e-3, warmup_iters=30, eval_interval=200, beam=1, seed=1)
    model_cfg = cfg.model_config(n_embd=32, n_head=4, n_enc_layer=1, n_dec_layer=1,
                                 norm_placement=placement)
    _, final = train_seq2seq(cfg, model_cfg, log=lambda m: None)
    # Chance is 6^-6 per sequence and 1/6 per token; a model that ignores the source or the
    # positions cannot get far past that.
    assert final["token_acc"] > 0.9, final
    assert final["seq_acc"] > 0.5, final


def test_save_and_load_round_trip(tmp_path) -> None:  # noqa: ANN001
    model = perturbed(EncoderDecoder(tiny(share_embeddings=True))).eval()
    save_seq2seq(tmp_path, model)
    loaded = load_seq2seq(tmp_path)
    assert loaded.tgt_emb.weight is loaded.lm_head.weight is loaded.src_emb.weight
    src, tgt = torch.tensor([[3, 4, 5]]), torch.tensor([[BOS, 6]])
    torch.testing.assert_close(loaded(src, tgt)[0], model(src, tgt)[0], atol=0, rtol=0)
    # A weights file from another save (same shapes) is refused, not silently mixed.
    save_seq2seq(tmp_path / "other", model)
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(BardlmError, match="mixes two checkpoints"):
        load_seq2seq(tmp_path)


def test_cli_writes_metrics(tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    rc = main(["seq2seq", "--task", "sort", "--length", "4", "--vocab", "4", "--max-iters", "20",
               "--n-test", "20", "--beam", "2", "--set", "n_embd=32", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]
    assert final["final"] and final["task"] == "sort" and final["n_test"] == 20
    assert 0.0 <= final["seq_acc"] <= 1.0 and "seq_acc_beam2" in final
    assert json.loads(capsys.readouterr().out)["seq_acc"] == final["seq_acc"]
    assert load_seq2seq(out).config.n_embd == 32


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--task", "shuffle"], "invalid choice"),
        (["--task", "copy", "--length", "0"], "length"),
        (["--task", "copy", "--length", "2", "--vocab", "2"], "distinct sources"),
        (["--task", "copy", "--set", "n_head=5"], "n_head"),
        (["--task", "copy", "--set", "bogus=1"], "bogus"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, argv, words) -> None:  # noqa: ANN001
    try:
        rc = main(["seq2seq", *argv, "--out", str(tmp_path / "x")])
    except SystemExit as e:  # argparse's own choice check
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and words in err
    assert "Traceback" not in err
