"""Load test: `bardlm serve` in its own process takes 50 concurrent requests, several times over.

Every request either completes with the right (greedy) text or gets a clean 503; the server
stays up, its queue drains, and its resident memory comes back to the level it had before.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi: pip install 'bardlm[serve]'")
pytest.importorskip("uvicorn", reason="the server needs uvicorn: pip install 'bardlm[serve]'")
openai = pytest.importorskip("openai", reason="these tests drive the server with the openai client")
httpx = pytest.importorskip("httpx")

from serve_helpers import make_checkpoint, reference_greedy, wait_until  # noqa: E402

from bardlm.io.checkpoint import load_checkpoint  # noqa: E402

N_REQUESTS = 50
MAX_QUEUE = 8
MAX_TOKENS = 24
PROMPTS = ["ROMEO:", "To be", "Hello there", "What, ho!", "Once upon", "abc", "The king",
           "JULIET: O", "1 2 3", "Now is the"]
RSS_SLACK_MIB = 24  # allocator noise; a per-request leak of the KV cache alone would exceed it


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line")


class ServerProcess:
    """`python -m bardlm serve --port 0 ...` as a child process; reads its port from stderr."""

    def __init__(self, ckpt: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bardlm", "serve", "--ckpt", str(ckpt), "--port", "0",
             "--max-queue", str(MAX_QUEUE), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()  # a full pipe would block it
        self.base_url = self._wait_for_url(timeout=120)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)

    def _wait_for_url(self, timeout: float) -> str:
        try:
            while True:
                line = self.lines.get(timeout=timeout)
                if m := re.search(r"at (http://[\d.]+:\d+)/v1", line):
                    return m.group(1)
        except queue.Empty:
            self.stop()
            raise RuntimeError("bardlm serve did not start:\n" + "".join(self.log)) from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: a graceful shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


async def one_request(client, i: int) -> tuple[int, str | None, dict | None]:  # noqa: ANN001
    """(status, text, error body) of request i; even i stream, odd i do not."""
    prompt = PROMPTS[i % len(PROMPTS)]
    kw = dict(model="tiny-load", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    try:
        if i % 2:
            r = await client.completions.create(**kw)
            return 200, r.choices[0].text, None
        stream = await client.completions.create(**kw, stream=True)
        return 200, "".join([c.choices[0].text async for c in stream]), None
    except openai.APIStatusError as e:
        return e.status_code, None, e.body


async def burst(base_url: str) -> list[tuple[int, str | None, dict | None]]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0,
                                  timeout=120) as client:
        return await asyncio.gather(*(one_request(client, i) for i in range(N_REQUESTS)))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads memory from /proc (Linux)")
def test_fifty_concurrent_requests(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "tiny-load")
    model, tok, _ = load_checkpoint(ckpt)
    expected = {p: reference_greedy(model, tok, p, MAX_TOKENS) for p in PROMPTS}
    server = ServerProcess(ckpt)
    try:
        base, pid = server.base_url, server.proc.pid

        def health() -> dict:
            return httpx.get(f"{base}/health", timeout=10).json()

        asyncio.run(burst(base))  # warm-up: first-use allocations are not a leak
        assert wait_until(lambda: health()["running"] + health()["queued"] == 0)
        baseline = rss_mib(pid)
        peaks = []
        for _ in range(2):
            results = asyncio.run(burst(base))
            ok = [(i, text) for i, (status, text, _) in enumerate(results) if status == 200]
            busy = [body for status, _, body in results if status == 503]
            assert len(ok) + len(busy) == N_REQUESTS, [s for s, _, _ in results]
            assert len(ok) >= 1 + MAX_QUEUE  # the first arrivals always fit in the queue
            for i, text in ok:
                assert text == expected[PROMPTS[i % len(PROMPTS)]], i
            for body in busy:
                assert body["code"] == "queue_full" and "busy" in body["message"]
            assert server.proc.poll() is None, "the server died"
            assert wait_until(lambda: health()["running"] + health()["queued"] == 0)
            peaks.append(rss_mib(pid))
        print(f"RSS baseline {baseline:.1f} MiB, after each burst {[round(p, 1) for p in peaks]}")
        assert peaks[-1] - baseline < RSS_SLACK_MIB, (baseline, peaks)
        assert health()["status"] == "ok"
    finally:
        code = server.stop()
    assert code == 0, "".join(server.log)
