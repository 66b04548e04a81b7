"""Whole conversations through the ranking app: a multi-turn prompt with a system message is what
labelers see (API), what the export writes, what the reward model and DPO train on and what PPO
samples and scores, token for token in the model's chat template."""

import json

import httpx
import pytest

from common import tiny_model_dir
from shoggoth.data.prompts import load_prompts, prompt_text
from shoggoth.data.rankings import encode_rankings
from shoggoth.train import rl
from shoggoth.lm import tokenizer
from shoggoth.feedback import accounts, assignments, jobs
from shoggoth.feedback.db import connect
from shoggoth.stages import dpo, reward

ADMIN = "admin-secret-token"
CHATS = [
    [{"role": "system", "content": "You are a terse pirate. Never name the island."},
     {"role": "user", "content": "Who made the heavens?"},
     {"role": "assistant", "content": "In the beginning God created the heaven and the earth."},
     {"role": "user", "content": "And the earth?"}],
    [{"role": "system", "content": "Answer in the words of the King James Bible."},
     {"role": "user", "content": "What was upon the face of the deep?"}],
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("policy") / "m")


def every_task(db):
    """Every task of a database as a labeler gets it (each skipped to get the next)."""
    e = connect(db)
    lid = accounts.create_labeler(e, "ann")[0]
    got = []
    while (t := assignments.next_task(e, lid)) is not None:
        got.append(t)
        assignments.skip(e, lid, t["task_id"])
    return got


def test_a_conversation_is_the_same_from_labeler_to_reward_dpo_and_ppo(live_app, db_url, policy, tmp_path):
    srv = live_app
    prompts = tmp_path / "prompts.jsonl"
    # the last prompt's trailing assistant turn is its reference, not part of the prompt (prompts.prompt_record)
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS[:1])
                       + json.dumps({"messages": CHATS[1] + [{"role": "assistant", "content": "Darkness."}]}) + "\n")
    records = load_prompts(str(prompts), log=lambda *_: None)
    assert [r["messages"] for r in records] == CHATS
    assert jobs.generate(policy, prompts, 3, db_url, campaign="chat", rankings_per_task=1, max_new_tokens=8) == ("chat", 2)

    # 1. the labeler gets the whole conversation (and its last user message as `prompt`), and ranks it
    session = accounts.trade_invite(srv.engine, accounts.create_labeler(srv.engine, "ann")[1])[2]
    seen = {}
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {session}"}) as c:
        while (task := c.post("/api/next").json()["task"]) is not None:
            seen[task["task_id"]] = task
            ranking = [[x["id"]] for x in task["completions"]]
            assert c.post(f"/api/tasks/{task['task_id']}/ranking", json={"ranking": ranking}).status_code == 201
        mine = c.get("/api/rankings").json()["rankings"]
    assert sorted((t["messages"] for t in seen.values()), key=len, reverse=True) == CHATS
    assert {t["prompt"] for t in seen.values()} == {prompt_text(r) for r in records}
    assert {r["task_id"]: r["messages"] for r in mine} == {tid: t["messages"] for tid, t in seen.items()}

    # 2. the export (the admin's download) writes it whole as `messages`, its last user message as `prompt`
    exported = tmp_path / "rankings.jsonl"
    exported.write_bytes(httpx.get(f"{srv.url}/admin/export.jsonl", headers={"Authorization": f"Bearer {ADMIN}"}).content)
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    assert sorted((r["messages"] for r in rows), key=len, reverse=True) == CHATS
    assert all(r["prompt"] == r["messages"][-1]["content"] for r in rows)

    # 3. token for token: what the reward model and DPO train on against what PPO samples from and scores
    tok = tokenizer.load(policy)
    train, held = reward.load_rankings(reward.Config(rankings=str(exported), eval_frac=0, heldout_prompts="none"),
                                       lambda *_: None)
    assert held == [] and len(train) == 2
    encode_rankings(train, tok, 10_000, None)  # the reward stage's rows (prompt + completion, to its end of turn)
    dpo_rows, _ = dpo.encode_pairs(train, tok, 10_000)  # DPO's rows of the same rankings
    ppo = dict(zip((json.dumps(r["messages"]) for r in records), rl.encode_prompts(tok, records, 10_000)))
    for r in train:
        prompt_ids = ppo[json.dumps(r["prompt"])]  # what PPO's rollout continues, and its reward model scores
        assert tok.tok.decode(prompt_ids).count(r["prompt"][0]["content"]) == 1  # the system prompt is in it
        for row, text in zip(r["rows"], r["completions"]):
            assert row[:len(prompt_ids)] == prompt_ids  # the same conversation, token for token
            assert tok.tok.decode(row[len(prompt_ids):-1], skip_special_tokens=False) == text
            assert row[-1] in tok.stop_ids
    assert [list(ids) for ids, _ in dpo_rows] == [row for r in train for row in r["rows"]]


def test_import_keeps_a_conversation_whole(tmp_path):
    """`feedback import`: an HH transcript's and a conversational pair's earlier turns stay in the task."""
    src = tmp_path / "prefs.jsonl"
    src.write_text(json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: And now?\n\nAssistant: Rest.",
                               "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: And now?\n\nAssistant: Run."})
                   + "\n" + json.dumps({"prompt": CHATS[0], "chosen": "Also God.", "rejected": "Arr."}) + "\n")
    db = tmp_path / "f.db"
    assert jobs.import_preferences(src, db, log=lambda *_: None)[1:] == (2, 2)
    got = every_task(db)
    assert [t["messages"] for t in got] == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                            {"role": "user", "content": "And now?"}], CHATS[0]]
    assert [t["prompt"] for t in got] == ["And now?", "And the earth?"]


def test_compare_keeps_a_conversation_whole(policy, tmp_path):
    """`feedback compare`: a blind evaluation's tasks are the conversations the models answered."""
    prompts = tmp_path / "held.jsonl"
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    db = tmp_path / "f.db"
    assert jobs.compare({"a": policy, "b": policy}, prompts, db, max_new_tokens=4) == ("eval-held", 2)
    got = every_task(db)
    assert [t["messages"] for t in got] == CHATS and got[0]["campaign"] == "evaluation"
