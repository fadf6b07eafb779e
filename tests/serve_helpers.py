"""Shared pieces of the server tests: a tiny checkpoint, a server in a thread, a reference greedy loop."""

from __future__ import annotations

import string
import threading
import time
from pathlib import Path

import torch

from bardlm import GPT, ModelConfig
from bardlm.io.checkpoint import save_checkpoint
from bardlm.tokenizers import CharTokenizer

# Enough characters for ordinary English prompts; no corpus needed.
CHARS = sorted(set(string.ascii_letters + string.digits + " .,:;!?'-\n"))


def make_checkpoint(out: Path, block_size: int = 96) -> Path:
    """A 2-layer char model with random weights, scaled up so greedy output is varied, not ':::'."""
    tok = CharTokenizer(CHARS)
    torch.manual_seed(1234)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2,
                      n_embd=32, bias=False)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return save_checkpoint(out, model, tok)


def reference_greedy(model: torch.nn.Module, tok: CharTokenizer, prompt: str, n: int) -> str:
    """Greedy continuation by re-reading the whole sequence each step: no cache, no generate.py."""
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(ids)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tok.decode(ids[0, -n:].tolist())


class ThreadServer:
    """uvicorn serving an app on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app, config=None) -> None:  # noqa: ANN001
        import uvicorn

        from bardlm.serve import bind

        self.app = app
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(config or uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


def wait_until(predicate, timeout: float = 10.0, every: float = 0.02) -> bool:  # noqa: ANN001
    """Poll `predicate` until it is true or `timeout` seconds pass (a bounded loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()
