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

This file is the algorithm: the reference decode step is the model's own forward
over a KVCache (kvcache.py), one new token per row. Two faster forms of the same step
live apart, each checked against this one in tests/test_engine.py: on CPU, a step
written out on weights packed once per call (packed.py: PackedWeights); on CUDA, a step
over a static cache captured as a CUDA graph and replayed per token (graphs.py: StaticStep).
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch

from . import graphs, kernels
from ..errors import DataError
from .graphs import StaticCache, StaticStep
from .kvcache import KVCache
from .packed import PackedWeights


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, N) long, new tokens only; pad_id after a row's stop
    mask: torch.Tensor  # (B, N) bool, True for real generated tokens (a stop token is real)
    logprobs: torch.Tensor  # (B, N) float32, log-prob of each token where it was sampled; 0 where mask is False


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
    # exponential_ alone was a fifth of a rollout (bench/RESULTS.md, PPO iteration).
    cdf = logp.exp().cumsum(-1)
    u = 1 - torch.rand((len(cdf), 1), generator=generator, device=cdf.device)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:])  # (B, 1)
    lp = logp.gather(-1, choice)[:, 0]
    tok = choice[:, 0] if ids is None else ids.gather(-1, choice)[:, 0]
    return tok, lp


class Engine:
    """Sampling over a `GPT` (shoggoth.lm.model): batched, cached, exact.

    bf16=True runs an fp32 model under bf16 autocast (about 2x faster matmuls on
    CPUs with AVX-512 bf16); a model already in bf16 runs in bf16 either way.

    On CUDA the decode step runs as a CUDA graph over a static cache (graphs.StaticStep),
    unless the model is sharded by FSDP (graphs.supported says why). static=True forces
    that step elsewhere (eagerly: the tests check it on CPU), static=False turns it off."""

    def __init__(self, model, bf16=False, pad_id=0, static=None):
        self.model = model
        self.pad_id = pad_id
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.autocast = bf16 and self.dtype == torch.float32
        if self.autocast:
            self.dtype = torch.bfloat16
        if static is None:
            static = graphs.supported(model)
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
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be 0 or more (got {max_new_tokens})")
        if N < 0:  # DataError, a ValueError the command line prints as one line
            raise DataError(f"a prompt of {P} tokens does not fit the model's context window of {c.max_seq_len}")
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
        # Prefill all prompts in one forward; only the last column needs logits.
        with fast():
            logits = head(trunk(idx, pos=pos, mask=prefill_mask, cache=cache)[:, -1])  # (B, V)
        cache.length = P
        step_pos = lengths[:, None] + torch.arange(N, device=dev)  # (B, N): position of each new token

        def step(tok, t):
            """Logits (B, V) after the tokens tok (B,) of step t: the model's forward for one
            new token per row, attending to every cached column but the row's padding."""
            step_mask = valid[:, None, None, :P + t + 1] if ragged else None  # (B, 1, 1, S)
            with fast():
                return head(trunk(tok[:, None], pos=step_pos[:, t:t + 1], mask=step_mask, cache=cache)[:, -1])

        # The same step, faster, where it computes what the model would.
        if self.static and N > 1:  # N = 1: no decode step to capture
            step = StaticStep(self.model, cache, valid, step_pos, dev.type == "cuda", self.autocast)
        elif packed and PackedWeights.decodes(self.model):
            step = packed.step(cache, step_pos, valid if ragged else None)
        for t in range(N):
            tok, lp = sample(logits, temperature, top_k, top_p, generator)
            yield tok, lp, ~done
            if len(stop):
                done = done | torch.isin(tok, stop)
                if done.all():
                    return
            if t == N - 1:
                return
            logits = step(tok, t)
            cache.length = P + t + 1
