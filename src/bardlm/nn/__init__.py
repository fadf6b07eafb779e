"""The network: norms, positions, dropout, feed-forward, attention, KV cache, block, `GPT`.

Imports nothing of bardlm but `config` and `errors` (and, lazily, the decode loop behind the
`GPT.generate` convenience): no files, tokenizers, training or serving.
"""

from .model import GPT

__all__ = ["GPT"]
