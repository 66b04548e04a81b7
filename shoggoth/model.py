"""The one model: a Llama-family decoder (Llama, Qwen2, Qwen3 shapes).

Modules only: no optimizer, no data, no parallelism. Parameter names follow
Hugging Face's `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj.weight`,
...), so a state dict moves between the two without renaming.
"""

from dataclasses import dataclass, asdict
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def to_dict(self):
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 and cast back before the weight, as Hugging Face does,
        # so that logits agree with transformers to 1e-4.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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

    def forward(self, x, cos, sin, mask, cache, layer):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, D): past and present keys
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # Without a mask and without a cache the attention is plainly causal; with a
        # cache and no mask every cached key is visible (one-token decode steps).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and cache is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.n_embd, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.n_embd, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.n_embd, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.n_embd, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    """Embedding, blocks and final norm: token ids in, hidden states out."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.n_embd)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.n_embd, c.norm_eps)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, pos):
        # Hugging Face layout: the two halves of each head share frequencies.
        freqs = pos.float()[..., None] * self.inv_freq  # (..., T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, idx, pos=None, mask=None, cache=None):
        """idx (B, T) token ids; pos (B, T) positions (default 0..T-1, or after the
        cache's length); mask (B, 1, T, S) bool, True where attention is allowed;
        cache: an object whose update(layer, k, v) returns all keys/values so far."""
        B, T = idx.shape
        if pos is None:
            start = cache.length if cache is not None else 0
            pos = torch.arange(start, start + T, device=idx.device)[None]  # (1, T)
        cos, sin = self.rope(pos)  # (B or 1, T, D)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        x = self.embed_tokens(idx)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, cache, i)
        return self.norm(x)


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

    def forward(self, idx, targets=None, pos=None, mask=None, cache=None):
        """Logits (B, T, V); or, given targets (B, T) with -100 where ignored,
        the mean next-token cross-entropy."""
        logits = self.lm_head(self.model(idx, pos, mask, cache))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

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
    (`model.*`, `score.weight`). The head starts at N(0, 1/(d+1)), as InstructGPT's did."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.model = Trunk(config)
        self.score = nn.Linear(config.n_embd, 1, bias=False)
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
