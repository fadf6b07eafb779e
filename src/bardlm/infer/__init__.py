"""Inference in memory: sampling, the decode loop, fast layouts and INT8 (module swaps).

Nothing here reads or writes files; `bardlm.load(path, dtype=...)` does that and calls
`layouts.prepare_for_inference`.
"""
