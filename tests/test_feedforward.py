import torch
import torch.nn.functional as F

from bardlm.config import ModelConfig
from bardlm.nn.feedforward import MLP, SwiGLU, gelu_tanh


def test_gelu_tanh_matches_torch() -> None:
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(gelu_tanh(x), F.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-5)
    assert (gelu_tanh(x) - F.gelu(x)).abs().max() > 1e-5  # and it is the tanh one, not erf


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16, **kw)


def test_mlp_is_4x_and_matches_formula() -> None:
    for act, ref in (("gelu", lambda t: F.gelu(t, approximate="tanh")), ("relu", F.relu)):
        mlp = MLP(_cfg(ffn=act))
        assert mlp.c_fc.weight.shape == (64, 16)
        x = torch.randn(2, 3, 16)
        want = F.linear(ref(F.linear(x, mlp.c_fc.weight, mlp.c_fc.bias)), mlp.c_proj.weight, mlp.c_proj.bias)
        torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=1e-5)


def test_swiglu_matches_formula() -> None:
    ff = SwiGLU(_cfg(ffn="swiglu", ffn_hidden=24, bias=False))
    w1, w3 = ff.c_fc.weight[:24], ff.c_fc.weight[24:]  # gate rows first, then up
    x = torch.randn(2, 3, 16)
    want = (F.silu(x @ w1.T) * (x @ w3.T)) @ ff.c_proj.weight.T
    torch.testing.assert_close(ff(x), want, atol=1e-5, rtol=1e-5)


def test_fused_ops_model_equals_written_out() -> None:
    """A whole model with fused norms and GELU gives the written-out model's logits and grads."""
    from bardlm import GPT
    from bardlm.config import ModelConfig

    torch.manual_seed(0)
    cfg = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    slow, fast = GPT(ModelConfig(**cfg, fused_ops=False)), GPT(ModelConfig(**cfg, fused_ops=True))
    fast.load_state_dict(slow.state_dict())
    idx = torch.randint(0, 50, (2, 16))
    (ls, loss_s), (lf, loss_f) = slow(idx, idx), fast(idx, idx)
    torch.testing.assert_close(lf, ls, atol=1e-5, rtol=1e-5)
    loss_s.backward()
    loss_f.backward()
    for (name, a), b in zip(slow.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
