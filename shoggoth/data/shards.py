"""A corpus tokenized into memory-mapped token shards, and pretraining's batches from them.
`build_shards` writes {train,val}_NNN.bin and meta.json (reused while the corpus files and the
tokenizer are unchanged); `TokenShards` gives deterministic random windows over them, so that a
resumed run sees exactly the batches an uninterrupted one would have seen."""

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import DataError
from .corpus import CorpusStats, corpus_files, iter_documents
from .files import atomic_write, write_json
from .rows import open_dataset

SHARD_TOKENS = 1 << 27  # 128M tokens (256 MB of uint16) per shard file


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

