"""What the RL stages (ppo, grpo, dpo) share: prompts, rollouts, log-probs of responses, rewards.

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

from . import checkpoint, data, dist, labelers, lora, tokenizer
from .engine import Engine
from .errors import DataError


# ---------------------------------------------------------------- prompts


def prompt_record(obj, where):
    """A prompts JSONL record -> {"messages", "references", "where"}.

    `{"prompt": "text"}`, `{"prompt": [messages]}` or `{"messages": [...]}`, with optional
    `"references": [answers]` (what the simulated labelers' gold reward compares against).
    Trailing assistant turns of `messages` are dropped from the prompt and, when there
    are no references, become them."""
    from .tokenizer import ROLES

    msgs = obj.get("prompt", obj.get("messages"))
    if isinstance(msgs, str):
        msgs = [{"role": "user", "content": msgs}]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: expected 'prompt' (a string or a list of messages) or 'messages'")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} needs a role ({', '.join(ROLES)}) and string content")
    refs = obj.get("references")
    if refs is not None and (not isinstance(refs, list) or not all(isinstance(r, str) for r in refs)):
        raise DataError(f"{where}: 'references' must be a list of strings")
    answers = []
    while msgs and msgs[-1]["role"] == "assistant":
        answers.insert(0, msgs[-1]["content"])
        msgs = msgs[:-1]
    if not msgs:
        raise DataError(f"{where}: no user message to answer")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs],
            "references": refs if refs is not None else answers[:1], "where": where}


def builtin_prompts(split):
    """The chatterbot-corpus opening questions of a split ("train" or "heldout"), each with
    all the corpus's answers to it as references."""
    refs = {}
    for conv in data.chatterbot_conversations(split):
        refs.setdefault(conv[0]["content"], []).append(conv[1]["content"])
    return [{"messages": [{"role": "user", "content": q}], "references": r, "where": f"chatterbot-corpus {split}"}
            for q, r in refs.items()]


def load_prompts(path, skip_invalid=False, log=print, split="train"):
    """Prompt records of a JSONL file, or of the built-in chatterbot-corpus split when path is empty."""
    if not path:
        recs = builtin_prompts(split)
        log(f"data: built-in chatterbot-corpus {split} questions: {len(recs)} prompts with reference answers")
        return recs
    return data.read_records(path, prompt_record, "prompts", skip_invalid, log)


def prompt_text(record):
    """The last user message: what the gold reward's relevance reads when there are no references."""
    return next(m["content"] for m in reversed(record["messages"]) if m["role"] == "user")


def encode_prompts(tok, records, room):
    """Chat-template token ids of each prompt, ready for the assistant's reply; a prompt
    longer than room keeps its last room tokens."""
    if room < 1:
        raise DataError(f"max_new_tokens leaves no room for a prompt in the context window ({room})")
    return [tok.prompt_ids(r["messages"])[-room:] for r in records]


def prompt_batch(n, batch_size, iteration, seed):
    """Indices of iteration's batch_size prompts (iterations count from 0): successive slices
    of a fresh shuffle of the n prompts per epoch, so that a resumed run sees the same batches."""
    pos = np.arange(iteration * batch_size, (iteration + 1) * batch_size)
    orders = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(pos // n)}
    return [int(orders[p // n][p % n]) for p in pos]


# ---------------------------------------------------------------- models


def load_policy(c, device):
    """(tok, policy, ref) of a stage's Config: the model to train (c.policy), on device, with c's
    LoRA adapters when c.lora_r is set, and a frozen copy of it, the reference; with LoRA the
    reference is the policy itself with its adapters off (reference()), and ref is None."""
    tok = tokenizer.load(c.policy)
    policy = checkpoint.load_pretrained(c.policy)
    tok.check_model(policy.config.vocab_size, c.policy)
    ref = None if c.lora_r else frozen(checkpoint.load_pretrained(c.policy), device)
    return tok, lora.wrap(policy, c, c.seed).to(device), ref


def check_lora(c):
    """Refuse LoRA dropout in an RL stage: the ratio and the KL compare a training forward with
    the rollout's (dropout-free) log-probs, which dropout would set apart."""
    from .errors import ShoggothError

    if c.lora_r and c.lora_dropout:
        raise ShoggothError("--lora-dropout must be 0 in PPO and GRPO: the policy's training forwards must compute "
                            "the log-probs its rollouts were sampled with")


def reference(policy, ref):
    """Context giving the reference model: ref, or, where it is None (LoRA), the policy with
    its adapters off. Under FSDP2, enter it inside dist.full_weights."""
    return nullcontext(ref) if ref is not None else lora.disabled(policy)


def load_prompt_sets(c, log):
    """(train, held-out) prompt records of a stage's Config: --prompts (default the built-in training
    questions) and at most eval_samples of --eval-prompts (default, when --prompts is empty, the
    built-in held-out questions; else none)."""
    prompts = load_prompts(c.prompts, c.skip_invalid, log)
    if not (c.eval_prompts or not c.prompts):
        return prompts, []
    return prompts, load_prompts(c.eval_prompts, c.skip_invalid, log, split="heldout")[:c.eval_samples]


def optimizer_step(opt, model, grad_clip, out, where):
    """Clip model's global grad norm, refuse a non-finite one (naming the last good checkpoint of
    out), step and zero the gradients. Returns the norm before clipping."""
    from .errors import TrainingError

    norm = dist.clip_grad_norm(model, grad_clip)
    if not torch.isfinite(norm):
        raise TrainingError(f"{where}: grad norm {norm.item():.4g} is not finite; stopped without updating. "
                            f"Last good checkpoint: {checkpoint.latest_checkpoint(out) or 'none'}")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def frozen(model, device):
    """model on device, in eval mode, without gradients: the reference and the reward model."""
    return model.to(device).eval().requires_grad_(False)


def load_reward(reward_dir, toy_word, tok, device):
    """(reward, model): the reward of a Rollout -> (B,), the reward model's score (minus its
    stored shift) computed with any LoRA adapters the model has since been given switched
    off (a PPO value model's: lora_value); or, with toy_word, the fraction of response tokens
    that are that word, and model None."""
    if toy_word:
        ids = toy_target_ids(tok, toy_word)
        return (lambda r: toy_scores(r, ids)), None
    model, shift = checkpoint.load_reward(reward_dir)
    if tokenizer.load(reward_dir).tok.get_vocab() != tok.tok.get_vocab():
        raise DataError(f"{reward_dir}: the reward model's tokenizer differs from the policy's; it must score the "
                        "policy's tokens as they are (train the reward model from the same SFT model)")
    model = frozen(model, device)

    def reward(r):
        with lora.disabled(model):
            return reward_scores(model, shift, r)
    return reward, model


def lora_value(reward_model):
    """A LoRA run's PPO value model: the frozen reward model's trunk itself (not a copy), which
    lora.wrap then gives the value's own adapters, and a trained copy of its head. It starts
    as the reward model, as InstructGPT's value model does; the reward, computed with the
    adapters off (load_reward), stays the reward model's."""
    from .model import RewardModel

    value = RewardModel(reward_model.config, trunk=reward_model.model)
    value.score.load_state_dict(reward_model.score.state_dict())
    return value.to(reward_model.score.weight.device)


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
    seq = torch.full((B, int(start.max()) + N), tok.pad_id, dtype=torch.long, device=dev)
    for b, p in enumerate(prompt_ids):
        seq[b, :len(p)] = torch.as_tensor(p, device=dev)
        seq[b, len(p):len(p) + N] = gen.tokens[b]
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


def reward_scores(reward_model, shift, r: Rollout):
    """Reward-model scores (B,) read at each response's last real token (its end of turn), minus the stored shift."""
    return reward_model(r.seq, last=r.start + r.lengths - 1) - shift


def toy_target_ids(tok, word):
    """Token ids that count as the toy reward's word: the word alone and after a space."""
    ids = {tuple(tok.encode(w)) for w in (word, " " + word)}
    single = sorted(i[0] for i in ids if len(i) == 1)
    if not single:
        raise DataError(f"toy reward: {word!r} is not a single token of this tokenizer")
    return single


def toy_scores(r: Rollout, target_ids):
    """Toy reward (B,): the fraction of a response's tokens that are the target word (a test and debug aid)."""
    hit = torch.isin(r.tokens, torch.tensor(target_ids, device=r.tokens.device)) & r.mask
    return hit.sum(1) / r.lengths.clamp(min=1)


def decode(tok, r: Rollout):
    """Response texts, special tokens dropped."""
    return [tok.decode([t for t, m in zip(row, keep) if m]) for row, keep in zip(r.tokens.tolist(), r.mask.tolist())]


def gold_scores(records, texts):
    """The simulated labelers' noise-free taste (labelers.gold_score) of each response; NaN for a
    prompt without reference answers."""
    return torch.tensor([labelers.gold_score(prompt_text(rec), t, rec["references"]) if rec["references"]
                         else float("nan") for rec, t in zip(records, texts)])


# ---------------------------------------------------------------- scoring and evaluation


def logprobs_of(model, r: Rollout, temperature, chunk):
    """log pi(response tokens) (B, N) of a model, chunk rows at a time (call under no_grad)."""
    return in_chunks(lambda s: token_logprobs(response_logits(model, s), s.tokens, temperature), r, chunk)


def all_nanmean(x, device):
    """Mean over every rank of x's non-NaN entries (the gold reward of prompts that have references); NaN if none."""
    ok = ~torch.isnan(x)
    s = dist.all_sum(torch.tensor([x[ok].sum().item(), ok.sum().item()], device=device, dtype=torch.float64))
    return (s[0] / s[1]).item() if s[1] else float("nan")


def all_mean(x):
    """Mean over every rank of a tensor's mean, as a float."""
    return dist.all_mean(x.float().mean()).item()


def evaluate(policy, ref, reward_fn, tok, records, c, amp, bf16, d, show=2):
    """One response per held-out prompt (this rank's share), sampled with the same seed at every
    evaluation: mean reward, gold reward, KL to the reference per response, end-of-text rate, length.
    c: the stage's Config (max_new_tokens, temperature, seed, minibatch_size)."""
    recs = dist.share(records, d)
    room = policy.config.max_seq_len - c.max_new_tokens
    r = generate(policy, tok, encode_prompts(tok, recs, room), c.max_new_tokens, c.temperature,
                 seed=c.seed + 1_000_003 + d.rank, bf16=bf16)
    chunk = max(1, c.minibatch_size // d.world)
    with torch.no_grad(), amp, reference(policy, ref) as ref:
        kl = ((r.logprobs - logprobs_of(ref, r, c.temperature, chunk)) * r.mask).sum(1)
        scores = in_chunks(reward_fn, r, chunk)
    texts = decode(tok, r)
    if d.main:
        for rec, text in list(zip(recs, texts))[:show]:
            print(f"  user> {prompt_text(rec)}\n  assistant> {text}", flush=True)
    return {"eval/scores": all_mean(scores), "eval/gold": all_nanmean(gold_scores(recs, texts), d.device),
            "eval/kl": all_mean(kl), "eval/eot_rate": all_mean(r.ended), "eval/length": all_mean(r.lengths)}
