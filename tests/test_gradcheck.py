"""fp64 gradcheck of the hand-written backwards (RMSNorm's, the chunked linear + cross-entropy)
and of the training paths that reshape the forward: fused q/k/v, GQA, causal attention as two
matmuls, packed documents. A wrong backward would train, slowly and wrongly, and pass every
other test."""

import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from shoggoth.model import GPT, Documents, GPTConfig, LinearCrossEntropy, _RMSNormFP32, causal_attention_cpu


def test_rmsnorm_backward():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16, dtype=torch.float64)).requires_grad_()
    assert gradcheck(lambda x, w: _RMSNormFP32.apply(x, w, 1e-6, torch.float64), (x, w))


def test_linear_cross_entropy_backward():
    torch.manual_seed(0)
    h = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(700, 8, dtype=torch.float64, requires_grad=True)  # several row chunks of 2 MB / V
    targets = torch.randint(0, 700, (40,))
    targets[::7] = -100  # ignored rows take no part in the mean
    assert gradcheck(lambda h, w: LinearCrossEntropy.apply(h, w, targets), (h, w))
    ref = torch.nn.functional.cross_entropy(h @ w.t(), targets, ignore_index=-100)
    assert torch.allclose(LinearCrossEntropy.apply(h, w, targets), ref)


def test_causal_attention_as_two_matmuls_backward():
    torch.manual_seed(0)  # the bf16 training path's attention; the model tests below run SDPA's in fp64
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert gradcheck(causal_attention_cpu, (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(causal_attention_cpu(q, k, v), ref)


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
