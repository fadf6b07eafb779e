import pytest
import torch
from torch import nn

from bardlm.norm import LayerNorm, RMSNorm


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(bias: bool) -> None:
    ours, ref = LayerNorm(48, eps=1e-5, bias=bias), nn.LayerNorm(48, eps=1e-5, bias=bias)
    with torch.no_grad():
        ref.weight.normal_()
        ours.weight.copy_(ref.weight)
        if bias:
            ref.bias.normal_()
            ours.bias.copy_(ref.bias)
    x = torch.randn(3, 7, 48) * 5 + 2  # non-zero mean and non-unit variance
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_layernorm_uses_biased_variance() -> None:
    x = torch.tensor([[1.0, 3.0]])  # mean 2, biased var 1, unbiased var 2
    y = LayerNorm(2, eps=0.0, bias=False)(x)
    torch.testing.assert_close(y, torch.tensor([[-1.0, 1.0]]))


def test_rmsnorm_matches_torch() -> None:
    ours, ref = RMSNorm(32, eps=1e-6), nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ours.weight.copy_(ref.weight)
    x = torch.randn(2, 5, 32) * 3 + 1
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
