import pytest
import torch
from torch import nn

from bardlm.nn.norm import LayerNorm, RMSNorm


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


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_equals_written_out(kind: str, dtype: torch.dtype) -> None:
    from bardlm.nn.norm import make_norm

    torch.manual_seed(0)
    slow, fast = make_norm(kind, 40, 1e-5, True, fused=False), make_norm(kind, 40, 1e-5, True, fused=True)
    with torch.no_grad():
        slow.weight.normal_()
        fast.weight.copy_(slow.weight)
        if kind == "layernorm":
            slow.bias.normal_()
            fast.bias.copy_(slow.bias)
    x = (torch.randn(3, 7, 40) * 4 + 1).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fast(x), slow(x), **tol)
    assert fast(x).dtype == slow(x).dtype
