"""fp64 gradcheck of the hand-written backwards (RMSNorm's, SwiGLU's, causal attention's as two
matmuls, the chunked linear + cross-entropy: the package's only autograd.Functions) and of the
training paths that reshape the forward: fused q/k/v, GQA, packed documents. A wrong backward would
train, slowly and wrongly, and pass every other test."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.func import functional_call

from shoggoth.lm.model import GPT, Documents, GPTConfig, LinearCrossEntropy, _RMSNormFP32, _SwiGLU, causal_attention_cpu


def test_rmsnorm_backward():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16, dtype=torch.float64)).requires_grad_()
    assert gradcheck(lambda x, w: _RMSNormFP32.apply(x, w, 1e-6, torch.float64), (x, w))


def test_rmsnorm_backward_frozen_weight():
    torch.manual_seed(0)  # LoRA freezes the norms: only the input's gradient is formed
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    w = 1 + 0.1 * torch.randn(16, dtype=torch.float64)
    assert gradcheck(lambda x: _RMSNormFP32.apply(x, w, 1e-6, torch.float64), (x,))


def test_rmsnorm_backward_through_the_cast_to_bf16():
    # Norms that feed matmuls return the autocast dtype: the gradient comes back in bf16 and is
    # widened before the closed form. Against autograd through F.rms_norm and the same cast.
    torch.manual_seed(0)
    x = torch.randn(6, 32, requires_grad=True)
    w = (1 + 0.1 * torch.randn(32)).requires_grad_()
    g = torch.randn(6, 32).bfloat16()
    ours = torch.autograd.grad(_RMSNormFP32.apply(x, w, 1e-5, torch.bfloat16), (x, w), g)
    ref = torch.autograd.grad(F.rms_norm(x, (32,), w, 1e-5).bfloat16(), (x, w), g)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_swiglu_backward():
    torch.manual_seed(0)
    g = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    assert gradcheck(_SwiGLU.apply, (g, u))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_autograd_bit_for_bit_and_keeps_less(dtype):
    # The same gradients as autograd's silu(g) * u, while keeping two tensors instead of three.
    torch.manual_seed(0)
    g, u = (torch.randn(64, 96).to(dtype).requires_grad_() for _ in range(2))
    grad = torch.randn(64, 96).to(dtype)
    kept = {}
    for name, f in (("ours", _SwiGLU.apply), ("autograd", lambda g, u: F.silu(g) * u)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.data_ptr()) or t, lambda t: t):
            y = f(g, u)
        kept[name] = (y, torch.autograd.grad(y, (g, u), grad), len(set(saved)))
    (y0, grads0, n0), (y1, grads1, n1) = kept["ours"], kept["autograd"]
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert (n0, n1) == (2, 3)


@pytest.mark.slow
def test_linear_cross_entropy_backward():
    torch.manual_seed(0)
    h = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(700, 8, dtype=torch.float64, requires_grad=True)  # several row chunks of 2 MB / V
    targets = torch.randint(0, 700, (40,))
    targets[::7] = -100  # ignored rows take no part in the mean
    assert gradcheck(lambda h, w: LinearCrossEntropy.apply(h, w, targets), (h, w))
    ref = torch.nn.functional.cross_entropy(h @ w.t(), targets, ignore_index=-100)
    assert torch.allclose(LinearCrossEntropy.apply(h, w, targets), ref)


def test_linear_cross_entropy_backward_scaled_and_half_frozen():
    # The upstream gradient scales both saved gradients (a loss divided by micro-steps, a
    # weighted sum), and each is formed only when its input needs it (LoRA: a frozen head).
    torch.manual_seed(0)
    h = torch.randn(24, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (24,))
    targets[:5] = -100
    assert gradcheck(lambda h: 3 * LinearCrossEntropy.apply(h, w.detach(), targets), (h,))
    assert gradcheck(lambda w: -0.5 * LinearCrossEntropy.apply(h.detach(), w, targets), (w,))


def test_causal_attention_as_two_matmuls_backward():
    torch.manual_seed(0)  # the bf16 training path's attention; the model tests below run SDPA's in fp64
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert gradcheck(causal_attention_cpu, (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(causal_attention_cpu(q, k, v), ref)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_matches_autograd_bit_for_bit_and_keeps_no_probabilities(dtype):
    # The hand-written backward (probabilities recomputed) against autograd through the same two
    # matmuls and softmax, which keeps the (N, T, T) probabilities: same output and gradients, bit for bit.
    def autograd_form(q, k, v):
        B, H, T, D = q.shape
        bias = torch.zeros(T, T, dtype=q.dtype).masked_fill_(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        s = torch.baddbmm(bias, q.reshape(B * H, T, D), k.reshape(B * H, T, D).transpose(1, 2), alpha=D**-0.5)
        return (s.softmax(-1) @ v.reshape(B * H, T, D)).view(B, H, T, D)

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 37, 16).to(dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(3, 4, 37, 16).to(dtype)
    runs = []
    for f in (causal_attention_cpu, autograd_form):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            y = f(q, k, v)
        runs.append((y, torch.autograd.grad(y, (q, k, v), grad), shapes))
    (y0, g0, kept0), (y1, g1, kept1) = runs
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert (12, 37, 37) in kept1 and (12, 37, 37) not in kept0  # the probabilities: kept by autograd only

def tiny(**kw):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, max_seq_len=32, **kw)
    return GPT(cfg).double().train()


def loss_of(model, names, idx, targets, mask=None):
    """The training loss as a function of the named parameters (gradcheck needs explicit inputs)."""
    return lambda *ws: functional_call(model, dict(zip(names, ws)), (idx,), {"targets": targets, "mask": mask})


def check_model(model, mask=None, T=12):
    torch.manual_seed(1)
    idx, targets = torch.randint(0, 64, (2, T)), torch.randint(0, 64, (2, T))
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.0.self_attn.v_proj.weight", "model.layers.1.input_layernorm.weight",
             "model.layers.1.mlp.down_proj.weight", "model.norm.weight",
             "model.embed_tokens.weight"]  # tied to lm_head: LinearCrossEntropy's weight gradient too
    params = dict(model.named_parameters())
    ws = [params[n].detach().clone().requires_grad_() for n in names]
    assert model.training  # the fused q/k/v matmul runs in training mode only
    # fast_mode: the Jacobian-vector products along random directions, not every column
    assert gradcheck(loss_of(model, names, idx, targets, mask), ws, eps=1e-6, atol=1e-6, fast_mode=True)


def test_training_step_backward_fused_qkv_gqa():
    check_model(tiny())


def test_training_step_backward_qwen_style_bias_and_qk_norm():
    check_model(tiny(qkv_bias=True, qk_norm=True))


def test_training_step_backward_packed_documents():
    seg = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 9 + [-1] * 3])  # three documents, then one and padding
    check_model(tiny(), mask=Documents(seg))


@pytest.mark.parametrize("kw", [dict(), dict(qkv_bias=True, qk_norm=True)])
def test_fp32_training_step_matches_plain_autograd(kw, monkeypatch):
    # In fp64 (above) RMSNorm runs plain autograd ops: its Function serves the fp32 residual
    # stream (and fp32 q/k) only. Here a real fp32 training step's gradients, with both Functions where the
    # model calls them, against the same step with them replaced by the formulas they stand for.
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=32, **kw)).train()
    idx, targets = torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16))
    targets[0, :4] = -100

    def grads():
        m.zero_grad()
        m(idx, targets=targets).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    calls = []
    real_norm, real_ce = _RMSNormFP32.apply, LinearCrossEntropy.apply
    monkeypatch.setattr(_RMSNormFP32, "apply", lambda *a: calls.append("norm") or real_norm(*a))
    monkeypatch.setattr(LinearCrossEntropy, "apply", lambda *a: calls.append("ce") or real_ce(*a))
    ours = grads()
    norms = 2 * (4 if m.config.qk_norm else 2) + 1  # per block two (and q/k norms), and the final one
    assert calls.count("norm") == norms and calls.count("ce") == 1
    monkeypatch.setattr(_RMSNormFP32, "apply", lambda x, w, eps, out: F.rms_norm(x, (x.shape[-1],), w, eps).to(out))
    monkeypatch.setattr(LinearCrossEntropy, "apply",
                        lambda h, w, t: F.cross_entropy((h @ w.t()).float(), t, ignore_index=-100))
    ref = grads()
    assert ours.keys() == ref.keys()
    for n in ours:
        torch.testing.assert_close(ours[n], ref[n], atol=1e-6, rtol=1e-4, msg=n)
