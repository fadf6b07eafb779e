import math

import numpy as np
import torch

from bardlm.nn.position import apply_rope, rope_cos_sin, rope_inv_freq, sinusoidal_table


def test_sinusoidal_matches_paper_formula() -> None:
    P, d = 50, 16
    want = np.zeros((P, d))
    for p in range(P):
        for i in range(d // 2):
            want[p, 2 * i] = math.sin(p / 10000 ** (2 * i / d))
            want[p, 2 * i + 1] = math.cos(p / 10000 ** (2 * i / d))
    torch.testing.assert_close(sinusoidal_table(P, d), torch.tensor(want, dtype=torch.float32), atol=1e-6, rtol=0)


def test_rope_equals_complex_rotation_of_half_pairs() -> None:
    """Rotate-half RoPE == multiplying the complex number (x_i + j x_{i+d/2}) by e^{j p theta_i}."""
    B, H, T, D = 2, 3, 9, 8
    x = torch.randn(B, H, T, D)
    inv = rope_inv_freq(D, 10000.0)
    cos, sin = rope_cos_sin(torch.arange(T), inv)
    ours = apply_rope(x, cos, sin)
    z = torch.complex(x[..., : D // 2], x[..., D // 2 :])
    rot = torch.polar(torch.ones(T, D // 2), torch.arange(T).float()[:, None] * inv)
    zr = z * rot
    torch.testing.assert_close(ours, torch.cat([zr.real, zr.imag], -1), atol=1e-5, rtol=1e-5)


def test_rope_is_relative() -> None:
    """q.k after RoPE depends only on the distance between positions."""
    D = 16
    inv = rope_inv_freq(D, 10000.0)
    q, k = torch.randn(D), torch.randn(D)

    def score(pq: int, pk: int) -> float:
        cq, sq = rope_cos_sin(torch.tensor([pq]), inv)
        ck, sk = rope_cos_sin(torch.tensor([pk]), inv)
        return float((apply_rope(q.view(1, 1, 1, D), cq, sq) * apply_rope(k.view(1, 1, 1, D), ck, sk)).sum())

    assert abs(score(5, 2) - score(105, 102)) < 1e-4
    assert abs(score(5, 2) - score(5, 3)) > 1e-3
