"""Blind win rates (issue #17): the statistics against hand-computed values, the evaluation campaign's
blindness over real HTTP, its exclusion from training exports, and `shoggoth feedback compare|winrate`.
(tests/test_reward.py: reward and DPO refuse rankings of held-out prompts.)"""

import json
import math
import random
import re
import time
from collections import Counter

import httpx
import numpy as np
import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from common import tiny_model_dir
from shoggoth.cli import main
from shoggoth.errors import DataError
from shoggoth.feedback import accounts, assignments, campaigns, jobs, queries
from shoggoth.feedback.db import Completion, connect, writing
from shoggoth.feedback import winrate as W


def judgement(task, labeler, ranks, models=("A", "B"), lengths=None):
    return {"task_id": task, "labeler": labeler, "ranks": list(ranks), "models": list(models),
            "lengths": list(lengths or [10] * len(models))}


# ---------------------------------------------------------------- the statistics, by hand


def test_win_rate_ties_and_interval_by_hand():
    rows = [judgement(1, "x", [0, 1]),  # A above B: 1
            judgement(1, "y", [0, 0]),  # a tie: 0.5
            judgement(2, "x", [1, 0]),  # B above A: 0
            judgement(3, "x", [0, 1]),  # 1
            judgement(4, "x", [0, 1, 1], ("C", "A", "B"))]  # A and B tied below C: 0.5
    p = W.pair(rows, "A", "B")
    assert p["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1 + 0.5) / 5)
    assert (p["n"], p["prompts"]) == (5, 4)
    assert p["per_labeler"] == {"x": {"win_rate": pytest.approx(2.5 / 4), "n": 4}, "y": {"win_rate": 0.5, "n": 1}}
    # Resamples of 4 prompts all of prompt 2 (rate 0) or all of prompt 3 (rate 1) are 1/256 each,
    # under 2.5%: the interval's ends lie inside (0, 1); where exactly is checked below on cases
    # whose bootstrap distribution is known.
    assert 0 < p["ci"][0] < p["win_rate"] < p["ci"][1] < 1
    assert W.pair(rows, "C", "A")["win_rate"] == 1.0 and W.pair(rows, "C", "B")["n"] == 1


def test_intervals_known_exactly():
    # Two prompts, one win and one loss: a resample is both wins (1/4), both losses (1/4) or one
    # of each (1/2), so the 2.5% and 97.5% points are 0 and 1; the win rate is 1/2.
    p = W.pair([judgement(1, "x", [0, 1]), judgement(2, "x", [1, 0])], "A", "B")
    assert p["win_rate"] == 0.5 and p["ci"] == [0.0, 1.0]
    # Every judgement a win (or every one a tie): every resample gives the same rate.
    wins = [judgement(i, "x", [0, 1], lengths=(10 + i, 10)) for i in range(6)]
    assert W.pair(wins, "A", "B")["ci"] == [1.0, 1.0]
    ties = [judgement(i, "x", [0, 0]) for i in range(6)]
    assert W.pair(ties, "A", "B")["win_rate"] == 0.5 and W.pair(ties, "A", "B")["ci"] == [0.5, 0.5]
    assert W.pair(ties, "A", "B")["lc_win_rate"] == pytest.approx(0.5)
    # Two prompts with 3 judgements, one with 1 (outcomes 1,1,1 and 0): resamples give 1 (1/4), 0
    # (1/4) or 3/4 (1/2): the rate of a resample weighs prompts by their judgements.
    p = W.pair([judgement(1, "x", [0, 1]), judgement(1, "y", [0, 1]), judgement(1, "z", [0, 1]),
                judgement(2, "x", [1, 0])], "A", "B")
    assert p["win_rate"] == 0.75 and p["ci"] == [0.0, 1.0]
    draws = Counter(round(float(v), 6) for w in W.prompt_weights([1, 1, 1, 2], 4000, 0) for v in
                    (w @ [1, 1, 1, 0]) / w.sum(1))
    assert set(draws) == {0.0, 0.75, 1.0} and abs(draws[0.75] / 4000 - 0.5) < 0.03
    # The same seed, the same interval; the pair turned around: 1 - each end.
    rows = [judgement(i, lab, [0, 1] if (i * 7 + len(lab)) % 3 else [1, 0]) for i in range(20) for lab in ("x", "yy")]
    ab = W.pair(rows, "A", "B")
    assert W.pair(rows, "A", "B") == ab
    s = W.summary(rows, ["B", "A"])
    assert s["pairs"][0]["a"] == "A" and s["pairs"][0]["ci"] == ab["ci"]  # the later-listed over the earlier
    ba = W.lookup(s, "B", "A")
    assert ba["win_rate"] == pytest.approx(1 - ab["win_rate"])
    assert ba["ci"] == pytest.approx([1 - ab["ci"][1], 1 - ab["ci"][0]])
    assert W.pair(rows, "B", "A")["ci"] == pytest.approx(ba["ci"])  # the bootstrap draws the same prompts


def test_length_controlled_win_rate_by_hand():
    """With two length differences, +d and -d, the fit is saturated: sigmoid(t + f x) at x = +a and
    -a equals the win rate at each, so t = (logit p+ + logit p-) / 2. A wins 9 of 10 when longer and
    1 of 2 when shorter: raw 10/12, length-controlled sigmoid((log 9 + 0) / 2) = 3/4."""
    rows = [judgement(i, "x", [0, 1] if i < 9 else [1, 0], lengths=(200, 100)) for i in range(10)]
    rows += [judgement(10, "x", [0, 1], lengths=(100, 200)), judgement(11, "x", [1, 0], lengths=(100, 200))]
    p = W.pair(rows, "A", "B")
    assert p["win_rate"] == pytest.approx(10 / 12)
    assert p["lc_win_rate"] == pytest.approx(0.75, abs=1e-3)  # (the ridge moves it by 1e-4)
    assert W.pair(rows, "B", "A")["lc_win_rate"] == pytest.approx(0.25, abs=1e-3)
    assert p["lc_ci"][0] < 0.75 < p["lc_ci"][1]
    # A wins 3 of 4 when longer and 1 of 4 when shorter: all the length; controlled, a coin flip.
    rows = [judgement(i, "x", [0, 1] if i % 4 else [1, 0], lengths=(50, 20)) for i in range(8)]
    rows += [judgement(8 + i, "x", [1, 0] if i % 4 else [0, 1], lengths=(20, 50)) for i in range(4)]
    p = W.pair(rows, "A", "B")
    assert p["win_rate"] == pytest.approx(7 / 12) and p["lc_win_rate"] == pytest.approx(0.5, abs=1e-3)
    # Equal lengths: nothing to control; the fit gives the plain win rate.
    rows = [judgement(i, "x", [0, 1] if i % 4 else [1, 0]) for i in range(8)]
    assert W.pair(rows, "A", "B")["lc_win_rate"] == pytest.approx(0.75, abs=1e-3)
    # The fit itself, without lengths: theta_1 - theta_0 is the logit of the weighted mean outcome.
    theta = W.fit(np.array([1, 1, 1]), np.array([0, 0, 0]), W.length_feature([0, 0, 0]), np.array([1.0, 0.0, 0.5]),
                  np.array([[1.0, 1.0, 1.0], [3.0, 1.0, 0.0]]), 2, ridge=1e-12)
    assert theta[:, 1] - theta[:, 0] == pytest.approx([0.0, math.log(3)])


def test_length_taste_is_learnt_from_every_pair():
    """Labelers who prefer the longer answer, whoever wrote it: they rank by length / 20 plus Gumbel
    noise (so that a pair's outcome is logistic in the length difference, the fit's own form). A's
    answers are always longer than B's: on A against B alone, length and model cannot be told apart;
    C's, now long, now short, show that length is what wins, and A over B at equal length is a coin flip."""
    rng = random.Random(0)
    rows = []
    for t in range(200):
        lengths = {"A": rng.randint(60, 80), "B": rng.randint(30, 50), "C": rng.randint(0, 110)}
        taste = {m: n / 20 - math.log(-math.log(rng.random())) for m, n in lengths.items()}
        order = sorted(lengths, key=lambda m: -taste[m])
        rows.append(judgement(t, "x", [order.index(m) for m in "ABC"], "ABC", [lengths[m] for m in "ABC"]))
    s = W.summary(rows, ["B", "A", "C"], resamples=200)
    for a, b in (("A", "B"), ("C", "B"), ("C", "A")):
        p = W.lookup(s, a, b)
        assert p["lc_ci"][0] < 0.5 < p["lc_ci"][1] and abs(p["lc_win_rate"] - 0.5) < 0.05, p
    assert W.lookup(s, "A", "B")["win_rate"] > 0.75 and W.lookup(s, "A", "B")["ci"][0] > 0.7


def test_summary_sentence_and_table():
    rng = random.Random(0)
    models = ["pretrained", "sft", "ppo", "dpo"]
    rows = []
    for task in range(30):
        for lab in ("a", "b"):
            order = sorted(models, key=lambda m: rng.random() - 0.3 * models.index(m))  # later models tend to win
            rows.append(judgement(task, lab, [order.index(m) for m in models], models, [rng.randint(5, 50) for _ in models]))
    s = W.summary(rows, models)
    assert [(p["a"], p["b"]) for p in s["pairs"]] == [("sft", "pretrained"), ("ppo", "pretrained"), ("ppo", "sft"),
                                                      ("dpo", "pretrained"), ("dpo", "sft"), ("dpo", "ppo")]
    assert (s["judgements"], s["prompts"], s["labelers"]) == (60, 30, ["a", "b"])
    assert s["agreement"]["pairs"] == 30 and set(s["mean_length"]) == set(models)
    line = W.sentence(s, "ppo", ["sft", "dpo"], {"ppo": "PPO", "sft": "SFT", "dpo": "DPO"})
    assert re.fullmatch(r"PPO preferred over SFT \d+% \[\d+%, \d+%\] of the time; over DPO \d+% \[\d+%, \d+%\]", line)
    table = "\n".join(W.table(s))
    assert "ppo over sft" in table and "per labeler: a " in table and "30 prompts, 60 judgements by 2 labelers" in table


# ---------------------------------------------------------------- blindness, over real HTTP


MODELS = ["zebra", "quokka", "narwhal"]  # names that no answer, page or id could hold by chance


def eval_campaign(engine, n, name="zebra-vs-quokka-vs-narwhal", per_task=3, seed=None):
    """An evaluation campaign of n prompts: each model's answer is a neutral text that says nothing of it."""
    rng = random.Random(1)
    records = [{"prompt": f"question number {i}?", "references": []} for i in range(n)]
    answers = {m: [f"reply {rng.randrange(10 ** 6)}" for _ in range(n)] for m in MODELS}
    jobs.add_comparison(engine, name, records, answers, {"temperature": 1.0, "seed": 0}, per_task,
                        rng=None if seed is None else random.Random(seed))
    return answers


def model_of(engine):
    with Session(engine) as s:
        return dict(s.execute(select(Completion.id, Completion.model)).all())


def test_labelers_see_nothing_of_the_models(live_app):
    """Every labeler-facing response (the page, its script, every /api/ answer) for a whole campaign
    holds no model name, nor the campaign's own name (which names them); and neither the order
    answers are shown in, nor their ids, nor their order in a labeler's rankings follow the models."""
    srv = live_app
    n = 30
    eval_campaign(srv.engine, n)
    who = model_of(srv.engine)
    bodies, first_shown, first_id, first_listed, id_orders = [], Counter(), Counter(), Counter(), set()
    with httpx.Client(base_url=srv.url) as c:
        for lab in ("ann", "ben", "cy"):
            auth = {"Authorization": f"Bearer {accounts.trade_invite(srv.engine, accounts.create_labeler(srv.engine, lab)[1])[2]}"}
            for path in ("/label", "/static/label.js", "/api/me"):
                bodies.append(c.get(path, headers=auth).text)
            while True:
                r = c.post("/api/next", headers=auth)
                bodies.append(r.text)
                task = r.json()["task"]
                if task is None:
                    break
                assert task["campaign"] == "evaluation"
                shown = [x["id"] for x in task["completions"]]
                first_shown[who[shown[0]]] += 1
                first_id[who[min(shown)]] += 1
                id_orders.add(tuple(who[i] for i in sorted(shown)))
                groups = [[i] for i in random.Random(task["task_id"]).sample(shown, len(shown))]
                r = c.post(f"/api/tasks/{task['task_id']}/ranking", json={"ranking": groups}, headers=auth)
                assert r.status_code == 201
                bodies.append(r.text)
            r = c.get("/api/rankings?limit=500", headers=auth)
            bodies.append(r.text)
            for row in r.json()["rankings"]:
                first_listed[who[min(x["id"] for x in row["shown"] if x["text"] == row["completions"][0])]] += 1
    assert len(bodies) > 3 * n
    for body in bodies:
        for m in MODELS:
            assert m not in body.lower()
    # Over 90 tasks shown (30 prompts, 3 labelers), every model comes first now and then, in each sense.
    for counts in (first_shown, first_id, first_listed):
        assert set(counts) == set(MODELS) and max(counts.values()) < 0.6 * 3 * n, counts
    assert len(id_orders) >= 4  # of the 6 orders of 3 models by id, not one fixed
    # What the labelers said, read back by model: the admin's win rates see every ranking.
    settings, rows = queries.judgements(srv.engine, "zebra-vs-quokka-vs-narwhal")
    assert settings["models"] == MODELS and len(rows) == 3 * n
    assert all(sorted(r["models"]) == sorted(MODELS) for r in rows)
    with httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer admin-secret-token"}) as c:
        deadline = time.monotonic() + 60
        while (camp := c.get("/admin/api/overview").json()["campaigns"][0])["winrate_status"]["state"] != "ready":
            assert time.monotonic() < deadline, camp["winrate_status"]  # computed in the background
            time.sleep(0.1)
        assert camp["evaluation"] and [(p["a"], p["b"]) for p in camp["winrate"]["pairs"]] == [
            ("quokka", "zebra"), ("narwhal", "zebra"), ("narwhal", "quokka")]
        page = c.get("/admin").text
        assert 'id="winrate-1"' in page and "quokka</b> over <b>zebra" in page


def test_evaluations_stay_out_of_training_exports(db_url, tmp_path):
    e = connect(db_url)
    campaigns.add_tasks(e, "train", [{"prompt": "p", "completions": ["a", "b"]}], rankings_per_task=1)
    answers = eval_campaign(e, 2, name="ev", per_task=1)
    lid = accounts.create_labeler(e, "l")[0]
    while (t := assignments.next_task(e, lid)) is not None:
        assignments.submit(e, lid, t["task_id"], [[c["id"]] for c in t["completions"]])
    assert [r["campaign"] for r in queries.export_rows(e)] == ["train"]
    assert [r["prompt"] for r in queries.export_rows(e, as_pairs=True)] == ["p"]
    rows = list(queries.export_rows(e, "ev"))  # named: there, with the model of each completion
    assert len(rows) == 2 and all(set(r["models"]) == set(MODELS) for r in rows)
    for r in rows:
        assert [answers[m][r["task_id"] - 2] for m in r["models"]] == r["completions"]
    assert "models" not in next(queries.export_rows(e, "train"))
    with pytest.raises(DataError, match="exists already"):
        eval_campaign(e, 2, name="ev")
    with pytest.raises(DataError, match="exists already"):
        eval_campaign(e, 2, name="train")
    with pytest.raises(DataError, match="not an evaluation"):
        queries.judgements(e, "train")


def test_stored_order_is_random_per_task_and_seeded(tmp_path):
    e = connect(tmp_path / "f.db")
    eval_campaign(e, 40, seed=3)
    orders = Counter()
    with Session(e) as s:
        for tid in range(1, 41):
            orders[tuple(s.scalars(select(Completion.model).where(Completion.task_id == tid)
                                   .order_by(Completion.idx)))] += 1
    assert len(orders) == 6 and max(orders.values()) < 15
    e2 = connect(tmp_path / "g.db")
    eval_campaign(e2, 40, seed=3)
    assert model_of(e2) == model_of(e)  # the same seed, the same stored order


def test_an_older_database_gets_the_new_columns(db_url):
    e = connect(db_url)
    campaigns.add_tasks(e, "old", [{"prompt": "p", "completions": ["a", "b"]}])
    with writing(e) as s:
        for table, col in (("campaigns", "evaluation"), ("campaigns", "settings"), ("completions", "model")):
            s.execute(text(f"ALTER TABLE {table} DROP COLUMN {col}"))
    e.dispose()
    e = connect(db_url)
    assert {"evaluation", "settings"} <= {c["name"] for c in inspect(e).get_columns("campaigns")}
    assert "model" in {c["name"] for c in inspect(e).get_columns("completions")}
    camp = queries.overview(e)[0][0]
    assert camp["name"] == "old" and camp["evaluation"] is False and camp["settings"] is None
    lid = accounts.create_labeler(e, "l")[0]
    t = assignments.next_task(e, lid)
    assignments.submit(e, lid, t["task_id"], [[c["id"]] for c in t["completions"]])
    assert [r["campaign"] for r in queries.export_rows(e)] == ["old"]
    connect(db_url)  # once there, connecting again leaves them be


# ---------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model") / "m")


def test_compare_then_winrate_commands(tmp_path, model, capsys):
    """The same model twice: the same seed and settings give the same answer to every prompt; ranked
    all tied, the win rate is exactly a half, its interval too."""
    prompts = tmp_path / "held.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Who is {w}?"}) + "\n" for w in ("Moses", "Aaron", "Noah", "Eve")))
    db = str(tmp_path / "f.db")
    assert main(["feedback", "compare", "--models", f"base={model}", f"again={model}", "--prompts", str(prompts),
                 "--db", db, "--max-new-tokens", "12", "--seed", "5", "--rankings-per-task", "2"]) == 0
    assert "evaluation campaign 'eval-held': 4 prompts" in capsys.readouterr().out
    e = connect(db)
    camp = queries.overview(e)[0][0]
    assert camp["evaluation"] and camp["settings"]["seed"] == 5 and camp["settings"]["max_new_tokens"] == 12
    assert camp["settings"]["models"] == ["base", "again"] and camp["settings"]["dirs"]["again"] == str(model)
    for lab in ("u", "v"):
        lid = accounts.create_labeler(e, lab)[0]
        while (t := assignments.next_task(e, lid)) is not None:
            assert len({c["text"] for c in t["completions"]}) == 1  # the same answer from both
            assignments.submit(e, lid, t["task_id"], [[c["id"] for c in t["completions"]]])  # a tie
    assert main(["feedback", "winrate", "--db", db, "--campaign", "eval-held"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"again over base\s+50%\s+\[50%, 50%\]\s+50%\s+\[50%, 50%\]\s+8", out), out
    assert main(["feedback", "winrate", "--db", db, "--campaign", "eval-held", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"][0]["ci"] == [0.5, 0.5]
    # an existing name, bad --models, a campaign that is no evaluation: one line each, exit 1
    for argv, message in (
            (["compare", "--models", f"a={model}", f"b={model}", "--prompts", str(prompts)], "exists already"),
            (["compare", "--models", f"a={model}", "--prompts", str(prompts)], "between 2 and"),
            (["compare", "--models", f"a={model}", f"a={model}", "--prompts", str(prompts)], "given twice"),
            (["compare", "--models", f"a b={model}", f"c={model}", "--prompts", str(prompts)], "NAME=DIR"),
            (["winrate", "--campaign", "nope"], "no campaign named 'nope'")):
        assert main(["feedback", *argv[:1], "--db", db, *argv[1:]]) == 1
        assert message in capsys.readouterr().err
    assert main(["feedback", "export", "--db", db, "--out", str(tmp_path / "x.jsonl")]) == 0
    assert (tmp_path / "x.jsonl").read_text() == ""
