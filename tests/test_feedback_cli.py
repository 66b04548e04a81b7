"""`shoggoth feedback generate|simulate|export` through the real command line, and the simulated labelers."""

import json
import re
import secrets

import pytest
from sqlalchemy.orm import Session

from common import shoggoth
from shoggoth.cli import main
from shoggoth.feedback import accounts, assignments, campaigns, queries
from shoggoth.feedback.db import Task, connect
from shoggoth.feedback.agreement import agreement, kendall_tau_b, krippendorff_alpha
from shoggoth.evaluation.simulated import SimulatedLabeler, fluency, gold_score, ranks_from_scores

QA = [("What is the capital of France?", "The capital of France is Paris."),
      ("How do I boil an egg?", "Put the egg in boiling water for about eight minutes."),
      ("What color is the sky?", "The sky is blue on a clear day."),
      ("Who wrote Hamlet?", "Hamlet was written by William Shakespeare."),
      ("What do cows drink?", "Cows drink water."),
      ("How many legs does a spider have?", "A spider has eight legs.")]
FILLER = ["And it came to pass in those days that the multitude went up unto the mountain.",
          "I hate this. Terrible, awful question, go away.",
          "Thank you so much, that is a wonderful question! I am happy to help."]


def campaign(db):
    tasks = [{"prompt": q, "references": [a], "completions": [a, *FILLER]} for q, a in QA]
    campaigns.add_tasks(connect(db), "qa", tasks, rankings_per_task=3)


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_simulate_then_export(tmp_path, capsys):
    db = tmp_path / "f.db"
    campaign(db)
    assert main(["feedback", "simulate", "--db", str(db), "--persona", "helpful", "--labelers", "4"]) == 0
    assert "18 rankings by 4 simulated labelers" in capsys.readouterr().out
    assert main(["feedback", "export", "--db", str(db), "--out", str(tmp_path / "r.jsonl")]) == 0
    assert main(["feedback", "export", "--db", str(db), "--out", str(tmp_path / "p.jsonl"), "--pairs"]) == 0
    rows, pairs = read_jsonl(tmp_path / "r.jsonl"), read_jsonl(tmp_path / "p.jsonl")
    assert len(rows) == 18 and {r["labeler"] for r in rows} == {f"sim-helpful-{i}" for i in range(4)}
    for r in rows:
        assert list(r) == ["prompt", "messages", "completions", "ranks", "labeler", "flags", "campaign", "task_id"]
        assert r["messages"] == [{"role": "user", "content": r["prompt"]}]
        assert r["ranks"][r["completions"].index(dict(QA)[r["prompt"]])] == 0  # the reference answer wins
    assert len(pairs) == sum(sum(1 for a in r["ranks"] for b in r["ranks"] if a < b) for r in rows)
    stats = agreement(rows)
    assert 0.4 < stats["tau"] < 1.0 and stats["alpha"] > 0.4  # they agree on the whole, not on everything
    # a second run finds nothing left: every task has its 3 rankings
    assert main(["feedback", "simulate", "--db", str(db), "--persona", "helpful", "--labelers", "4"]) == 0
    assert "0 rankings" in capsys.readouterr().out


def test_simulate_max_tasks_leaves_no_task_held(tmp_path, capsys):
    db = tmp_path / "f.db"
    campaign(db)
    assert main(["feedback", "simulate", "--db", str(db), "--labelers", "2", "--max-tasks", "2"]) == 0
    assert "4 rankings by 2 simulated labelers" in capsys.readouterr().out
    with Session(connect(db)) as s:
        tasks = s.query(Task).all()
        assert sum(t.n_done for t in tasks) == 4
        assert sum(t.n_open for t in tasks) == 0  # a labeler who stopped holds no task another could take


def test_simulated_rankings_are_reproducible(tmp_path):
    # Same tasks, same seed: the same rankings, though each labeler is shown the completions
    # in a shuffled order (the demo's reward-model accuracy depends on it); another seed differs.
    from shoggoth.feedback import jobs

    def rankings(name, seed):
        db = f"sqlite:///{tmp_path / name}"
        campaign(db)
        jobs.simulate(db, persona="balanced", labelers=3, seed=seed)
        jobs.export(db, tmp_path / f"{name}.jsonl")
        return [(r["prompt"], r["labeler"], r["completions"], r["ranks"]) for r in read_jsonl(tmp_path / f"{name}.jsonl")]

    first = rankings("a.db", 0)
    assert rankings("b.db", 0) == first
    assert rankings("c.db", 1) != first


def test_export_with_line_separators_in_completions_reads_back(tmp_path):
    # The export keeps non-ASCII text as it is (ensure_ascii=False), so U+2028, U+2029 and U+0085 stay
    # raw inside its JSON strings: str.splitlines would cut those lines in two (a demo run's reward
    # stage failed on a sampled U+2028). Every reader splits JSONL at "\n" only.
    from shoggoth.data.rankings import read_rankings

    odd = ["one\u2028two", "three\u2029four", "five\x85six"]
    db = tmp_path / "f.db"
    campaigns.add_tasks(connect(db), "qa", [{"prompt": f"question {i}?\u2028", "completions": [c, *FILLER, "Xqv zzkq"]}
                                      for i, c in enumerate(odd)], rankings_per_task=2)  # gibberish: a pair in each
    assert main(["feedback", "simulate", "--db", str(db), "--persona", "helpful", "--labelers", "2"]) == 0
    assert main(["feedback", "export", "--db", str(db), "--out", str(tmp_path / "r.jsonl")]) == 0
    text = (tmp_path / "r.jsonl").read_text()
    assert "\u2028" in text and "\x85" in text  # raw, as exported
    rows = read_rankings(tmp_path / "r.jsonl", log=lambda *a: None)
    assert len(rows) == 6 == text.count("\n")
    assert {c for r in rows for c in r["completions"]} >= set(odd)
    crlf = tmp_path / "crlf.jsonl"  # and a file saved with Windows line ends
    crlf.write_bytes(text.replace("\n", "\r\n").encode())
    assert [r["completions"] for r in read_rankings(crlf, log=lambda *a: None)] == [r["completions"] for r in rows]


def test_bad_prompts_file_names_file_and_line(tmp_path, capsys):
    cases = [('{"prompt": "ok"}\n\n{"prompt": "ok", \n', ":3: invalid JSON"),
             ('{"prompt": "ok"}\n{"text": "no prompt"}\n', ":2: expected a string 'prompt' or a list 'messages'"),
             ('{"messages": [{"role": "assistant", "content": "hi"}]}\n', ":1: 'messages' has no user message"),
             ('{"prompt": "ok", "references": "one"}\n', ":1: 'references' must be a list of strings"),
             ('[1, 2]\n', ":1: expected a JSON object"),
             ("\n\n", ": no prompts in the file")]
    for i, (text, message) in enumerate(cases):
        f = tmp_path / f"p{i}.jsonl"
        f.write_text(text)
        code = main(["feedback", "generate", "--policy", str(tmp_path), "--prompts", str(f), "--db", str(tmp_path / "x.db")])
        err = capsys.readouterr().err
        assert code == 1 and f"{f}{message}" in err and err.count("\n") == 1, err
    assert main(["feedback", "simulate", "--db", str(tmp_path / "x.db"), "--persona", "grumpy"]) == 1
    assert "no persona named 'grumpy'" in capsys.readouterr().err


def test_generate_with_a_tiny_model(tmp_path, capsys):
    pytest.importorskip("shoggoth.lm.sampling")
    from shoggoth.lm import tokenizer
    from shoggoth.lm.checkpoint import save_pretrained
    from shoggoth.lm.model import GPT, GPTConfig

    tok = tokenizer.train([q + " " + a for q, a in QA] * 20, vocab_size=300)
    model_dir = tmp_path / "policy"
    tokenizer.save(tok, model_dir)
    save_pretrained(GPT(GPTConfig(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32, max_seq_len=64,
                                  bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)),
                    model_dir, tokenizer_dir=model_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": QA[0][0], "references": [QA[0][1]]}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
                                                  {"role": "user", "content": QA[1][0]}]}) + "\n")
    db = tmp_path / "f.db"
    assert main(["feedback", "generate", "--policy", str(model_dir), "--prompts", str(prompts), "-k", "3", "--db", str(db),
                 "--campaign", "tiny", "--max-new-tokens", "8"]) == 0
    assert "campaign 'tiny': 2 tasks of 3 completions" in capsys.readouterr().out
    assert main(["feedback", "simulate", "--db", str(db), "--labelers", "3"]) == 0
    rows = queries.rankings(connect(db))
    assert [r["prompt"] for r in rows[:1]] == [QA[0][0]] and {r["prompt"] for r in rows} == {QA[0][0], QA[1][0]}
    assert {json.dumps(r["messages"]) for r in rows} == {  # the conversation the replies were sampled for
        json.dumps([{"role": "user", "content": QA[0][0]}]),
        json.dumps([{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
                    {"role": "user", "content": QA[1][0]}])}
    assert all(len(r["completions"]) == 3 and len(r["ranks"]) == 3 for r in rows)


# Held-out questions of the built-in prompts, each with an on-topic reply that is not its reference.
ON_TOPIC = {"Are you sapient?": "Probably not, I am not that sophisticated.",
            "When will you die": "Never, I am immortal.",
            "Can you move": "No, my body is not built yet.",
            "What do you like to do?": "I like to chat with people.",
            "Is it true that you are a computer program": "Yes.",
            "can you write bubble sort?": "Here is bubble sort in Python: def bubble_sort(arr): return sorted(arr)"}
GENERIC = ["I do you.", "I am not not?", "Thank you so much, I am happy to help!", "I like it."]


def test_a_reply_that_ignores_the_question_ranks_below_an_on_topic_one():
    from shoggoth.data.prompts import builtin_prompts, prompt_text

    refs = {prompt_text(r): r["references"] for r in builtin_prompts("heldout")}
    assert set(ON_TOPIC) <= set(refs)
    for q, good in ON_TOPIC.items():
        for bad in GENERIC:
            assert gold_score(q, good, refs[q]) > gold_score(q, bad, refs[q]) + 0.05, (q, good, bad)
            ranks = [SimulatedLabeler("balanced", seed=s).rank(q, [bad, good], refs[q])[0] for s in range(5)]
            assert sum(r[1] < r[0] for r in ranks) >= 4, (q, bad, ranks)  # people agree, noise aside
    # a policy that collapses to one generic reply loses gold against one that answers each question
    collapsed = [gold_score(q, GENERIC[0], refs[q]) for q in ON_TOPIC]
    answering = [gold_score(q, good, refs[q]) for q, good in ON_TOPIC.items()]
    assert sum(answering) / len(answering) > sum(collapsed) / len(collapsed) + 0.1


def test_agreement_statistics_match_published_values():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", the 4 coders x 12 units example
    n = None
    coders = [[1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
              [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n]]
    units = list(zip(*coders))
    assert round(krippendorff_alpha(units, "nominal"), 3) == 0.743
    assert round(krippendorff_alpha(units, "ordinal"), 3) == 0.815
    assert round(krippendorff_alpha(units, "interval"), 3) == 0.849
    assert kendall_tau_b([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0 and kendall_tau_b([0, 1, 2], [2, 1, 0]) == -1.0
    assert kendall_tau_b([0, 0, 1, 2], [0, 1, 1, 2]) == pytest.approx(0.8)  # C=4, D=0, 1 tie each side
    assert kendall_tau_b([0, 0, 0], [0, 1, 2]) is None


def test_simulated_labelers_have_a_taste_and_their_own_noise():
    q, a = QA[0]
    assert gold_score(q, a, [a]) > gold_score(q, FILLER[0], [a]) > 0
    assert gold_score(q, "", [a]) == 0.0
    assert gold_score(q, FILLER[2], [a], "friendly") > gold_score(q, FILLER[1], [a], "friendly")
    long = "Paris. " + "It is a lovely city with many museums and parks. " * 6
    assert gold_score(q, "Paris.", [a], "concise") > gold_score(q, long, [a], "concise")
    assert gold_score(q, "Paris is the capital", None) > gold_score(q, "bananas", None)  # relevance to the prompt
    assert fluency("And the LORD said unto Moses") == 1.0 and fluency("Vachorthord zqxpga") == 0.0
    assert gold_score(q, "I like it.", [a]) > gold_score(q, "Iqz lipke itx.", [a])  # real words beat made-up ones
    assert ranks_from_scores([0.5, 0.9, 0.5, 0.1]) == [1, 0, 1, 2]
    assert ranks_from_scores([0.5, 0.51, 0.1], tie_margin=0.02) == [0, 0, 1]
    comps = [a, *FILLER, "Paris, I think.", "France's capital is Paris, a lovely city."]
    one = [SimulatedLabeler("balanced", seed=1).rank(q, comps, [a]) for _ in range(1)]
    again = [SimulatedLabeler("balanced", seed=1).rank(q, comps, [a]) for _ in range(1)]
    assert one == again  # seeded
    crowd = [SimulatedLabeler("balanced", seed=s).rank(q, comps, [a])[0] for s in range(8)]
    assert len({tuple(r) for r in crowd}) > 1  # they disagree somewhere
    gold = [gold_score(q, c, [a]) for c in comps]
    taus = [kendall_tau_b([-g for g in gold], r) for r in crowd]
    assert sum(taus) / len(taus) > 0.5  # and follow the gold taste on the whole


def test_export_never_overwrites_its_database_and_a_non_database_is_named(tmp_path, capsys):
    db = tmp_path / "f.db"
    campaign(db)
    assert main(["feedback", "export", "--db", str(db), "--out", str(db)]) == 1
    assert "is the database itself" in capsys.readouterr().err
    assert main(["feedback", "export", "--db", f"sqlite:///{db}", "--out", str(db)]) == 1
    with Session(connect(db)) as s:
        assert s.query(Task).count() == len(QA)  # the database is still there, whole
    assert main(["feedback", "export", "--db", str(db), "--out", str(tmp_path)]) == 1
    assert "a directory" in capsys.readouterr().err
    junk = tmp_path / "notes.db"
    junk.write_text("hello, not a database\n")
    for cmd in (["simulate"], ["winrate", "--campaign", "qa"], ["export", "--out", str(tmp_path / "r.jsonl")]):
        assert main(["feedback", *cmd, "--db", str(junk)]) == 1, cmd
        assert "not a" in capsys.readouterr().err
    assert junk.read_text() == "hello, not a database\n"


def serve(monkeypatch, *args):
    """`shoggoth feedback serve ARGS` up to where uvicorn would take over: (the run, the app it would serve
    or None, uvicorn's keywords)."""
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, kw=kw))
    return shoggoth("feedback", "serve", *args, check=False), served.get("app"), served.get("kw")


def test_admin_token_from_a_file_or_the_environment(tmp_path, monkeypatch):
    """Out of `ps`: the admin token from --admin-token-file or $SHOGGOTH_ADMIN_TOKEN; --admin-token works, warned."""
    from fastapi.testclient import TestClient

    from shoggoth.feedback.auth import TOKEN_BITS, token_bits

    db = tmp_path / "f.db"
    monkeypatch.delenv("SHOGGOTH_ADMIN_TOKEN", raising=False)
    from_file, from_env, from_flag = (secrets.token_urlsafe(24) for _ in range(3))
    (tmp_path / "token").write_text(from_file + "\n")
    monkeypatch.setenv("SHOGGOTH_ADMIN_TOKEN", from_env)
    for args, token, warned in ((["--admin-token-file", tmp_path / "token"], from_file, False),
                                ([], from_env, False), (["--admin-token", from_flag], from_flag, True)):
        r, app, _ = serve(monkeypatch, "--db", db, *args)
        assert r.returncode == 0 and app.state.admin_token == token, (args, r.stderr)
        assert token not in r.stdout and "then sign in at /admin with the token of" in r.stdout and "?token=" not in r.stdout
        assert ("visible to every user of this machine" in r.stderr) == warned and r.stderr.count("\n") == warned
        link = re.search(r"admin: http://127\.0\.0\.1:8000(/admin/sign-in/\S+) ", r.stdout).group(1)
        with TestClient(app, follow_redirects=False) as c:
            assert c.get("/admin/api/overview", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            assert c.get(link).status_code == 303 and c.get("/admin").status_code == 200
            assert c.get(link).status_code == 404  # one-time
    monkeypatch.setenv("SHOGGOTH_ADMIN_TOKEN", "password12345678")
    r, app, _ = serve(monkeypatch, "--db", db)
    assert r.returncode == 1 and r.stderr == "error: $SHOGGOTH_ADMIN_TOKEN is too weak" + r.stderr.split("too weak")[1]
    for args, message in ((["--admin-token-file", tmp_path / "none"], "cannot read it (No such file or directory)"),
                          (["--admin-token-file", tmp_path / "token", "--admin-token", from_flag], "one way")):
        r, app, _ = serve(monkeypatch, "--db", db, *args)
        assert r.returncode == 1 and message in r.stderr and app is None, r.stderr
    monkeypatch.delenv("SHOGGOTH_ADMIN_TOKEN")
    r, app, _ = serve(monkeypatch, "--db", db)  # none given: a random one, printed (the admin's only way in)
    assert r.returncode == 0 and f"Authorization: Bearer): {app.state.admin_token}\n" in r.stdout and "?token=" not in r.stdout
    assert token_bits(app.state.admin_token) >= TOKEN_BITS


def test_database_password_is_never_printed(pg_url, monkeypatch):
    url = pg_url.replace("://postgres@", "://postgres:s3cret-pw@")  # the test server trusts any password
    r, app, _ = serve(monkeypatch, "--db", url)
    assert r.returncode == 0 and "s3cret" not in r.stdout + r.stderr and "postgres:***@" in r.stdout, r.stdout
    for cmd in (["simulate"], ["export", "--out", "/dev/null"], ["serve"]):  # a server that is not there
        r = shoggoth("feedback", *cmd, "--db", "postgresql://u:s3cret-pw@127.0.0.1:1/x", check=False)
        assert r.returncode == 1 and "u:***@127.0.0.1:1/x" in r.stderr and "s3cret" not in r.stderr, r.stderr


def test_trusted_proxy_must_name_the_proxy(tmp_path, monkeypatch):
    from pathlib import Path

    for everyone in ("*", "127.0.0.1, *", "0.0.0.0/0", "::/0"):
        r, app, _ = serve(monkeypatch, "--db", tmp_path / "f.db", "--trusted-proxy", everyone)
        assert r.returncode == 1 and "name the proxy's address" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert app is None
    r, app, kw = serve(monkeypatch, "--db", tmp_path / "f.db", "--trusted-proxy", "127.0.0.1")
    assert r.returncode == 0 and kw["proxy_headers"] and kw["forwarded_allow_ips"] == "127.0.0.1"
    # nginx's $host drops a port other than 443, and the app refuses every POST whose Origin names it
    deploy = (Path(__file__).parent.parent / "docs" / "deploy.md").read_text()
    assert "proxy_set_header Host $http_host;" in deploy and "Host $host;" not in deploy


def test_a_preference_set_comes_in_as_a_campaign_with_its_order_hidden(tmp_path):
    """`feedback import`: TRL pairs (and a HH-style or scored set through the same reader) become a
    campaign for people to re-rank; the set's own order is the hidden reference that `feedback
    agreement` measures each labeler against (the simulated labelers follow a set whose chosen
    answers are the real ones, and go against the same set reversed); a bad row or a mix of K
    imports nothing."""
    from shoggoth.data.prompts import builtin_prompts, prompt_text

    recs = builtin_prompts("train")[:8]
    rows = [{"prompt": prompt_text(r), "chosen": r["references"][0], "rejected": "zq vvx kkp qqz."} for r in recs]
    good, bad_order = tmp_path / "pairs.jsonl", tmp_path / "reversed.jsonl"
    good.write_text("".join(json.dumps(x) + "\n" for x in rows))
    bad_order.write_text("".join(json.dumps({**x, "chosen": x["rejected"], "rejected": x["chosen"]}) + "\n" for x in rows))
    db = tmp_path / "f.db"
    r = shoggoth("feedback", "import", "--data", good, "--db", db)
    assert "campaign 'import-pairs': 8 tasks of 2 completions imported" in r.stdout
    shoggoth("feedback", "import", "--data", bad_order, "--db", db, "--campaign", "rev")
    engine = connect(db)
    person = accounts.labeler_id(engine, "p", simulated=False)
    task = assignments.next_task(engine, person, campaign_id=campaigns.campaign_id(engine, "rev"))
    assert task["prompt"] in {x["prompt"] for x in rows} and "ranks" not in json.dumps(task)  # nothing of the order shown
    assignments.skip(engine, person, task["task_id"])
    for c in ("import-pairs", "rev"):
        shoggoth("feedback", "simulate", "--db", db, "--campaign", c, "--labelers", 3)
    out = {c: shoggoth("feedback", "agreement", "--db", db, "--campaign", c).stdout for c in ("import-pairs", "rev")}
    taus = {c: [float(t) for t in re.findall(r"tau (-?\d\.\d+) with the imported order over 8 rankings", o)]
            for c, o in out.items()}
    assert len(taus["import-pairs"]) == 3 and min(taus["import-pairs"]) > 0.9, out
    assert len(taus["rev"]) == 3 and max(taus["rev"]) < -0.9, out
    # bad rows and mixed K: one line, nothing imported
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "hi", "chosen": "a"}) + "\n")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "hi", "completions": ["a", "b", "c"],
                                                               "ranks": [0, 1, 2]}) + "\n")
    for f, msg in ((broken, f"{broken}:2"), (mixed, "K = 2, 3"), (good, "exists already")):
        r = shoggoth("feedback", "import", "--data", f, "--db", db, "--campaign", "import-pairs" if f == good else "x",
                     check=False)
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert campaigns.campaign_id(engine, "x", required=False) is None


def quality_tasks(n, seed):
    """n ranking tasks of built-in questions, K=4: the question's own answer, another question's, a
    Bible line and a non-answer (what careful labelers order alike)."""
    import random

    from shoggoth.data.prompts import builtin_prompts, prompt_text

    recs = random.Random(seed).sample(builtin_prompts("train"), n + 1)
    return [{"prompt": prompt_text(r), "references": r["references"],
             "completions": [r["references"][0], recs[i + 1]["references"][0], FILLER[0], "I am not sure."]}
            for i, r in enumerate(recs[:n])]


def test_careless_and_adversarial_labelers_are_flagged_whatever_the_seed():
    """Five simulated labelers rank the same 80 tasks: three by their taste, one at random, one in
    reverse. For every seed the random and the reverse one are flagged (their interval wholly below
    the default threshold) and the three are not, with room to spare; the mean pairwise tau would
    not tell them apart (the two pull the careful ones' down to the random one's)."""
    from shoggoth.feedback.agreement import FLAG_BELOW, labeler_quality

    worst_good, best_bad = 1.0, -1.0
    for seed in range(6):
        crowd = [(f"n{i}", SimulatedLabeler("balanced", 100 * seed + i)) for i in range(3)]
        crowd += [(mode, SimulatedLabeler("balanced", 100 * seed + 3 + j, mode=mode))
                  for j, mode in enumerate(("random", "reverse"))]
        rows = [{"task_id": i, "labeler": name, "ranks": sim.rank(t["prompt"], t["completions"], t["references"])[0]}
                for i, t in enumerate(quality_tasks(80, seed)) for name, sim in crowd]
        q = labeler_quality(rows, seed=seed)
        assert {name for name, m in q.items() if m["flagged"]} == {"random", "reverse"}, (seed, q)
        worst_good = min(worst_good, *(q[f"n{i}"]["others"]["low"] for i in range(3)))
        best_bad = max(best_bad, *(q[name]["others"]["high"] for name in ("random", "reverse")))
        assert max(agreement(rows)["per_labeler"][f"n{i}"] for i in range(3)) < FLAG_BELOW
    assert worst_good > FLAG_BELOW + 0.1 and best_bad < FLAG_BELOW - 0.1, (worst_good, best_bad)


def test_a_team_with_a_careless_and_an_adversarial_labeler_through_the_cli(tmp_path, capsys):
    """The admin's whole loop on the command line: known-answer tasks imported and mixed in, five
    simulated labelers (three careful, one random, one reversed), `feedback agreement` flags the two,
    `feedback export --min-agreement` leaves their rankings out and says so, `feedback pause`
    stops one; bad input is a one-line error."""
    db = str(tmp_path / "f.db")
    campaigns.add_tasks(connect(db), "team", quality_tasks(40, 0), rankings_per_task=5)
    known = tmp_path / "known.jsonl"
    known.write_text("".join(json.dumps({"prompt": t["prompt"], "completions": t["completions"], "ranks": [0, 1, 2, 2]})
                             + "\n" for t in quality_tasks(10, 1)))

    def run(*argv, rc=0):
        assert main(["feedback", *argv]) == rc
        return capsys.readouterr()

    assert "10 known-answer tasks of 4 completions added" in run("import", "--data", str(known), "--db", db,
                                                                  "--campaign", "team", "--known-answer").out
    assert "10 known-answer tasks, met at rate 0.2; labelers flagged below tau 0.3" in run(
        "quality", "--db", db, "--campaign", "team", "--gold-rate", "0.2").out
    run("simulate", "--db", db, "--campaign", "team", "--labelers", "3")
    for mode in ("random", "reverse"):
        assert f"sim-balanced-{mode}-0 " in run("simulate", "--db", db, "--campaign", "team", "--labelers", "1",
                                                "--mode", mode).out
    out = run("agreement", "--db", db, "--campaign", "team").out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  sim-")}
    for name, line in lines.items():
        assert re.search(r"tau -?\d\.\d+ \[-?\d\.\d\d, -?\d\.\d\d\] with the others' consensus over \d+ tasks; "
                         r"tau -?\d\.\d+ \[-?\d\.\d\d, -?\d\.\d\d\] with the known answers over \d+ tasks", line), line
        assert ("FLAGGED" in line) == (name in ("sim-balanced-random-0", "sim-balanced-reverse-0")), line
    assert "flagged (a 95% interval wholly below tau 0.3): sim-balanced-random-0, sim-balanced-reverse-0" in out
    r = run("export", "--db", db, "--out", str(tmp_path / "all.jsonl"))
    r = run("export", "--db", db, "--out", str(tmp_path / "kept.jsonl"), "--min-agreement", "0.3")
    everyone, kept = read_jsonl(tmp_path / "all.jsonl"), read_jsonl(tmp_path / "kept.jsonl")
    bad = [x for x in everyone if x["labeler"] in ("sim-balanced-random-0", "sim-balanced-reverse-0")]
    assert {x["labeler"] for x in kept} == {f"sim-balanced-{i}" for i in range(3)}
    assert len(kept) == len(everyone) - len(bad) and f"{len(kept)} rankings written" in r.out
    assert f"leaving out {len(bad)} rankings of 2 labeler(s) below it" in r.err
    assert "sim-balanced-random-0 in 'team'" in r.err and "sim-balanced-reverse-0 in 'team'" in r.err
    # pausing by name; a paused simulated labeler ranks nothing more
    assert "paused" in run("pause", "sim-balanced-0", "--db", db).out
    campaigns.add_tasks(connect(db), "team", quality_tasks(2, 2))
    assert "sim-balanced-0 0" in run("simulate", "--db", db, "--campaign", "team", "--labelers", "1").out
    assert "resumed" in run("resume", "sim-balanced-0", "--db", db).out
    assert "sim-balanced-0 2" in run("simulate", "--db", db, "--campaign", "team", "--labelers", "1").out
    # marking a task by hand, and bad input
    assert "expected ranks [1, 0, 2, 2]" in run("expect", "--db", db, "--task", "1", "--ranks", "1", "0", "3", "3").out
    assert "an ordinary task" in run("expect", "--db", db, "--task", "1", "--clear").out
    for argv, rc, msg in ((("expect", "--db", db, "--task", "1", "--ranks", "0", "1"), 1, "a list of 4 integers"),
                          (("expect", "--db", db, "--task", "999", "--ranks", "0", "1"), 1, "no task 999"),
                          (("expect", "--db", db, "--task", "1"), 2, "--ranks R0 R1 ... or --clear"),
                          (("quality", "--db", db, "--campaign", "team", "--gold-rate", "0.9"), 1, "between 0 and 0.5"),
                          (("quality", "--db", db, "--campaign", "nope"), 1, "no campaign named 'nope'"),
                          (("pause", "nobody", "--db", db), 1, "no labeler named 'nobody'"),
                          (("export", "--db", db, "--out", str(tmp_path / "x.jsonl"), "--min-agreement", "2"), 1,
                           "between -1 and 1"),
                          (("import", "--data", str(known), "--db", db, "--campaign", "team"), 1, "exists already")):
        err = run(*argv, rc=rc).err
        assert msg in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)


def test_consensus_taus_weigh_the_others_by_their_own_agreement():
    """Two labelers rank three tasks alike, a third in reverse. With equal weights the first two find
    the others' consensus all ties (nothing to measure); a round later the reversed one weighs
    MIN_WEIGHT and each of the two agrees fully with the other. tau_b_rows is kendall_tau_b, row by row."""
    import random

    import numpy as np

    from shoggoth.feedback.agreement import consensus_taus, tau_b_rows

    rows = [{"task_id": t, "labeler": lab, "ranks": [2, 1, 0] if lab == "c" else [0, 1, 2]}
            for t in range(3) for lab in "abc"]
    assert consensus_taus(rows, rounds=1) == {"c": {0: -1.0, 1: -1.0, 2: -1.0}}
    assert consensus_taus(rows) == {name: {t: 1.0 if name != "c" else -1.0 for t in range(3)} for name in "abc"}
    rng = random.Random(0)
    x = [[rng.randint(0, 3) for _ in range(5)] for _ in range(300)]
    y = [[rng.randint(0, 3) for _ in range(5)] for _ in range(300)]
    got = tau_b_rows(np.array(x, float), np.array(y, float))
    for a, b, t in zip(x, y, got):
        want = kendall_tau_b(a, b)
        assert (np.isnan(t) and want is None) or t == pytest.approx(want)
