"""Model metadata: what a model carries besides weights and vocabulary, read and written in one place.

`ModelMeta` holds the facts that make a model prompt, chat and stop as it was trained to:

    bos_id, add_bos   the beginning-of-sequence id, and whether a prompt starts with it
    eos_ids           the ids generation stops at (Llama 3 instruct has several)
    pad_id            the padding id, or None
    tokens            the special tokens by name ("bos_token": "<s>", "eos_token": ..., "pad_token": ...)
    chat_template     the model's chat template (`infer.chat.ChatTemplate`), or None
    generation        generation_config.json's sampling defaults (temperature, top_p, ...)

Every format keeps them in its own files, and every reader and writer goes through this class:

* a Hugging Face directory: tokenizer_config.json (token names, add_bos_token, chat_template),
  chat_template.jinja, generation_config.json (ids and defaults) and config.json (ids);
  `from_hf_dir` reads them as `transformers` does, `tokenizer_config` / `generation_config`
  write them back;
* a bardlm checkpoint's config.json: "special_tokens", "chat_template" and "generation_config"
  entries (`to_checkpoint` / `from_checkpoint`);
* a GGUF file: `tokenizer.ggml.*_token_id` and `tokenizer.chat_template` (`io.gguf`).

So HF -> bardlm -> int8 -> HF / GGUF keeps them all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BardlmError
from ..infer.chat import HF_SPECIAL_KEYS, ChatTemplate, builtin_template
from ..tokenizers import HFTokenizer

CONFIG_FILE = "config.json"  # a bardlm checkpoint's and a HF directory's config alike
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # token names, add_bos_token, chat_template
GENERATION_CONFIG_FILE = "generation_config.json"  # the ids generation stops at, sampling defaults
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer HF directories keep the template
ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# transformers' GenerationConfig defaults of the sampler fields bardlm has (min_p: off).
SAMPLING_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None,
                                     "repetition_penalty": 1.0}
# generation_config.json keys that are bookkeeping (or ids, kept apart), not sampling defaults.
NOT_DEFAULTS = ("transformers_version", "_from_model_config", *ID_KEYS)


def _optional_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BardlmError(f"{path} is not valid JSON ({e}); fix it or delete it") from None
    if not isinstance(data, dict):
        raise BardlmError(f"{path} holds a JSON {type(data).__name__}, not an object; fix it or delete it")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: "<s>", {"content": "<s>", ...} or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_ids(value: Any, where: str) -> list[int]:
    """A bos/eos_token_id field: an int, a list of ints (Llama 3 instruct) or null."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise BardlmError(f"{where}: token ids must be integers or a list of them, got {value!r}")
    return values


def _prefix_bos(tokenizer: HFTokenizer) -> int | None:
    """The BOS the tokenizer.json post-processor itself puts before every text (Llama 3), or None."""
    prefix = tokenizer.template_prefix()
    return prefix[0] if len(prefix) == 1 else None


def hf_special_tokens(src: Path, tokenizer: HFTokenizer) -> dict[str, Any]:
    """bos_id, add_bos, eos_ids and pad_id for the tokenizer of HF directory `src`, decided as
    `transformers` does:

    * BOS is tokenizer_config.json's `bos_token`, else the `bos_token_id` of
      generation_config.json or config.json.
    * add_bos is tokenizer_config.json's `add_bos_token` when it says (Llama 1/2); else whether
      tokenizer.json's post-processor starts every text with one token (Llama 3's template adds
      <|begin_of_text|>). Qwen and GPT-2 have neither, so no BOS.
    * EOS ids are generation_config.json's `eos_token_id` (what `generate` stops at), else
      config.json's, plus tokenizer_config.json's `eos_token`.
    * PAD is tokenizer_config.json's `pad_token`, else the files' `pad_token_id`.
    """
    tok_cfg = _optional_json(src / TOKENIZER_CONFIG_FILE)
    id_files = [(_optional_json(src / name), name) for name in (GENERATION_CONFIG_FILE, CONFIG_FILE)]

    def named(key: str) -> int | None:  # the id of tokenizer_config's bos_token / eos_token
        text = _token_text(tok_cfg.get(key))
        return None if text is None else tokenizer.token_id(text)

    def first_ids(key: str) -> list[int]:  # generation_config.json wins over config.json
        for cfg, name in id_files:
            if cfg.get(key) is not None:
                return _token_ids(cfg[key], f"{src / name} {key}")
        return []

    bos_id = named("bos_token")
    if bos_id is None and first_ids("bos_token_id"):
        bos_id = first_ids("bos_token_id")[0]
    add_bos = tok_cfg.get("add_bos_token")
    if add_bos is None:
        prefix = _prefix_bos(tokenizer)
        add_bos = prefix is not None
        bos_id = prefix if add_bos else bos_id
    elif add_bos and bos_id is None:
        raise BardlmError(
            f"{src / TOKENIZER_CONFIG_FILE} sets add_bos_token but its bos_token "
            f"{_token_text(tok_cfg.get('bos_token'))!r} is not in the vocabulary; fix bos_token"
        )
    eos_ids = first_ids("eos_token_id")
    eos = named("eos_token")  # an eos_token missing from the vocabulary is never generated
    pad_id = named("pad_token")
    if pad_id is None and first_ids("pad_token_id"):
        pad_id = first_ids("pad_token_id")[0]
    return {"bos_id": bos_id, "add_bos": bool(add_bos), "pad_id": pad_id,
            "eos_ids": tuple(dict.fromkeys(eos_ids + ([] if eos is None else [eos])))}


def hf_chat_template(src: Path) -> ChatTemplate | None:
    """The chat template of a Hugging Face directory (tokenizer_config.json's `chat_template`,
    or chat_template.jinja), with its special tokens as variables; None when it has none."""
    cfg = _optional_json(src / TOKENIZER_CONFIG_FILE)
    source = cfg.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if source is None and (src / CHAT_TEMPLATE_FILE).is_file():
        source = (src / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if not isinstance(source, str):
        return None
    variables = {k: _token_text(cfg[k]) for k in HF_SPECIAL_KEYS if _token_text(cfg.get(k)) is not None}
    return ChatTemplate(source, variables.get("eos_token", ""), "hf", variables)


@dataclass
class ModelMeta:
    """A model's special ids, special tokens, chat template and generation defaults (see the
    module docstring). The empty default is a model that knows none of them."""

    bos_id: int | None = None
    add_bos: bool = False
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    tokens: dict[str, str] = field(default_factory=dict)  # HF_SPECIAL_KEYS name -> token text
    chat_template: ChatTemplate | None = None
    generation: dict[str, Any] = field(default_factory=dict)

    # Readers ----------------------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, src: str | Path, tokenizer: Any) -> ModelMeta:
        """What a Hugging Face directory says (ids only when its tokenizer is a tokenizer.json)."""
        src = Path(src)
        tok_cfg = _optional_json(src / TOKENIZER_CONFIG_FILE)
        gen = _optional_json(src / GENERATION_CONFIG_FILE)
        ids = hf_special_tokens(src, tokenizer) if isinstance(tokenizer, HFTokenizer) else {}
        tokens = {k: _token_text(tok_cfg[k]) for k in HF_SPECIAL_KEYS if _token_text(tok_cfg.get(k))}
        return cls(ids.get("bos_id"), bool(ids.get("add_bos")), tuple(ids.get("eos_ids", ())),
                   ids.get("pad_id"), tokens, hf_chat_template(src),
                   {k: v for k, v in gen.items() if k not in NOT_DEFAULTS})

    @classmethod
    def from_checkpoint(cls, meta: dict[str, Any]) -> ModelMeta:
        """What a bardlm checkpoint's config.json dict says (see `to_checkpoint`)."""
        s = meta.get("special_tokens") or {}
        template = meta.get("chat_template")
        return cls(s.get("bos_id"), bool(s.get("add_bos")), tuple(s.get("eos_ids") or ()),
                   s.get("pad_id"), dict(s.get("tokens") or {}),
                   ChatTemplate.from_dict(template) if isinstance(template, dict) else None,
                   dict(meta.get("generation_config") or {}))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ModelMeta:
        """The BOS/EOS a loaded tokenizer knows (nothing else): for a model saved without a
        source directory to read."""
        return cls(getattr(tokenizer, "bos_id", None), bool(getattr(tokenizer, "add_bos", False)),
                   tuple(getattr(tokenizer, "eos_ids", ()) or ()))

    # Writers ----------------------------------------------------------------------------------
    def apply(self, tokenizer: Any) -> None:
        """Give a loaded Hugging Face tokenizer these BOS/EOS facts (others have no such ids)."""
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.set_special_tokens(self.bos_id, self.add_bos, self.eos_ids)

    def to_checkpoint(self) -> dict[str, Any]:
        """The entries of a bardlm checkpoint's config.json that hold this metadata."""
        out: dict[str, Any] = {}
        if self.bos_id is not None or self.eos_ids or self.pad_id is not None or self.tokens:
            out["special_tokens"] = {"bos_id": self.bos_id, "add_bos": self.add_bos,
                                     "eos_ids": list(self.eos_ids), "pad_id": self.pad_id,
                                     "tokens": dict(self.tokens)}
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template.to_dict()
        if self.generation:
            out["generation_config"] = dict(self.generation)
        return out

    def stop_ids(self, tokenizer: Any) -> tuple[int, ...]:
        """Every id generation ends at: the EOS ids, then the chat template's end-of-turn token
        (a bardlm finetune's <|end|>, which no tokenizer_config names)."""
        turn = self.chat_template.stop_ids(tokenizer) if self.chat_template and tokenizer else ()
        return tuple(dict.fromkeys((*self.eos_ids, *turn)))

    def token_names(self, tokenizer: Any) -> dict[str, str]:
        """Special tokens by name: the stored names, else the vocabulary strings of the ids."""
        names = dict(self.tokens)
        token = getattr(tokenizer, "token", None)
        stops = self.stop_ids(tokenizer)
        for key, i in (("bos_token", self.bos_id), ("eos_token", stops[0] if stops else None),
                       ("pad_token", self.pad_id)):
            text = token(i) if token is not None and i is not None else None
            if key not in names and text is not None:
                names[key] = text
        return names

    def tokenizer_config(self, tokenizer: Any) -> dict[str, Any]:
        """tokenizer_config.json for a directory with this tokenizer: what `transformers` needs
        to load it (for a tokenizer.json), the special tokens and the chat template."""
        out: dict[str, Any] = {}
        if isinstance(tokenizer, HFTokenizer) and tokenizer.kind == "hf":
            out["tokenizer_class"] = "PreTrainedTokenizerFast"
        out.update(self.token_names(tokenizer))
        # Said only where the tokenizer.json post-processor alone would do otherwise: saying it
        # makes transformers replace that post-processor.
        if isinstance(tokenizer, HFTokenizer) and (_prefix_bos(tokenizer) is not None) != self.add_bos:
            out["add_bos_token"] = self.add_bos
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template.source
        return out

    def sampling_defaults(self) -> dict[str, Any]:
        """The sampler settings the model's authors chose (generation_config.json), read as
        `transformers`' `generate` reads them: without `do_sample: true` decoding is greedy
        (temperature 0); with it, an unset field takes transformers' default (temperature 1,
        top_k 50, top_p 1). {} when the file sets no sampling field: then bardlm's own defaults.
        Flags (`--temperature`, ...) and request fields override each value."""
        g = self.generation
        if not any(k in g for k in ("do_sample", *SAMPLING_DEFAULTS)):
            return {}
        penalty = g.get("repetition_penalty") or 1.0
        if not g.get("do_sample"):
            return {"temperature": 0.0, "repetition_penalty": penalty}
        out = {k: g[k] if g.get(k) is not None else v for k, v in SAMPLING_DEFAULTS.items()}
        out["repetition_penalty"] = penalty
        if not out["top_k"]:  # 0 turns it off in transformers; None does here
            out["top_k"] = None
        return out

    def generation_config(self, tokenizer: Any = None) -> dict[str, Any]:
        """generation_config.json: the defaults and the ids (`transformers`' `generate` stops at
        eos_token_id, an int or a list)."""
        out = dict(self.generation)
        stops = self.stop_ids(tokenizer)
        for key, value in (("bos_token_id", self.bos_id), ("pad_token_id", self.pad_id),
                           ("eos_token_id", stops[0] if len(stops) == 1 else list(stops) or None)):
            if value is not None:
                out[key] = value
        return out

    def hf_files(self, tokenizer: Any) -> dict[str, dict[str, Any]]:
        """{file name: JSON} of the metadata files of a Hugging Face directory (none empty)."""
        files = {TOKENIZER_CONFIG_FILE: self.tokenizer_config(tokenizer),
                 GENERATION_CONFIG_FILE: self.generation_config(tokenizer)}
        return {name: data for name, data in files.items() if data}


def template_for(path: str | Path, tokenizer: Any) -> ChatTemplate:
    """The chat template of a model directory: the one its metadata holds (a bardlm finetune's
    or converted checkpoint's config.json, a Hugging Face directory's own), else the built-in
    one for its tokenizer."""
    path = Path(path)
    cfg = _optional_json(path / CONFIG_FILE)
    meta = ModelMeta.from_checkpoint(cfg) if "model" in cfg else ModelMeta.from_hf_dir(path, None)
    return meta.chat_template or builtin_template(tokenizer)


__all__ = ["ModelMeta", "hf_chat_template", "hf_special_tokens", "template_for"]
