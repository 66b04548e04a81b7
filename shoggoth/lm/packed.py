"""The CPU decode step on packed weights: the model's Linear weights reordered once per
generate call into oneDNN's blocked layout (PyTorch's private mkldnn ops: they live in
this file alone), and the model's one-token forward written out on them, with shoggoth's
compiled attention kernel (kernels.py) or SDPA. tests/test_engine.py checks that it
samples the very tokens and log-probs of the engine's reference step."""

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

from . import kernels, lora
from .model import apply_rope


def _packed_linear(weight, bias, dtype, x):
    x = x if x.dtype == dtype else x.to(dtype)  # a Python test costs less than a no-op dispatch
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _fused_project(linear, sizes, x):
    return linear(x).split(sizes, dim=-1)


def _fused_mlp(gate_up, down, x):
    gate, up = gate_up(x).chunk(2, dim=-1)
    return down(F.silu(gate) * up)


class PackedWeights:
    """The model's Linear weights reordered once into oneDNN's blocked layout, with q/k/v
    and gate/up each concatenated into one matrix, and a decode step written out on them.

    F.linear on CPU repacks its weight at every call; a decode step multiplies a few
    rows by every weight, so repacking is a large share of the step, and one matmul for
    q/k/v instead of three saves a third of their time (bench/RESULTS.md, Generation:
    "Prepacked weights"). Packing a small model costs milliseconds, so it is done once per
    generate call: a PPO policy's weights change between calls. `applied()` routes the
    model's modules through the packed copies (the prefill runs the model itself);
    outside it they are untouched."""

    def __init__(self, model, rows, dtype):
        def pack(*linears):
            w = torch.cat([lora.weight(m).detach() for m in linears]).to(dtype)  # LoRA adapters merged in
            b = torch.cat([m.bias.detach() for m in linears]).to(dtype) if linears[0].bias is not None else None
            return partial(_packed_linear, torch.ops.mkldnn._reorder_linear_weight(w, rows), b, dtype)

        # (module, attribute, replacement): an instance attribute shadows the class's method.
        self.patches = []
        self.layers = []  # per block: its two norms and packed q/k/v, o, gate/up, down
        for block in model.model.layers:
            a, mlp = block.self_attn, block.mlp
            p = (a.q_proj, a.k_proj, a.v_proj)
            qkv, o, gate_up, down = pack(*p), pack(a.o_proj), pack(mlp.gate_proj, mlp.up_proj), pack(mlp.down_proj)
            self.patches += [(a, "project", partial(_fused_project, qkv, [x.out_features for x in p])),
                             (a.o_proj, "forward", o), (mlp, "forward", partial(_fused_mlp, gate_up, down))]
            self.layers.append((block.input_layernorm, qkv, o, block.post_attention_layernorm, gate_up, down))
        self.head = pack(model.lm_head)
        self.patches.append((model.lm_head, "forward", self.head))
        self.trunk, self.config, self.dtype = model.model, model.config, dtype
        self.kernel = kernels.load()  # shoggoth's compiled decode attention, or None: SDPA

    @staticmethod
    def supported(model, dtype):
        """CPU, plain tensors (not the DTensors of a sharded model), and oneDNN able to run dtype."""
        w = next(model.parameters())
        return (w.device.type == "cpu" and type(w.data) is torch.Tensor and torch.backends.mkldnn.is_available()
                and (dtype == torch.float32 or dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))

    @staticmethod
    def decodes(model):
        """Whether decode() computes what the model would: a GPT without per-head q/k norms (Qwen3)."""
        return not model.config.qk_norm

    @contextmanager
    def applied(self):
        # Set in __dict__ directly: this runs around every decode step, and Module.__setattr__ is slow.
        for m, name, fn in self.patches:
            m.__dict__[name] = fn
        try:
            yield
        finally:
            for m, name, _ in self.patches:
                m.__dict__.pop(name, None)

    def step(self, cache, step_pos, valid):
        """The engine's decode step on these weights: step(tok (B,), t) -> logits (B, V) after
        the tokens of step t, with the RoPE tables and the padding mask of every step made
        once here. The cache holds the prompt; step_pos (B, N): the position of each new
        token; valid (B, S) bool: the keys each row may see, or None where no row is padded."""
        cos, sin = (x[:, :, None].to(self.dtype) for x in self.trunk.rope(step_pos))  # (B, N, 1, D)
        if valid is None or self.kernel:
            mask = valid  # None (no row padded), or (B, S) bool: what the kernel takes
        else:
            B, S = valid.shape
            mask = torch.zeros(B, 1, 1, S, device=valid.device).masked_fill_(~valid[:, None, None], float("-inf"))
        prompt = cache.length

        def step(tok, t):
            return self.decode(tok, cos[:, t], sin[:, t], None if mask is None else mask[..., :prompt + t + 1], cache)

        return step

    def decode(self, tok, cos, sin, mask, cache):
        """Logits (B, V) of one new token per row: the model's forward for T = 1, written out
        op for op (the same kernels in the same dtypes, so the same numbers) without the
        modules' generality: no module calls, RoPE on q and k at once, tables and mask made
        once per generate call (its A/B against the modules: bench/RESULTS.md, Generation).
        cos, sin (B, 1, D) in the q/k dtype (sin as Trunk.rope gives it); mask over the cache,
        or None: (B, S) bool with shoggoth's kernel (kernels.py), (B, 1, 1, S) additive fp32
        for SDPA (which would otherwise convert a bool mask at every call)."""
        c = self.config
        H, Hkv, D = c.n_head, c.n_kv_head, c.head_dim
        B, end = tok.shape[0], cache.length + 1
        x = self.trunk.embed_tokens(tok)  # (B, C)
        # The norms' own forward() and the model's apply_rope, without Module.__call__.
        # Autocast is off for the whole step, as decode_attention_cpu turns it off for
        # attention (no other op here is an autocast op); that function's per-call
        # context slowed batch-1 steps, so its attention call is written here.
        if self.kernel:
            cos, sin = cos.squeeze(1), sin.squeeze(1)  # (B, D), as the kernel takes them
        with torch.autocast("cpu", enabled=False):
            for (norm1, qkv, o, norm2, gate_up, down), (k, v) in zip(self.layers, cache.layers):
                if self.kernel:
                    # RoPE, the cache write and attention in one call, with the same numbers as
                    # the ops below (tests/test_engine.py): 14 fewer ops per layer.
                    y = self.kernel.decode_step(qkv(norm1.forward(x)), cos, sin, k, v, end - 1, mask, H)
                else:
                    qk, v_new = qkv(norm1.forward(x)).split([(H + Hkv) * D, Hkv * D], dim=-1)
                    qk = apply_rope(qk.view(B, H + Hkv, D), cos, sin)  # q and k at once
                    k.select(2, end - 1).copy_(qk[:, H:])
                    v.select(2, end - 1).copy_(v_new.view(B, Hkv, D))
                    y = F.scaled_dot_product_attention(qk[:, :H, None].float(), k.narrow(2, 0, end),
                                                       v.narrow(2, 0, end), attn_mask=mask, enable_gqa=Hkv != H)
                x = x + o(y.view(B, H * D))  # y fp32; o casts to its dtype
                gate, up = gate_up(norm2.forward(x)).chunk(2, dim=-1)
                x = x + down(F.silu(gate) * up)
            return self.head(self.trunk.norm.forward(x))
