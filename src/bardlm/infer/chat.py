"""Chat templates: a conversation (a list of {"role", "content"} messages) <-> the text a model reads.

Two sources of templates:

* a Hugging Face checkpoint's own `chat_template` (tokenizer_config.json, or chat_template.jinja;
  `bardlm.io.metadata.template_for` finds a model directory's template), rendered with Jinja2 the way `transformers`' `apply_chat_template` renders it: a sandboxed
  environment with trim_blocks and lstrip_blocks, its `tojson` (no HTML escaping),
  `raise_exception`, `strftime_now` and a `{% generation %}` tag, and the tokenizer's special
  tokens (bos_token, eos_token, ...) as variables. Text is tokenized without adding any special
  token: the template writes the ones it wants.
* the built-in templates of models trained with bardlm (documented in
  docs/readme-sections/finetune.md):

      SPECIAL (BPE and other Hugging Face tokenizers; four special tokens are added)
          <|system|>\\nYou are terse.<|end|>\\n<|user|>\\nhi<|end|>\\n<|assistant|>\\nhello<|end|>\\n
      PLAIN (char and word tokenizers: role markers in plain text, like a play's script)
          SYSTEM:\\nYou are terse.\\n\\nUSER:\\nhi\\n\\nASSISTANT:\\nhello\\n\\n

  A turn ends with `end` (<|end|>, or a blank line): generation stops there.

What the model learns from (`encode_chat`) is the rendered text with, per token, whether an
assistant wrote it: an assistant turn is what rendering it adds after the generation prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..errors import BardlmError

ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m.role | upper }}:\n{{ m.content }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)
# What the plain template's markers are made of: a char or word vocabulary gains what it lacks.
PLAIN_PIECES = ("SYSTEM", "USER", "ASSISTANT", ":\n", "\n\n")
# Special tokens of a tokenizer_config.json that transformers passes to every template.
HF_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                   "mask_token")


def compile_template(source: str) -> Any:
    """A Jinja2 template compiled as transformers compiles chat templates (same settings)."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise BardlmError("chat templates need jinja2; pip install 'bardlm[chat]'") from None

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text; it renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes <, >, & for HTML; chat templates want the JSON as is.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise BardlmError(f"the chat template does not compile (line {e.lineno}: {e.message})") from None


@dataclass
class ChatTemplate:
    """A chat template: Jinja source, the text that ends a turn, and the template's variables."""

    source: str
    end: str  # the end of a turn: a stop string for generation ("<|end|>", "<|im_end|>", "\n\n")
    kind: str = "hf"  # "special", "plain" (built in) or "hf" (a checkpoint's own)
    variables: dict[str, Any] = field(default_factory=dict)  # bos_token, eos_token, ...

    def __post_init__(self) -> None:
        self._template: Any = None

    @property
    def _compiled(self) -> Any:
        """The compiled template, on first use: a model's metadata travels through conversions
        as text, so converting never needs jinja2."""
        if self._template is None:
            self._template = compile_template(self.source)
        return self._template

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The conversation as text; with `add_generation_prompt`, followed by the opening of
        the assistant's turn (what a model continues from)."""
        import jinja2

        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.variables)
        except jinja2.exceptions.TemplateError as e:
            raise BardlmError(f"the chat template failed on this conversation: {e}") from None

    def assistant_spans(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, [start, end) character spans of each assistant turn).

        A turn's span is what rendering it adds to the rendering of the conversation before it
        with the generation prompt: the reply and its end-of-turn marker, never the role header.
        """
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise BardlmError(
                    "the chat template does not render a conversation as a growing prefix (a "
                    "later turn changes how an earlier one is written); bardlm cannot tell the "
                    "assistant's tokens apart with it: finetune with the built-in template")
            spans.append((len(before), len(upto)))
        return full, spans

    def stop_ids(self, tokenizer: Any) -> tuple[int, ...]:
        """The id of the end-of-turn marker when it is one token (a special token), else ()."""
        token_id = getattr(tokenizer, "token_id", None)
        i = token_id(self.end) if token_id is not None else None
        return () if i is None else (i,)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "end": self.end, "kind": self.kind, "variables": self.variables}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatTemplate:
        return cls(data["source"], data["end"], data.get("kind", "hf"), dict(data.get("variables") or {}))


def builtin_template(tokenizer: Any) -> ChatTemplate:
    """The built-in template for a tokenizer: SPECIAL for BPE/HF tokenizers, PLAIN for char/word."""
    kind = getattr(tokenizer, "kind", None)
    if kind in ("char", "word"):
        return ChatTemplate(PLAIN_TEMPLATE, "\n\n", "plain")
    if hasattr(tokenizer, "hf"):
        return ChatTemplate(SPECIAL_TEMPLATE, "<|end|>", "special")
    raise BardlmError(f"no built-in chat template for a {kind!r} tokenizer; use char, word or BPE")


def prepare_vocab(template: ChatTemplate, tokenizer: Any) -> tuple[Any, int]:
    """(tokenizer that can write the template's markers, how many tokens it gained).

    SPECIAL adds its four tokens as special tokens of the BPE; PLAIN adds the characters (char)
    or marker words (word) the vocabulary lacks. New ids come after the old ones, so a model
    only gains embedding rows (`train.sft.resize_vocab`).
    """
    if template.kind == "special":
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_id(t) is None]
        if missing:
            from tokenizers import AddedToken

            before = tokenizer.vocab_size
            tokenizer.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
            tokenizer._chunked = False  # added tokens: encode in one piece
            return tokenizer, tokenizer.vocab_size - before
        return tokenizer, 0
    if template.kind == "plain":
        from ..tokenizers import CharTokenizer, WordTokenizer

        if isinstance(tokenizer, CharTokenizer):
            new = [c for c in dict.fromkeys("".join(PLAIN_PIECES)) if c not in tokenizer.stoi]
            return (CharTokenizer(tokenizer.chars + new), len(new)) if new else (tokenizer, 0)
        if isinstance(tokenizer, WordTokenizer):
            new = [w for w in PLAIN_PIECES if w not in tokenizer.stoi]
            return (WordTokenizer(tokenizer.words + new), len(new)) if new else (tokenizer, 0)
    return tokenizer, 0


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """A conversation as plain dicts, or a one-line error naming what is wrong and where."""
    if not isinstance(messages, list) or not messages:
        raise BardlmError(f"{where}: 'messages' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise BardlmError(f"{where}: message {i} must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise BardlmError(f"{where}: message {i} has role {m.get('role')!r}; use one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Text -> ids, failing on text the vocabulary cannot write (never a silent <unk>)."""
    try:
        return list(tokenizer.encode(text, strict=True))
    except TypeError:  # tokenizers without a strict mode cover every string
        return list(tokenizer.encode(text))


def _offsets(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """(ids, start character of each token) of text."""
    if hasattr(tokenizer, "hf"):  # Hugging Face tokenizers report offsets themselves
        enc = tokenizer.hf.encode(text, add_special_tokens=False)
        return list(enc.ids), [s for s, _ in enc.offsets]
    ids = _encode(tokenizer, text)
    starts, pos = [], 0
    for i in ids:  # char and word tokens decode to their own text, end to end
        starts.append(pos)
        pos += len(tokenizer.decode([i]))
    return ids, starts


def encode_chat(template: ChatTemplate, tokenizer: Any, messages: list[dict[str, Any]],
                skip_turns: int = 0) -> tuple[list[int], list[bool]]:
    """(ids of the rendered conversation, per id: was it written by the assistant?).
    skip_turns: the first assistant turns that count as not written (a preference pair's
    prompt may hold earlier answers: only the completion after it is the model's)."""
    text, spans = template.assistant_spans(messages)
    spans = spans[skip_turns:]
    ids, starts = _offsets(tokenizer, text)
    mine = [any(a <= s < b for a, b in spans) for s in starts]
    return ids, mine


def prompt_ids(template: ChatTemplate, tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Ids of the conversation followed by the generation prompt: what the model continues."""
    return _encode(tokenizer, template.render(messages, add_generation_prompt=True))


class ChatSession:
    """A conversation with a model: history, a system message, replies streamed as text.

    The oldest turns are dropped when the history no longer leaves the reply room in the
    context (the system message stays); a reply is cut where the context ends.
    """

    def __init__(self, model: Any, tokenizer: Any, template: ChatTemplate,
                 system: str | None = None, max_new_tokens: int = 200, **sampling: Any) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.system, self.max_new_tokens = system, max_new_tokens
        self.stop = [*(sampling.pop("stop", None) or []), template.end]  # user stops + end of turn
        self.sampling = sampling
        self.history: list[dict[str, str]] = []

    def reset(self) -> None:
        self.history = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """The assistant's answer to `text`, streamed to `on_text`; both join the history."""
        from .budget import context_window
        from .generate import generate_text

        ctx = context_window(self.model.config, self.sampling.get("max_context"))
        alone = prompt_ids(self.template, self.tokenizer, self.messages()[: bool(self.system)]
                           + [{"role": "user", "content": text}])
        if len(alone) >= ctx:  # refused before any history is dropped
            raise BardlmError(f"the message is {len(alone)} tokens with the chat template and the "
                              f"model's context is {ctx}; send a shorter message")
        self.history.append({"role": "user", "content": text})
        ids = prompt_ids(self.template, self.tokenizer, self.messages())
        # Old turns go while they crowd the reply out of the context: it keeps room for
        # max_new_tokens, or for half the context when that is smaller (a 64-token model).
        want = min(self.max_new_tokens, max(1, ctx // 2))
        while len(ids) > ctx - want and len(self.history) > 1:
            self.history = self.history[2:] if len(self.history) > 2 else self.history[1:]
            ids = prompt_ids(self.template, self.tokenizer, self.messages())
        new_tokens = min(self.max_new_tokens, ctx - len(ids))  # the reply ends where the context does
        answer = generate_text(self.model, self.tokenizer, "", max_new_tokens=new_tokens,
                               stop=self.stop, on_text=on_text, prompt_ids=ids,
                               eos_ids=self.template.stop_ids(self.tokenizer), **self.sampling)
        self.history.append({"role": "assistant", "content": answer})
        return answer
