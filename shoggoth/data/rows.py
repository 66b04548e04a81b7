"""Where every reader gets its records. `iter_rows` yields (where, row) of a source: the lines of
a JSONL file, or through the `datasets` library (the optional extra shoggoth[datasets]) the rows of
Parquet and Arrow files, `save_to_disk` folders and hub dataset ids; `where` names the row for
errors ("FILE:LINE", "SOURCE row N").

The column formats the readers do not know themselves are converted here, once for every stage
(`standard`): Anthropic HH transcripts and scored completions (UltraFeedback). `read_records`
reads a source through one kind of record check (conversations, prompts, rankings): a bad row is a
DataError naming it, or with skip_invalid a counted, reported skip; nothing is dropped without
being counted. No numpy, no torch."""

import json
import math
import re
from pathlib import Path

from ..errors import DataError
from .files import looks_local

TEXT_SUFFIXES = {".txt", ".md"}
JSONL_SUFFIXES = {".jsonl"}
DATASET_SUFFIXES = {".parquet", ".arrow"}  # read through the `datasets` library
DATASETS_EXTRA = "pip install 'shoggoth[datasets]'"


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

