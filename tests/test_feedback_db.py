"""Assignment and submission rules of the ranking app, on SQLite and on a real PostgreSQL server."""

import itertools
import json
import threading
import time
import tracemalloc
from collections import Counter

import pytest
from sqlalchemy import event, func, inspect, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common import ranking_history
from shoggoth.errors import DataError
from shoggoth.feedback import accounts, assignments, campaigns, jobs, oversight, queries
from shoggoth.feedback.db import ONE_OPEN, Assignment, Campaign, Completion, Labeler, Ranking, RankingVersion, Rejected, Task, connect, normalize_url, writing


def make_tasks(n, k=4, tag=""):
    return [{"prompt": f"prompt {tag}{i}", "references": [f"answer {i}"],
             "completions": [f"completion {i}.{j}" for j in range(k)]} for i in range(n)]


def groups_in_order(task):
    """A strict ranking: the completions in the order they were shown."""
    return [[c["id"]] for c in task["completions"]]


def count(engine, table):
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(table))


def test_each_task_collects_n_rankings_from_different_labelers(db_url):
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(3), rankings_per_task=2)
    labs = [accounts.create_labeler(e, name)[0] for name in "abc"]
    seen = {lid: [] for lid in labs}
    for lid in labs[:2]:
        while (t := assignments.next_task(e, lid)) is not None:
            assert assignments.next_task(e, lid)["task_id"] == t["task_id"]  # an open task is handed back, not a new one
            assignments.submit(e, lid, t["task_id"], groups_in_order(t))
            seen[lid].append(t["task_id"])
    assert sorted(seen[labs[0]]) == sorted(seen[labs[1]]) == [1, 2, 3]
    assert assignments.next_task(e, labs[2]) is None  # every task has its 2 rankings
    rows = queries.rankings(e)
    assert len(rows) == 6 and Counter(r["task_id"] for r in rows) == {1: 2, 2: 2, 3: 2}
    assert assignments.progress(e, labs[0]) == {"done": 3, "skipped": 0, "open": 0, "left": 0}


def test_skipped_task_never_comes_back_and_frees_its_slot(db_url):
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(2), rankings_per_task=1)
    a, b = accounts.create_labeler(e, "a")[0], accounts.create_labeler(e, "b")[0]
    first = assignments.next_task(e, a)
    assignments.skip(e, a, first["task_id"])
    second = assignments.next_task(e, a)
    assert second["task_id"] != first["task_id"]
    assignments.submit(e, a, second["task_id"], groups_in_order(second))
    assert assignments.next_task(e, a) is None
    assert assignments.next_task(e, b)["task_id"] == first["task_id"]  # the skip gave the slot back
    assert assignments.progress(e, a)["skipped"] == 1


def test_completions_are_shown_in_a_random_order(db_url):
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(1, k=8), rankings_per_task=30)
    orders = set()
    for i in range(12):
        t = assignments.next_task(e, accounts.create_labeler(e, f"l{i}")[0])
        orders.add(tuple(c["text"] for c in t["completions"]))
        assert sorted(c["text"] for c in t["completions"]) == [f"completion 0.{j}" for j in range(8)]
    assert len(orders) > 6


@pytest.mark.parametrize("bad, status, message", [
    ("short", 422, "places 3 completions; this task has 4"),
    ("unknown", 422, "is not one of this task's completions"),
    ("duplicate", 422, "appears more than once"),
    ("empty_group", 422, "rank group 2 is empty"),
    ("not_a_list", 422, "must be a list of groups"),
    ("bad_flag", 422, "flags must be a list drawn from"),
    ("not_assigned", 403, "is not assigned to you"),
    ("no_such_task", 404, "there is no task"),
])
def test_invalid_ranking_is_refused_and_stores_nothing(db_url, bad, status, message):
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(2), rankings_per_task=1)
    lid = accounts.create_labeler(e, "a")[0]
    t = assignments.next_task(e, lid)
    ids = [c["id"] for c in t["completions"]]
    tid, groups, flags = t["task_id"], [[i] for i in ids], []
    if bad == "short":
        groups = groups[:3]
    elif bad == "unknown":
        groups[0] = [10_000]
    elif bad == "duplicate":
        groups = [[ids[0]], [ids[0], ids[1]], [ids[2]], [ids[3]]]
    elif bad == "empty_group":
        groups.insert(1, [])
    elif bad == "not_a_list":
        groups = {"a": 1}
    elif bad == "bad_flag":
        flags = ["boring"]
    elif bad == "not_assigned":
        tid = 3 - tid
    elif bad == "no_such_task":
        tid = 999
    with pytest.raises(Rejected, match=message) as err:
        assignments.submit(e, lid, tid, groups, flags)
    assert err.value.status == status
    assert count(e, Ranking) == 0
    assert assignments.progress(e, lid) == {"done": 0, "skipped": 0, "open": 1, "left": 1}
    assignments.submit(e, lid, t["task_id"], [[ids[0], ids[1]], [ids[3]], [ids[2]]], ["unsafe"])  # the task is still open
    with pytest.raises(Rejected, match="already submitted") as err:
        assignments.submit(e, lid, t["task_id"], [[i] for i in ids])
    assert err.value.status == 409
    row = queries.rankings(e)[0]
    assert count(e, Ranking) == 1 and row["flags"] == ["unsafe"]
    by_text = dict(zip(row["completions"], row["ranks"]))
    shown = [c["text"] for c in t["completions"]]
    assert [by_text[x] for x in shown] == [0, 0, 2, 1]


def test_concurrent_labelers_never_lose_or_duplicate(db_url):
    """Eight labelers at once, each submitting every task twice from two threads: one copy counts."""
    e = connect(db_url)
    n_tasks, n = 12, 3
    campaigns.add_tasks(e, "c", make_tasks(n_tasks), rankings_per_task=n)
    labs = [accounts.create_labeler(e, f"l{i}")[0] for i in range(8)]
    accepted, refused, errors = Counter(), Counter(), []
    lock = threading.Lock()

    def send(lid, t):
        try:
            assignments.submit(e, lid, t["task_id"], groups_in_order(t))
            with lock:
                accepted[lid] += 1
        except Rejected as err:
            with lock:
                refused[err.status] += 1

    def work(lid):
        try:
            while (t := assignments.next_task(e, lid)) is not None:
                twins = [threading.Thread(target=send, args=(lid, t)) for _ in range(2)]
                [x.start() for x in twins]
                [x.join() for x in twins]
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(lid,)) for lid in labs]
    [x.start() for x in threads]
    [x.join() for x in threads]
    assert not errors
    assert sum(accepted.values()) == n_tasks * n == count(e, Ranking)
    assert refused == {409: n_tasks * n}  # every twin was refused as a duplicate
    rows = queries.rankings(e)
    assert len({(r["task_id"], r["labeler"]) for r in rows}) == len(rows)
    assert Counter(r["task_id"] for r in rows) == {i: n for i in range(1, n_tasks + 1)}
    camp = queries.overview(e)[0][0]
    assert (camp["done"], camp["open"], camp["complete"]) == (n_tasks * n, 0, n_tasks)


def test_expired_assignment_frees_its_slot_but_a_late_answer_still_counts(db_url):
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(1), rankings_per_task=1)
    a, b = accounts.create_labeler(e, "a")[0], accounts.create_labeler(e, "b")[0]
    late = assignments.next_task(e, a, lease_s=-1)  # expired at once
    other = assignments.next_task(e, b)
    assert other["task_id"] == late["task_id"]
    assignments.submit(e, b, other["task_id"], groups_in_order(other))
    assignments.submit(e, a, late["task_id"], groups_in_order(late))
    assert count(e, Ranking) == 2
    assert queries.overview(e)[0][0]["open"] == 0


def release_during(e, statement, release):
    """Run `release()` (another labeler's next_task) while this thread is about to execute its first
    statement starting with `statement`: on PostgreSQL it commits in between (the race of issue #33);
    SQLite's one writer at a time makes it wait until this thread's transaction ends."""
    fired, out = [], []

    @event.listens_for(e, "before_cursor_execute")
    def between(conn, cursor, sql, *_):
        if fired or not sql.startswith(statement) or threading.current_thread() is not threading.main_thread():
            return
        fired.append(threading.Thread(target=lambda: out.append(release())))
        fired[0].start()
        if e.dialect.name == "postgresql":
            fired[0].join(30)
            assert out, "the release did not commit in between"

    return fired, out


def counters_match_rows(e, tid):
    with Session(e) as s:
        task = s.get(Task, tid)
        per = dict(s.execute(select(Assignment.status, func.count()).where(Assignment.task_id == tid)
                             .group_by(Assignment.status)).all())
        stored = s.scalar(select(func.count()).select_from(Ranking).where(Ranking.task_id == tid))
        assert (task.n_open, task.n_done, task.n_skipped) == (per.get("open", 0), stored, per.get("skipped", 0))
        return per


@pytest.mark.parametrize("action", ["submit", "skip"])
def test_a_lease_released_while_its_owner_answers_loses_nothing(db_url, action):
    """Issue #33, item 5: the owner's lease has run out and another labeler's next_task releases it (and
    takes the freed slot) between the owner's read of their assignment and its update. The owner's
    answer counts, as a late answer does; before, PostgreSQL answered a false 409 and stored nothing."""
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(1), rankings_per_task=1)
    owner, other = accounts.create_labeler(e, "owner")[0], accounts.create_labeler(e, "other")[0]
    task = assignments.next_task(e, owner)
    with writing(e) as s:  # the lease ran out
        s.execute(update(Assignment).values(expires_at=time.time() - 1))
    fired, out = release_during(e, "UPDATE assignments SET status", lambda: assignments.next_task(e, other))
    if action == "submit":
        assignments.submit(e, owner, task["task_id"], groups_in_order(task))
    else:
        assignments.skip(e, owner, task["task_id"])
    fired[0].join(30)
    assert fired and out
    per = counters_match_rows(e, task["task_id"])
    assert per.get("done" if action == "submit" else "skipped") == 1
    if e.dialect.name == "postgresql":  # released in between: the task went to the other labeler, who answers too
        assert out[0]["task_id"] == task["task_id"] and per.get("open") == 1
        assignments.submit(e, other, task["task_id"], groups_in_order(out[0]))
        counters_match_rows(e, task["task_id"])
    else:  # the release came after the owner's answer: nothing was left to release
        assert out[0] is None if action == "submit" else out[0]["task_id"] == task["task_id"]
    assert count(e, Ranking) == (action == "submit") + (e.dialect.name == "postgresql")


def test_labeler_scoped_to_a_campaign_sees_only_its_tasks(db_url):
    e = connect(db_url)
    campaigns.add_tasks(e, "one", make_tasks(2, tag="one-"), rankings_per_task=1)
    two = campaigns.add_tasks(e, "two", make_tasks(2, tag="two-"), rankings_per_task=1)
    lid = accounts.create_labeler(e, "scoped", campaign_id=two)[0]
    got = []
    while (t := assignments.next_task(e, lid)) is not None:
        got.append(t["prompt"])
        assignments.skip(e, lid, t["task_id"])
    assert sorted(got) == ["prompt two-0", "prompt two-1"]


def test_export_formats(tmp_path):
    e = connect(tmp_path / "x.db")
    campaigns.add_tasks(e, "c", make_tasks(1, k=3), rankings_per_task=1)
    lid = accounts.create_labeler(e, "ann")[0]
    t = assignments.next_task(e, lid)
    by_text = {c["text"]: c["id"] for c in t["completions"]}
    assignments.submit(e, lid, t["task_id"], [[by_text["completion 0.2"]], [by_text["completion 0.0"], by_text["completion 0.1"]]],
             ["all_bad"])
    (row,) = queries.export_rows(e)
    assert row == {"prompt": "prompt 0", "messages": [{"role": "user", "content": "prompt 0"}],
                   "completions": ["completion 0.0", "completion 0.1", "completion 0.2"],
                   "ranks": [1, 1, 0], "labeler": "ann", "flags": ["all_bad"], "campaign": "c", "task_id": 1}
    assert list(queries.export_rows(e, as_pairs=True)) == [
        {"prompt": "prompt 0", "chosen": "completion 0.2", "rejected": "completion 0.0"},
        {"prompt": "prompt 0", "chosen": "completion 0.2", "rejected": "completion 0.1"}]


CHAT = [{"role": "system", "content": "You are a pirate.\x00 Answer <b>briefly</b>."},
        {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Arr, a bot."},
        {"role": "user", "content": "And where is the treasure?"}]


def test_a_task_keeps_its_whole_conversation(db_url):
    """A task of a multi-turn conversation with a system prompt: the labeler gets it whole (its last
    user message as `prompt`), the export writes it as `messages` and the pairs in TRL's conversational
    form; a task of one user message reads as before; a malformed conversation stores nothing."""
    e = connect(db_url)
    chat = [{**m, "content": m["content"].replace("\x00", "\ufffd")} for m in CHAT]  # as PostgreSQL can store it
    with pytest.raises(DataError, match="task 2: 'messages' must be"):
        campaigns.add_tasks(e, "c", [{"messages": CHAT, "completions": ["a", "b"]},
                             {"messages": [{"role": "user"}], "completions": ["a", "b"]}])
    assert queries.overview(e)[0] == []  # nothing half-stored
    campaigns.add_tasks(e, "c", [{"messages": CHAT, "completions": ["a", "b"]}, {"prompt": "plain", "completions": ["c", "d"]}],
                rankings_per_task=1)
    lid = accounts.create_labeler(e, "ann")[0]
    seen = []
    while (t := assignments.next_task(e, lid)) is not None:
        seen.append(t)
        assignments.submit(e, lid, t["task_id"], [[c["id"]] for c in sorted(t["completions"], key=lambda c: c["text"])])
    by_prompt = {t["prompt"]: t["messages"] for t in seen}
    assert by_prompt == {"And where is the treasure?": chat, "plain": [{"role": "user", "content": "plain"}]}
    rows = {r["prompt"]: r for r in queries.export_rows(e)}
    assert rows["And where is the treasure?"]["messages"] == chat and rows["plain"]["messages"] == by_prompt["plain"]
    assert {r["prompt"]: r["messages"] for r in assignments.my_rankings(e, lid)} == by_prompt
    assert sorted(map(json.dumps, queries.export_rows(e, as_pairs=True))) == sorted(map(json.dumps, [
        {"prompt": chat, "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
        {"prompt": [{"role": "user", "content": "plain"}], "chosen": [{"role": "assistant", "content": "c"}],
         "rejected": [{"role": "assistant", "content": "d"}]}]))
    # an export of one-message conversations only: its pairs stay strings, as before
    campaigns.add_tasks(e, "single", make_tasks(1, k=2), rankings_per_task=1)
    t = assignments.next_task(e, lid)
    assignments.submit(e, lid, t["task_id"], groups_in_order(t))
    assert all(isinstance(p["prompt"], str) for p in queries.export_rows(e, campaign="single", as_pairs=True))


def test_an_older_database_gets_task_conversations(db_url, tmp_path):
    """A database made before tasks kept their conversation: connecting adds the column (also for an
    export, which opens it to read); its tasks read, rank and export as conversations of their one
    user message, and new tasks keep theirs."""
    e = connect(db_url)
    campaigns.add_tasks(e, "old", make_tasks(1, k=2), rankings_per_task=1)
    lid = accounts.create_labeler(e, "ann")[0]
    t = assignments.next_task(e, lid)
    assignments.submit(e, lid, t["task_id"], groups_in_order(t))
    with writing(e) as s:
        s.execute(text("ALTER TABLE tasks DROP COLUMN messages"))
    e.dispose()
    assert jobs.export(db_url, tmp_path / "old.jsonl") == 1
    assert json.loads((tmp_path / "old.jsonl").read_text())["messages"] == [{"role": "user", "content": "prompt 0"}]
    e = connect(db_url)
    assert "messages" in {c["name"] for c in inspect(e).get_columns("tasks")}
    assert assignments.my_rankings(e, lid)[0]["messages"] == [{"role": "user", "content": "prompt 0"}]
    campaigns.add_tasks(e, "new", [{"messages": CHAT[1:], "completions": ["a", "b"]}], rankings_per_task=1)
    t = assignments.next_task(e, lid)
    assignments.submit(e, lid, t["task_id"], groups_in_order(t))
    assert [r["messages"] for r in queries.export_rows(e)] == [[{"role": "user", "content": "prompt 0"}], CHAT[1:]]
    connect(db_url)  # once there, connecting again leaves it be


def test_bad_campaigns_and_labelers(tmp_path):
    e = connect(tmp_path / "x.db")
    with pytest.raises(DataError, match="same number K"):
        campaigns.add_tasks(e, "c", make_tasks(1, k=3) + make_tasks(1, k=4))
    campaigns.add_tasks(e, "c", make_tasks(1, k=3))
    with pytest.raises(DataError, match="has K=3"):
        campaigns.add_tasks(e, "c", make_tasks(1, k=4))
    accounts.create_labeler(e, "ann")
    with pytest.raises(Rejected, match="already a labeler named"):
        accounts.create_labeler(e, "ann")
    with pytest.raises(Rejected, match="1 to 100 characters"):
        accounts.create_labeler(e, "  ")
    # PostgreSQL refuses NUL characters in text: they are replaced, not a crash
    campaigns.add_tasks(e, "nul", [{"prompt": "a\x00b", "completions": ["x\x00", "y"]}])
    assert normalize_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("f.db").startswith("sqlite:////")


def test_labelers_of_an_older_database_keep_their_link_once(tmp_path):
    """Before sessions, a labeler's row held the hash of their invite token: it becomes an invite."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    e = connect(url)
    with writing(e) as s:
        s.add(Labeler(name="old-timer", token_hash=accounts.hash_token("the-old-link-token"), simulated=False))
    e.dispose()
    e = connect(url)
    assert accounts.labeler_by_token(e, "the-old-link-token")[1] == "old-timer"
    assert accounts.trade_invite(e, "the-old-link-token") is not None and accounts.trade_invite(e, "the-old-link-token") is None


def open_assignments(engine, lid):
    with Session(engine) as s:
        return list(s.scalars(select(Assignment.task_id).where(Assignment.labeler_id == lid,
                                                                 Assignment.status == "open")))


def test_racing_next_task_calls_of_one_labeler_get_one_task(db_url):
    """Many /api/next at once for one labeler (each thread on its own connection): one open
    assignment, the same task for every call, and only that task's slot taken."""
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(30), rankings_per_task=1)
    lid = accounts.create_labeler(e, "eager")[0]
    n = 16
    start, got, errors = threading.Barrier(n), [], []

    def call():
        try:
            start.wait()
            got.append(assignments.next_task(e, lid)["task_id"])
        except Exception as err:  # surfaced below
            errors.append(err)

    for _round in range(3):
        threads = [threading.Thread(target=call) for _ in range(n)]
        [x.start() for x in threads]
        [x.join() for x in threads]
        assert not errors
        (tid,) = set(got)
        assert open_assignments(e, lid) == [tid]
        assert queries.overview(e)[0][0]["open"] == 1  # the losers' slots were given back
        assignments.skip(e, lid, tid)
        got.clear()


def test_a_campaigns_task_releases_the_open_one_of_another(db_url):
    e = connect(db_url)
    a = campaigns.add_tasks(e, "a", make_tasks(1, tag="a"), rankings_per_task=1)
    b = campaigns.add_tasks(e, "b", make_tasks(1, tag="b"), rankings_per_task=1)
    lid, other = accounts.create_labeler(e, "x")[0], accounts.create_labeler(e, "y")[0]
    first = assignments.next_task(e, lid, campaign_id=a)
    second = assignments.next_task(e, lid, campaign_id=b)
    assert open_assignments(e, lid) == [second["task_id"]]
    assert assignments.next_task(e, other, campaign_id=a)["task_id"] == first["task_id"]  # its slot was freed
    assignments.submit(e, lid, first["task_id"], groups_in_order(first))  # a late answer still counts
    assert count(e, Ranking) == 1


def test_one_open_index_is_added_to_an_older_database(db_url):
    """A database made before the index: connecting adds it, after releasing the extra open
    assignments an earlier race left (oldest kept), and from then on a second one is refused."""
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(3), rankings_per_task=2)
    lid = accounts.create_labeler(e, "old")[0]
    with writing(e) as s:
        s.execute(text(f"DROP INDEX {ONE_OPEN.name}"))
    assert not inspect(e).has_index("assignments", ONE_OPEN.name)
    for tid in (2, 1, 3):  # what racing calls could leave before
        with writing(e) as s:
            s.add(Assignment(task_id=tid, labeler_id=lid, status="open", display_order=[], created_at=0,
                               expires_at=time.time() + 3600))
            s.execute(update(Task).where(Task.id == tid).values(n_open=Task.n_open + 1))
    e.dispose()
    e = connect(db_url)
    assert inspect(e).has_index("assignments", ONE_OPEN.name)
    assert open_assignments(e, lid) == [2]
    assert queries.overview(e)[0][0]["open"] == 1
    assert assignments.next_task(e, lid)["task_id"] == 2
    with pytest.raises(IntegrityError), writing(e) as s:
        s.add(Assignment(task_id=3, labeler_id=lid, status="open", display_order=[], created_at=0, expires_at=0))
    connect(db_url)  # once there, connecting again leaves it be


def bulk_insert(engine, table, rows):
    """Rows (tuples in column order) straight into a table: COPY on PostgreSQL, executemany on SQLite.
    Columns past a row's length (added to the table since the test was written) take their defaults."""
    cols = [c.name for c in table.columns][:len(rows[0])]
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            with conn.connection.dbapi_connection.cursor().copy(
                    f"COPY {table.name} ({', '.join(cols)}) FROM STDIN") as copy:
                for r in rows:
                    copy.write_row([json.dumps(v) if isinstance(v, list) else v for v in r])
    else:
        with engine.begin() as conn:
            conn.execute(table.insert(), [dict(zip(cols, r)) for r in rows])


@pytest.mark.slow
def test_export_of_200k_rankings_streams(db_url, tmp_path):
    """200,000 rankings of 100,000 tasks (more than a driver binds parameters: the export once sent
    one per task) exported to a file, in order, with memory bounded while the rows are read."""
    n_tasks, k, per_task = 100_000, 3, 2
    e = connect(db_url)
    started = time.perf_counter()
    bulk_insert(e, Campaign.__table__, [(1, "big", k, per_task, "", 0.0, False, None)])
    bulk_insert(e, Labeler.__table__, [(i, f"lab{i}", f"h{i}", None, True, 0.0) for i in (1, 2)])
    bulk_insert(e, Task.__table__, [(t, 1, f"prompt {t}", [], 0, per_task, 0, None) for t in range(1, n_tasks + 1)])
    bulk_insert(e, Completion.__table__, [(t * k + j, t, j, f"c{t}.{j}", None) for t in range(1, n_tasks + 1)
                                            for j in range(k)])
    ids = range(1, n_tasks * per_task + 1)  # ranking i: task (i+1)//2, labeler 1 or 2; ranks cycle
    bulk_insert(e, Assignment.__table__, [(i, (i + 1) // 2, 2 - i % 2, "done", [], 0.0, 0.0) for i in ids])
    bulk_insert(e, Ranking.__table__, [(i, i, (i + 1) // 2, 2 - i % 2, [i % 3, (i + 1) % 3, (i + 2) % 3],
                                          ["unsafe"] if i % 1000 == 0 else [], 1.0, 0.0) for i in ids])
    inserted = time.perf_counter()

    def expected(i):
        t = (i + 1) // 2
        return {"prompt": f"prompt {t}", "messages": [{"role": "user", "content": f"prompt {t}"}],
                "completions": [f"c{t}.{j}" for j in range(k)],
                "ranks": [i % 3, (i + 1) % 3, (i + 2) % 3], "labeler": f"lab{2 - i % 2}",
                "flags": ["unsafe"] if i % 1000 == 0 else [], "campaign": "big", "task_id": t}

    out = tmp_path / "big.jsonl"
    tracemalloc.start()
    try:
        assert jobs.export(db_url, out) == len(ids)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    exported = time.perf_counter()
    assert peak < 30e6, f"export peak {peak / 1e6:.1f} MB"
    with open(out, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if i in (1, 2, 1000, 65_536, 123_457, len(ids)):
                assert json.loads(line) == expected(i), i
    assert i == len(ids)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed
    first = list(itertools.islice(queries.export_rows(e, campaign="big", as_pairs=True), 6))
    assert first == queries.pairs(expected(1)) + queries.pairs(expected(2))  # 3 pairs each
    print(f"\n{e.dialect.name}: insert {inserted - started:.1f} s, export to file {exported - inserted:.1f} s "
          f"(peak {peak / 1e6:.1f} MB under tracemalloc)")


def ranked(e, lid, reverse=False):
    """The labeler's next task, ranked in shown order (or its reverse); returns (task, ranking id)."""
    t = assignments.next_task(e, lid)
    groups = groups_in_order(t)
    return t, assignments.submit(e, lid, t["task_id"], groups[::-1] if reverse else groups)


def test_revise_keeps_the_old_version_and_the_export_gives_the_latest(db_url):
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(2, k=3), rankings_per_task=2)
    ann, bob = accounts.create_labeler(e, "ann")[0], accounts.create_labeler(e, "bob")[0]
    t, rid = ranked(e, ann)
    ranked(e, bob)
    first = list(queries.export_rows(e))[0]
    a, b, c = (x["id"] for x in t["completions"])
    assert assignments.revise(e, ann, rid, [[c], [a, b]], ["unsafe"]) == 2
    assert assignments.revise(e, ann, rid, [[b], [c], [a]]) == 3
    history = ranking_history(e, rid)
    assert [h["version"] for h in history] == [1, 2, 3]
    assert history[0]["ranks"] == first["ranks"] and history[0]["flags"] == []
    assert history[1]["flags"] == ["unsafe"]
    pos = {x["id"]: i for i, x in enumerate(sorted(t["completions"], key=lambda x: x["text"]))}
    want = [0] * 3
    for r, cid in enumerate((b, c, a)):
        want[pos[cid]] = r
    rows = list(queries.export_rows(e))
    assert len(rows) == 2 and rows[0]["labeler"] == "ann" and rows[0]["ranks"] == want and rows[0]["flags"] == []
    assert rows[1]["labeler"] == "bob"  # others' rankings untouched
    assert len(queries.rank_vectors(e, 1)) == 2 and queries.overview(e)[1][0]["rankings"] == 1  # still one ranking of ann's
    (mine,) = assignments.my_rankings(e, ann)
    assert mine["ranking_id"] == rid and mine["version"] == 3 and mine["revisable"]
    assert mine["shown"] == t["completions"] and mine["groups"] == [[b], [c], [a]]
    with Session(e) as s:
        assert s.scalar(select(func.count()).select_from(RankingVersion)) == 2


@pytest.mark.parametrize("bad, status, message", [
    ("others", 403, "is not yours"),
    ("unknown", 404, "there is no ranking"),
    ("short", 422, "places 2 completions; this task has 3"),
    ("foreign_completion", 422, "is not one of this task's completions"),
    ("duplicate", 422, "appears more than once"),
    ("bad_flag", 422, "flags must be a list drawn from"),
])
def test_invalid_revision_is_refused_and_changes_nothing(db_url, bad, status, message):
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(2, k=3), rankings_per_task=2)
    ann, bob = accounts.create_labeler(e, "ann")[0], accounts.create_labeler(e, "bob")[0]
    t, rid = ranked(e, ann)
    other, _ = ranked(e, ann)
    ids = [x["id"] for x in t["completions"]]
    groups, flags, who, target = [[i] for i in ids], [], ann, rid
    if bad == "others":
        who = bob
    elif bad == "unknown":
        target = 999
    elif bad == "short":
        groups = groups[:2]
    elif bad == "foreign_completion":
        groups[0] = [other["completions"][0]["id"]]
    elif bad == "duplicate":
        groups[1] = [ids[0]]
    else:
        flags = ["great"]
    before = list(queries.export_rows(e))
    with pytest.raises(Rejected, match=message) as err:
        assignments.revise(e, who, target, groups, flags)
    assert err.value.status == status
    assert list(queries.export_rows(e)) == before and len(ranking_history(e, rid)) == 1


def test_only_the_last_rankings_can_be_revised(db_url):
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(4, k=2), rankings_per_task=1)
    ann = accounts.create_labeler(e, "ann")[0]
    rids = [ranked(e, ann)[1] for _ in range(4)]
    with pytest.raises(Rejected, match="only your last 3 rankings can be, and you have made 3 since") as err:
        assignments.revise(e, ann, rids[0], [[1], [2]], last=3)
    assert err.value.status == 409
    t = assignments.my_rankings(e, ann)[2]
    assert t["ranking_id"] == rids[1]
    assert assignments.revise(e, ann, rids[1], t["groups"][::-1], last=3) == 2
    assert [r["revisable"] for r in assignments.my_rankings(e, ann, limit=500)] == [True] * 4  # REVISABLE is 20


def test_a_ranking_has_at_most_max_versions(db_url):
    """Each revision is kept, so their number per ranking is capped (#33, item 3): past MAX_VERSIONS a
    revision is refused (409), and every version, the first answer included, stays."""
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(1, k=3), rankings_per_task=1)
    ann = accounts.create_labeler(e, "ann")[0]
    t, rid = ranked(e, ann)
    groups = groups_in_order(t)
    for v in range(2, assignments.MAX_VERSIONS + 1):
        assert assignments.revise(e, ann, rid, groups if v % 2 else groups[::-1]) == v
    assert assignments.my_rankings(e, ann)[0]["version"] == assignments.MAX_VERSIONS and not assignments.my_rankings(e, ann)[0]["revisable"]
    before = list(queries.export_rows(e))
    with pytest.raises(Rejected, match=f"can no longer be revised: it has {assignments.MAX_VERSIONS} versions") as err:
        assignments.revise(e, ann, rid, groups)
    assert err.value.status == 409 and list(queries.export_rows(e)) == before
    history = ranking_history(e, rid)
    assert [h["version"] for h in history] == list(range(1, assignments.MAX_VERSIONS + 1))
    assert history[0]["ranks"] == history[2]["ranks"] != history[1]["ranks"]


def test_concurrent_revisions_each_get_their_own_version(db_url):
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(1, k=3), rankings_per_task=1)
    ann = accounts.create_labeler(e, "ann")[0]
    t, rid = ranked(e, ann)
    groups = groups_in_order(t)
    got, errors = [], []

    def one(i):
        try:
            got.append(assignments.revise(e, ann, rid, groups[i % 3:] + groups[:i % 3]))
        except Exception as ex:  # noqa: BLE001 - reported below
            errors.append(ex)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and sorted(got) == [2, 3, 4, 5, 6, 7]
    assert [h["version"] for h in ranking_history(e, rid)] == list(range(1, 8))
    assert list(queries.export_rows(e))[0]["ranks"] == ranking_history(e, rid)[-1]["ranks"]


# ---------------------------------------------------------------- labeler quality


def answer_in_turns(e, labs, campaign_id):
    """The labelers rank tasks (as shown) in turns until none is left for any: {labeler: task ids they got}."""
    import random

    got, rngs, active = {lid: [] for lid in labs}, {lid: random.Random(lid) for lid in labs}, list(labs)
    while active:
        for lid in list(active):
            t = assignments.next_task(e, lid, rng=rngs[lid], campaign_id=campaign_id)
            if t is None:
                active.remove(lid)
                continue
            assignments.submit(e, lid, t["task_id"], groups_in_order(t))
            got[lid].append(t["task_id"])
    return got


def test_known_answer_tasks_are_mixed_in_at_the_campaigns_rate_beyond_their_slots(db_url):
    """A known-answer task is dealt to every labeler (beyond its rankings per task), at the campaign's
    gold rate, and never as all that is left for someone; at rate 0 it is an ordinary task."""
    e = connect(db_url)
    for name, rate in (("mixed", 0.25), ("plain", 0.0)):
        cid = campaigns.add_tasks(e, name, make_tasks(60, tag=name), rankings_per_task=1)
        campaigns.add_tasks(e, name, [{**t, "expected": [3, 2, 1, 0]} for t in make_tasks(20, tag=f"{name}-known")])
        known = queries.task_ids(e, cid)[60:]
        assert oversight.set_quality(e, cid, gold_rate=rate) == {"gold_rate": rate, "flag_below": None}
        labs = [accounts.create_labeler(e, f"{name}-{i}")[0] for i in range(3)]
        got = answer_in_turns(e, labs, cid)
        met = {lid: [t for t in ts if t in known] for lid, ts in got.items()}
        with Session(e) as s:
            done = dict(s.execute(select(Task.id, Task.n_done).where(Task.campaign_id == cid)).all())
            assert s.scalar(select(func.sum(Task.n_open))) == 0
        assert all(done[t] == 1 for t in queries.task_ids(e, cid)[:60])  # an ordinary task: its one ranking
        if rate == 0:
            assert all(done[t] == 1 for t in known)  # known tasks are ordinary tasks, nothing mixed in
            assert sum(map(len, met.values())) == 20
            continue
        # each labeler met about a quarter of their tasks' worth of known answers, however full those were
        for lid in labs:
            assert 0.1 < len(met[lid]) / len(got[lid]) < 0.5, (len(met[lid]), len(got[lid]))
        assert max(done[t] for t in known) > 1  # dealt beyond the one slot
        # known tasks are never all that is left: labelers who never met some of them get nothing more
        assert any(set(known) - set(ts) for ts in got.values())
        assert all(assignments.next_task(e, lid, campaign_id=cid) is None for lid in labs)


def test_a_paused_labeler_gets_no_task_and_their_open_one_is_released(db_url):
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(2), rankings_per_task=1)
    a, b = accounts.create_labeler(e, "a")[0], accounts.create_labeler(e, "b")[0]
    held = assignments.next_task(e, a)
    assert oversight.pause_labeler(e, a) is not None
    with Session(e) as s:
        assert s.get(Task, held["task_id"]).n_open == 0  # its slot is free for others at once
    for call in (lambda: assignments.next_task(e, a), lambda: assignments.submit(e, a, held["task_id"], groups_in_order(held))):
        with pytest.raises(Rejected, match="paused by the admin") as why:
            call()
        assert why.value.status == 423
    assert count(e, Ranking) == 0
    assert assignments.next_task(e, b)["task_id"] == held["task_id"]  # the released task goes to another labeler
    assert oversight.pause_labeler(e, a, False) is None
    assert assignments.next_task(e, a)["task_id"] != held["task_id"]  # resumed: a task again (not the one they had)
    with pytest.raises(Rejected, match="no labeler 99"):
        oversight.pause_labeler(e, 99)
    oversight.pause_labeler(e, accounts.labeler_id(e, "sim-balanced-0"))  # a paused simulated labeler stops, without an error
    assert jobs.simulate(db_url, labelers=1) == {"sim-balanced-0": 0}


@pytest.mark.parametrize("ranks, status, message", [
    ([0, 1, 2], 422, "a list of 4 integers"), ([0, 1, 2, 4], 422, r"from 0 \(best\) to 3"),
    ([0, 1, True, 2], 422, "integers"), ("0123", 422, "integers"), ([-1, 0, 1, 2], 422, "from 0")])
def test_bad_expected_ranks_are_refused_and_change_nothing(db_url, ranks, status, message):
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(1), rankings_per_task=1)
    assert oversight.set_expected(e, 1, [1, 1, 3, 0]) == [1, 1, 2, 0]  # made dense, as a ranking is stored
    with pytest.raises(Rejected, match=message) as why:
        oversight.set_expected(e, 1, ranks)
    assert why.value.status == status
    assert oversight.quality_settings(e)[0][1]["expected"] == {1: [1, 1, 2, 0]}
    assert oversight.set_expected(e, 1, None) is None and oversight.quality_settings(e)[0][1]["known"] == 0


def test_known_answers_and_settings_refuse_what_makes_no_sense(db_url):
    e = connect(db_url)
    jobs.add_comparison(e, "ev", [{"prompt": "p", "references": []}], {"a": ["x"], "b": ["y"]}, {})
    for call, status, message in ((lambda: oversight.set_expected(e, 1, [0, 1]), 409, "evaluation"),
                                  (lambda: oversight.set_expected(e, 5, [0, 1]), 404, "no task 5"),
                                  (lambda: oversight.set_quality(e, 1, gold_rate=0.6), 422, "between 0 and 0.5"),
                                  (lambda: oversight.set_quality(e, 1, flag_below=1.5), 422, "between -1 and 1"),
                                  (lambda: oversight.set_quality(e, 9, gold_rate=0.1), 404, "no campaign 9")):
        with pytest.raises(Rejected, match=message) as why:
            call()
        assert why.value.status == status
    assert oversight.quality_settings(e)[0][1] == {"gold_rate": 0.0, "flag_below": None, "expected": {}, "known": 0}


def test_an_older_database_gets_the_quality_columns(db_url):
    """A database made before known answers, gold rates, thresholds and pausing: connecting adds the
    columns, empty; its campaigns mix in nothing, nobody is paused."""
    e = connect(db_url)
    campaigns.add_tasks(e, "c", make_tasks(2), rankings_per_task=1)
    lid = accounts.create_labeler(e, "a")[0]
    with writing(e) as s:
        for table, col in (("campaigns", "gold_rate"), ("campaigns", "flag_below"), ("tasks", "expected"),
                           ("labelers", "paused_at")):
            s.execute(text(f"ALTER TABLE {table} DROP COLUMN {col}"))
    e.dispose()
    e = connect(db_url)
    assert oversight.quality_settings(e) == ({1: {"gold_rate": 0.0, "flag_below": None, "expected": {}, "known": 0}}, {})
    assert assignments.next_task(e, lid)["task_id"] == 1


def test_meeting_a_known_answer_task_counts_down_as_any_task(db_url):
    """A labeler's `left` drops by one for every task they get, a known-answer task dealt beyond its
    slots too (else it would give that task away), and is 0 once no ordinary work is left for them."""
    import random

    e = connect(db_url)
    cid = campaigns.add_tasks(e, "c", make_tasks(4) + [{**t, "expected": [0, 1, 2, 3]} for t in make_tasks(3, tag="k")],
                      rankings_per_task=1)
    oversight.set_quality(e, cid, gold_rate=0.5)
    with writing(e) as s:  # the known tasks' one slot each taken by someone else
        s.execute(update(Task).where(Task.expected.is_not(None)).values(n_done=1))
    lid, rng, lefts, known = accounts.create_labeler(e, "b")[0], random.Random(3), [], 0
    while True:
        lefts.append(assignments.progress(e, lid)["left"])
        t = assignments.next_task(e, lid, rng=rng)
        if t is None:
            break
        known += t["prompt"].startswith("prompt k")
        assignments.submit(e, lid, t["task_id"], groups_in_order(t))
    assert known >= 1 and lefts[0] == 7 and lefts[-1] == 0, lefts
    assert all(a - b == 1 for a, b in zip(lefts, lefts[1:-1])), lefts  # one down per task, to the last ordinary one
