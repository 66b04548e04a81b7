"""Hugging Face datasets as data: Parquet and Arrow files, save_to_disk folders and hub ids (offline:
the one-line error), in the column formats people have (TRL's, Anthropic HH transcripts, scored
completions), read by the real stage readers and a tiny SFT and reward run; bad rows and a missing
`datasets` library as one-line errors."""

import json
import sys

import datasets
import huggingface_hub
import pytest

from common import shoggoth, tiny_model_dir
from shoggoth.data.conversations import read_conversations
from shoggoth.data.corpus import read_corpus
from shoggoth.data.prompts import load_prompts
from shoggoth.data.rankings import read_rankings
from shoggoth.data.shards import build_shards
from shoggoth.errors import DataError
from shoggoth.feedback import jobs

QUIET = {"log": lambda *_: None}
CHATS = [[{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]
         for i in range(12)]


def hh(question, good, bad, before=()):
    """An Anthropic HH row: two transcripts of the same conversation, different last replies."""
    talk = "".join(f"\n\n{role}: {text}" for role, text in before) + f"\n\nHuman: {question}"
    return {"chosen": f"{talk}\n\nAssistant: {good}", "rejected": f"{talk}\n\nAssistant: {bad}"}


def dataset(rows):
    """A Dataset of rows: a row without one of the columns has it null there (as Arrow keeps a JSONL
    record that lacks a field; Dataset.from_list alone would take the first row's columns only)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])


def parquet(path, rows):
    dataset(rows).to_parquet(str(path))
    return path


def saved(path, rows, split=None):
    ds = dataset(rows)
    (datasets.DatasetDict({split: ds, "test": ds}) if split else ds).save_to_disk(str(path))
    return path


def one_line_error(*args):
    r = shoggoth(*args, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")][0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m") / "m")


def test_sft_formats_in_every_kind_of_file_read_alike(tmp_path):
    msgs = [{"messages": c} for c in CHATS]
    strings = [{"prompt": c[0]["content"], "completion": c[1]["content"]} for c in CHATS]
    lists = [{"prompt": c[:1], "completion": c[1:]} for c in CHATS]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in msgs))
    arrow = saved(tmp_path / "one", strings)
    sources = [tmp_path / "m.jsonl", parquet(tmp_path / "m.parquet", msgs), parquet(tmp_path / "s.parquet", strings),
               next(arrow.glob("*.arrow")), arrow, f"{saved(tmp_path / 'dict', lists, 'train')}:train"]
    for source in sources:
        assert read_conversations(source, **QUIET) == CHATS, source
    # The prompts the RL stages and `feedback generate` sample for: the same reader.
    assert [r["messages"] for r in jobs.read_prompts(tmp_path / "s.parquet")] == [c[:1] for c in CHATS]
    assert [r["references"] for r in load_prompts(tmp_path / "m.parquet", **QUIET)] == [[c[1]["content"]]
                                                                                         for c in CHATS]


def test_preference_formats_read_as_rankings(tmp_path):
    user, reply = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}
    rows = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},  # standard
            {"chosen": [user, reply], "rejected": [user, {"role": "assistant", "content": "Go away."}]},  # implicit
            {"prompt": [user], "chosen": [reply], "rejected": [{"role": "assistant", "content": "Go away."}]}]
    for i, row in enumerate(rows):
        got = read_rankings(parquet(tmp_path / f"{i}.parquet", [row]), **QUIET)
        assert [(r["prompt"], r["completions"], r["ranks"]) for r in got] == [([user], ["Hello!", "Go away."], [0, 1])]


def test_hh_transcripts_split_into_the_shared_conversation_and_two_replies(tmp_path):
    rows = [hh("Tell me a joke.", "Why did the chicken cross the road?\n\nTo get to the other side.", "No.",
               before=[("Human", "Hi"), ("Assistant", "Hello! How can I help?")]),
            hh("What is 2 + 2?", "4", "5")]
    got = read_rankings(parquet(tmp_path / "hh.parquet", rows), **QUIET)
    assert got[0]["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                                {"role": "user", "content": "Tell me a joke."}]
    assert got[0]["completions"] == ["Why did the chicken cross the road?\n\nTo get to the other side.", "No."]
    assert got[1]["prompt"] == [{"role": "user", "content": "What is 2 + 2?"}] and got[1]["ranks"] == [0, 1]
    # Its prompts are prompts for PPO and `feedback generate`: the conversation before the replies.
    assert [r["messages"] for r in load_prompts(tmp_path / "hh.parquet", **QUIET)] == [g["prompt"] for g in got]
    bad = [{**hh("Q", "a", "b"), "rejected": "\n\nHuman: Another Q\n\nAssistant: b"},
           {**hh("Q", "a", "b"), "rejected": "\n\nHuman: Q\n\nAssistant: b\n\nHuman: and?"}]
    with pytest.raises(DataError, match=r"bad\.parquet row 0: 'chosen' and 'rejected' differ before their last"):
        read_rankings(parquet(tmp_path / "bad.parquet", bad), **QUIET)
    log = []
    assert len(read_rankings(parquet(tmp_path / "mixed.parquet", rows + bad), skip_invalid=True,
                             log=log.append)) == 2
    assert "2 rankings read, 2 invalid row(s) skipped (first: " in log[0] and "mixed.parquet row 2: 'chosen'" in log[0]
    with pytest.raises(DataError, match=r"one\.parquet row 0: 'rejected' is not an HH transcript ending with an "
                                        r"Assistant: reply"):
        read_rankings(parquet(tmp_path / "one.parquet", bad[1:]), **QUIET)


def test_scored_completions_become_rankings_with_ties(tmp_path):
    rows = [{"instruction": "Name a colour.",  # UltraFeedback
             "completions": [{"response": "Red.", "overall_score": 7.5}, {"response": "Blue!", "overall_score": 9},
                             {"response": "A dog.", "overall_score": 2}, {"response": "Green.", "overall_score": 7.5}]},
            {"prompt": "Count to two.", "completions": [{"text": "1 2", "score": 1}, {"text": "1 3", "score": 0}]},
            {"prompt": "Say hi.", "responses": ["hi", "hello", "bye"], "scores": [3, 3, 1]}]
    got = read_rankings(saved(tmp_path / "uf", rows), **QUIET)
    assert [(r["prompt"][0]["content"], r["completions"], r["ranks"]) for r in got] == [
        ("Name a colour.", ["Red.", "Blue!", "A dog.", "Green."], [1, 0, 2, 1]),
        ("Count to two.", ["1 2", "1 3"], [0, 1]),
        ("Say hi.", ["hi", "hello", "bye"], [0, 0, 1])]
    bad = parquet(tmp_path / "bad.parquet", [rows[2], {"prompt": "p", "responses": ["a", "b"], "scores": [1.0, None]}])
    with pytest.raises(DataError, match=r"bad\.parquet row 1: 'scores' item 1 must be a number \(got None\)"):
        read_rankings(bad, **QUIET)


def test_corpus_from_parquet_and_saved_datasets(tmp_path, model_dir):
    texts = [f"In the beginning {i}." for i in range(6)]
    sources = [parquet(tmp_path / "c.parquet", [{"text": t} for t in texts[:3]]),
               saved(tmp_path / "c", [{"text": t, "id": i} for i, t in enumerate(texts[3:])])]
    assert read_corpus(sources) == texts
    (tmp_path / "folder").mkdir()
    parquet(tmp_path / "folder" / "part-0.parquet", [{"text": t} for t in texts])
    assert read_corpus([tmp_path / "folder"]) == texts  # a folder's Parquet files are read too
    from shoggoth.lm import tokenizer

    tok = tokenizer.load(model_dir)
    first = build_shards(sources, tok, tmp_path / "tok", log=lambda *_: None)
    said = []
    assert build_shards(sources, tok, tmp_path / "tok", log=said.append) == first and "reusing" in said[0]
    with pytest.raises(DataError, match=r"t\.parquet row 1: no string column 'text'"):
        read_corpus([parquet(tmp_path / "t.parquet", [{"text": "a"}, {"title": "no text"}])])
    r = shoggoth("tokenizer", "--corpus", *sources, "--vocab-size", 300, "--out", tmp_path / "tok-dir")
    assert (tmp_path / "tok-dir" / "tokenizer.json").exists(), r.stdout


def test_bad_rows_are_one_line_errors_naming_source_row_and_column(tmp_path, model_dir):
    good = {"messages": CHATS[0]}
    sft = parquet(tmp_path / "sft.parquet", [good, {"messages": [{"role": "wizard", "content": "x"}]}, good])
    assert one_line_error("sft", "--init", model_dir, "--data", sft, "--out", tmp_path / "o") == \
        f"error: {sft} row 1: message 0 has unknown role 'wizard' (expected one of system, user, assistant)"
    ranks = parquet(tmp_path / "r.parquet", [{"prompt": "p", "completions": ["a", "b"], "ranks": [0, 1]},
                                            {"prompt": "p", "completions": ["a", "b"], "ranks": [0]}])
    for stage, flag in (("reward", "--init"), ("dpo", "--policy")):
        assert one_line_error(stage, flag, model_dir, "--rankings", ranks, "--out", tmp_path / "o") == \
            f"error: {ranks} row 1: 1 ranks for 2 completions"
    prompts = parquet(tmp_path / "p.parquet", [{"prompt": "ok"}, {"text": "no prompt"}])
    assert one_line_error("feedback", "generate", "--policy", model_dir, "--prompts", prompts, "--db",
                          tmp_path / "x.db").startswith(f"error: {prompts} row 1: expected a string 'prompt'")
    assert one_line_error("feedback", "compare", "--models", f"a={model_dir}", f"b={model_dir}", "--prompts",
                          prompts, "--db", tmp_path / "x.db").startswith(f"error: {prompts} row 1: ")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert one_line_error("sft", "--init", model_dir, "--data", broken, "--out", tmp_path / "o") \
        .startswith(f"error: {broken}: cannot be read as a dataset (")


def test_splits_missing_paths_and_offline_hub_ids(tmp_path, model_dir, monkeypatch):
    both = saved(tmp_path / "both", [{"messages": c} for c in CHATS], "train")
    with pytest.raises(DataError, match=f"{both}: several splits \\(it has train, test\\): name one as {both}:SPLIT"):
        read_conversations(both, **QUIET)
    with pytest.raises(DataError, match=f"{both}:dev: no split 'dev' \\(it has train, test\\)"):
        read_conversations(f"{both}:dev", **QUIET)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="plain: a folder, but not a dataset that `save_to_disk` wrote"):
        read_rankings(tmp_path / "plain", **QUIET)
    for missing in (tmp_path / "none.parquet", "data/none.jsonl", "./org/name"):
        with pytest.raises(DataError, match=f"^{missing}: no such file or folder$"):
            read_rankings(missing, **QUIET)
    # An id is looked up in the datasets cache only (HF_HUB_OFFLINE=1), where it is not.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for source in ("HuggingFaceH4/ultrafeedback_binarized:train_prefs", "org/prefs"):
        with pytest.raises(DataError, match=f"^{source}: no such file or folder, and no dataset of that id in the "
                                            f"Hugging Face cache {tmp_path / 'cache'} \\(HF_HUB_OFFLINE=1\\)"):
            read_rankings(source, **QUIET)
    assert one_line_error("sft", "--init", model_dir, "--data", "org/chats:train", "--out", tmp_path / "o") \
        .startswith("error: org/chats:train: no such file or folder, and no dataset of that id")


def test_without_the_datasets_library_the_error_names_the_extra(tmp_path, model_dir, monkeypatch):
    pq = parquet(tmp_path / "p.parquet", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    assert one_line_error("reward", "--init", model_dir, "--rankings", pq, "--out", tmp_path / "o") == \
        f"error: {pq}: Parquet, Arrow and Hugging Face datasets are read with the `datasets` library, which is not " \
        "installed: pip install 'shoggoth[datasets]'"
    assert len(read_rankings(tmp_path / "p.jsonl", **QUIET)) == 1  # JSONL needs no datasets


@pytest.mark.slow
def test_tiny_sft_and_reward_runs_on_datasets(tmp_path, model_dir):
    train = parquet(tmp_path / "train.parquet", [{"prompt": c[0]["content"], "completion": c[1]["content"]}
                                                 for c in CHATS])
    held = saved(tmp_path / "held", [{"messages": c} for c in CHATS[:4]], "train")
    out = tmp_path / "sft"
    r = shoggoth("sft", "--init", model_dir, "--data", train, "--eval-data", f"{held}:test", "--out", out,
                 "--max-steps", 3, "--sample-every", 0, "--batch-size", 4, "--eval-every", 3)
    assert f"{train}: 12 conversations read" in r.stdout and (out / "model.safetensors").exists()
    rows = [hh(f"What is {i} + {i}?", f"{2 * i}.", "I will not say.") for i in range(16)]
    rows += [{"prompt": f"Count to {i}.", "completions": [{"text": " ".join(map(str, range(1, i + 1))), "score": 2},
                                                          {"text": "No.", "score": 0}, {"text": "1", "score": 0}]}
             for i in range(2, 10)]
    prefs = saved(tmp_path / "prefs", rows, "train")
    out = tmp_path / "rm"
    r = shoggoth("reward", "--init", model_dir, "--rankings", f"{prefs}:train", "--out", out, "--batch-size", 8,
                 "--dtype", "fp32", "--normalize-samples", 4, "--normalize-max-new-tokens", 4)
    assert f"{prefs}:train: 24 rankings read" in r.stdout and "held-out: pairwise accuracy" in r.stdout
    assert json.loads((out / "config.json").read_text())["reward_shift"] != 0.0
