"""What every training stage shares: AdamW parameter groups and the lr schedule."""

import math

import torch


def adamw(model, lr, weight_decay, betas=(0.9, 0.95)):
    """AdamW (fused kernel) that decays matrices but not norms or biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def cosine_lr(step, total, lr, warmup, min_frac):
    """Linear warmup to lr over `warmup` steps, then cosine decay to lr * min_frac at `total` (steps count from 1)."""
    if step <= warmup:
        return lr * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress)))
