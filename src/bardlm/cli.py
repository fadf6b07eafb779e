"""The `bardlm` command line: argument parsing only; every command calls the library.

Each subcommand is a pair: `add_X(subparsers)` declares its arguments, `cmd_X(args)` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import BardlmError, Interrupted


def add_device(p: argparse.ArgumentParser) -> None:
    """--device, the same on every verb that runs a model; `main` resolves it once."""
    p.add_argument("--device", default="auto",
                   help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")


# train -------------------------------------------------------------------------------------
def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on a text corpus")
    p.add_argument("--preset", help="model shape and budget (default char-tiny)")
    p.add_argument("--data", help="a text file (.txt or .txt.gz), a folder made by `bardlm prepare`, "
                                  "or a corpus name: tiny-shakespeare (default, shipped with bardlm), "
                                  "shakespeare (complete works, downloaded once unless in "
                                  "$BARDLM_DATA_DIR)")
    p.add_argument("--tokenizer", help="char (default), word, word:MIN_COUNT, bpe:VOCAB, or a "
                                       "tokenizer.json; a prepared --data folder brings its own")
    p.add_argument("--init-from", metavar="DIR",
                   help="start from this model's weights (a bardlm run or a Hugging Face GPT-2/"
                        "Llama/Qwen3 folder): its shape and tokenizer, a fresh optimizer and schedule")
    p.add_argument("--out", required=True, help="run directory (checkpoint, metrics.jsonl, loss.png)")
    p.add_argument("--max-iters", type=int, help="number of optimizer steps")
    p.add_argument("--seed", type=int, help="random seed (data order, init, dropout)")
    add_device(p)
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16 autocast or plain fp32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (--no-compile for eager)")
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun: shard the model with FSDP2 instead of DDP")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model or training field, e.g. --set n_layer=6 --set lr=3e-4")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a bar")


def _split_overrides(pairs: list[str]) -> tuple[dict, dict]:
    from .config import config_keys, parse_overrides, train_config_keys

    values = parse_overrides(pairs, config_keys() + train_config_keys())
    model_keys = set(config_keys())
    return ({k: v for k, v in values.items() if k in model_keys},
            {k: v for k, v in values.items() if k not in model_keys})


def cmd_train(args: argparse.Namespace) -> int:
    from .config import TRAIN_PRESETS, ModelConfig, TrainConfig, preset
    from .tokenizers import build
    from .tokenizers import load as load_tokenizer
    from .train.data import load_corpus, load_prepared, token_ids
    from .train.memory import return_freed_memory
    from .train.trainer import Trainer, prepare_out

    return_freed_memory()  # before the model is built: freed tensors leave the resident set
    out = Path(args.out)
    prepare_out(out, args.resume, args.overwrite)
    model_over, train_over = _split_overrides(args.set)
    if "vocab_size" in model_over:  # the model is built to the tokenizer's size, always
        raise BardlmError("--set vocab_size: the vocabulary size comes from the tokenizer; drop it "
                          "and choose the tokenizer instead (--tokenizer bpe:VOCAB, word:MIN_COUNT, ...)")
    for key in ("max_iters", "seed", "device", "dtype", "compile", "fsdp"):
        if getattr(args, key) is not None:
            train_over[key] = getattr(args, key)
    started_from = args.init_from and str(Path(args.init_from).resolve())
    tokenizer = None
    if args.resume:
        from .io.checkpoint import read_config

        meta = read_config(out)
        started_from = meta.get("init_from")
        model_cfg = ModelConfig.from_dict({**meta["model"], **model_over})
        train_cfg = TrainConfig.from_dict({**meta["train"], **train_over})
        data = args.data or meta.get("data")
        name = meta.get("preset", args.preset)
        tokenizer = load_tokenizer(out / "tokenizer.json")
    elif args.init_from:
        from .train.trainer import init_config

        name = args.preset
        model_cfg, tokenizer = init_config(args.init_from, args.preset, model_over, args.tokenizer)
        train_cfg = TrainConfig(**{**TRAIN_PRESETS.get(name or "", {}), **train_over})
        data = args.data
    else:
        name = args.preset or "char-tiny"
        model_cfg = preset(name, **model_over)
        train_cfg = TrainConfig(**{**TRAIN_PRESETS.get(name, {}), **train_over})
        data = args.data
    run_meta: dict = {"preset": name}
    if started_from:
        run_meta["init_from"] = started_from
    if data is not None and Path(data).is_dir():  # shards from `bardlm prepare`, memory-mapped
        prepared = load_prepared(data)
        if tokenizer is None:
            tokenizer = load_tokenizer(prepared.tokenizer_path)
            check_tokenizer_flag(args.tokenizer, prepared, tokenizer)
        text, path, ids = "", prepared.path, None
        run_meta["data_fingerprint"] = prepared.fingerprint()
        described = (f"{prepared.meta['documents']:,} documents, {prepared.meta['train_tokens']:,} "
                     f"training tokens in {len(prepared.meta['shards'])} shards")
    else:
        prepared = None
        text, path = load_corpus(data)
        tokenizer = tokenizer or build(args.tokenizer or "char", text)
        ids = token_ids(path, text, tokenizer)
        described = f"{len(text):,} characters"
    trainer = Trainer(model_cfg, train_cfg, tokenizer, text, out, progress=not args.no_progress,
                      log=lambda m: print(m, file=sys.stderr),
                      meta={**run_meta, "data": str(path)}, ids=ids, prepared=prepared,
                      keep_vocab=bool(started_from))
    if args.resume:
        trainer.resume()
    elif args.init_from:
        trainer.init_from(args.init_from)
    world = trainer.dist.world  # under torchrun only rank 0 logs
    trainer.log(f"data: {path} ({described}); tokenizer: {tokenizer.kind} "
                f"({tokenizer.vocab_size:,} tokens)")
    trainer.log(f"model: {trainer.model.num_params():,} parameters; {train_cfg.max_iters} steps of "
                f"{train_cfg.batch_size} x {world} x {train_cfg.grad_accum} x "
                f"{model_cfg.block_size} tokens (batch x processes x accumulation x context)")
    try:
        final = trainer.fit()
    finally:
        trainer.dist.close()
    if trainer.dist.is_main:
        print(json.dumps({"out": str(out), **final}))
    return 0


def check_tokenizer_flag(spec: str | None, prepared, tokenizer) -> None:  # noqa: ANN001
    """A prepared folder brings its tokenizer; --tokenizer may only name that same one."""
    if spec is None or spec == prepared.meta.get("tokenizer_spec"):
        return
    if Path(spec).is_file():
        from .tokenizers import load as load_tokenizer

        if load_tokenizer(spec).to_dict() == tokenizer.to_dict():
            return
    raise BardlmError(
        f"--tokenizer {spec} conflicts with --data {prepared.path}, prepared with "
        f"{prepared.meta.get('tokenizer_spec')} (its tokenizer.json is used); drop --tokenizer, "
        f"or prepare the corpus again with --tokenizer {spec}"
    )


# prepare -----------------------------------------------------------------------------------
def add_prepare(sub: argparse._SubParsersAction) -> None:
    from .train.prepare import DEFAULT_SAMPLE_MB, DEFAULT_SHARD_TOKENS

    p = sub.add_parser("prepare", help="tokenize text files, JSONL or parquet of any size into "
                                       "token shards for `bardlm train --data DIR`")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help=".txt, .txt.gz, .jsonl, .jsonl.gz, .parquet files, or folders of them")
    p.add_argument("--tokenizer", required=True,
                   help="char, word, word:MIN_COUNT, bpe:VOCAB (trained on the sources) or a tokenizer.json")
    p.add_argument("--out", required=True, help="folder to write (shards, tokenizer.json, meta.json)")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet column with the text")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of documents that validate (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the tokenizer sample")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--sample-mb", type=float, default=DEFAULT_SAMPLE_MB,
                   help="MB of text that word:N and bpe:VOCAB are trained on, at most")
    p.add_argument("--workers", type=int, help="encoding threads or processes (default: every core)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad files, lines and rows (counted in meta.json) instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_prepare(args: argparse.Namespace) -> int:
    from .train.prepare import prepare

    meta = prepare(args.data, args.tokenizer, args.out, text_field=args.text_field,
                   val_fraction=args.val_fraction, seed=args.seed, shard_tokens=args.shard_tokens,
                   skip_bad=args.skip_bad, overwrite=args.overwrite, workers=args.workers,
                   sample_mb=args.sample_mb, log=lambda m: print(m, file=sys.stderr),
                   progress=not args.no_progress)
    keys = ("documents", "tokens", "train_tokens", "val_tokens", "dtype", "skipped", "elapsed_s")
    print(json.dumps({"out": args.out, **{k: meta[k] for k in keys}, "shards": len(meta["shards"])}))
    return 0


# generate ----------------------------------------------------------------------------------
def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=200)
    # Unset sampler flags take the model's generation_config.json defaults, then bardlm's.
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the model's, else 0.8)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float, help="1 = off (default: the model's, else 1)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-cache", action="store_true", help="re-read the whole context each step")
    p.add_argument("--max-context", type=int,
                   help="positions one pass may see (default: the model's context); rotary and "
                        "position-free models may pass more, and slide past it")


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model")
    p.add_argument("--ckpt", required=True, help="a bardlm run, an INT8 or a Hugging Face model directory")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    add_sampling_args(p)
    add_device(p)
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8", "int4"], default="fp32",
                   help="inference weights: fp32, bf16, or int8 / int4 (groups of 32) quantized "
                        "on load (checkpoints from `bardlm quantize` always run as saved)")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="keep the model loaded and continue each line read from stdin")
    add_draft_args(p)


def add_draft_args(p: argparse.ArgumentParser, server: bool = False) -> None:
    """--draft and --draft-tokens (generate and serve)."""
    where = " while one request is generating" if server else ""
    p.add_argument("--draft", metavar="DIR|ngram",
                   help="speculative decoding: a smaller model with the same tokenizer, or "
                        f"'ngram' (prompt lookup, no second model){where}; same output distribution")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K",
                   help="guesses the drafter makes per step with --draft (default 4)")


def draft_stream(args: argparse.Namespace, tokenizer) -> dict:  # noqa: ANN001
    """{"stream": a speculative stream} for --draft (its model loaded and checked), else {}."""
    if args.draft is None:
        return {}
    from .infer.speculative import speculative_stream
    from .io.load import load_draft

    draft = load_draft(args.draft, tokenizer, args.dtype, args.device)
    return {"stream": speculative_stream(draft, args.draft_tokens)}


BARDLM_SAMPLING = {"temperature": 0.8, "repetition_penalty": 1.0}  # when neither flag nor model says


def sampling_kwargs(args: argparse.Namespace, vocab_size: int, model_defaults: dict | None = None) -> dict:
    """The sampling flags as keyword arguments, checked at once (chat would otherwise report a
    bad value at every line typed). A flag left unset takes `model_defaults` (the model's
    generation_config.json, `ModelMeta.sampling_defaults`), else bardlm's default; what was
    taken from the model is said on stderr."""
    from .infer.sampling import check_sampling

    model_defaults = model_defaults or {}
    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    chosen, taken = {}, []
    for key in keys:
        value = getattr(args, key)
        if value is None and model_defaults.get(key) is not None:
            value = model_defaults[key]
            taken.append(f"{key} {value:g}")
        chosen[key] = value if value is not None else BARDLM_SAMPLING.get(key)
    if taken:
        print(f"bardlm: the model's generation_config: {', '.join(taken)} (flags override)", file=sys.stderr)
    check_sampling(chosen["temperature"], chosen["top_k"], chosen["top_p"], vocab_size, chosen["min_p"],
                   chosen["repetition_penalty"], args.seed)
    return dict(
        max_new_tokens=args.max_new_tokens, **chosen,
        seed=args.seed, use_cache=not args.no_cache, stop=args.stop, max_context=args.max_context,
    )


def model_sampling(ckpt: str, tokenizer: Any) -> dict:
    """The sampler defaults of the model directory `ckpt` (see `sampling_kwargs`)."""
    from .io.load import read_meta

    return read_meta(ckpt, tokenizer).sampling_defaults()


def cmd_generate(args: argparse.Namespace) -> int:
    from .infer.budget import context_window
    from .infer.generate import generate_text, interactive
    from .io.load import load

    model, tokenizer = load(args.ckpt, args.dtype, args.device)
    if tokenizer is None:
        raise BardlmError(f"{args.ckpt} has no tokenizer.json; it cannot turn text into ids")
    context_window(model.config, args.max_context)  # a bad --max-context: before any output
    kwargs = sampling_kwargs(args, model.config.vocab_size, model_sampling(args.ckpt, tokenizer))
    kwargs.update(draft_stream(args, tokenizer))

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if args.interactive:
        marker = (lambda: print("> ", end="", file=sys.stderr, flush=True)) if sys.stdin.isatty() else None
        interactive(model, tokenizer, sys.stdin, emit, marker, **kwargs)
        return 0
    emit(args.prompt)
    generate_text(model, tokenizer, args.prompt, on_text=emit, **kwargs)
    emit("\n")
    return 0


# quantize ----------------------------------------------------------------------------------
def add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="write an int8 or int4 weight-only copy of a checkpoint")
    p.add_argument("--ckpt", required=True, help="a float bardlm run or Hugging Face model directory")
    p.add_argument("--out", required=True, help="directory for the quantized checkpoint")
    p.add_argument("--bits", type=int, default=8, help="8 (one scale per row) or 4 (group-wise)")
    p.add_argument("--group-size", type=int,
                   help="--bits 4: weights per scale, 32 (default), 64 or 128")
    p.add_argument("--no-embeddings", action="store_true",
                   help="keep the token embedding and head in bf16 (only the blocks quantized)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")


def cmd_quantize(args: argparse.Namespace) -> int:
    from .io.load import quantize_checkpoint

    print(json.dumps(quantize_checkpoint(args.ckpt, args.out, embeddings=not args.no_embeddings,
                                         overwrite=args.overwrite, bits=args.bits,
                                         group_size=args.group_size)))
    return 0


# tokenizer ---------------------------------------------------------------------------------
def add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train or inspect a tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE (or char/word) tokenizer on a corpus")
    t.add_argument("--data", help="a text file or corpus name (default: tiny-shakespeare, shipped "
                                  "with bardlm)")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--kind", choices=["bpe", "bpe_scratch", "char", "word"], default="bpe",
                   help="bpe (Hugging Face tokenizers, fast) or bpe_scratch (our readable trainer)")
    t.add_argument("--out", required=True, help="tokenizer.json to write")


def cmd_tokenizer(args: argparse.Namespace) -> int:
    import time

    from .io.checkpoint import save_tokenizer
    from .tokenizers import ScratchBPETokenizer, build, train_bpe_scratch
    from .tokenizers.bpe import chars_per_token
    from .train.data import load_corpus

    text, path = load_corpus(args.data)
    start = time.time()
    if args.kind == "bpe_scratch":
        tok = ScratchBPETokenizer(train_bpe_scratch(text, args.vocab_size))
    else:
        tok = build(f"bpe:{args.vocab_size}" if args.kind == "bpe" else args.kind, text)
    seconds = time.time() - start
    save_tokenizer(tok, args.out)
    print(json.dumps({"out": args.out, "kind": tok.kind, "vocab_size": tok.vocab_size,
                      "train_seconds": round(seconds, 2), "data": str(path),
                      "chars_per_token": round(chars_per_token(tok, text[:1_000_000]), 3)}))
    return 0


# info --------------------------------------------------------------------------------------
def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, weight memory and KV-cache size of a model")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset")
    g.add_argument("--ckpt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a model field, or with --train a training field (batch_size, dtype, optimizer, "
                        "checkpoint_activations, checkpoint_every, loss_chunk)")
    p.add_argument("--train", action="store_true",
                   help="also estimate the peak memory of one training step")
    p.add_argument("--context", type=int, default=None, help="--train: tokens per row (default: block_size)")
    p.add_argument("--lora-rank", type=int, default=0, help="--train: LoRA of this rank (0: full finetuning)")
    p.add_argument("--base-dtype", choices=["fp32", "int8", "int4"], default="fp32",
                   help="--train with --lora-rank: the frozen base's weights (int8 or int4: QLoRA)")


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .config import TrainConfig, config_keys, parse_overrides, preset, train_config_keys
    from .infer.budget import kv_bytes_per_sequence, kv_bytes_per_token, state_bytes_per_sequence
    from .io.load import read_model_config
    from .nn.model import GPT
    from .nn.moe import active_params

    over = parse_overrides(args.set, config_keys() + (train_config_keys() if args.train else []))
    train_over = {k: over.pop(k) for k in list(over) if k in train_config_keys() and k not in config_keys()}
    cfg = preset(args.preset, **over) if args.preset else read_model_config(args.ckpt).replace(**over)
    with torch.device("meta"):  # shapes only: even gpt2-xl costs no memory
        model = GPT(cfg)
    n = model.num_params()
    head = model.lm_head.weight.numel()  # V x C: the matrix tying saves
    kv_token = kv_bytes_per_token(cfg, 1)  # elements: bytes at one byte each
    if cfg.tie_embeddings:
        counts = [("parameters", f"{n:,} (head tied to the embedding)"),
                  ("parameters, head counted separately", f"{n + head:,}")]
    else:
        counts = [("parameters", f"{n:,} (separate output head)"),
                  ("parameters if the head were tied", f"{n - head:,}")]
    rows = [
        *counts,
        # Both units: "MB" in much writing (and "LLMs from scratch") is bytes / 2^20.
        ("weights fp32", f"{n * 4:,} B = {n * 4 / 1e6:,.2f} MB = {n * 4 / 2**20:,.2f} MiB"),
        ("weights bf16 / int8", f"{_mib(n * 2)} / {_mib(n)}"),
        ("KV cache per token fp32 / bf16", f"{kv_token * 4:,} B / {kv_token * 2:,} B"),
        ("KV cache of one sequence at full context fp32",
         f"{kv_bytes_per_sequence(cfg, cfg.block_size, 4):,} B = "
         f"{_mib(kv_bytes_per_sequence(cfg, cfg.block_size, 4))}{_cache_layout(cfg)}"),
        *_state_rows(cfg, state_bytes_per_sequence),
        ("shape", f"{cfg.n_layer} layers, {cfg.n_head} heads ({cfg.n_kv_head} KV), "
                  f"{cfg.n_embd} dims, head_dim {cfg.head_dim}, context {cfg.block_size}, "
                  f"vocab {cfg.vocab_size}" + _global_heads(cfg)),
        ("style", f"{cfg.pos} positions, {cfg.norm}, {cfg.ffn}"
                  + (", QK-norm" if cfg.qk_norm else "")),
        ("attention", _attention_layout(cfg)),
        *([("latent cache (MLA)", f"kv_lora_rank {cfg.kv_lora_rank} + qk_rope_head_dim "
                                  f"{cfg.qk_rope_head_dim} = {cfg.cache_width()} values per token per layer "
                                  f"(expanded keys and values: {cfg.n_head * (cfg.head_dim + cfg.v_head_dim)})")]
          if cfg.attn_type == "mla" else []),
        ("biases", f"q/k/v {_yn(cfg.qkv_bias)}, attention output {_yn(cfg.attn_bias)}, "
                   f"MLP and norms {_yn(cfg.bias)}"),
        ("dropout", f"embeddings {cfg.emb_dropout}, attention weights {cfg.attn_dropout}, "
                    f"residual {cfg.resid_dropout}"),
    ]
    n_moe = sum(kind != "dense" for kind in cfg.ffn_layers)  # "moe" and Gemma 4's "dense+moe"
    if n_moe:
        rows.append(("experts", f"{cfg.n_expert} per MoE layer ({n_moe} of "
                                f"{cfg.n_layer} layers), top {cfg.n_expert_active}, width "
                                f"{cfg.expert_hidden}{_routing(cfg)}; {active_params(model):,} parameters "
                                "active per token"))
    if args.train:
        rows += _train_memory_rows(cfg, TrainConfig(**train_over), args)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _cache_layout(cfg) -> str:  # noqa: ANN001
    """" (G global layers x N + L local layers x W positions)" when some cached layers are
    local, "; L linear layers hold no positions" when some are linear (or conv), and "; K
    KV-shared layers hold none" when the last layers read earlier ones' keys."""
    kinds = [cfg.attn_layers[i] for i in cfg.cache_layers()]
    local, linear, conv = kinds.count("local"), kinds.count("linear"), kinds.count("conv")
    parts = []
    if local or linear or conv:
        text = f"{len(kinds) - local - linear - conv} global layers x {cfg.block_size:,}"
        if local:
            text += f" + {local} local layers x {min(cfg.sliding_window, cfg.block_size):,} positions"
        parts.append(text)
        for n, kind in ((linear, "linear"), (conv, "conv")):
            if n:
                parts.append(f"{n} {kind} layers hold no positions")
    if cfg.kv_shared_layers:
        parts.append(f"{cfg.kv_shared_layers} KV-shared layers hold none")
    return f" ({'; '.join(parts)})" if parts else ""


def _global_heads(cfg) -> str:  # noqa: ANN001
    """"; global layers: head_dim D, K KV heads" when they differ from the others (Gemma 4)."""
    if (cfg.global_head_dim, cfg.global_n_kv_head) == (cfg.head_dim, cfg.n_kv_head):
        return ""
    return f"; global layers: head_dim {cfg.global_head_dim}, {cfg.global_n_kv_head} KV heads"


def _routing(cfg) -> str:  # noqa: ANN001
    """", sigmoid scores, ..." for DeepSeek-V3 routing and shared experts; "" otherwise."""
    text = ""
    if cfg.router_score == "sigmoid":
        text += ", sigmoid scores" + (f" x {cfg.routed_scale:g}" if cfg.routed_scale != 1 else "")
    if cfg.router_groups > 1:
        text += f", within the best {cfg.router_topk_groups} of {cfg.router_groups} groups"
    if cfg.shared_expert_hidden:
        text += f", a {'gated ' if cfg.shared_expert_gate else ''}shared expert of width {cfg.shared_expert_hidden}"
    return text


def _state_rows(cfg, state_bytes) -> list[tuple[str, str]]:  # noqa: ANN001
    """The fixed state of the linear and conv layers, per sequence (none without them)."""
    counts = [(cfg.attn_layers.count(kind), kind) for kind in ("linear", "conv")]
    if not any(n for n, _ in counts):
        return []
    conv, state = cfg.linear_state_elements()
    layers = " + ".join(f"{n} {kind}" for n, kind in counts if n)
    held = f"{conv:,} conv inputs" + (f" + {state:,} delta-rule state values, the state in fp32"
                                      if state else "")
    return [("fixed state per sequence fp32 / bf16",
             f"{state_bytes(cfg, 4):,} B / {state_bytes(cfg, 2):,} B at any length ({layers} "
             f"layers: {held})")]


def _attention_layout(cfg) -> str:  # noqa: ANN001
    """Which layers are local (sliding window) or linear (gated delta rule), which have no
    RoPE, and the attention gate and partial rotary."""
    local = [i for i, k in enumerate(cfg.attn_layers) if k == "local"]
    linear = [i for i, k in enumerate(cfg.attn_layers) if k == "linear"]
    text = "global in every layer" if not local else \
        f"sliding window {cfg.sliding_window} in {len(local)} of {cfg.n_layer} layers {local}"
    if linear:
        text = (f"gated delta rule in {len(linear)} of {cfg.n_layer} layers {linear} ("
                f"{cfg.linear_k_heads} key / {cfg.linear_v_heads} value heads of {cfg.linear_k_head_dim} / "
                f"{cfg.linear_v_head_dim}, conv {cfg.linear_conv_kernel}), softmax attention in the others")
    conv = [i for i, k in enumerate(cfg.attn_layers) if k == "conv"]
    if conv:
        text = (f"gated short convolution (kernel {cfg.linear_conv_kernel}) in {len(conv)} of "
                f"{cfg.n_layer} layers {conv}, softmax attention in the others")
    if cfg.attn_gate:
        text += "; output gate"
    if cfg.pos == "rope" and cfg.partial_rotary_factor != 1:
        text += f"; RoPE on {cfg.rope_dim} of {cfg.head_dim} channels"
    nope = [i for i, r in enumerate(cfg.rope_layers) if not r]
    if cfg.pos == "rope" and nope:
        text += f"; no RoPE in layers {nope}"
    if cfg.attn_type == "mla":
        text = (f"latent (MLA): q.k over {cfg.qk_nope_head_dim} + {cfg.qk_rope_head_dim} (RoPE) "
                f"channels, values {cfg.v_head_dim}, queries {f'rank {cfg.q_lora_rank}' if cfg.q_lora_rank else 'full rank'}; "
                + text)
    return text


def _train_memory_rows(cfg, train_cfg, args: argparse.Namespace) -> list[tuple[str, str]]:  # noqa: ANN001
    """`info --train`: the estimated memory of one training step, part by part."""
    from .train.memory import estimate

    context = args.context or cfg.block_size
    if context <= 0 or args.lora_rank < 0:
        raise BardlmError(f"--context must be positive and --lora-rank >= 0, got {context} and {args.lora_rank}")
    if args.base_dtype != "fp32" and not args.lora_rank:
        raise BardlmError(f"--base-dtype {args.base_dtype} is a frozen base under LoRA: add --lora-rank R")
    est = estimate(cfg, train_cfg, train_cfg.batch_size, context, args.lora_rank, base_dtype=args.base_dtype)
    what = f"LoRA rank {args.lora_rank} on a {args.base_dtype} base" if args.lora_rank else "full"
    ckpt = f"every {train_cfg.checkpoint_every}" if train_cfg.checkpoint_activations else "off"
    gib = lambda n: f"{n / 2**30:,.2f} GiB"  # noqa: E731
    return [
        ("training step", f"{what}, batch {train_cfg.batch_size} x {context} tokens, {train_cfg.dtype}, "
                          f"optimizer {train_cfg.optimizer}, checkpointing {ckpt}, "
                          f"loss_chunk {train_cfg.loss_chunk or 'off'}"),
        ("  weights", gib(est.weights)),
        ("  gradients", gib(est.grads)),
        ("  optimizer state (+ step temporaries)", f"{gib(est.optimizer)} (+ {gib(est.optimizer_temp)})"),
        ("  activations kept for backward", gib(est.activations)),
        ("  a checkpointed block recomputed in backward", gib(est.recomputed)),
        ("  logits and their gradient (during the loss)", gib(est.logits)),
        ("  head gradient", gib(est.head_grad)),
        ("  runtime (interpreter, libraries)", gib(est.runtime)),
        ("estimated peak, first step", gib(est.first_step)),
        ("estimated peak, later steps", gib(est.later_steps)),
    ]


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


# convert -------------------------------------------------------------------------------------
def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="Hugging Face directory <-> bardlm checkpoint (GPT-2, Llama, Qwen3, Qwen3-MoE, Qwen2-MoE, Mixtral)")
    p.add_argument("src", help="a transformers save_pretrained directory, or a bardlm checkpoint")
    p.add_argument("--out", required=True, help="directory to write (the other format)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")


def cmd_convert(args: argparse.Namespace) -> int:
    from .io.hf import convert

    print(json.dumps(convert(args.src, args.out, args.overwrite)))
    return 0


# export ------------------------------------------------------------------------------------
def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model for other runtimes: GGUF (llama.cpp, Ollama, "
                                      "LM Studio) or a Hugging Face directory")
    p.add_argument("--ckpt", required=True, help="a bardlm run or Hugging Face model directory")
    p.add_argument("--format", required=True, choices=["gguf", "hf"],
                   help="gguf: one .gguf file; hf: a transformers save_pretrained directory")
    p.add_argument("--out", required=True, help="the .gguf file, or the directory for --format hf")
    p.add_argument("--type", choices=["f32", "f16", "q8_0", "q4_0"],
                   help="GGUF weight type (default f16); --format hf keeps the checkpoint's dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "hf":
        from .io.hf import export_hf

        if args.type:
            raise BardlmError("--type applies to --format gguf; --format hf keeps the "
                              "checkpoint's dtype")
        print(json.dumps(export_hf(args.ckpt, args.out, args.overwrite)))
        return 0
    from .io.gguf import export_gguf

    print(json.dumps(export_gguf(args.ckpt, args.out, args.type or "f16", args.overwrite)))
    return 0


# reverse -----------------------------------------------------------------------------------
def add_reverse(sub: argparse._SubParsersAction) -> None:
    # Defaults live in tasks.reverse.ReverseConfig (None here = "use it"), so --help stays fast.
    p = sub.add_parser("reverse", help="the reversal probe: check the causal mask on a toy task")
    p.add_argument("--vocab", type=int, help="symbols V; chance is 1/V (default 16)")
    p.add_argument("--length", type=int, help="symbols per half L (default 12)")
    p.add_argument("--steps", type=int, help="training steps (default 300)")
    p.add_argument("--seed", type=int, help="seeds the weights, training data and held-out set")
    p.add_argument("--batch-size", type=int, help="examples per step (default 64)")
    p.add_argument("--eval-examples", type=int, help="unseen examples scored (default 2000)")
    p.add_argument("--no-causal-mask", action="store_true",
                   help="debug: train this probe's model WITHOUT the causal mask, to see a leak")
    add_device(p)
    p.add_argument("--out", required=True, help="directory for reverse.json and reverse.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_reverse(args: argparse.Namespace) -> int:
    from .lab.reverse import ReverseConfig, format_table, run_reverse

    given = {k: getattr(args, k) for k in
             ("vocab", "length", "steps", "seed", "batch_size", "eval_examples", "device")}
    cfg = ReverseConfig(**{k: v for k, v in given.items() if v is not None},
                        causal=not args.no_causal_mask)
    result = run_reverse(cfg, args.out, progress=not args.no_progress,
                         log=lambda m: print(m, file=sys.stderr))
    print(format_table(result))
    print(f"wrote {Path(args.out) / 'reverse.json'} and {Path(args.out) / 'reverse.png'}")
    return 0


# seq2seq ----------------------------------------------------------------------------------
def add_seq2seq(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("seq2seq", help="train the encoder-decoder Transformer on a synthetic task")
    p.add_argument("--task", required=True, choices=["reverse", "sort", "copy"])
    p.add_argument("--length", type=int, default=16, help="source length (default 16)")
    p.add_argument("--min-length", type=int, help="shortest source (default: --length, all equal)")
    p.add_argument("--vocab", type=int, default=10, help="number of symbols (default 10)")
    p.add_argument("--out", required=True, help="run directory (metrics.jsonl, model, config)")
    p.add_argument("--max-iters", type=int, help="optimizer steps")
    p.add_argument("--n-test", type=int, help="held-out pairs scored at the end (default 1000)")
    p.add_argument("--beam", type=int, help="beam width of the final evaluation (default 4)")
    p.add_argument("--norm", choices=["post", "pre"], help="norm placement (default post, the paper)")
    p.add_argument("--share-embeddings", action="store_true", help="one source/target embedding")
    p.add_argument("--seed", type=int)
    add_device(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model or training field, e.g. --set n_embd=128 --set lr=1e-3")


def cmd_seq2seq(args: argparse.Namespace) -> int:
    import dataclasses

    from .config import field_types, parse_overrides
    from .seq2seq.model import Seq2SeqConfig
    from .seq2seq.tasks import TaskConfig, task_config_keys, train_seq2seq

    model_keys = [f.name for f in dataclasses.fields(Seq2SeqConfig)]
    # Types of the seq2seq dataclasses, not of ModelConfig/TrainConfig (the default), which lack
    # fields such as n_enc_layer and tie_output.
    values = parse_overrides(args.set, model_keys + task_config_keys(),
                             types=field_types(TaskConfig, Seq2SeqConfig))
    task_over = {k: v for k, v in values.items() if k not in model_keys}
    model_over = {k: v for k, v in values.items() if k in model_keys}
    for key in ("task", "length", "min_length", "vocab", "max_iters", "n_test", "beam", "seed", "device"):
        if getattr(args, key) is not None:
            task_over[key] = getattr(args, key)
    if args.norm:
        model_over["norm_placement"] = args.norm
    if args.share_embeddings:
        model_over["share_embeddings"] = True
    cfg = TaskConfig(**task_over)
    _, final = train_seq2seq(cfg, cfg.model_config(**model_over), args.out,
                             log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"out": args.out, **final}))
    return 0


# experiment --------------------------------------------------------------------------------
def add_experiment(sub: argparse._SubParsersAction) -> None:
    from .lab.experiments import EXPERIMENTS

    p = sub.add_parser("experiment", help="run an experiment of docs/concepts.md (figure + JSON)")
    p.add_argument("name", choices=[*EXPERIMENTS, "all"])
    p.add_argument("--out", default="runs/experiments", help="folder for NAME.json and NAME.png")
    p.add_argument("--quick", action="store_true", help="toy budget (seconds): checks it runs")
    p.add_argument("--steps", type=int, help="training steps of each run (default 300)")
    p.add_argument("--seconds", type=float, help="training time of each run of `lstm` (default 60)")
    p.add_argument("--seeds", type=int, help="runs per row, seeds 1337, 1338, ... (default 1; "
                                             "norms, positions, gqa, tying, window, lstm)")
    p.add_argument("--data", help="text file or corpus name (default tiny-shakespeare, shipped "
                                  "with bardlm)")
    add_device(p)


def cmd_experiment(args: argparse.Namespace) -> int:
    from .lab.experiments import EXPERIMENTS, run_experiment

    for name in EXPERIMENTS if args.name == "all" else [args.name]:
        run_experiment(name, args.out, quick=args.quick, data=args.data, device=args.device,
                       steps=args.steps, seconds=args.seconds, seeds=args.seeds,
                       log=lambda m: print(m, file=sys.stderr))
        print(json.dumps({"experiment": name, "json": str(Path(args.out) / f"{name}.json")}))
    return 0


# eval --------------------------------------------------------------------------------------
def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity and bits per byte of a model on a text file")
    p.add_argument("--ckpt", required=True, help="a bardlm run, an INT8 or a Hugging Face model directory")
    p.add_argument("--data", required=True, help="a UTF-8 text file to score")
    p.add_argument("--max-length", type=int, help="window length L in tokens (default: the context)")
    p.add_argument("--stride", type=int, help="tokens between window starts S (default: L)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    add_device(p)
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8", "int4"], help="inference weights (default: as saved)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.perplexity import perplexity
    from .io.load import load
    from .train.data import read_text  # the reader `train --data FILE` uses (.gz included)

    text = read_text(args.data)
    model, tokenizer = load(args.ckpt, args.dtype, args.device)
    result = perplexity(model, tokenizer, text, max_length=args.max_length, stride=args.stride,
                        batch_size=args.batch_size, progress=not args.no_progress).to_dict()
    if args.json:
        print(json.dumps({"ckpt": args.ckpt, "data": args.data, **result}))
        return 0
    print(f"{args.ckpt} on {args.data}: {result['tokens']:,} tokens, {result['bytes']:,} bytes, "
          f"window {result['max_length']} stride {result['stride']} ({result['windows']} windows)")
    print(f"loss {result['loss']:.4f} nats/token   perplexity {result['perplexity']:.3f}   "
          f"bits per byte {result['bits_per_byte']:.4f}")
    return 0


# lm-eval -----------------------------------------------------------------------------------
def add_lm_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on a model (pip install 'bardlm[eval]')")
    p.add_argument("--ckpt", required=True, help="a bardlm run, an INT8 or a Hugging Face model directory")
    p.add_argument("--tasks", required=True, help="comma-separated task names, e.g. hellaswag,lambada_openai")
    p.add_argument("--include-path", help="a folder of your own task YAML files")
    p.add_argument("--limit", type=float, help="at most this many examples per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    add_device(p)
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8", "int4"], help="inference weights (default: as saved)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from .eval.harness import run_harness

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise BardlmError("--tasks is empty; name at least one task")
    if args.limit is not None and args.limit <= 0:
        raise BardlmError(f"--limit must be positive, got {args.limit}")
    if args.include_path and not Path(args.include_path).is_dir():
        raise BardlmError(f"--include-path {args.include_path} is not a folder")
    results = run_harness(args.ckpt, tasks, args.include_path, args.limit, args.batch_size,
                          progress=not args.no_progress, device=args.device, dtype=args.dtype)
    if args.json:
        print(json.dumps({"ckpt": args.ckpt, "results": results}))
        return 0
    for task, metrics in results.items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                print(f"{task:<24} {name:<32} {value:.6g}")
    return 0


# serve -------------------------------------------------------------------------------------
def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model: OpenAI-compatible HTTP API + web playground")
    p.add_argument("--ckpt", required=True, help="a bardlm run, an INT8 or a Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for a free slot; more get 503 (default 16)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests generated together, each in its own KV cache slot (default 8)")
    p.add_argument("--max-context", type=int,
                   help="KV cache positions per slot: prompt + completion at most (default: the "
                        "model's context, or what half the free memory holds, shared by the slots)")
    p.add_argument("--api-key", default=os.environ.get("BARDLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the API (default: $BARDLM_API_KEY)")
    p.add_argument("--allowed-host", action="append", default=[],
                   help="another name clients may reach the server by (Host header); repeatable")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections at most; one more closes the one waiting longest for "
                   "its request, or gets 503 when all are busy (default 256)")
    p.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8", "int4"], default="fp32",
                   help="inference weights, as for generate (int8 checkpoints always run int8)")
    p.add_argument("--model-name", help="model id in the API (default: the checkpoint folder name)")
    add_draft_args(p, server=True)
    add_device(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(args.ckpt, host=args.host, port=args.port, device=args.device, max_queue=args.max_queue,
          model_name=args.model_name, log_level=args.log_level, max_batch=args.max_batch,
          api_key=args.api_key, allowed_hosts=args.allowed_host,
          max_connections=args.max_connections, docs=args.docs, compile=args.compile,
          dtype=args.dtype, max_context=args.max_context, draft=args.draft,
          draft_tokens=args.draft_tokens)
    return 0


# finetune ----------------------------------------------------------------------------------
def add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="supervised finetuning on chat JSONL (full, or LoRA)")
    p.add_argument("--data", required=True, help='JSONL, one {"messages": [{"role", "content"}, ...]} a line')
    add_tuning_args(p)
    p.add_argument("--merge", action="store_true", help="with LoRA: also write base + adapter merged to OUT/merged")


def add_tuning_args(p: argparse.ArgumentParser) -> None:
    """The flags finetune, dpo and rl share: model, output, run length, LoRA, --set, resume."""
    p.add_argument("--init-from", required=True, metavar="DIR",
                   help="the model to tune: a bardlm run or a Hugging Face GPT-2/Llama/Qwen3 folder")
    p.add_argument("--out", required=True, help="run directory (a checkpoint, or with LoRA an adapter)")
    p.add_argument("--max-iters", type=int, help="optimizer steps (default 500)")
    p.add_argument("--seed", type=int)
    add_device(p)
    p.add_argument("--lora-rank", type=int, help="train rank-R adapters instead of every weight")
    p.add_argument("--lora-alpha", type=float, help="adapter scale alpha / rank (default alpha = 2 x rank)")
    p.add_argument("--lora-targets", nargs="+", default=["c_attn", "c_proj", "c_fc"],
                   help="linear layers to adapt (default: c_attn c_proj c_fc)")
    p.add_argument("--base-dtype", choices=["fp32", "int8", "int4"], default=None,
                   help="with --lora-rank: hold the frozen base's linear layers in int8 or int4 "
                        "(QLoRA; int4: groups of 32)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16 autocast or plain fp32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (--no-compile for eager)")
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun: shard the model with FSDP2 instead of DDP (full finetuning)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training field, e.g. --set lr=1e-4 --set batch_size=8")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a bar")


# Finetuning defaults: a smaller step than pretraining, on fewer, shorter sequences.
FINETUNE_DEFAULTS = dict(max_iters=500, lr=1e-4, min_lr=1e-5, warmup_iters=20, batch_size=8,
                         eval_interval=100, weight_decay=0.0, val_fraction=0.1)


def tuning_setup(args: argparse.Namespace, defaults: dict) -> tuple:  # noqa: ANN001
    """(out, TrainConfig, LoRASpec or None, log) of a finetune, dpo or rl command."""
    from .config import TrainConfig, parse_overrides, train_config_keys
    from .io.checkpoint import read_config
    from .train.memory import return_freed_memory
    from .train.sft import LoRASpec
    from .train.trainer import prepare_out

    return_freed_memory()  # before the model is built: freed tensors leave the resident set
    out = Path(args.out)
    prepare_out(out, args.resume, args.overwrite)
    over = parse_overrides(args.set, train_config_keys())
    for key in ("max_iters", "seed", "device", "dtype", "compile", "fsdp"):
        if getattr(args, key) is not None:
            over[key] = getattr(args, key)
    saved = read_config(out).get("train", {}) if args.resume else {}
    cfg = TrainConfig.from_dict({**defaults, **saved, **over})
    lora = None
    if args.lora_rank is not None:
        alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
        lora = LoRASpec(args.lora_rank, alpha, tuple(args.lora_targets), args.base_dtype or "fp32")
    elif getattr(args, "merge", False) or args.lora_alpha is not None or args.base_dtype is not None:
        raise BardlmError("--merge, --lora-alpha and --base-dtype need --lora-rank")
    return out, cfg, lora, lambda m: print(m, file=sys.stderr)


def run_tuner(tuner: Any, lines: list[str]) -> dict | None:
    """Log `lines` and train; under torchrun every rank trains, and rank 0 alone logs and gets
    the final figures (the others get None)."""
    try:
        for line in lines:
            tuner.log(line)
        final = tuner.fit()
    finally:
        tuner.dist.close()
    return final if tuner.dist.is_main else None


def cmd_finetune(args: argparse.Namespace) -> int:
    from .train.sft import Finetuner

    out, cfg, lora, log = tuning_setup(args, FINETUNE_DEFAULTS)
    ft = Finetuner(args.init_from, args.data, out, cfg, lora, log, resume=args.resume,
                   progress=not args.no_progress)
    final = run_tuner(ft, [
        f"{ft.n_train} training and {ft.n_val} held-out conversations; template: {ft.template.kind}",
        f"trainable parameters: {ft.trainable:,} of {ft.total:,} "
        f"({100 * ft.trainable / ft.total:.2f}%); {ft.dist.world} process(es)"])
    if final is None:
        return 0
    if args.merge:
        from .io.adapter import merge_adapter

        final["merged"] = merge_adapter(out, out / "merged", overwrite=True)["out"]  # the run's own
    print(json.dumps({"out": str(out), **final}))
    return 0


# dpo and rl --------------------------------------------------------------------------------
def add_dpo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dpo", help="preference tuning (DPO, IPO) on prompt/chosen/rejected JSONL")
    p.add_argument("--data", required=True,
                   help='JSONL, one {"prompt": [messages], "chosen": [messages], "rejected": [messages]} '
                        "a line (or the three as plain strings)")
    add_tuning_args(p)
    p.add_argument("--beta", type=float, default=0.1, help="strength of the pull to the reference (default 0.1)")
    p.add_argument("--loss", choices=("sigmoid", "ipo", "norm"), default="sigmoid",
                   help="sigmoid (DPO), ipo, or norm (length-normalised, SimPO-style); default sigmoid")
    p.add_argument("--sft-weight", type=float, default=0.0,
                   help="add this weight x the chosen answers' NLL (keeps them likely; default 0)")


DPO_DEFAULTS = dict(FINETUNE_DEFAULTS, max_iters=200, eval_interval=50)


def cmd_dpo(args: argparse.Namespace) -> int:
    from .train.dpo import DPOTuner

    out, cfg, lora, log = tuning_setup(args, DPO_DEFAULTS)
    t = DPOTuner(args.init_from, args.data, out, cfg, lora, log, resume=args.resume,
                 beta=args.beta, loss=args.loss, sft_weight=args.sft_weight, progress=not args.no_progress)
    final = run_tuner(t, [f"{t.n_train} training and {t.n_val} held-out pairs; template: {t.template.kind}"])
    if final is not None:
        print(json.dumps({"out": str(out), **final}))
    return 0


def add_rl(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rl", help="reinforcement learning with a verifiable reward (GRPO)")
    p.add_argument("--task", required=True,
                   help="arithmetic, arithmetic-lsb (answer digits least significant first: 57+68 -> 521), "
                   "reverse, sort, or module.py:function (prompt, completion) -> float")
    p.add_argument("--prompts", help='with module.py:function: JSONL, one {"prompt": "..."} a line')
    p.add_argument("--digits", type=int, default=2, help="built-in tasks: digits of each number, letters of a word")
    add_tuning_args(p)
    p.add_argument("--group", type=int, default=8, help="completions sampled per prompt (default 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest completion (default 16)")
    p.add_argument("--kl", type=float, default=0.0, help="weight of the KL term to the starting model (default 0)")
    p.add_argument("--epsilon", type=float, default=0.2, help="clip range of the ratio (default 0.2)")
    p.add_argument("--n-val", type=int, default=100, help="built-in tasks: held-out prompts (default 100)")


RL_DEFAULTS = dict(FINETUNE_DEFAULTS, max_iters=100, eval_interval=20, batch_size=4, warmup_iters=5)


def cmd_rl(args: argparse.Namespace) -> int:
    from .train.grpo import GRPOTuner

    out, cfg, lora, log = tuning_setup(args, RL_DEFAULTS)
    t = GRPOTuner(args.init_from, args.task, out, cfg, lora, log, resume=args.resume, prompts=args.prompts,
                  digits=args.digits, group=args.group, temperature=args.temperature,
                  max_new_tokens=args.max_new_tokens, kl_coef=args.kl, epsilon=args.epsilon, n_val=args.n_val,
                  progress=not args.no_progress)
    final = run_tuner(t, [f"{t.n_train} training and {t.n_val} held-out prompts; {args.group} completions a prompt"])
    if final is not None:
        print(json.dumps({"out": str(out), **final}))
    return 0


# merge -------------------------------------------------------------------------------------
def add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="base model + LoRA adapter -> one full checkpoint")
    p.add_argument("--adapter", required=True, help="the adapter directory (bardlm finetune --lora-rank)")
    p.add_argument("--base", help="the base model (default: the one the adapter recorded)")
    p.add_argument("--out", required=True, help="directory for the merged checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")


def cmd_merge(args: argparse.Namespace) -> int:
    from .io.adapter import merge_adapter

    print(json.dumps(merge_adapter(args.adapter, args.out, args.base, args.overwrite)))
    return 0


# chat --------------------------------------------------------------------------------------
def add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk with a model (its chat template); /reset, /system TEXT, /exit")
    p.add_argument("--ckpt", required=True, help="a bardlm run, adapter, INT8 or Hugging Face model directory")
    p.add_argument("--system", help="a system message to start with")
    add_sampling_args(p)
    add_device(p)
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8", "int4"], help="inference weights (default: as saved)")


def cmd_chat(args: argparse.Namespace) -> int:
    from .infer.chat import ChatSession
    from .io.load import load
    from .io.metadata import template_for

    model, tokenizer = load(args.ckpt, args.dtype, args.device)
    if tokenizer is None:
        raise BardlmError(f"{args.ckpt} has no tokenizer.json; it cannot turn text into ids")
    kw = sampling_kwargs(args, model.config.vocab_size, model_sampling(args.ckpt, tokenizer))
    session = ChatSession(model, tokenizer, template_for(args.ckpt, tokenizer), args.system,
                          kw.pop("max_new_tokens"), **kw)
    tty = sys.stdin.isatty()

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if tty:
        print("bardlm chat: /reset clears the history, /system TEXT sets the system message, "
              "/exit ends", file=sys.stderr)
    while True:
        if tty:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            session.system = text[len("/system"):].strip() or None
            session.reset()
            print("(system message set; history cleared)", file=sys.stderr)
            continue
        try:
            session.reply(text, on_text=emit)
        except BardlmError as e:
            print(f"bardlm: error: {e}", file=sys.stderr)
        emit("\n")


COMMANDS = {
    "train": (add_train, cmd_train),
    "prepare": (add_prepare, cmd_prepare),
    "generate": (add_generate, cmd_generate),
    "info": (add_info, cmd_info),
    "tokenizer": (add_tokenizer, cmd_tokenizer),
    "quantize": (add_quantize, cmd_quantize),
    "convert": (add_convert, cmd_convert),
    "export": (add_export, cmd_export),
    "reverse": (add_reverse, cmd_reverse),
    "seq2seq": (add_seq2seq, cmd_seq2seq),
    "experiment": (add_experiment, cmd_experiment),
    "eval": (add_eval, cmd_eval),
    "lm-eval": (add_lm_eval, cmd_lm_eval),
    "serve": (add_serve, cmd_serve),
    "finetune": (add_finetune, cmd_finetune),
    "dpo": (add_dpo, cmd_dpo),
    "rl": (add_rl, cmd_rl),
    "merge": (add_merge, cmd_merge),
    "chat": (add_chat, cmd_chat),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bardlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:
            from .infer.device import resolve_device

            args.device = str(resolve_device(args.device))  # one line if this machine lacks it
        return COMMANDS[args.command][1](args)
    except Interrupted as e:  # saved on Ctrl-C or SIGTERM: a note, not an error
        print(f"bardlm: {e}", file=sys.stderr)
        return 130
    except BardlmError as e:
        print(f"bardlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bardlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `bardlm generate ... | head`: the reader has all it wanted
        # Python would complain again when it flushes stdout at exit: point it at devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command its pipe ended
    except OSError as e:  # a folder we may not write, a file we may not read: no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"bardlm: error: {where}{e.strerror or e}; check that the path exists and that "
              "you may read and write it", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
