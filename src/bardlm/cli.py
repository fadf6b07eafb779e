"""The `bardlm` command line: argument parsing only; every command calls the library.

Each subcommand is a pair: `add_X(subparsers)` declares its arguments, `cmd_X(args)` runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import BardlmError


# train -------------------------------------------------------------------------------------
def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on a text corpus")
    p.add_argument("--preset", default="char-tiny", help="model shape and budget (default char-tiny)")
    p.add_argument("--data", help="a text file, or a corpus name: shakespeare (default), tiny-shakespeare")
    p.add_argument("--tokenizer", default="char", help="char, word, word:MIN_COUNT, bpe:VOCAB, or a tokenizer.json")
    p.add_argument("--out", required=True, help="run directory (checkpoint, metrics.jsonl, loss.png)")
    p.add_argument("--max-iters", type=int, help="number of optimizer steps")
    p.add_argument("--seed", type=int, help="random seed (data order, init, dropout)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16 autocast or plain fp32")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model or training field, e.g. --set n_layer=6 --set lr=3e-4")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a bar")


def _split_overrides(pairs: list[str]) -> tuple[dict, dict]:
    from .config import config_keys, parse_overrides
    from .train import train_config_keys

    values = parse_overrides(pairs, config_keys() + train_config_keys())
    model_keys = set(config_keys())
    return ({k: v for k, v in values.items() if k in model_keys},
            {k: v for k, v in values.items() if k not in model_keys})


def cmd_train(args: argparse.Namespace) -> int:
    from .config import ModelConfig, preset
    from .data import load_corpus
    from .tokenizers import build
    from .tokenizers import load as load_tokenizer
    from .train import TRAIN_PRESETS, TrainConfig, Trainer, prepare_out

    out = Path(args.out)
    prepare_out(out, args.resume, args.overwrite)
    model_over, train_over = _split_overrides(args.set)
    for key in ("max_iters", "seed", "device", "dtype"):
        if getattr(args, key) is not None:
            train_over[key] = getattr(args, key)
    if args.resume:
        from .checkpoint import read_config

        meta = read_config(out)
        model_cfg = ModelConfig.from_dict({**meta["model"], **model_over})
        train_cfg = TrainConfig(**{**meta["train"], **train_over})
        text, path = load_corpus(args.data or meta.get("data"))
        tokenizer = load_tokenizer(out / "tokenizer.json")
        name = meta.get("preset", args.preset)
    else:
        name = args.preset
        model_cfg = preset(name, **model_over)
        train_cfg = TrainConfig(**{**TRAIN_PRESETS.get(name, {}), **train_over})
        text, path = load_corpus(args.data)
        tokenizer = build(args.tokenizer, text)
    print(f"data: {path} ({len(text):,} characters); tokenizer: {tokenizer.kind} "
          f"({tokenizer.vocab_size:,} tokens)", file=sys.stderr)
    trainer = Trainer(model_cfg, train_cfg, tokenizer, text, out, progress=not args.no_progress,
                      log=lambda m: print(m, file=sys.stderr),
                      meta={"preset": name, "data": str(path)})
    if args.resume:
        trainer.resume()
    print(f"model: {trainer.model.num_params():,} parameters; {train_cfg.max_iters} steps of "
          f"{train_cfg.batch_size} x {model_cfg.block_size} tokens", file=sys.stderr)
    final = trainer.fit()
    print(json.dumps({"out": str(out), **final}))
    return 0


# generate ----------------------------------------------------------------------------------
def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-cache", action="store_true", help="re-read the whole context each step")


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model")
    p.add_argument("--ckpt", required=True, help="checkpoint directory")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    add_sampling_args(p)
    p.add_argument("--device", default="cpu")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        seed=args.seed, use_cache=not args.no_cache, stop=args.stop,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .generate import generate_text

    model, tokenizer, _ = load_checkpoint(args.ckpt, args.device)
    if tokenizer is None:
        raise BardlmError(f"{args.ckpt} has no tokenizer.json; it cannot turn text into ids")

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    emit(args.prompt)
    generate_text(model, tokenizer, args.prompt, on_text=emit, **sampling_kwargs(args))
    emit("\n")
    return 0


# info --------------------------------------------------------------------------------------
def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, weight memory and KV-cache size of a model")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset")
    g.add_argument("--ckpt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .config import ModelConfig, parse_overrides, preset
    from .model import GPT

    over = parse_overrides(args.set)
    if args.preset:
        cfg = preset(args.preset, **over)
    else:
        from .checkpoint import read_config

        cfg = ModelConfig.from_dict({**read_config(args.ckpt)["model"], **over})
    with torch.device("meta"):  # shapes only: even gpt2-xl costs no memory
        model = GPT(cfg)
    n = model.num_params()
    n_head_sep = model.num_params(count_tied_head_twice=True)
    kv_token = 2 * cfg.n_layer * cfg.kv_heads * cfg.dim_head
    rows = [
        ("parameters", f"{n:,}" + (" (head tied to the embedding)" if cfg.tie_embeddings else "")),
        ("parameters, head counted separately", f"{n_head_sep:,}"),
        ("weights fp32 / bf16 / int8", f"{_mib(n * 4)} / {_mib(n * 2)} / {_mib(n)}"),
        ("KV cache per token fp32 / bf16", f"{kv_token * 4:,} B / {kv_token * 2:,} B"),
        ("KV cache at full context fp32", _mib(kv_token * 4 * cfg.block_size)),
        ("shape", f"{cfg.n_layer} layers, {cfg.n_head} heads ({cfg.kv_heads} KV), "
                  f"{cfg.n_embd} dims, head_dim {cfg.dim_head}, context {cfg.block_size}, "
                  f"vocab {cfg.vocab_size}"),
        ("style", f"{cfg.pos} positions, {cfg.norm}, {cfg.ffn}"
                  + (", QK-norm" if cfg.qk_norm else "")),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


# serve -------------------------------------------------------------------------------------
def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model: OpenAI-compatible HTTP API + web playground")
    p.add_argument("--ckpt", required=True, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait behind the running one; more get 503 (default 16)")
    p.add_argument("--model-name", help="model id in the API (default: the checkpoint folder name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(args.ckpt, host=args.host, port=args.port, device=args.device, max_queue=args.max_queue,
          model_name=args.model_name, log_level=args.log_level)
    return 0


COMMANDS = {
    "train": (add_train, cmd_train),
    "generate": (add_generate, cmd_generate),
    "info": (add_info, cmd_info),
    "serve": (add_serve, cmd_serve),
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
        return COMMANDS[args.command][1](args)
    except BardlmError as e:
        print(f"bardlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bardlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
