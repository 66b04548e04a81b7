"""SFT conversations: TRL's conversational ({"messages": [...]}) and prompt/completion records, or
the built-in chatterbot-corpus split into train and held-out by question. Checked (`messages` is
the one check of a list of chat messages, which prompts and rankings use too), encoded in the
model's chat template with the loss on the assistant's tokens only, packed into rows and collated
with each token's position and conversation."""

import importlib.util
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from .rows import read_records


def messages(msgs, where, what="'messages'", blank=True):
    """The one check of a list of chat messages (SFT conversations, prompts, rankings' prompts):
    a non-empty list of {"role": one of tokenizer.ROLES, "content": a string} (blank=False: a
    string with text) -> the messages with just those two keys, or a DataError naming `where`."""
    from ..lm.tokenizer import ROLES

    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: {what} must be a non-empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise DataError(f"{where}: message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str) or not (blank or m["content"].strip()):
            raise DataError(f"{where}: message {i} ({m['role']}) has {'non-string' if blank else 'empty or non-string'}"
                            " content")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def conversation(obj, where):
    """A JSON record in TRL's conversational ({"messages": [...]}) or prompt/completion
    format (strings, or lists of messages) -> a validated list of messages."""
    if "messages" in obj:
        msgs = obj["messages"]
    elif "prompt" in obj and "completion" in obj:
        p, c = obj["prompt"], obj["completion"]
        msgs = (p if isinstance(p, list) else [{"role": "user", "content": p}]) + \
               (c if isinstance(c, list) else [{"role": "assistant", "content": c}])
    else:
        raise DataError(f"{where}: expected 'messages', or 'prompt' and 'completion'")
    msgs = messages(msgs, where, blank=False)
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant turn to learn from")
    return msgs


def encode_conversations(convs, tok, seq_len):
    """Conversations -> (ids, labels) arrays, labels -100 where there is no loss; longer
    ones truncated to seq_len (counted)."""
    out, cut = [], 0
    for conv in convs:
        ids, mask = tok.render_chat(conv)
        ids, labels = np.array(ids), np.array(mask)
        # Predict token t+1 from t: the label of position t is the next token, if it is trained on.
        labels = np.where(np.roll(labels, -1) == 1, np.roll(ids, -1), -100)
        labels[-1] = -100
        if len(ids) > seq_len:
            ids, labels, cut = ids[:seq_len], labels[:seq_len], cut + 1
        if (labels != -100).any():
            out.append((ids, labels))
    return out, cut


def pack(examples, seq_len, order):
    """Greedy packing in `order`: a new row starts when the next example does not fit."""
    rows, row, used = [], [], 0
    for i in order:
        n = len(examples[i][0])
        if used + n > seq_len and row:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


def collate(examples, rows, seq_len, pad_id):
    """Packed rows -> ids, labels, positions and documents (B, T): which example each token
    belongs to (-1 = padding), for model.Documents."""
    import torch

    B = len(rows)
    ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), -100, dtype=torch.long)
    pos = torch.zeros((B, seq_len), dtype=torch.long)
    seg = torch.full((B, seq_len), -1, dtype=torch.long)  # which example each token belongs to
    for b, row in enumerate(rows):
        t = 0
        for j, i in enumerate(row):
            x, y = examples[i]
            n = len(x)
            ids[b, t:t + n], labels[b, t:t + n] = torch.from_numpy(x), torch.from_numpy(y)
            pos[b, t:t + n], seg[b, t:t + n] = torch.arange(n), j
            t += n
    return ids, labels, pos, seg


def read_conversations(path, skip_invalid=False, log=print):
    """Conversations of an SFT JSONL file. A bad line is an error naming it, or
    with skip_invalid a counted, reported skip; never a silent drop."""
    return read_records(path, conversation, "conversations", skip_invalid, log)


def chatterbot_conversations(split, heldout_every=10):
    """The English chatterbot-corpus as conversations, split by opening question:
    a question (and all its answers) is held out when crc32(question) % heldout_every == 0.
    Dialogues alternate user/assistant; a trailing unanswered user turn is dropped."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise DataError("built-in SFT data: chatterbot-corpus is not installed (pip install chatterbot-corpus==1.3.3)")
    root = Path(spec.submodule_search_locations[0]) / "data" / "english"
    out = []
    for f in sorted(root.glob("*.yml")):
        for conv in yaml.safe_load(f.read_text())["conversations"]:
            turns = [str(t).strip() for t in conv]
            turns = turns[: len(turns) // 2 * 2]
            if not turns or any(not t for t in turns):
                continue
            held = zlib.crc32(turns[0].lower().encode()) % heldout_every == 0
            if held == (split == "heldout"):
                out.append([{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)])
    return out

