"""The decode step with fixed shapes and addresses, captured once per generate call as a CUDA
graph and replayed for every new token (engine.py's step, made fit for a graph).

A decode step of a small model is a few dozen tiny kernels, each costing more to launch
from Python than to run: a replay is one launch. tests/test_engine.py checks this step
against the engine's reference step, eagerly on CPU and as a graph on a GPU."""

import torch

from .kvcache import KVCache


def supported(model):
    """Whether the decode step can be captured: a model on CUDA in plain tensors, with no
    FSDP module in it. FSDP's hooks run in every block's forward, and their all-gather
    streams cannot be captured (even inside dist.full_weights). Not dist._fsdp, which asks
    of the root alone: PPO and GRPO hand the engine the policy inside a sharded
    policy-and-value root, so only its blocks are FSDP modules."""
    w = next(model.parameters())
    if w.device.type != "cuda" or type(w.data) is not torch.Tensor:
        return False
    from torch.distributed.fsdp import FSDPModule

    return not any(isinstance(m, FSDPModule) for m in model.modules())


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
    buffers; on CUDA (graph=True) it is captured once as a CUDA graph and replayed for
    every new token. Elsewhere (the engine's static=True on CPU, for the tests) the same
    step runs eagerly.

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
