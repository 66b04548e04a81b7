"""The one model: a Llama-family decoder (Llama, Qwen2, Qwen3 shapes).

Modules only: no optimizer, no data, no parallelism. Parameter names follow
Hugging Face's `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj.weight`,
...), so a state dict moves between the two without renaming.
"""

from dataclasses import dataclass
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import kernels


@dataclass
class GPTConfig:
    vocab_size: int = 4096  # rows of the embedding; >= the tokenizer's length
    n_layer: int = 4  # decoder blocks
    n_head: int = 4  # query heads
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0 means n_head
    n_embd: int = 256  # residual width
    head_dim: int = 0  # per-head width; 0 means n_embd // n_head (Qwen3 sets it apart)
    intermediate_size: int = 0  # SwiGLU hidden width; 0 means 8/3 * n_embd rounded up to 64
    max_seq_len: int = 256  # longest context (max_position_embeddings)
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict | None = None  # Llama 3.1+ "llama3" frequencies: factor, low/high_freq_factor, original_max_position_embeddings
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # lm_head shares the embedding matrix
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on each head's q and k before RoPE (Qwen3)
    bos_token_id: int | None = None  # recorded for export; the model does not use them
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        if not self.intermediate_size:
            self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, feeds_matmul=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # Only matmuls read the output (the norms inside a block): under autocast it may
        # come out in the autocast dtype, the cast the matmul would do anyway. The final
        # norm stays fp32: heads read it in fp32 (RewardModel.score, log-probs).
        self.feeds_matmul = feeds_matmul

    def forward(self, x):
        # Normalise in fp32 and cast back before the weight, as Hugging Face does,
        # so that logits agree with transformers to 1e-4.
        if x.dtype == self.weight.dtype == torch.float32:  # the fp32 residual stream, with or without autocast
            dev = x.device.type
            cast = self.feeds_matmul and torch.is_autocast_enabled(dev)
            out = torch.get_autocast_dtype(dev) if cast else x.dtype
            if not torch.is_grad_enabled():  # decoding: the same forward without the autograd.Function's overhead
                return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps).to(out)
            return _RMSNormFP32.apply(x, self.weight, self.eps, out)
        return self.weight * F.rms_norm(x.to(wide(x.dtype)), (x.shape[-1],), eps=self.eps).to(x.dtype)


def wide(dtype):
    """fp32 for bf16, fp16 and fp32 (the dtype norms and losses compute in); fp64 stays fp64,
    so that gradcheck can test the hand-written backwards in double precision."""
    return torch.promote_types(dtype, torch.float32)


class _RMSNormFP32(torch.autograd.Function):
    """weight * x / rms(x) for fp32 x and weight, returned in out_dtype. Forward is F.rms_norm
    (one fused kernel, bit-identical to Hugging Face's formula in fp32), then one cast
    (to the autocast dtype, for norms that feed matmuls); backward is the closed
    form in five passes instead of autograd's dozen (timings: bench/RESULTS.md, "Figures
    quoted in the code")."""

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.rms_norm(x, (x.shape[-1],), weight, eps).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(x.dtype)
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ctx.eps)  # (..., 1)
        xhat = x * rstd
        gw = grad * weight
        # d/dx of xhat: (g - xhat * mean(g * xhat)) * rstd, with g = grad * weight
        grad_x = (gw - xhat * (torch.linalg.vecdot(gw, xhat).unsqueeze(-1) / x.shape[-1])) * rstd
        grad_w = (grad * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None


def apply_rope(x, cos, sin):
    """Hugging Face's x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1):
    `sin` comes with its first half negated (Trunk.rope), so the halves swap without a
    negation pass; flipping a sign is exact, so the result is bit-identical."""
    h = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., h:], x[..., :h]), dim=-1) * sin


def causal_attention_cpu(q, k, v):
    """Causal attention as two batched matmuls (scale and mask folded into the first),
    softmax in fp32 inside the kernel, probabilities in the input dtype; the same as
    transformers' eager attention under bf16 autocast (the scores are rounded to bf16,
    which SDPA's flash kernel does not do; fp32 is unchanged). On CPU in bf16, for T <= 512,
    its forward+backward is faster than SDPA's flash kernel; at T=1024 flash wins
    (bench/RESULTS.md, "Figures quoted in the code")."""
    B, H, T, D = q.shape
    q, k, v = (x.reshape(B * H, T, D) for x in (q, k, v))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _CausalAttention.apply(q, k, v).view(B, H, T, D)
    return (_causal_probs(q, k) @ v).view(B, H, T, D)


def _causal_probs(q, k):
    """softmax(q k^T / sqrt(D) + causal mask) of q, k (N, T, D): (N, T, T) in their dtype."""
    T, D = q.shape[1:]
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    bias = torch.zeros(T, T, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    return torch.baddbmm(bias, q, k.transpose(1, 2), alpha=D**-0.5).softmax(-1)


class _CausalAttention(torch.autograd.Function):
    """causal_attention_cpu's two matmuls, keeping q, k and v for backward and recomputing the
    probabilities there: autograd would keep them, (N, T, T) per layer (about 5.5 KB per token and
    layer for 300-token documents at SmolLM2-135M's 9 heads in bf16, as much as the rest of the
    attention), for one more q k^T in backward. Backward runs the ops autograd's formulas for bmm,
    softmax and baddbmm run, in their order, so the gradients are bit-identical."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return _causal_probs(q, k) @ v

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        p = _causal_probs(q, k)  # (N, T, T), as forward made it
        grad_v = p.transpose(1, 2).bmm(grad)  # p @ v: bmm's mat2
        grad_s = torch._softmax_backward_data(grad.bmm(v.transpose(1, 2)), p, -1, p.dtype)  # bmm's self, softmax
        scale = q.shape[-1] ** -0.5
        grad_q = grad_s.bmm(k) * scale  # baddbmm's batch1, times alpha
        grad_k = (q.transpose(1, 2).bmm(grad_s) * scale).transpose(1, 2)  # batch2 = k^T, back through the transpose
        return grad_q, grad_k, grad_v


def decode_attention_cpu(q, k, v, mask=None):
    """One new query per row (B, H, 1, D) against the cached keys and values (B, Hkv, S, D)
    in fp32; mask (B, 1, 1, S) bool, True where a key is visible. On CPU SDPA's flash
    kernel is several times slower for a single query in bf16 than in fp32 (bench/RESULTS.md,
    Generation), and fp32 scores and softmax round less. shoggoth's kernel (kernels.py)
    reads a bf16 cache into fp32 directly; without it the engine keeps an fp32 cache and
    SDPA computes in fp32. Autocast is off here: it would cast all three back to bf16,
    the slow path (bench/RESULTS.md, "Figures quoted in the code")."""
    y = kernels.decode_attention(q, k, v, mask)
    if y is not None:
        return y.to(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                           enable_gqa=k.shape[1] != q.shape[1])
    return y.to(q.dtype)


class Documents:
    """Packed rows as documents that attend only to themselves (block-diagonal causal
    attention), without a (T, T) mask: each layer gathers every document's q, k, v into
    a right-padded (documents, L) batch, attends causally, and scatters the outputs back
    (pad slots are never read: causal attention keeps real tokens off the pads after them).
    Attention work is the sum of squared document lengths, not rows x T squared; see
    bench/packed_attention.py for the options measured. Documents are sorted by length
    into buckets of similar lengths, so that padding stays small. Built once per batch."""

    def __init__(self, seg):
        """seg (B, T) long: the document of each token, a run of one value >= 0 within a row;
        -1 for padding."""
        B, T = seg.shape
        # A run of one value within a row is a document: the row index keeps rows apart.
        flat = (seg + 1 + torch.arange(B, device=seg.device)[:, None] * (int(seg.max()) + 2)).flatten()
        values, lengths = torch.unique_consecutive(flat, return_counts=True)
        starts = torch.cumsum(lengths, 0) - lengths
        real = seg.flatten()[starts] >= 0
        lengths, starts = lengths[real].tolist(), starts[real].tolist()
        self.size = B * T
        self.buckets = []  # (index (n, L) into the B*T flat tokens, valid (n, L) bool)
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        while order:
            L = lengths[order[0]]
            n, tokens = 1, L  # grow the bucket while its padding stays under a quarter of its tokens
            while n < len(order) and (n + 1) * L <= 1.25 * (tokens + lengths[order[n]]):
                tokens += lengths[order[n]]
                n += 1
            take, order = order[:n], order[n:]
            cols = torch.arange(L, device=seg.device)
            start = torch.tensor([starts[i] for i in take], device=seg.device)[:, None]
            length = torch.tensor([lengths[i] for i in take], device=seg.device)[:, None]
            valid = cols[None] < length
            self.buckets.append((torch.where(valid, start + cols, start), valid))
        # Where each bucket's outputs go.
        self.scatter = torch.cat([idx[valid] for idx, valid in self.buckets] + [seg.new_zeros(0)])

    def attend(self, q, k, v):
        """Block-diagonal causal attention of q (B, H, T, D) over k, v (B, Hkv, T, D) -> (B, H, T, D)."""
        B, H, T, D = q.shape
        rows = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], D)  # noqa: E731  (B*T, heads, D)
        q, k, v = rows(q), rows(k), rows(v)
        if k.shape[1] != H:
            k, v = k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // v.shape[1], dim=1)
        outs = []
        for idx, valid in self.buckets:
            qb, kb, vb = (x[idx].transpose(1, 2) for x in (q, k, v))  # (n, H, L, D)
            # bench/packed_attention.py, rows of 2,048: the two matmuls beat SDPA's flash kernel
            # for short documents in bf16, and lose to it in fp32.
            if q.device.type == "cpu" and q.dtype == torch.bfloat16 and idx.shape[1] <= 512:
                y = causal_attention_cpu(qb, kb, vb)
            else:
                y = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
            outs.append(y.transpose(1, 2)[valid])  # (real tokens, H, D)
        y = torch.cat(outs + [q.new_zeros(0, H, D)])
        out = y.new_zeros(self.size, H, D).index_copy(0, self.scatter, y)  # padding: zeros, never read
        return out.view(B, T, H, D).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.q_proj = nn.Linear(c.n_embd, c.n_head * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project(self, x):
        """q, k, v of x (B, T, C), each (B, T, heads * head_dim)."""
        p = (self.q_proj, self.k_proj, self.v_proj)
        if self.training and all(type(m) is nn.Linear for m in p):
            # One matmul on the concatenated weights: the input is read (and cast under
            # autocast) once, and backward sums the three input gradients inside one
            # matmul. Copying the weights pays on training batches (B*T rows >> n_embd),
            # not in one-token decode steps, so eval mode keeps three matmuls (the
            # engine fuses them once per generate call: packed.PackedWeights). A wrapped
            # projection (a LoRA layer, shoggoth.lm.lora) runs its own forward.
            bias = torch.cat([m.bias for m in p]) if p[0].bias is not None else None
            return F.linear(x, torch.cat([m.weight for m in p]), bias).split([m.out_features for m in p], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, mask, cache, layer):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, D): past and present keys
        return self.o_proj(attend(q, k, v, mask, cache is not None).transpose(1, 2).reshape(B, T, -1))


def attend(q, k, v, mask, cached):
    """Attention of q (B, H, T, D) over k and v (B, Hkv, S, D) through the fastest back-end for the
    case: packed documents' own attention, the CPU decode kernel, the CPU causal matmuls or SDPA.
    Without a mask and without a cache (`cached`) the attention is plainly causal; with a cache and
    no mask every cached key is visible (one-token decode steps)."""
    if isinstance(mask, Documents):
        return mask.attend(q, k, v)
    gqa = k.shape[1] != q.shape[1]
    if cached and q.shape[2] == 1 and q.device.type == "cpu" and (mask is None or mask.dtype == torch.bool):
        return decode_attention_cpu(q, k, v, mask)
    if mask is None and not cached and q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[2] <= 512:
        # In fp32 SDPA's flash kernel is the faster one (bench/RESULTS.md, 2026-12-01: these two
        # matmuls took 1.20-1.31x its time there, 0.60-0.92x in bf16).
        if gqa:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return causal_attention_cpu(q, k, v)
    # enable_gqa lets each group of query heads read its shared key/value head in
    # place, instead of copying the whole cache per decode step.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and not cached, enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.n_embd, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.n_embd, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.n_embd, bias=False)

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(_SwiGLU.apply(g, u) if torch.is_grad_enabled() else F.silu(g) * u)


class _SwiGLU(torch.autograd.Function):
    """silu(g) * u, keeping g and u for backward and recomputing silu(g) there: autograd would also
    keep silu(g), one more (tokens, intermediate_size) tensor per layer (3 KB of about 33 KB per
    token and layer at SmolLM2-135M's shape in bf16). Backward runs the ops autograd would (mul's two
    products, then silu_backward), so the gradients are bit-identical."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        grad_u = grad * F.silu(g) if ctx.needs_input_grad[1] else None
        return torch.ops.aten.silu_backward(grad * u, g), grad_u


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.n_embd, c.norm_eps, feeds_matmul=True)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.n_embd, c.norm_eps, feeds_matmul=True)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def llama3_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3.1's RoPE frequencies for a longer context: wavelengths shorter than
    original/high_freq_factor stay, those longer than original/low_freq_factor are
    stretched by factor, and those between are interpolated (transformers' "llama3")."""
    old = original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    out = torch.where(wavelen > old / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    medium = (wavelen >= old / high_freq_factor) & (wavelen <= old / low_freq_factor)
    return torch.where(medium, (1 - smooth) * out / factor + smooth * out, out)


class Trunk(nn.Module):
    """Embedding, blocks and final norm: token ids in, hidden states out.

    With grad_ckpt set, a forward that records gradients keeps only each block's input
    and computes the block again in backward (activation checkpointing, per block): the
    same numbers for about a third more compute, and activations of one block at a
    time instead of all of them."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.grad_ckpt = False
        self.embed_tokens = nn.Embedding(c.vocab_size, c.n_embd)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.n_embd, c.norm_eps)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        if c.rope_scaling:
            inv_freq = llama3_inv_freq(inv_freq, **c.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, pos):
        # Hugging Face layout: the two halves of each head share frequencies.
        freqs = pos.float()[..., None] * self.inv_freq  # (..., T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = freqs.sin()
        return emb.cos(), torch.cat((-sin, sin), dim=-1)  # sin with its first half negated: see apply_rope

    def forward(self, idx, pos=None, mask=None, cache=None):
        """idx (B, T) token ids; pos (B, T) positions (default 0..T-1, or after the
        cache's length); mask (B, 1, T, S) bool, True where attention is allowed, or
        Documents (packed rows whose documents attend only to themselves);
        cache: an object whose update(layer, k, v) returns all keys/values so far."""
        B, T = idx.shape
        if pos is None:
            start = cache.length if cache is not None else 0
            pos = torch.arange(start, start + T, device=idx.device)[None]  # (1, T)
        cos, sin = self.rope(pos)  # (B or 1, T, D)
        # In the dtype q and k will have (the matmuls'), here rather than in every layer:
        # Attention's own cast to q's dtype is then a no-op, except with per-head q/k norms
        # (Qwen3) under autocast, whose fp32 output widens the tables back in every layer.
        dev = idx.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.embed_tokens.weight.dtype
        cos, sin = cos[:, None].to(dtype), sin[:, None].to(dtype)  # broadcast over heads
        x = self.embed_tokens(idx)
        # Not with a cache: decoding records no gradients, and the recompute would write it twice.
        ckpt = self.grad_ckpt and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.layers):
            if ckpt:  # use_reentrant=False: saves the autocast and RNG state for the recompute (LoRA dropout)
                x = checkpoint(block, x, cos, sin, mask, cache, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i)
        return self.norm(x)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits h @ w.T against targets (-100 = ignored): the same
    numbers as F.cross_entropy(logits.float(), ...) on the head's output (up to the order
    of the final sum; bf16 gradients come out bit-identical), computed in
    row chunks that stay in cache. The gradient (softmax - onehot) / count is formed in
    the forward pass, chunk by chunk, in place of the logits, so that no fp32 (N, V)
    tensor is ever written (bench/RESULTS.md, Pretraining throughput: 1.10x per step).
    Backward only scales the two saved gradients."""

    @staticmethod
    def forward(ctx, h, w, targets):
        # h (N, C), w (V, C) in the compute dtype; targets (N,)
        N, V = h.shape[0], w.shape[0]
        logits = h @ w.t()  # (N, V), becomes d loss / d logits below
        valid = targets != -100
        count = valid.sum()
        scale = (valid / count).to(wide(h.dtype))[:, None]  # (N, 1) fp32: d loss / d nll of each row
        tgt = targets.clamp(min=0)[:, None]  # (N, 1)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        nll = torch.empty(N, device=h.device, dtype=scale.dtype)
        # CPU: 2 MB of fp32 logits, the fastest of 1-8 MB on these CPUs (1 or 2 threads). GPU: 512 MB, since
        # each chunk is a handful of kernel launches (16 rows at a vocabulary of 32768 made thousands per step).
        chunk = max(16, (2**19 if h.device.type == "cpu" else 2**27) // V)
        for s in range(0, N, chunk):
            rows = slice(s, s + chunk)
            logp = torch.log_softmax(logits[rows].to(nll.dtype), dim=-1)  # (n, V) fp32
            nll[rows] = -logp.gather(1, tgt[rows]).squeeze(1)
            if need_grad:
                grad = logp.exp_().mul_(scale[rows])  # softmax / count
                grad.scatter_add_(1, tgt[rows], -scale[rows])  # minus onehot / count
                logits[rows] = grad
        if need_grad:
            ctx.save_for_backward(logits @ w if ctx.needs_input_grad[0] else None,
                                  logits.t() @ h if ctx.needs_input_grad[1] else None)
        return torch.where(valid, nll, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
                None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype), None)


class GPT(nn.Module):
    """Causal language model: Trunk plus an output projection to the vocabulary."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.model = Trunk(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None, pos=None, mask=None, cache=None, at=None):
        """Logits (B, T, V); or, given targets (B, T) with -100 where ignored,
        the mean next-token cross-entropy. at (B, T) bool: logits (M, V) at those
        positions only, row by row (the output projection and softmax of a DPO step
        need only the response's tokens)."""
        h = self.model(idx, pos, mask, cache)
        if at is not None:
            return self.lm_head(h[at])
        if targets is None:
            return self.lm_head(h)
        # Without grad, LinearCrossEntropy would form gradients nobody reads; under
        # torch.compile, inductor fuses the plain loss itself, while the chunk loop
        # would unroll (the compiled 14M step ran 0.6x as fast with it).
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return F.cross_entropy(self.lm_head(h).float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        # The head's matmul runs in the autocast dtype, as nn.Linear would under autocast.
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        return LinearCrossEntropy.apply(h.flatten(0, 1).to(dt), self.lm_head.weight.to(dt), targets.flatten())

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per matmul weight (the lookup table is no
        matmul, the output projection is, tied or not) plus attention scores, the
        PaLM appendix-B estimate that nanoGPT and nanochat use."""
        c = self.config
        matmul = self.num_params() - self.model.embed_tokens.weight.numel()
        if c.tie_embeddings:
            matmul += self.lm_head.weight.numel()
        return 6 * matmul + 12 * c.n_layer * c.n_head * c.head_dim * seq_len


class RewardModel(nn.Module):
    """Reward model: the Trunk plus a scalar head read at each row's last real token.

    The layout of Hugging Face's `LlamaForSequenceClassification` with one label
    (`model.*`, `score.weight`). The head starts at N(0, 1/(d+1)), as InstructGPT's did.
    trunk: an existing Trunk to share (a LoRA value model on the reward model's), kept as it is."""

    def __init__(self, config: GPTConfig, trunk: Trunk | None = None):
        super().__init__()
        self.config = config
        self.model = trunk if trunk is not None else Trunk(config)
        self.score = nn.Linear(config.n_embd, 1, bias=False)
        if trunk is None:
            self.apply(GPT._init)
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(config.n_embd + 1))

    def forward(self, idx, pos=None, mask=None, last=None):
        """Scores (B,) float32 of rows idx (B, T), read at column last (B,) of each row
        (default T-1); or, with last (B, N), scores (B, N) at N columns of each row (the
        per-token values of a PPO value model). With right padding and no mask, plain
        causal attention is exact: no real token attends to the pads after it."""
        h = self.model(idx, pos, mask)  # (B, T, d)
        if last is None:
            last = torch.full((idx.shape[0],), idx.shape[1] - 1, device=idx.device)
        rows = torch.arange(idx.shape[0], device=idx.device)
        h = h[rows[:, None] if last.dim() == 2 else rows, last]  # (B, d) or (B, N, d)
        # The head in fp32, also under autocast: rewards are compared by small margins
        # that bf16's 8-bit mantissa would round away (0.008 steps near 1.0).
        with torch.autocast(h.device.type, enabled=False):
            return self.score(h.float()).squeeze(-1)  # (B,) or (B, N) float32

    def num_params(self):
        return sum(p.numel() for p in self.parameters())
