"""Load benchmark of the ranking app: concurrent labelers submitting rankings over HTTP.

    python bench/feedback_load.py                       # 200 labelers x 50 rankings, SQLite and PostgreSQL
    python bench/feedback_load.py --backend sqlite --labelers 10 --rankings 20
    python bench/feedback_load.py --write-results       # also rewrite our section of bench/RESULTS.md

The server is `shoggoth feedback serve` in its own process (one uvicorn worker) on
127.0.0.1; the labelers are asyncio tasks with one HTTP connection each. Every
labeler signs in (trades its invite for a session at POST /api/session), then
loops: POST /api/next, POST its ranking; a share of submissions is sent a second
time at once (a client retrying), which must be refused with 409. Meanwhile an
admin client invites, signs in and revokes other labelers, one after another,
and checks that a revoked session is refused at once.
Afterwards the database is checked: every accepted submission stored exactly
once (zero lost), no (task, labeler) twice and no task over its N (zero duplicated).
"""

import argparse
import asyncio
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import create_database, free_port, start_postgres  # noqa: E402
from sqlalchemy import select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from shoggoth.feedback import accounts, campaigns, queries  # noqa: E402
from shoggoth.feedback.db import Ranking, connect  # noqa: E402

SECTION = "## Feedback app load (bench/feedback_load.py)"


def prepare(url, labelers, rankings, k, per_task):
    engine = connect(url)
    n_tasks = (labelers * rankings) // per_task + labelers  # enough for everyone, with a margin
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    rng = random.Random(0)
    tasks = [{"prompt": f"Question {i}: " + " ".join(rng.choices(words, k=20)),
              "completions": [" ".join(rng.choices(words, k=rng.randint(20, 80))) for _ in range(k)]}
             for i in range(n_tasks)]
    campaigns.add_tasks(engine, "load", tasks, rankings_per_task=per_task)
    # invites, traded by the clients
    tokens = [accounts.create_labeler(engine, f"load-{i}")[1] for i in range(labelers)]
    engine.dispose()
    return tokens, n_tasks


async def labeler(*args):
    try:
        await _labeler(*args)
    except httpx.TransportError as e:  # a dropped connection: counted as a problem, never hidden
        args[-1].append(f"transport error: {type(e).__name__}")


async def _labeler(base, invite, rankings, retry_fraction, seed, lat, accepted, problems):
    rng = random.Random(seed)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        r = await c.post("/api/session", headers={"Authorization": f"Bearer {invite}"})
        lat["signin"].append(time.perf_counter() - t0)
        if r.status_code != 201:
            problems.append(f"sign-in: {r.status_code} {r.text[:100]}")
            return
        c.headers["Authorization"] = f"Bearer {r.json()['session']}"
        for _ in range(rankings):
            t0 = time.perf_counter()
            r = await c.post("/api/next")
            lat["next"].append(time.perf_counter() - t0)
            task = r.json().get("task") if r.status_code == 200 else None
            if task is None:
                problems.append(f"next: {r.status_code} {r.text[:100]}")
                return
            ids = [x["id"] for x in task["completions"]]
            rng.shuffle(ids)
            body = {"ranking": [[i] for i in ids]}
            path = f"/api/tasks/{task['task_id']}/ranking"
            t0 = time.perf_counter()
            if rng.random() < retry_fraction:  # the same submission twice at once: one must win, one get 409
                a, b = await asyncio.gather(c.post(path, json=body), c.post(path, json=body))
                lat["submit"].append(time.perf_counter() - t0)
                codes = sorted([a.status_code, b.status_code])
                if codes != [201, 409]:
                    problems.append(f"twin submit answered {codes}")
                got = a if a.status_code == 201 else b
                lat["twins"] += 1
            else:
                got = await c.post(path, json=body)
                lat["submit"].append(time.perf_counter() - t0)
            if got.status_code != 201:
                problems.append(f"submit: {got.status_code} {got.text[:100]}")
                continue
            accepted.append(got.json()["ranking_id"])


async def churn(base, admin_token, stop, lat, problems):
    """The admin invites a labeler, who signs in and looks at their page; the admin revokes them,
    and their session must be refused at once. Again and again until stop is set."""
    admin = {"Authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        i = 0
        while not stop.is_set():
            i += 1
            t0 = time.perf_counter()
            r = await c.post("/admin/invite", data={"name": f"churn-{i}"}, headers=admin)
            if r.status_code != 201:
                problems.append(f"invite: {r.status_code}")
                return
            invite = r.text.split('id="invite-link">')[1].split("<")[0].rsplit("/", 1)[1]
            r = await c.post("/api/session", headers={"Authorization": f"Bearer {invite}"})
            session = {"Authorization": f"Bearer {r.json()['session']}"}
            if (await c.get("/api/me", headers=session)).status_code != 200:
                problems.append("churn: a fresh session was refused")
            labs = (await c.get("/admin/api/overview", headers=admin)).json()["labelers"]
            lid = next(lab["id"] for lab in labs if lab["name"] == f"churn-{i}")
            if (await c.post(f"/admin/labelers/{lid}/revoke", headers=admin)).status_code != 200:
                problems.append("churn: revoke failed")
            if (await c.get("/api/me", headers=session)).status_code != 401:
                problems.append("churn: a revoked session still worked")
            lat["churn"].append(time.perf_counter() - t0)


def check(url, accepted, labelers, rankings, per_task):
    engine = connect(url)
    rows = queries.rankings(engine)
    with Session(engine) as s:
        ids = set(s.scalars(select(Ranking.id)))
    camp = queries.overview(engine)[0][0]
    engine.dispose()
    pairs = Counter((r["task_id"], r["labeler"]) for r in rows)
    per_task_count = Counter(r["task_id"] for r in rows)
    return {
        "accepted": len(accepted),
        "stored": len(rows),
        "lost": len(set(accepted) - ids),  # accepted (201) but not in the database
        "unaccounted": len(ids - set(accepted)),  # in the database but never acknowledged
        "duplicated": sum(n - 1 for n in pairs.values() if n > 1) + (len(accepted) - len(set(accepted))),
        "over_n": sum(1 for n in per_task_count.values() if n > per_task),
        "per_labeler_ok": all(n == rankings for n in Counter(r["labeler"] for r in rows).values())
        and len({r["labeler"] for r in rows}) == labelers,
        "counters_ok": camp["done"] == len(rows) and camp["open"] == 0,
    }


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] * 1000


def run(backend, url, args):
    tokens, n_tasks = prepare(url, args.labelers, args.rankings, args.k, args.per_task)
    port = free_port()
    log = open(Path(tempfile.gettempdir()) / f"feedback_load_server_{port}.log", "w")
    admin_token = secrets.token_urlsafe(24)
    server = subprocess.Popen([sys.executable, "-m", "shoggoth", "feedback", "serve", "--db", url, "--port", str(port)],
                              env={**os.environ, "SHOGGOTH_ADMIN_TOKEN": admin_token},  # as docs/deploy.md advises
                              stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/favicon.ico").status_code == 204:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        lat, accepted, problems = {"next": [], "submit": [], "signin": [], "churn": [], "twins": 0}, [], []

        async def main():
            stop = asyncio.Event()
            admin = asyncio.create_task(churn(base, admin_token, stop, lat, problems))
            await asyncio.gather(*(labeler(base, tok, args.rankings, args.retry_fraction, i, lat, accepted, problems)
                                   for i, tok in enumerate(tokens)))
            stop.set()
            await admin

        t0 = time.perf_counter()
        asyncio.run(main())
        wall = time.perf_counter() - t0
        load = os.getloadavg()[0]
    finally:
        server.terminate()
        server.wait(10)
        log.close()
        print(f"  server log: {log.name}")
    res = check(url, accepted, args.labelers, args.rankings, args.per_task)
    res.update(backend=backend, wall=wall, rate=len(accepted) / wall, twins=lat["twins"], problems=len(problems),
               submit_p50=pct(lat["submit"], 50), submit_p99=pct(lat["submit"], 99),
               next_p50=pct(lat["next"], 50), next_p99=pct(lat["next"], 99), tasks=n_tasks, load=load,
               signin_p50=pct(lat["signin"], 50), signin_p99=pct(lat["signin"], 99), revoked=len(lat["churn"]))
    for p in problems[:5]:
        print(f"  problem: {p}")
    return res


def table(results, args):
    lines = [SECTION, "",
             f"{args.labelers} concurrent labelers x {args.rankings} rankings each over HTTP (K={args.k} completions, "
             f"N={args.per_task} rankings per task; {args.retry_fraction:.0%} of submissions sent twice at once, "
             "as a retrying client would). One uvicorn worker (`shoggoth feedback serve`) in its own process; the "
             "labelers are asyncio clients on the same machine (2 CPU cores), each signing in first (invite traded "
             "for a session over HTTP), while an admin client invites, signs in and revokes other labelers in a "
             "loop (each revoked session checked refused at once). Latency is per HTTP request, client side; a "
             "twin submission counts once, as the time until both answers are back.", "",
             "| backend | accepted | stored | lost | duplicated | over N | twins refused 409 | submit p50 / p99 ms "
             "| next-task p50 / p99 ms | sign-in p50 / p99 ms | invite-sign-in-revoke cycles | rankings/s | wall s "
             "| load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['backend']} | {r['accepted']} | {r['stored']} | {r['lost']} | {r['duplicated']} | "
                     f"{r['over_n']} | {r['twins']} | {r['submit_p50']:.0f} / {r['submit_p99']:.0f} | "
                     f"{r['next_p50']:.0f} / {r['next_p99']:.0f} | {r['signin_p50']:.0f} / {r['signin_p99']:.0f} | "
                     f"{r['revoked']} | {r['rate']:.0f} | {r['wall']:.1f} | {r['load']:.1f} |")
    lines += ["", "Load average is the machine's at the end of the run: other jobs shared the 2 cores, so the latencies "
              "are an upper bound for this box. uvicorn ran without `httptools`/`uvloop` (not installed here; "
              "`uvicorn[standard]` would add them).", "", "Checked after each run: every acknowledged ranking is in the database and every stored one was "
              "acknowledged; no (task, labeler) pair twice; every labeler has exactly its rankings; the tasks' "
              "counters match the rows.", ""]
    return "\n".join(lines)


def write_section(text, path=ROOT / "bench" / "RESULTS.md"):
    """Replace our section of RESULTS.md (up to the next '## ' heading), or append it; others' sections stay."""
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if SECTION in old:
        start = old.index(SECTION)
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + (old[nxt + 1:] if nxt >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument("--labelers", type=int, default=200)
    p.add_argument("--rankings", type=int, default=50, help="rankings each labeler submits")
    p.add_argument("-k", type=int, default=4)
    p.add_argument("--per-task", type=int, default=3, help="N: rankings each task collects")
    p.add_argument("--retry-fraction", type=float, default=0.1)
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.backend in ("sqlite", "both"):
            results.append(run("SQLite (file, WAL)", f"sqlite:///{tmp / 'load.db'}", args))
            print(results[-1], flush=True)
        if args.backend in ("postgres", "both"):
            (tmp / "pg").mkdir()
            host, port, user, stop = start_postgres(tmp / "pg")
            try:
                results.append(run("PostgreSQL 15", create_database(host, port, user, "load"), args))
                print(results[-1], flush=True)
            finally:
                stop()
    text = table(results, args)
    print(text)
    if args.write_results:
        write_section(text)
    bad = [r for r in results if r["lost"] or r["duplicated"] or r["over_n"] or r["unaccounted"] or r["problems"]
           or not r["per_labeler_ok"] or not r["counters_ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
