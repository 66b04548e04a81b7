"""Rollouts, what the RL stages (ppo, grpo, dpo) share: prompts, the policy and its reference,
responses sampled by the Engine, their log-probs. Their scores are scoring.py's.

A rollout is a batch of prompts (rendered with the model's chat template and its
generation prompt, `<|im_start|>assistant\\n` in ChatML) continued by the Engine until
a reply-ending token (tok.stop_ids: `<|im_end|>`, Llama 3's `<|eot_id|>`, ...) or
max_new_tokens. For training it is laid out right-padded, `[prompt | response |
pad]` per row, so that a plain causal forward pass is exact; the logits that
predict response token j of row b sit at column start[b] - 1 + j.

Log-probs are those of `log_softmax(logits / temperature)`: the distribution the
Engine samples from at that temperature (no top-k/top-p in RL rollouts), so the
rollout and the training forward agree. The model has no dropout, so train and
eval passes compute the same function.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from ..lm import checkpoint, lora, sampling, tokenizer
from ..data.prompts import load_prompts
from . import dist
from ..lm.engine import Engine
from ..errors import DataError, ShoggothError


# ---------------------------------------------------------------- prompts


def load_prompt_sets(c, log):
    """(train, held-out) prompt records of a stage's Config: --prompts (default the built-in training
    questions) and at most eval_samples of --eval-prompts (default, when --prompts is empty, the
    built-in held-out questions; else none)."""
    prompts = load_prompts(c.prompts, c.skip_invalid, log)
    if not (c.eval_prompts or not c.prompts):
        return prompts, []
    return prompts, load_prompts(c.eval_prompts, c.skip_invalid, log, split="heldout")[:c.eval_samples]


def encode_prompts(tok, records, room):
    """Chat-template token ids of each prompt record, ready for the assistant's reply (sampling.fit_prompts)."""
    return sampling.fit_prompts(tok, [r["messages"] for r in records], room)


def prompt_batch(n, batch_size, iteration, seed):
    """Indices of iteration's batch_size prompts (iterations count from 0): successive slices
    of a fresh shuffle of the n prompts per epoch, so that a resumed run sees the same batches."""
    pos = np.arange(iteration * batch_size, (iteration + 1) * batch_size)
    orders = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(pos // n)}
    return [int(orders[p // n][p % n]) for p in pos]


# ---------------------------------------------------------------- models


@dataclass
class Options:
    """The fields PPO and GRPO share (their Configs inherit them, as lora.Options): the models, the
    prompts, the rollouts, the schedule and the evaluation. A stage redeclares a field whose default differs."""

    policy: str = ""  # model directory (or hub id) to optimise (the SFT model); also the frozen reference unless --ref
    revision: str = ""  # branch, tag or commit of --policy when it is a hub id (--ref and --reward: main); empty = main
    ref: str = ""  # model directory (or hub id) of the KL reference; empty = --policy (`shoggoth rounds`: the SFT model, while --policy is the last round's)
    reward: str = ""  # reward model directory or hub id (a `shoggoth reward` output)
    prompts: str = ""  # {"prompt"} or {"messages"} records, optional "references": JSONL, Parquet, Arrow, a save_to_disk folder or a hub ID:SPLIT; empty = built-in chatterbot questions
    eval_prompts: str = ""  # held-out prompts (as --prompts); empty = built-in held-out questions when --prompts is empty, else none
    toy_reward: str = ""  # test/debug aid: reward = fraction of response tokens that are this word (no reward model)
    skip_invalid: bool = False  # skip (and count) invalid prompt lines instead of stopping at the first
    iterations: int = 100  # iterations (rollout + update)
    max_new_tokens: int = 48  # longest response
    temperature: float = 1.0  # rollout sampling temperature; training log-probs use the same
    lr: float = 1e-5  # peak learning rate
    min_lr_frac: float = 1.0  # final lr as a fraction of the peak (cosine decay; 1 = constant)
    warmup_steps: int = 0  # linear warmup, in optimizer steps
    clip: float = 0.2  # policy ratio clip (epsilon)
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response that never emits a stop token (ends its turn)
    eval_every: int = 20  # iterations between held-out evaluations (reward, gold reward, KL, distinct answers)
    eval_samples: int = 64  # held-out prompts per evaluation
    ckpt_every: int = 20  # iterations between resume checkpoints


def load_policy(c, device):
    """(tok, policy, ref) of a stage's Config: the model to train (c.policy), on device, with c's
    LoRA adapters when c.lora_r is set, and a frozen copy of it, the reference; with LoRA the
    reference is the policy itself with its adapters off (reference()), and ref is None. With a `ref`
    directory the reference is that model, frozen, with LoRA too."""
    tok = tokenizer.load(c.policy)
    policy = checkpoint.load_pretrained(c.policy)
    tok.check_model(policy.config.vocab_size, c.policy)
    ref_dir = c.ref or c.policy
    if ref_dir != c.policy and not tok.same_tokens(ref_dir):
        raise DataError(f"--ref {ref_dir}: its tokenizer differs from the policy's; the KL compares the same tokens")
    ref = None if c.lora_r and ref_dir == c.policy else frozen(checkpoint.load_pretrained(ref_dir), device)
    return tok, lora.wrap(policy, c, c.seed).to(device), ref


def check_lora(c):
    """Refuse LoRA dropout in an RL stage: the ratio and the KL compare a training forward with
    the rollout's (dropout-free) log-probs, which dropout would set apart."""
    if c.lora_r and c.lora_dropout:
        raise ShoggothError("--lora-dropout must be 0 in PPO and GRPO: the policy's training forwards must compute "
                            "the log-probs its rollouts were sampled with")


def reference(policy, ref):
    """Context giving the reference model: ref, or, where it is None (LoRA), the policy with
    its adapters off. Under FSDP2, enter it inside dist.full_weights."""
    return nullcontext(ref) if ref is not None else lora.disabled(policy)


def frozen(model, device):
    """model on device, in eval mode, without gradients: the reference and the reward model."""
    return model.to(device).eval().requires_grad_(False)


def in_chunks(fn, r, size):
    """fn over rows of r, size at a time, concatenated along the batch: bounded memory for big batches."""
    B = r.tokens.shape[0]
    return torch.cat([fn(r.rows(torch.arange(i, min(i + size, B), device=r.seq.device))) for i in range(0, B, size)])


def masked_moments(x, mask):
    """(mean, var) of x's masked entries over every rank's batch, for losses.masked_whiten."""
    m = mask.to(x.dtype)
    s = dist.all_sum(torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]))
    mean = s[0] / s[2].clamp(min=1)
    return mean, (s[1] / s[2].clamp(min=1) - mean ** 2).clamp(min=0)


# ---------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    seq: torch.Tensor  # (B, T) long: prompt, response, pad_id after; right-padded
    start: torch.Tensor  # (B,) long: column of each row's first response token
    tokens: torch.Tensor  # (B, N) long: the response tokens (pad_id after a row's stop)
    mask: torch.Tensor  # (B, N) bool: real response tokens (the stop token included)
    logprobs: torch.Tensor  # (B, N) float32: log-probs the Engine sampled with
    ended: torch.Tensor  # (B,) bool: the response emitted a stop token

    @property
    def lengths(self):
        return self.mask.sum(1)  # (B,)

    def columns(self):
        """(B, N) column of the logits (and values) that predict each response token."""
        N = self.tokens.shape[1]
        return self.start[:, None] - 1 + torch.arange(N, device=self.seq.device)[None]

    def rows(self, index):
        """The rollout restricted to rows index, with the padding columns no row uses cut off."""
        r = Rollout(self.seq[index], self.start[index], self.tokens[index], self.mask[index],
                    self.logprobs[index], self.ended[index])
        r.seq = r.seq[:, :int(r.start.max()) + r.tokens.shape[1]]
        return r


def generate(model, tok, prompt_ids, max_new_tokens, temperature, seed, bf16=False):
    """Sample one response per prompt with the Engine -> Rollout."""
    stops = tok.stop_ids
    gen = Engine(model, bf16=bf16, pad_id=tok.pad_id).generate(prompt_ids, max_new_tokens=max_new_tokens,
                                                               temperature=temperature, stop_ids=stops, seed=seed)
    B, N = gen.tokens.shape
    dev = gen.tokens.device
    start = torch.tensor([len(p) for p in prompt_ids], device=dev)
    seq = torch.full((B, int(start.max()) + N), tok.pad_id, dtype=torch.long)  # built on the CPU, one copy over
    for b, p in enumerate(prompt_ids):
        seq[b, :len(p)] = torch.as_tensor(p)
    seq = seq.to(dev).scatter_(1, start[:, None] + torch.arange(N, device=dev), gen.tokens)  # each response after its prompt
    last = gen.tokens.gather(1, (gen.mask.sum(1, keepdim=True) - 1).clamp(min=0))[:, 0]
    ended = torch.isin(last, torch.tensor(stops, device=dev)) & gen.mask.any(1)
    return Rollout(seq, start, gen.tokens, gen.mask, gen.logprobs, ended)


def response_logits(model, r: Rollout):
    """Logits (B, N, V) that predict each response token of r, from one pass of a GPT's trunk
    over r.seq; the output projection runs at the response columns only."""
    cols = r.columns().clamp(max=r.seq.shape[1] - 1)  # (B, N)
    h = model.model(r.seq)  # (B, T, d)
    return model.lm_head(h[torch.arange(len(cols), device=cols.device)[:, None], cols])  # (B, N, V)


class PolicyValue(torch.nn.Module):
    """The trained models of an RL stage as one module, so that one forward and one DDP wrapper
    serve them all: a Rollout in; response-token logits (B, N, V), per-token values (B, N) (None
    without a value model) and, given lm = (x, y) rows of text, the policy's next-token loss on
    them (PPO-ptx; else None) out. Holds the models; adds no weights of its own."""

    def __init__(self, policy, value=None):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, r: Rollout, lm=None):
        logits = response_logits(self.policy, r)
        values = None if self.value is None else response_values(self.value, r)
        return logits, values, None if lm is None else self.policy(lm[0], targets=lm[1])


def split_state(sd):
    """A PolicyValue's state dict (e.g. dist.model_state's) -> {"policy": ..., "value": ...}, each model's own."""
    out = {}
    for k, v in sd.items():
        name, _, rest = k.partition(".")
        out.setdefault(name, {})[rest] = v
    return out


def token_logprobs(logits, tokens, temperature=1.0):
    """log pi(token) (B, N) float32 under log_softmax(logits / temperature), as the Engine samples."""
    logp = (logits.float() / temperature).log_softmax(-1)
    return logp.gather(-1, tokens[..., None])[..., 0]


def response_values(value_model, r: Rollout):
    """Per-token values (B, N): the value model's scalar head at the columns that predict each response token."""
    return value_model(r.seq, last=r.columns().clamp(max=r.seq.shape[1] - 1))


def decode(tok, r: Rollout):
    """Response texts, special tokens dropped."""
    return tok.decode_rows(r.tokens, r.mask)


def logprobs_of(model, r: Rollout, temperature, chunk):
    """log pi(response tokens) (B, N) of a model, chunk rows at a time (call under no_grad)."""
    return in_chunks(lambda s: token_logprobs(response_logits(model, s), s.tokens, temperature), r, chunk)
