"""Scores of replies: the reward model's (of token rows, of texts, of a Rollout), the toy reward,
the simulated labelers' gold reward, and the held-out evaluation the RL stages print and log, with
its collapse monitor (how many different answers the policy gives to different questions).

The reward model reads its score at the end-of-turn token that closes each (prompt, reply)
rendered with the model's chat template, minus the shift stored in its config.json
(`reward_shift`); transformers gives the raw score.
"""

import math
import re
import string

import torch

from ..lm import checkpoint, lora, tokenizer
from ..data.prompts import prompt_text
from ..data.rankings import pad_right, reward_rows
from ..train import dist, rl
from ..errors import DataError
from ..train.rl import Rollout
from ..lm.model import RewardModel
from .simulated import gold_score, token_f1


# ---------------------------------------------------------------- the reward model


def scores(model, rows, pad_id, device, batch_size=64):
    """Raw scores (N,) of token rows, right-padded in batches."""
    out = []
    for i in range(0, len(rows), batch_size):
        idx, last = pad_right(rows[i:i + batch_size], pad_id)
        out.append(model(idx.to(device), last=last.to(device)).float())
    return torch.cat(out)


def load_scorer(model_dir):
    """(reward model in eval mode, shift, tokenizer) of a reward directory, for score_texts."""
    model, shift = checkpoint.load_reward(model_dir)
    return model.eval(), shift, tokenizer.load(model_dir)


def score_texts(scorer, prompt, completions, raw=False):
    """Scores of completions of a prompt (a string or messages): raw - shift, or raw.
    `scorer` is a reward directory or what load_scorer returned (to score many times)."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    return score_replies(scorer, [prompt] * len(completions), completions, raw)


def score_replies(scorer, conversations, replies, raw=False):
    """Scores (raw - shift, or raw) of one reply to each conversation (lists of messages), in
    batches. `scorer` is a reward directory or what load_scorer returned."""
    model, shift, tok = load_scorer(scorer) if not isinstance(scorer, tuple) else scorer
    rows = [row for conv, text in zip(conversations, replies) for row in reward_rows(tok, conv, [text])]
    with torch.no_grad():
        s = scores(model.eval(), rows, tok.pad_id, "cpu")
    return (s if raw else s - shift).tolist()


def score_pad(tok):
    """The pad_token_id of the reward model's config.json. transformers' sequence classification
    reads the score at the last token that is not pad_token_id, so it must be a token that no
    scored row holds: the tokenizer's pad where that is not a reply-ending token; else a special
    token the chat template never writes (SmolLM2 pads with its <|im_end|>, Llama 3 has no pad);
    else None, and transformers scores one row at a time. Shoggoth itself reads rows by length."""
    if tok.has_pad and tok.pad_id not in tok.stop_ids:
        return tok.pad_id
    taken = {*tok.stop_ids, tok.bos_id}
    for i, content in tok.specials():
        if i not in taken and content not in (tok.template or ""):
            return i
    return None


def reward_scores(reward_model, shift, r: Rollout):
    """Reward-model scores (B,) read at each response's last real token (its end of turn), minus the stored shift."""
    return reward_model(r.seq, last=r.start + r.lengths - 1) - shift


def load_reward(reward_dir, toy_word, tok, device):
    """(reward, model): the reward of a Rollout -> (B,), the reward model's score (minus its
    stored shift) computed with any LoRA adapters the model has since been given switched
    off (a PPO value model's: lora_value); or, with toy_word, the fraction of response tokens
    that are that word, and model None."""
    if toy_word:
        ids = toy_target_ids(tok, toy_word)
        return (lambda r: toy_scores(r, ids)), None
    model, shift = checkpoint.load_reward(reward_dir)
    if not tok.same_tokens(reward_dir):
        raise DataError(f"{reward_dir}: the reward model's tokenizer differs from the policy's; it must score the "
                        "policy's tokens as they are (train the reward model from the same SFT model)")
    model = rl.frozen(model, device)

    def reward(r):
        with lora.disabled(model):
            return reward_scores(model, shift, r)
    return reward, model


def value_model(c, config, reward_model):
    """PPO's value model of a stage Config c (on the CPU, c's LoRA adapters on): the reward
    model (c.reward) with its head, as InstructGPT starts it; with LoRA the frozen reward model's
    own trunk (lora_value); with c.toy_reward the policy's trunk (c.policy, `config`) and a zero head."""
    if c.toy_reward:  # no reward model to start from
        value = RewardModel(config)
        checkpoint.load_trunk(value, c.policy)
        torch.nn.init.zeros_(value.score.weight)
    elif c.lora_r:
        value = lora_value(reward_model)
    else:
        value, _ = checkpoint.load_reward(c.reward)
    return lora.wrap(value, c, c.seed + 1, trained=("score",))


def lora_value(reward_model):
    """A LoRA run's PPO value model: the frozen reward model's trunk itself (not a copy), which
    lora.wrap then gives the value's own adapters, and a trained copy of its head. It starts
    as the reward model, as InstructGPT's value model does; the reward, computed with the
    adapters off (load_reward), stays the reward model's."""
    value = RewardModel(reward_model.config, trunk=reward_model.model)
    value.score.load_state_dict(reward_model.score.state_dict())
    return value.to(reward_model.score.weight.device)


# ---------------------------------------------------------------- toy and gold rewards


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


def gold_sums(records, texts):
    """{"gold_sum", "gold_n"}: the sum and count of the simulated labelers' noise-free taste
    (simulated.gold_score) of the responses to prompts with reference answers, to be reduced over
    ranks with a step's other statistics (dist.all_sums or all_means); with_gold reads them."""
    gold = torch.tensor([gold_score(prompt_text(rec), t, rec["references"])
                         for rec, t in zip(records, texts) if rec["references"]])
    return {"gold_sum": gold.sum().double(), "gold_n": torch.tensor(len(gold), dtype=torch.float64)}


def with_gold(stats, key, always=False):
    """stats reduced over ranks with gold_sums' entries among them: those two replaced, where they
    stood, by key, the mean gold reward; a NaN mean (no prompt with references) is left out unless always."""
    out = {}
    for k, v in stats.items():
        if k == "gold_sum":
            gold = (v / stats["gold_n"]).item() if stats["gold_n"] else float("nan")
            if always or not math.isnan(gold):
                out[key] = gold
        elif k != "gold_n":
            out[k] = v
    return out


# ---------------------------------------------------------------- evaluation


SAMPLES = 8  # held-out samples each evaluation hands the trackers


def evaluate(policy, ref, reward_fn, tok, records, c, amp, bf16, d, name, show=2):
    """One response per held-out prompt (this rank's share), sampled with the same seed at every
    evaluation: mean reward, gold reward, KL to the reference per response, end-of-text rate, length,
    and the collapse monitor over every rank's greedy answers (answer_diversity), with rank 0's warning
    line (collapse_warning) when fewer than COLLAPSE of the answers are distinct; and rank 0's first
    SAMPLES samples (eval/completions: rows for the trackers, not metrics.jsonl).
    c: the stage's Config (max_new_tokens, temperature, seed, minibatch_size); name: the stage's, for the warning."""
    recs = dist.share(records, d)
    room = policy.config.max_seq_len - c.max_new_tokens
    ids = rl.encode_prompts(tok, recs, room)
    r = rl.generate(policy, tok, ids, c.max_new_tokens, c.temperature, seed=c.seed + 1_000_003 + d.rank, bf16=bf16)
    chunk = max(1, c.minibatch_size // d.world)
    with torch.no_grad(), amp, rl.reference(policy, ref) as ref:
        kl = ((r.logprobs - rl.logprobs_of(ref, r, c.temperature, chunk)) * r.mask).sum(1)
        reward = rl.in_chunks(reward_fn, r, chunk)
    texts = rl.decode(tok, r)
    if d.main:
        for rec, text in list(zip(recs, texts))[:show]:
            print(f"  user> {prompt_text(rec)}\n  assistant> {text}", flush=True)
    # The collapse monitor reads greedy answers: sampled at temperature 1, a small model's answers stay
    # apart by their noise alone (a demo run: 64 of 64 sampled answers distinct at every evaluation
    # while its greedy answers were 4 different replies to 83 questions).
    greedy = rl.generate(policy, tok, ids, c.max_new_tokens, 0.0, seed=0, bf16=bf16)
    answers = dist.gathered(rl.decode(tok, greedy), d)  # every rank's, in prompt order
    distinct, similarity = answer_diversity(answers)
    if d.main and distinct < COLLAPSE:
        print(collapse_warning(name, c, len(answers), distinct, similarity), flush=True)
    stats = with_gold(dist.all_means({"eval/scores": reward.float().mean(), **gold_sums(recs, texts),
                                      "eval/kl": kl.float().mean(), "eval/eot_rate": r.ended.float().mean(),
                                      "eval/length": r.lengths.float().mean()}, d.device), "eval/gold", always=True)
    # the first few samples with their rewards, for the trackers' table (TRL's LogCompletionsCallback)
    samples = [{"prompt": prompt_text(rec), "completion": text, "reward": round(float(v), 4)}
               for rec, text, v in list(zip(recs, texts, reward.tolist()))[:SAMPLES]] if d.main else []
    return {**stats, "eval/distinct": distinct, "eval/similarity": similarity, "eval/completions": samples}


# ---------------------------------------------------------------- collapse monitor

COLLAPSE = 0.5  # an evaluation whose share of distinct answers is below this prints a warning


def normalised_answer(text):
    """An answer as the collapse monitor compares answers: lowercased, each run of whitespace one
    space, without leading spaces or trailing punctuation and spaces ("Yes ." and "yes" are one)."""
    return re.sub(r"\s+", " ", text.lower()).strip().rstrip(string.punctuation + " ")


def answer_diversity(texts):
    """(distinct, similarity) of a policy's answers, one to each of n prompts: the number of
    distinct normalised answers / n (1/n when every answer is the same, 1 when all differ) and
    the mean over all pairs of their similarity, 1 for two equal normalised answers and else the
    token F1 of their words (simulated.token_f1; 0 for two answers without a word in common): 1.0
    when all are identical. Reward climbing while distinct falls and similarity rises is mode
    collapse, one answer to every question. O(n^2): meant for an evaluation's few dozen answers.
    Fewer than two answers have no pair: similarity 0 (and no answers, distinct 1)."""
    norm = [normalised_answer(t) for t in texts]
    pairs = [(a, b) for i, a in enumerate(norm) for b in norm[i + 1:]]
    similarity = sum(1.0 if a == b else token_f1(a, b) for a, b in pairs) / len(pairs) if pairs else 0.0
    return (len(set(norm)) / len(norm) if norm else 1.0), similarity


def collapse_warning(name, c, n, distinct, similarity):
    """The one line a stage prints when its policy gives the same few answers to the held-out
    prompts (distinct, of n answers, below COLLAPSE), naming the stage's own options that hold it
    back: --lr, --beta, and PPO's adaptive KL controller (--target-kl) where the Config has one."""
    if getattr(c, "target_kl", None):
        fix = "lower --lr or --target-kl"
    elif hasattr(c, "target_kl"):
        fix = "lower --lr, raise --beta or set --target-kl"
    else:
        fix = "lower --lr or raise --beta"
    return (f"{name}: warning: the policy is collapsing: {round(distinct * n)} distinct answers to {n} held-out "
            f"prompts ({distinct:.2f}), mean pairwise similarity {similarity:.2f}; "
            f"a reward that climbs on one answer to everything is not progress ({fix})")
