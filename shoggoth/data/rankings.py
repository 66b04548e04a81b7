"""Rankings, the raw human signal: K completions of a prompt ranked (rank 0 best, ties share a
rank), or TRL pairs. Checked (`ranking`), split into train and held-out by prompt (refusing any
prompt held out for evaluation), encoded into the token rows a reward model scores, and batched for
the reward model and DPO in each epoch's order fixed by the seed (`epoch_batches`: the same batch at
the same step on resume), a task ranked by several labelers kept in one batch (`grouped_batches`)."""

import json
import math
import zlib

import numpy as np

from ..errors import DataError
from .conversations import messages
from .prompts import load_prompts
from .rows import read_records


def ranking(obj, where):
    """A rankings record {"prompt", "completions", "ranks"} (rank 0 best, ties share a
    rank) or a TRL pair {"prompt", "chosen", "rejected"} (standard or conversational,
    explicit or implicit prompt) -> {"prompt": messages, "completions", "ranks"}. A list `messages`
    is the prompt also next to a `prompt`: the feedback app's export writes the whole conversation
    there and its last user message as `prompt` (for tools that read a string)."""
    msgs = obj.get("messages")
    prompt = msgs if isinstance(msgs, list) else obj.get("prompt", msgs)
    if "chosen" in obj or "rejected" in obj:
        completions, ranks = [obj.get("chosen"), obj.get("rejected")], [0, 1]
        if all(isinstance(c, list) and c and isinstance(c[-1], dict) for c in completions):
            if prompt is None:  # implicit prompt: the conversation before the last turn
                prompt = completions[0][:-1]
            completions = [c[-1].get("content") for c in completions]
    else:
        completions, ranks = obj.get("completions"), obj.get("ranks")
    if prompt is None:
        raise DataError(f"{where}: expected 'prompt' as a string or a non-empty list of messages")
    prompt = messages([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt, where, "'prompt'")
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise DataError(f"{where}: expected 'completions' as a list of strings (or 'chosen' and 'rejected')")
    if len(completions) < 2:
        raise DataError(f"{where}: {len(completions)} completion(s): a ranking needs at least 2")
    if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                                              for r in ranks):
        raise DataError(f"{where}: expected 'ranks' as a list of non-negative integers (0 = best)")
    if len(ranks) != len(completions):
        raise DataError(f"{where}: {len(ranks)} ranks for {len(completions)} completions")
    return {"prompt": prompt, "completions": completions, "ranks": ranks, "where": where}


def prompt_key(rec):
    """A ranking's prompt as one string: what makes two rankings rankings of the same prompt."""
    return json.dumps(rec["prompt"], sort_keys=True)


def read_rankings(path, skip_invalid=False, log=print):
    """Rankings (or TRL pairs) of a JSONL file; every line is its own ranking, also when
    several labelers ranked the same completions. A ranking that ties all its completions
    is valid but holds no pair: it is left out, and counted."""
    recs = read_records(path, ranking, "rankings", skip_invalid, log)
    tied = [r["where"] for r in recs if not has_pair(r)]
    if tied:
        log(f"data: {path}: {len(tied)} ranking(s) tie all their completions or rank only identical texts apart "
            f"(no pair to learn from), left out (first: {tied[0]})")
    if len(tied) == len(recs):
        raise DataError(f"{path}: no ranking holds two different texts at different ranks: no pair to learn from")
    return [r for r in recs if has_pair(r)]


def has_pair(rec):
    """Whether a ranking orders two different texts (a chosen equal to its rejected teaches nothing)."""
    ranked = list(zip(rec["completions"], rec["ranks"]))
    return any(a != b and ra != rb for i, (a, ra) in enumerate(ranked) for b, rb in ranked[i + 1:])


def question(messages):
    """A prompt's user turns, case and spacing folded: what makes two prompts the same question."""
    return tuple(" ".join(m["content"].casefold().split()) for m in messages if m["role"] == "user")


def refuse_heldout(records, heldout="builtin", log=print):
    """Stop (DataError) when a training record's prompt (messages) is one of the prompts held out
    for evaluation, the blind win rates of `shoggoth feedback compare` and `shoggoth demo`:
    heldout is "builtin" (the chatterbot-corpus held-out questions), a prompts JSONL, or "none"."""
    if heldout == "none":
        return
    held = {question(r["messages"]) for r in load_prompts("" if heldout == "builtin" else heldout,
                                                         log=lambda *_: None, split="heldout")}
    bad = [r for r in records if question(r["prompt"]) in held]
    if bad:
        raise DataError(f"{len(bad)} of {len(records)} training rankings are of prompts held out for evaluation "
                        f"(--heldout-prompts {heldout}), first {bad[0]['where']}: {bad[0]['prompt'][-1]['content']!r}. "
                        "Evaluation prompts never feed training: leave those rankings out (`feedback export` leaves "
                        "evaluation campaigns out), or name the prompts you hold out with --heldout-prompts FILE "
                        "(none: no check)")
    log(f"data: none of the {len(records)} training rankings is of the {len(held)} prompts held out for evaluation "
        f"({heldout})")


def split_rankings(path, eval_path="", eval_frac=0.1, skip_invalid=False, log=print, heldout="builtin"):
    """(train, held-out) rankings of path. Without eval_path the held-out share is a set of
    ceil(eval_frac * prompts) prompts, chosen by a hash of the prompt (the same every run), so
    that no held-out prompt has rankings in training. Rankings of path whose prompt is held out
    for evaluation (`heldout`, see refuse_heldout) are refused."""
    train = read_rankings(path, skip_invalid, log)
    refuse_heldout(train, heldout, log)
    if eval_path:
        return train, read_rankings(eval_path, skip_invalid, log)
    return hold_out(train, eval_frac)


def hold_out(rankings, frac):
    """(train, held-out) rankings: the held-out ones are those of ceil(frac x prompts) prompts, chosen
    by a hash of the prompt (the same every run), so that no held-out prompt has rankings in training."""
    prompts = sorted({prompt_key(r) for r in rankings}, key=lambda k: (zlib.crc32(k.encode()), k))
    held = set(prompts[:math.ceil(frac * len(prompts))] if len(prompts) > 1 else [])
    return [r for r in rankings if prompt_key(r) not in held], [r for r in rankings if prompt_key(r) in held]


def encode_rankings(records, tok, seq_len, pad):
    """Add each ranking's token rows (prompt + completion, to its end of turn); rows longer
    than seq_len keep their last seq_len tokens (counted)."""
    cut = 0
    for r in records:
        rows = reward_rows(tok, r["prompt"], r["completions"])
        if pad is not None and any(pad in row for row in rows):
            raise DataError(f"{r['where']}: the text holds the token {tok.token(pad)!r}, the reward model's "
                            "pad, which would end the row early for transformers' sequence classification")
        cut += sum(len(row) > seq_len for row in rows)
        r["rows"] = [row[-seq_len:] for row in rows]
    return cut


def flatten_rankings(records):
    """Rankings -> their distinct rows, and which (N,), ranks (N,), groups (N,) of every ranked
    completion: its row, its rank, its ranking (for losses.ranking_loss). Several labelers'
    rankings of the same completions share rows, so each row is scored once."""
    import torch

    rows, seen, which, ranks, groups = [], {}, [], [], []
    for g, r in enumerate(records):
        for row in r["rows"]:
            which.append(seen.setdefault(tuple(row), len(seen)))
            if which[-1] == len(rows):
                rows.append(row)
        ranks += r["ranks"]
        groups += [g] * len(r["rows"])
    return rows, torch.tensor(which), torch.tensor(ranks), torch.tensor(groups)


def epoch_batches(items, batch_size, epochs, seed, world):
    """Every epoch's batches of items, each epoch in a fresh order fixed by the seed, so that
    step s always sees the same batch; a last batch too small to give each of world ranks an
    item is dropped."""
    batches = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(items))
        batches += [[items[i] for i in order[b:b + batch_size]] for b in range(0, len(order), batch_size)
                    if len(order) - b >= world]
    return batches


def grouped_batches(records, batch_size, epochs, seed, world):
    """Every epoch's batches of rankings (epoch_batches' order and rules), where the rankings
    of the same prompt and completions (one task ranked by several labelers) stay together: whole
    tasks fill a batch up to batch_size rankings, and their rows are scored once."""
    tasks = {}
    for r in records:
        tasks.setdefault((prompt_key(r), tuple(r["completions"])), []).append(r)
    batches = []
    for epoch in epoch_batches(list(tasks.values()), len(tasks), epochs, seed, 1):
        batch = []
        for task in epoch:
            if batch and len(batch) + len(task) > batch_size:
                batches.append(batch)
                batch = []
            batch += task
        if len(batch) >= world:  # a last batch too small to give each rank a ranking is dropped
            batches.append(batch)
    return batches


def reward_rows(tok, prompt, completions):
    """Token ids a reward model scores: the prompt messages and each completion as the
    assistant turn, in the model's chat template, ending at that turn's end-of-turn token."""
    return [tok.render_reply(prompt, c)[0] for c in completions]


def pad_right(rows, pad_id):
    """Rows of token ids -> idx (B, T) right-padded with pad_id, and last (B,) the column
    of each row's last real token (where a reward model reads its score)."""
    import torch

    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        idx[b, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return idx, torch.tensor([len(r) - 1 for r in rows])

