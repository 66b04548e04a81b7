"""Batched sampling with a preallocated KV cache: token ids in, token ids and log-probs out.

The engine knows nothing about text; callers tokenize and detokenize. Prompts of
different lengths share one batch by left padding: every row's prompt ends at
the same column, pad keys are masked out, and each row's positions count from
its own first real token, so a row computes what it would alone (up to float
rounding; tests/test_engine.py checks greedy tokens against full recompute).

    gen = Engine(model).generate([[1, 5, 9], [1, 7]], max_new_tokens=32, temperature=0.8, top_p=0.9,
                                 stop_ids=[eos], seed=0)
    gen.tokens, gen.mask, gen.logprobs   # (B, N) each

`logprobs` are those of the distribution each token was drawn from: logits / T,
then top-k, then top-p, renormalised (as Hugging Face's warpers compose), so a
later forward pass with the same recipe reproduces them. Temperature 0 is greedy
decoding; its log-probs are then those of the argmax under the plain
temperature-1 softmax, no top-k/top-p.

On CPU the decode step runs on weights packed once per call (PackedWeights); on
CUDA it runs over a static cache as a CUDA graph replayed per token (StaticStep).
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
import torch.nn.functional as F

from . import kernels, lora
from .model import apply_rope


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, N) long, new tokens only; pad_id after a row's stop
    mask: torch.Tensor  # (B, N) bool, True for real generated tokens (a stop token is real)
    logprobs: torch.Tensor  # (B, N) float32, log-prob of each token where it was sampled; 0 where mask is False


class KVCache:
    """Keys and values of every layer in one buffer allocated once per generate call.

    The model calls update(layer, k, v) from inside each attention layer; the
    engine moves `length` on after each forward, once every layer has written."""

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, dtype, device):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.layers = list(zip(self.k, self.v))  # per layer (B, Hkv, max_len, D) views
        self.length = 0

    def update(self, layer, k, v):
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        if start == 0:
            return k, v  # the prefill: nothing cached before, and k, v stay in the model's dtype
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, Hkv, S, D) views, no copies


def _fsdp(model):
    # Not dist._fsdp, which asks of the root alone: PPO and GRPO hand the engine the policy
    # inside a sharded policy-and-value root, so only its blocks are FSDP modules.
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


class StaticCache(KVCache):
    """A KVCache whose decode steps keep fixed shapes and addresses, as a CUDA graph needs:
    each step writes its column at `at`, a device tensor, and attends over the whole
    buffer, with the columns not yet written masked out (StaticStep)."""

    at = None  # (1,) long, the column the current step writes; None during the prefill

    def __init__(self, *args):
        super().__init__(*args)
        # Columns not yet written are masked, but a masked score still multiplies its
        # value by 0, and 0 * NaN from uninitialised memory would poison the output.
        self.k.zero_()
        self.v.zero_()

    def update(self, layer, k, v):
        if self.at is None:
            return super().update(layer, k, v)
        self.k[layer].index_copy_(2, self.at, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, self.at, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]


class StaticStep:
    """The model's one-token decode step over a StaticCache, on inputs held in fixed
    buffers; on CUDA it is captured once per generate call as a CUDA graph and replayed
    for every new token. A decode step of a small model is a few dozen tiny kernels,
    each costing more to launch from Python than to run: a replay is one launch.
    Elsewhere (static=True on CPU, for the tests) the same step runs eagerly.

    valid (B, S) bool: the keys each row may see (not its left padding); step_pos (B, N):
    the position of each new token. The cache holds the prompt (cache.length = P)."""

    def __init__(self, model, cache, valid, step_pos, graph, autocast):
        dev = valid.device
        self.trunk, self.head, self.cache = model.model, model.lm_head, cache
        self.valid, self.step_pos, self.prompt = valid, step_pos, cache.length
        self.cols = torch.arange(valid.shape[1], device=dev)
        self.tok = torch.zeros(valid.shape[0], dtype=torch.long, device=dev)  # the inputs, written before each step
        self.t = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph = None
        if graph:
            # Autocast's cache of cast weights is emptied when its context exits (stream()
            # enters the engine's per step; a caller may hold its own), so the graph does
            # its own casts: autocast as it stands now, with the cache off.
            amp = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if autocast else
                   torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False,
                                  enabled=torch.is_autocast_enabled("cuda")))
            with torch.cuda.device(dev):  # streams and capture on the model's GPU, whichever is current
                side = torch.cuda.Stream()  # warm up off the main stream, as torch.cuda.graphs advises
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), amp:
                    self.forward()  # writes column P, which step 0 writes again before reading it
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph), amp:
                    self.logits = self.forward()

    def forward(self):
        end = self.t + self.prompt  # (1,) the column of this step's token
        self.cache.at = end
        mask = (self.valid & (self.cols <= end))[:, None, None]  # (B, 1, 1, S)
        h = self.trunk(self.tok[:, None], pos=self.step_pos.index_select(1, self.t), mask=mask, cache=self.cache)
        return self.head(h[:, -1])  # (B, V)

    def __call__(self, tok, t):
        """Logits (B, V) after the tokens tok (B,) of step t; under a graph they stay
        in the graph's buffer until the next call."""
        self.tok.copy_(tok)
        self.t.fill_(t)
        if self.graph is None:
            return self.forward()
        with torch.cuda.device(self.tok.device):
            self.graph.replay()
        return self.logits


def sample(logits, temperature, top_k, top_p, generator=None):
    """One token per row from logits (B, V) -> (tokens (B,), logprobs (B,) float32).

    Top-k and top-p work in a sorted, shortened vocabulary so that the cost of a
    step does not grow with the vocabulary beyond one topk (or sort)."""
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    logits = logits / temperature
    ids = None  # vocabulary ids of the columns of `logits` once shortened
    if 0 < top_k < logits.shape[-1]:
        logits, ids = logits.topk(top_k, dim=-1)  # sorted, largest first
    elif top_p < 1:
        logits, ids = logits.sort(dim=-1, descending=True)
    if top_p < 1:
        # Keep the smallest prefix whose probability reaches top_p: a token stays
        # if the tokens ranked above it hold less than top_p (the first always stays).
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    logp = logits.log_softmax(-1)
    # Inverse CDF: the first token whose cumulative probability reaches u * total, with
    # u in (0, 1] (so the target is above 0 and at most the total: a token of probability
    # 0, masked or underflowed, is never the first to reach it). One random number per
    # row; on CPU an exponential race drew one per vocabulary entry, and torch's
    # exponential_ alone took 2.6 ms of a 32 x 4096 step (this: 0.26 ms).
    cdf = logp.exp().cumsum(-1)
    u = 1 - torch.rand((len(cdf), 1), generator=generator, device=cdf.device)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:])  # (B, 1)
    lp = logp.gather(-1, choice)[:, 0]
    tok = choice[:, 0] if ids is None else ids.gather(-1, choice)[:, 0]
    return tok, lp


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
    rows by every weight, so repacking is a large share of the step (bf16, 16 rows x
    [256, 4096]: 164 us with F.linear, 109 us prepacked; fp32 305 vs 172), and one
    matmul for q/k/v instead of three saves a third of their time (99 vs 64 us, bf16).
    Packing the 4.3M-parameter demo model takes about 3 ms, so it is done once per
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
        self.trunk, self.config = model.model, model.config
        self.kernel = kernels.load()  # shoggoth's compiled decode attention, or None: SDPA

    @staticmethod
    def supported(model, dtype):
        """CPU, plain tensors (not the DTensors of a sharded model), and oneDNN able to run dtype."""
        w = next(model.parameters())
        return (w.device.type == "cpu" and type(w.data) is torch.Tensor and torch.backends.mkldnn.is_available()
                and (dtype == torch.float32 or dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))

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

    def decode(self, tok, cos, sin, mask, cache):
        """Logits (B, V) of one new token per row: the model's forward for T = 1, written out
        op for op (the same kernels in the same dtypes, so the same numbers) without the
        modules' generality: no module calls, RoPE on q and k at once, tables and mask made
        once per generate call. On the demo model, in four A/B runs (1 and 2 threads, a
        noisy machine), a batch-16 step took 0.83-1.00x the time of the modules', a
        batch-1 step 0.78-0.86x.
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
        # context made batch-1 steps 4-10% slower, so its attention call is written here.
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

    @staticmethod
    def decodes(model):
        """Whether decode() computes what the model would: a GPT without per-head q/k norms (Qwen3)."""
        return not model.config.qk_norm


class Engine:
    """Sampling over a `GPT` (shoggoth.model): batched, cached, exact.

    bf16=True runs an fp32 model under bf16 autocast (about 2x faster matmuls on
    CPUs with AVX-512 bf16); a model already in bf16 runs in bf16 either way.

    On CUDA the decode step runs as a CUDA graph over a static cache (StaticStep),
    unless the model is sharded by FSDP: its hooks run in every block's forward, and
    their all-gather streams cannot be captured (even inside dist.full_weights).
    static=True forces that step elsewhere (eagerly: the tests check it on CPU),
    static=False turns it off."""

    def __init__(self, model, bf16=False, pad_id=0, static=None):
        self.model = model
        self.pad_id = pad_id
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.autocast = bf16 and self.dtype == torch.float32
        if self.autocast:
            self.dtype = torch.bfloat16
        if static is None:
            static = self.device.type == "cuda" and type(param.data) is torch.Tensor and not _fsdp(model)
        self.static = static

    def generate(self, prompts: list[list[int]], max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0,
                 stop_ids=(), seed=None) -> Generation:
        """Continue every prompt by up to max_new_tokens (fewer if the context
        window fills). A row stops after emitting any of stop_ids; the whole
        batch stops once every row has, so N may be below max_new_tokens."""
        B = len(prompts)
        tokens = torch.empty((B, max_new_tokens), dtype=torch.long, device=self.device)
        mask = torch.empty((B, max_new_tokens), dtype=torch.bool, device=self.device)
        logprobs = torch.empty((B, max_new_tokens), dtype=torch.float32, device=self.device)
        n = 0
        with self._amp(), self._eval():
            steps = self._steps(prompts, max_new_tokens, temperature, top_k, top_p, stop_ids, seed)
            for n, (tok, lp, live) in enumerate(steps, start=1):
                tokens[:, n - 1], logprobs[:, n - 1], mask[:, n - 1] = tok, lp, live
        tokens, mask, logprobs = tokens[:, :n], mask[:, :n], logprobs[:, :n]
        return Generation(tokens.masked_fill_(~mask, self.pad_id), mask, logprobs.masked_fill_(~mask, 0.0))

    def stream(self, prompt: list[int], max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0,
               stop_ids=(), seed=None) -> Iterator[int]:
        """Yield the token ids of one continuation as they are sampled (the stop
        token included); the same tokens generate() returns for this prompt alone."""
        steps = self._steps([prompt], max_new_tokens, temperature, top_k, top_p, stop_ids, seed)
        while True:
            # Autocast per step: a context held across a yield would leak into the caller's code.
            with self._amp(), self._eval():
                step = next(steps, None)
            if step is None:
                return
            yield int(step[0][0])

    def _amp(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()

    @contextmanager
    def _eval(self):
        # Decode in eval mode, then hand the model back as it came (a PPO policy is mid-training).
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)

    @torch.inference_mode()
    def _steps(self, prompts, max_new_tokens, temperature, top_k, top_p, stop_ids, seed):
        """Yield (tokens (B,), logprobs (B,), live (B,) bool) once per new column;
        live is False for rows that had already stopped before this column."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (prepend BOS to start from nothing)")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 (got {temperature}, {top_p}, {top_k})")
        c, dev = self.model.config, self.device
        B, P = len(prompts), max(len(p) for p in prompts)
        N = min(max_new_tokens, c.max_seq_len - P)
        if N < 0:
            raise ValueError(f"a prompt of {P} tokens does not fit the context window of {c.max_seq_len}")
        if N == 0:
            return
        generator = None
        if seed is not None:
            generator = torch.Generator(device=dev).manual_seed(seed)

        # Left padding: row b's real tokens fill columns pad[b]..P-1 of the prompt block.
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        pad = P - lengths  # (B,)
        idx = torch.tensor([[self.pad_id] * (P - len(p)) + list(p) for p in prompts], device=dev)  # (B, P)
        cols = torch.arange(P + N, device=dev)
        valid = cols[None] >= pad[:, None]  # (B, S): keys a row may attend to, for the whole run
        pos = (cols[None, :P] - pad[:, None]).clamp(min=0)  # (B, P): each row counts from its first token
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        # Pad queries see only themselves, so that no softmax row is empty (their outputs are never read).
        prefill_mask = (causal & valid[:, None, None, :P]) | torch.eye(P, dtype=torch.bool, device=dev)
        ragged = bool((pad > 0).any())

        # On CPU, decode attention computes in fp32 (model.decode_attention_cpu). shoggoth's
        # kernel reads a cache in the model's dtype (half the bytes in bf16); without it SDPA
        # does, and an fp32 cache (bf16 -> fp32 is exact) spares converting every cached
        # key and value at every step, which took a quarter of a bf16 decode's time.
        kernel = dev.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16) and kernels.load() is not None
        cache_dtype = torch.float32 if dev.type == "cpu" and not kernel else self.dtype
        cache = (StaticCache if self.static else KVCache)(c.n_layer, B, c.n_kv_head, P + N, c.head_dim, cache_dtype, dev)
        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        trunk, head = self.model.model, self.model.lm_head
        packed = None
        if not self.static and PackedWeights.supported(self.model, self.dtype):
            packed = PackedWeights(self.model, B, self.dtype)
        fast = packed.applied if packed else nullcontext  # entered per forward: never held across a yield
        decode = None  # StaticStep, or PackedWeights.decode where it computes what the model would
        # Prefill all prompts in one forward; only the last column needs logits.
        with fast():
            logits = head(trunk(idx, pos=pos, mask=prefill_mask, cache=cache)[:, -1])  # (B, V)
        cache.length = P
        step_pos = lengths[:, None] + torch.arange(N, device=dev)  # (B, N): position of each new token
        if self.static and N > 1:  # N = 1: no decode step to capture
            decode = StaticStep(self.model, cache, valid, step_pos, dev.type == "cuda", self.autocast)
        elif packed and PackedWeights.decodes(self.model):
            # RoPE tables and the padding mask of every step, made once.
            cos, sin = (x[:, :, None].to(self.dtype) for x in trunk.rope(step_pos))  # (B, N, 1, D)
            if ragged and kernel:
                bias = valid  # (B, S) bool: what the kernel takes
            elif ragged:
                bias = torch.zeros(B, 1, 1, P + N, device=dev).masked_fill_(~valid[:, None, None], float("-inf"))
            decode = packed.decode
        for t in range(N):
            tok, lp = sample(logits, temperature, top_k, top_p, generator)
            yield tok, lp, ~done
            if len(stop):
                done = done | torch.isin(tok, stop)
                if done.all():
                    return
            if t == N - 1:
                return
            end = P + t + 1
            if self.static:
                logits = decode(tok, t)
            elif decode:
                logits = decode(tok, cos[:, t], sin[:, t], bias[..., :end] if ragged else None, cache)
            else:
                step_mask = valid[:, None, None, :end] if ragged else None  # (B, 1, 1, S)
                with fast():
                    logits = head(trunk(tok[:, None], pos=step_pos[:, t:t + 1], mask=step_mask, cache=cache)[:, -1])
            cache.length = end
