"""The KV cache the engine hands the model: keys and values of every layer in one buffer."""

import torch


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
