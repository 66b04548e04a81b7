"""The ranking app over real HTTP: who may do what, CSRF, and bad input (4xx with a message, never a 500)."""

import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import update

from common import ranking_history
from shoggoth.feedback import accounts, campaigns, oversight, queries, winrate
from shoggoth.feedback.db import Invite, writing
from shoggoth.feedback.admin import WinRates
from shoggoth.feedback.agreement import kendall_tau_b
from shoggoth.feedback.auth import REVISION_WINDOW, REVISIONS

ADMIN = "admin-secret-token"


def setup_campaign(srv, n_tasks=3, k=4, per_task=2):
    campaigns.add_tasks(srv.engine, "camp", [{"prompt": f"p{i}", "completions": [f"c{i}.{j}" for j in range(k)]}
                                     for i in range(n_tasks)], rankings_per_task=per_task)


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def csrf_of(page):
    """The CSRF token a page carries: the labeler page's meta tag or a form's hidden field."""
    return re.search(r'name="csrf(?:-token)?" (?:content|value)="([^"]*)"', page).group(1)


def signed_in(srv, name):
    """A new labeler's session token, as a script gets it (its invite traded once)."""
    return accounts.trade_invite(srv.engine, accounts.create_labeler(srv.engine, name)[1])[2]


def admin_sign_in(c, token=ADMIN):
    """Sign client `c` in as the admin with the sign-in form (the token in the body, never in a URL)."""
    return c.post("/admin/sign-in", data={"token": token}, follow_redirects=False)


def n_rankings(srv):
    return len(queries.rankings(srv.engine))


def test_tokens_gate_labeler_and_admin_endpoints(live_app):
    srv = live_app
    setup_campaign(srv)
    alice = signed_in(srv, "alice")
    bob = signed_in(srv, "bob")
    with httpx.Client(base_url=srv.url) as c:
        for headers in ({}, bearer("wrong"), bearer(ADMIN)):  # the admin token is no labeler token
            r = c.post("/api/next", headers=headers)
            assert r.status_code == 401 and "invite link" in r.json()["error"]
        for path in ("/admin", "/admin/api/overview", "/admin/export.jsonl", "/admin/labelers/1"):
            assert c.get(path, headers=bearer(alice)).status_code == 401
            assert c.get(path, headers=bearer(ADMIN)).status_code == 200
        assert admin_sign_in(c, "wrong").status_code == 401
        task = c.post("/api/next", headers=bearer(alice)).json()["task"]
        groups = [[x["id"]] for x in task["completions"]]
        tid = task["task_id"]
        # bob can neither answer nor skip alice's task, nor read her rankings
        r = c.post(f"/api/tasks/{tid}/ranking", json={"ranking": groups}, headers=bearer(bob))
        assert r.status_code == 403 and "not assigned to you" in r.json()["error"]
        assert c.post(f"/api/tasks/{tid}/skip", headers=bearer(bob)).status_code == 403
        assert c.post(f"/api/tasks/{tid}/ranking", json={"ranking": groups}, headers=bearer(alice)).status_code == 201
        assert [r["labeler"] for r in c.get("/api/rankings", headers=bearer(alice)).json()["rankings"]] == ["alice"]
        assert c.get("/api/rankings", headers=bearer(bob)).json()["rankings"] == []
        # bob gets the same task (2 rankings per task) and answers it: alice's ranking is untouched
        assert c.post("/api/next", headers=bearer(bob)).json()["task"]["task_id"] == tid
        r = c.post(f"/api/tasks/{tid}/ranking", json={"ranking": groups[::-1]}, headers=bearer(bob))
        assert r.status_code == 201
        mine = c.get("/api/rankings", headers=bearer(alice)).json()["rankings"]
        assert len(mine) == 1 and mine[0]["ranks"] != c.get("/api/rankings", headers=bearer(bob)).json()["rankings"][0]["ranks"]
        me = c.get("/api/me", headers=bearer(alice)).json()
        assert me["name"] == "alice" and me["progress"]["done"] == 1


def test_cookie_sessions_need_csrf_token_and_same_origin(live_app):
    srv = live_app
    setup_campaign(srv)
    _, token = accounts.create_labeler(srv.engine, "carol")
    with httpx.Client(base_url=srv.url) as c:
        r = c.post(f"/join/{token}")
        assert r.status_code == 303 and r.headers["location"] == "/label"
        assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=lax" in r.headers["set-cookie"]
        page = c.get("/label").text
        csrf = csrf_of(page)
        r = c.post("/api/next")  # cookie only: what a forged cross-site request would carry
        assert r.status_code == 403 and "CSRF" in r.json()["error"]
        r = c.post("/api/next", headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"})
        assert r.status_code == 403 and "cross-origin" in r.json()["error"]
        r = c.post("/api/next", headers={"X-CSRF-Token": csrf, "Origin": srv.url})
        assert r.status_code == 200
        task = r.json()["task"]
        body = {"ranking": [[x["id"]] for x in task["completions"]]}
        assert c.post(f"/api/tasks/{task['task_id']}/ranking", json=body).status_code == 403
        assert n_rankings(srv) == 0
        assert c.post(f"/api/tasks/{task['task_id']}/ranking", json=body, headers={"X-CSRF-Token": csrf}).status_code == 201
        assert n_rankings(srv) == 1
        assert c.get("/join/not-a-token").status_code == 404
    with httpx.Client(base_url=srv.url) as admin:
        r = admin_sign_in(admin)
        assert r.status_code == 303 and "sg_admin" in r.headers["set-cookie"]
        page = admin.get("/admin").text
        csrf = csrf_of(page)
        assert admin.post("/admin/invite", data={"name": "dave"}).status_code == 403  # no CSRF field
        assert admin.post("/admin/invite", data={"name": "dave", "csrf": csrf},
                          headers={"Origin": "http://evil.example"}).status_code == 403
        r = admin.post("/admin/invite", data={"name": "dave", "csrf": csrf})
        assert r.status_code == 201
        link = r.text.split('id="invite-link">')[1].split("<")[0]
        assert link.startswith(f"{srv.url}/join/") and accounts.labeler_by_token(srv.engine, link.rsplit("/", 1)[1])[1] == "dave"
        r = admin.post("/admin/invite", data={"name": "dave", "csrf": csrf})
        assert r.status_code == 409 and "already a labeler named" in r.text
        assert r.headers["referrer-policy"] == "same-origin"  # "no-referrer" makes Chromium post Origin: null
        r = admin.post("/admin/campaigns/1/n", data={"n": "5", "csrf": csrf})
        assert r.status_code == 303 and queries.overview(srv.engine)[0][0]["n"] == 5


def test_bad_input_gets_a_clear_4xx_and_stores_nothing(live_app):
    srv = live_app
    setup_campaign(srv, n_tasks=2, per_task=1)
    token = signed_in(srv, "eve")
    h = bearer(token)
    with httpx.Client(base_url=srv.url, headers=h) as c:
        task = c.post("/api/next").json()["task"]
        tid, ids = task["task_id"], [x["id"] for x in task["completions"]]
        other = 3 - tid
        cases = [
            (f"/api/tasks/{tid}/ranking", {"ranking": [[i] for i in ids[:3]]}, 422, "places 3 completions; this task has 4"),
            (f"/api/tasks/{tid}/ranking", {"ranking": [[ids[0]], [ids[0]], [ids[1]], [ids[2]]]}, 422, "more than once"),
            (f"/api/tasks/{tid}/ranking", {"ranking": [[999999]] + [[i] for i in ids[1:]]}, 422, "not one of this task"),
            (f"/api/tasks/{tid}/ranking", {"ranking": [[i] for i in ids], "flags": ["meh"]}, 422, "flags must be"),
            (f"/api/tasks/{tid}/ranking", {"ranking": [["1"]]}, 422, "valid integer"),
            (f"/api/tasks/{tid}/ranking", {"ranking": "best"}, 422, "valid list"),
            (f"/api/tasks/{tid}/ranking", {}, 422, "ranking: Field required"),
            (f"/api/tasks/{other}/ranking", {"ranking": [[i] for i in ids]}, 403, "not assigned to you"),
            ("/api/tasks/424242/ranking", {"ranking": [[i] for i in ids]}, 404, "no task 424242"),
            (f"/api/tasks/{2**40}/ranking", {"ranking": [[i] for i in ids]}, 422, "less than or equal"),
            ("/api/tasks/abc/ranking", {"ranking": [[i] for i in ids]}, 422, "valid integer"),
        ]
        for path, body, status, message in cases:
            r = c.post(path, json=body)
            assert r.status_code == status, (path, body, r.text)
            assert message in r.json()["error"], (message, r.json())
        r = c.post(f"/api/tasks/{tid}/ranking", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "JSON" in r.json()["error"]
        assert n_rankings(srv) == 0
        assert c.post(f"/api/tasks/{tid}/ranking", json={"ranking": [ids]}).status_code == 201  # all tied is fine
        r = c.post(f"/api/tasks/{tid}/ranking", json={"ranking": [ids]})
        assert r.status_code == 409 and "already submitted" in r.json()["error"]
        assert n_rankings(srv) == 1


def test_no_input_gets_a_500(live_app):
    """Random junk at every endpoint, as labeler, admin and nobody: only 2xx/3xx/4xx come back."""
    srv = live_app
    setup_campaign(srv, n_tasks=2)
    token = signed_in(srv, "mallory")
    rng = random.Random(0)
    junk = [None, "", "x", "\x00", "\ud800", "😀" * 50, -1, 0, 2**63, 1e308, True, [], {}, [[]], [[None]],
            [[1, 2], [3]] * 20, {"ranking": None}, {"ranking": [[2**70]]}, {"ranking": [[1]], "flags": [None]},
            {"ranking": [[1]] * 100}, {"flags": "all_bad"}, "a" * 5000]
    paths = ["/api/next", "/api/tasks/1/ranking", "/api/tasks/1/skip", "/api/tasks/0/ranking", "/api/tasks/-5/skip",
             "/api/me", "/api/rankings?limit=0", "/api/rankings?limit=x", "/admin/invite", "/admin/campaigns/1/n",
             "/admin/campaigns/99999999999/n", "/admin/labelers/0", "/admin/export.jsonl?campaign=%00",
             "/admin/export.jsonl?pairs=maybe", "/admin?token=%00", "/join/%00", "/join/" + "x" * 300]
    with httpx.Client(base_url=srv.url) as c:
        c.post("/api/next", headers=bearer(token))
        for path in paths:
            for headers in ({}, bearer(token), bearer(ADMIN), {"Cookie": "sg_labeler=\x01; sg_admin=zz"}):
                for body in rng.sample(junk, 6):
                    r = c.post(path, content=json.dumps(body).encode(),  # ASCII: a lone surrogate travels escaped
                               headers={**headers, "Content-Type": "application/json"})
                    assert r.status_code < 500, (path, body, headers, r.status_code, r.text[:200])
                    text = str(body).encode("utf-8", "replace").decode()
                    r = c.post(path, data={"name": text, "n": text, "csrf": text}, headers=headers)
                    assert r.status_code < 500, (path, body, headers, r.status_code, r.text[:200])
                assert c.get(path, headers=headers).status_code < 500, path


def test_export_endpoint(live_app):
    srv = live_app
    setup_campaign(srv, n_tasks=1, k=3, per_task=1)
    token = signed_in(srv, "ann")
    with httpx.Client(base_url=srv.url) as c:
        task = c.post("/api/next", headers=bearer(token)).json()["task"]
        ids = [x["id"] for x in task["completions"]]
        assert c.post(f"/api/tasks/{task['task_id']}/ranking", json={"ranking": [[i] for i in ids]},
                      headers=bearer(token)).status_code == 201
        r = c.get("/admin/export.jsonl?campaign=camp", headers=bearer(ADMIN))
        assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
        (row,) = [json.loads(x) for x in r.text.splitlines()]
        assert sorted(row) == sorted(queries.EXPORT_KEYS) and sorted(row["ranks"]) == [0, 1, 2]
        pairs = [json.loads(x) for x in c.get("/admin/export.jsonl?pairs=true", headers=bearer(ADMIN)).text.splitlines()]
        assert len(pairs) == 3 and all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)
        assert c.get("/admin/export.jsonl?campaign=nope", headers=bearer(ADMIN)).text == ""


@pytest.mark.parametrize("name", ["<b>x</b>"])
def test_admin_pages_escape_names(live_app, name):
    srv = live_app
    accounts.create_labeler(srv.engine, name)
    r = httpx.get(f"{srv.url}/admin", headers=bearer(ADMIN))
    assert "&lt;b&gt;x&lt;/b&gt;" in r.text and "<b>x</b>" not in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]


def test_bodies_are_bounded_before_anything_reads_them(live_app):
    """A stranger's large body (JSON, form, file part, or chunked without a length) gets 413 before
    authentication, and the server stays up."""
    from shoggoth.feedback.app import MAX_BODY

    srv = live_app
    setup_campaign(srv)
    big = b"x" * (4 * 1024 * 1024)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/api/tasks/1/ranking", content=b'{"ranking": [[1]], "pad": "' + big + b'"}',
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "bytes" in r.json()["error"]
        r = c.post("/admin/invite", data={f"f{i}": "y" * 1024 for i in range(1000)})
        assert r.status_code == 413
        r = c.post("/admin/invite", files={"upload": ("big.bin", big)})
        assert r.status_code == 413
        r = c.post("/api/next", content=(big[i:i + 65536] for i in range(0, len(big), 65536)))  # chunked
        assert r.status_code == 413
        r = c.post("/api/next", content=b"x" * (MAX_BODY + 1))
        assert r.status_code == 413
        assert c.post("/api/next", content=b"x" * MAX_BODY).status_code == 401  # at the limit: read, then who?
        assert c.get("/label").status_code == 401  # still serving


def test_malformed_headers_and_fields_get_a_4xx(live_app):
    """The inputs that once made 500s, each with a valid session."""
    srv = live_app
    setup_campaign(srv)
    _, token = accounts.create_labeler(srv.engine, "oscar")
    with httpx.Client(base_url=srv.url) as c:
        c.post(f"/join/{token}")
        for csrf in ("é".encode("latin-1"), "\u00ff\u00fe".encode("latin-1")):
            r = c.post("/api/next", headers={"X-CSRF-Token": csrf})
            assert r.status_code == 403 and "CSRF" in r.json()["error"]
        r = c.post("/api/next", headers={"Origin": "http://["})
        assert r.status_code == 403 and "cross-origin" in r.json()["error"]
    with httpx.Client(base_url=srv.url) as admin:
        admin_sign_in(admin)
        csrf = csrf_of(admin.get("/admin").text)
        assert admin.post("/admin/invite", data={"name": "x", "csrf": "ü" * 10}).status_code == 403
        for cid in ("²", "9" * 5000, "٣", "1e3", "-1"):
            r = admin.post("/admin/invite", data={"name": "zed", "campaign_id": cid, "csrf": csrf})
            assert r.status_code == 422 and "campaign_id" in r.text, (cid, r.status_code)
        assert queries.overview(srv.engine)[1] and all(lab["name"] != "zed" for lab in queries.overview(srv.engine)[1])


def test_invalid_input_is_answered_before_who_is_asking(tmp_path):
    """The order of answers: a malformed request gets 422 whoever sends it; a well-formed one from a
    stranger 401, and a cookie write without the page's CSRF token 403 (FastAPI would call the auth
    dependencies first; the app keeps validation first)."""
    from fastapi.testclient import TestClient

    from shoggoth.feedback.app import create_app

    app = create_app(f"sqlite:///{tmp_path / 'f.db'}", admin_token=ADMIN)
    labeler = accounts.trade_invite(app.state.engine, accounts.create_labeler(app.state.engine, "zoe")[1])[2]
    admin = accounts.admin_session(app.state.engine, ADMIN)
    requests = [  # (method, path, malformed, well-formed)
        ("POST", "/api/tasks/{}/ranking", ("abc", {"json": {"ranking": [[1]]}}), ("1", {"json": {"ranking": [[1]]}})),
        ("POST", "/api/tasks/1/ranking{}", ("", {"json": {"ranking": "best"}}), ("", {"json": {"ranking": [[1]]}})),
        ("PUT", "/api/rankings/{}", ("0", {"json": {"ranking": [[1]]}}), ("1", {"json": {"ranking": [[1]]}})),
        ("POST", "/api/tasks/{}/skip", (str(2**40), {}), ("1", {})),
        ("GET", "/api/rankings?limit={}", ("x", {}), ("5", {})),
        ("POST", "/admin/invite{}", ("", {"data": {"name": ""}}), ("", {"data": {"name": "yves"}})),
        ("POST", "/admin/campaigns/1/n{}", ("", {"data": {"n": "0"}}), ("", {"data": {"n": "2"}})),
        ("POST", "/admin/labelers/1/revoke{}", ("", {"data": {"csrf": "x" * 101}}), ("", {"data": {"csrf": "x"}})),
        ("GET", "/admin/labelers/{}", ("abc", {}), ("1", {})),
        ("GET", "/admin/export.jsonl?pairs={}", ("maybe", {}), ("true", {})),
    ]
    for who, cookies, refused in (("nobody", {}, 401), ("a wrong token", {}, 401),
                                  ("a cookie without CSRF", {"sg_labeler": labeler, "sg_admin": admin}, 403)):
        headers = bearer("wrong") if who == "a wrong token" else {}
        with TestClient(app, cookies=cookies) as c:
            for method, path, (bad, bad_kw), (good, good_kw) in requests:
                r = c.request(method, path.format(bad), headers=headers, **bad_kw)
                assert r.status_code == 422, (who, method, path, bad, r.status_code)
                if method == "GET" and cookies:
                    continue  # a cookie session reads without CSRF
                r = c.request(method, path.format(good), headers=headers, **good_kw)
                assert r.status_code == refused, (who, method, path, good, r.status_code)


def test_guessing_tokens_is_slowed_down(live_app):
    from shoggoth.feedback.auth import GUESSES

    srv = live_app
    _, token = accounts.create_labeler(srv.engine, "peggy")
    with httpx.Client(base_url=srv.url) as c:
        for i in range(GUESSES):
            assert c.get(f"/join/guess-{i}").status_code == 404
        r = c.get(f"/join/{token}")  # even the right token, from this address, for a while
        assert r.status_code == 429 and "wait" in r.text
        assert admin_sign_in(c).status_code == 429
        session = accounts.trade_invite(srv.engine, token)[2]
        assert c.post("/api/next", headers=bearer(session)).status_code == 200  # a signed-in labeler works on


def test_wrong_admin_bearer_tokens_count_as_guesses(live_app):
    """A script's `Authorization: Bearer` is as much a way to guess the admin token as the sign-in form: both count."""
    from shoggoth.feedback.auth import GUESSES

    srv = live_app
    labeler = signed_in(srv, "quinn")
    with httpx.Client(base_url=srv.url) as c:
        for i in range(GUESSES - 1):
            assert c.get("/admin/api/overview", headers=bearer(f"guess-{i}")).status_code == 401
        assert admin_sign_in(c, "guess").status_code == 401  # the two ways share one count
        r = c.get("/admin/api/overview", headers=bearer("guess-last"))
        assert r.status_code == 429 and "wait" in r.json()["error"] and 0 < int(r.headers["retry-after"]) <= 60
        assert c.get("/admin/api/overview", headers=bearer(ADMIN)).status_code == 429  # even the right one, for a while
        assert c.post("/admin/invite", data={"name": "x"}, headers=bearer(ADMIN)).status_code == 429
        assert c.post("/api/next", headers=bearer(labeler)).status_code == 200  # a signed-in labeler works on


def test_concurrent_wrong_tokens_get_no_more_answers_than_the_limit(live_app):
    """Check and record are one step: 60 wrong invite tokens at once get GUESSES answers, not more."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from shoggoth.feedback.auth import GUESSES

    srv, n = live_app, 60
    start = Barrier(n)

    def guess(i):
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            start.wait()
            return c.get(f"/join/guess-{i}").status_code

    with ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(guess, range(n)))
    assert sorted(set(codes)) == [404, 429] and codes.count(404) == GUESSES, codes


def test_wrong_token_limiter_forgets_is_bounded_and_groups_ipv6(tmp_path):
    """Per address (an IPv6 /64 is one), forgotten a window after, a bounded table, a ceiling over all addresses."""
    from fastapi.testclient import TestClient

    from shoggoth.feedback.app import create_app
    from shoggoth.feedback.auth import GUESS_WINDOW, GUESSES

    app = create_app(f"sqlite:///{tmp_path / 'f.db'}", admin_token=ADMIN)
    limiter, now = app.state.guesses, [0.0]
    limiter.clock = lambda: now[0]

    def guess(address, path="/join/guess"):
        return TestClient(app, client=(address, 1234)).get(path, follow_redirects=False).status_code

    def sign_in(address):
        return admin_sign_in(TestClient(app, client=(address, 1234))).status_code

    assert [guess(f"2001:db8:0:1::{i:x}") for i in range(GUESSES + 1)] == [404] * GUESSES + [429]
    assert sign_in("2001:db8:0:1:ffff::1") == 429  # the same /64
    assert guess("2001:db8:0:2::1") == 404  # the next /64 is another address
    assert guess("::ffff:192.0.2.7") == 404 and guess("192.0.2.7") == 404
    assert len(limiter.seen["192.0.2.7"]) == 2  # an IPv4 address however written: one address
    for i in range(200):
        guess(f"10.0.{i // 250}.{i % 250}")
    assert len(limiter.seen) == 203
    now[0] += GUESS_WINDOW  # a window later every entry is stale: the next request sweeps them
    assert guess("2001:db8:0:1::1") == 404 and len(limiter.seen) == 1 and len(limiter.everyone) == 1
    limiter.addresses = 50
    for i in range(100):
        guess(f"10.1.0.{i}")
    assert len(limiter.seen) == 50  # the table's cap: the addresses wrong longest ago go first
    now[0] += GUESS_WINDOW
    limiter.total = 30  # many addresses, one wrong token each: the ceiling over all of them
    assert [guess(f"10.2.0.{i}") for i in range(30)] == [404] * 30
    r = TestClient(app, client=("10.3.0.1", 1)).get("/admin/api/overview", headers=bearer(ADMIN))
    assert r.status_code == 429 and "from all addresses" in r.json()["error"]
    now[0] += GUESS_WINDOW
    assert sign_in("10.3.0.1") == 303  # the window past, the right token works again


def test_cookies_are_secure_over_https(tmp_path):
    """Over HTTPS: session cookies Secure, Path=/, no Domain, named __Host-... (so no sibling subdomain
    can plant one), and HSTS on every response; plain HTTP (localhost) keeps plain names and no HSTS."""
    from fastapi.testclient import TestClient

    from shoggoth.feedback.app import HSTS, create_app

    app = create_app(f"sqlite:///{tmp_path / 'f.db'}", admin_token=ADMIN)
    for base, secure in (("https://labels.example", True), ("http://127.0.0.1", False)):
        prefix = "__Host-" if secure else ""
        _, token = accounts.create_labeler(app.state.engine, f"trent {base}")
        with TestClient(app, base_url=base, follow_redirects=False) as c:
            for r, name in ((c.post(f"/join/{token}"), "sg_labeler"), (admin_sign_in(c), "sg_admin")):
                cookie = r.headers["set-cookie"]
                assert r.status_code == 303 and cookie.startswith(f"{prefix}{name}=") and "Path=/" in cookie
                assert ("Secure" in cookie) == secure and "Domain" not in cookie, cookie
                ttl = accounts.SESSION_TTL["labeler" if name == "sg_labeler" else "admin"]  # the cookie lasts as its session
                assert f"Max-Age={int(ttl)}" in cookie, cookie
                assert r.headers.get("strict-transport-security") == (HSTS if secure else None)
            assert c.get("/label").status_code == 200 and c.get("/admin").status_code == 200
            session = c.cookies[f"{prefix}sg_labeler"]
            r = c.post("/logout", data={"csrf": csrf_of(c.get("/label").text)})
            assert r.status_code == 200 and f'{prefix}sg_labeler=""' in r.headers["set-cookie"]
        with TestClient(app, base_url=base, cookies={"sg_labeler": session}) as c:
            r = c.get("/label")  # over HTTPS a cookie without the prefix is not this app's (anyone could plant it)
            assert r.status_code == 401 and (r.headers.get("strict-transport-security") is not None) == secure


def test_https_behind_a_trusted_proxy_only(tmp_path):
    """What `serve --trusted-proxy` sets up: X-Forwarded-Proto: https from the named proxy makes the cookies
    __Host- and Secure, with HSTS; from any other client the header is ignored (plain HTTP, as sent)."""
    from conftest import LiveServer
    from shoggoth.feedback.app import create_app

    for proxy, https in (("127.0.0.1", True), ("10.9.9.9", False)):  # the test client is 127.0.0.1
        srv = LiveServer(create_app(f"sqlite:///{tmp_path / f'{proxy}.db'}", admin_token=ADMIN),
                         proxy_headers=True, forwarded_allow_ips=proxy)
        try:
            _, token = accounts.create_labeler(srv.engine, "pat")
            r = httpx.post(f"{srv.url}/join/{token}", headers={"X-Forwarded-Proto": "https"})
            cookie = r.headers["set-cookie"]
            assert r.status_code == 303 and cookie.startswith("__Host-sg_labeler=") == https, (proxy, cookie)
            assert ("Secure" in cookie) == https and ("strict-transport-security" in r.headers) == https
        finally:
            srv.stop()


def test_admin_signs_in_by_post_or_a_one_time_link(live_app):
    """The admin token travels in a form's body, never in a URL: an old `/admin?token=` bookmark gets
    a clear 401 and the form (the token in it neither checked nor counted); a one-time link works once."""
    from shoggoth.feedback.auth import GUESSES

    srv = live_app
    with httpx.Client(base_url=srv.url) as c:
        for _ in range(GUESSES + 2):  # not counted as guesses: not checked at all
            r = c.get(f"/admin?token={ADMIN}")
            assert r.status_code == 401 and "no longer work" in r.text and 'action="/admin/sign-in"' in r.text
            assert "set-cookie" not in r.headers
        r = c.get("/admin")
        assert r.status_code == 401 and 'action="/admin/sign-in"' in r.text and 'type="password"' in r.text
        for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            assert c.post("/admin/sign-in", data={"token": ADMIN}, headers=headers).status_code == 403
        r = admin_sign_in(c, "wrong-token")
        assert r.status_code == 401 and "Wrong admin token" in r.text and "sg_admin" not in c.cookies
        assert c.post("/admin/sign-in", data={}).status_code == 422
        r = admin_sign_in(c)
        assert r.status_code == 303 and r.headers["location"] == "/admin" and c.get("/admin").status_code == 200
        assert c.get(f"/admin?token={ADMIN}").status_code == 200  # signed in, an old bookmark shows the page
    links = srv.app.state.sign_in_links
    code = links.new()
    with httpx.Client(base_url=srv.url) as c:
        r = c.get(f"/admin/sign-in/{code}")
        assert r.status_code == 303 and ADMIN not in r.headers["set-cookie"] and c.get("/admin").status_code == 200
    with httpx.Client(base_url=srv.url) as c:
        r = c.get(f"/admin/sign-in/{code}")  # once only
        assert r.status_code == 404 and "used already" in r.text and "sg_admin" not in c.cookies
        assert c.get(f"/admin/sign-in/{ADMIN}").status_code == 404  # the admin token is no link
        code = links.new()
        links.clock = lambda: time.time() + accounts.SESSION_TTL["admin"] + 1
        assert c.get(f"/admin/sign-in/{code}").status_code == 404  # expired


def test_join_refuses_a_cross_site_post_without_origin(live_app):
    """A browser may leave Origin out of a form POST; its Sec-Fetch-Site still says where it came from."""
    srv = live_app
    _, token = accounts.create_labeler(srv.engine, "zack")
    with httpx.Client(base_url=srv.url) as c:
        for site in ("cross-site", "same-site"):  # same-site: a sibling subdomain
            r = c.post(f"/join/{token}", headers={"Sec-Fetch-Site": site})
            assert r.status_code == 403 and "cross-site" in r.text and "sg_labeler" not in c.cookies
        assert accounts.labeler_by_token(srv.engine, token) is not None  # the invite is not spent
        assert c.post(f"/join/{token}", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 303


def test_revoking_frees_the_task_held_and_a_new_invite_ends_sessions(live_app):
    srv = live_app
    setup_campaign(srv, n_tasks=1, per_task=1)
    alice_id, alice_link = accounts.create_labeler(srv.engine, "alice")
    bob = signed_in(srv, "bob")
    with httpx.Client(base_url=srv.url) as alice:
        alice.post(f"/join/{alice_link}")
        alice_csrf = csrf_of(alice.get("/label").text)
        assert alice.post("/api/next", headers={"X-CSRF-Token": alice_csrf}).json()["task"] is not None
    with httpx.Client(base_url=srv.url) as c:
        assert c.post("/api/next", headers=bearer(bob)).json()["task"] is None  # alice holds the only slot
        admin_sign_in(c)
        csrf = csrf_of(c.get(f"/admin/labelers/{alice_id}").text)
        assert c.post(f"/admin/labelers/{alice_id}/revoke", data={"csrf": csrf}).status_code == 200
        assert c.post("/api/next", headers=bearer(bob)).json()["task"] is not None  # freed at once, not in an hour
    # a new link: the sessions the labeler has (a lost laptop, a leaked cookie) end
    carol_id, carol_link = accounts.create_labeler(srv.engine, "carol")
    session = accounts.trade_invite(srv.engine, carol_link)[2]
    with httpx.Client(base_url=srv.url, cookies={"sg_labeler": session}) as carol:
        assert carol.get("/label").status_code == 200
        with httpx.Client(base_url=srv.url) as c:
            admin_sign_in(c)
            csrf = csrf_of(c.get(f"/admin/labelers/{carol_id}").text)
            r = c.post(f"/admin/labelers/{carol_id}/invite", data={"csrf": csrf})
            link = r.text.split('id="invite-link">')[1].split("<")[0]
        assert carol.get("/label").status_code == 401
        assert carol.post("/api/next", headers=bearer(session)).status_code == 401
    with httpx.Client(base_url=srv.url) as carol:
        assert carol.post(link.replace(srv.url, "")).status_code == 303 and carol.get("/label").status_code == 200


def test_weak_admin_token_is_refused(tmp_path):
    import secrets

    from common import shoggoth
    from shoggoth.feedback.auth import TOKEN_BITS, token_bits

    for weak in ("admin", "password12345678", "1234567890123456", "a" * 64, "passwordpassword" * 4,
                 "abcdefghijklmnopqrstuvwxyz0123456789", "qwertyuiop" * 5):
        r = shoggoth("feedback", "serve", "--db", tmp_path / "f.db", "--admin-token", weak, "--port", 0, check=False)
        assert r.returncode == 1 and "too weak" in r.stderr and "128" in r.stderr, (weak, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 2  # the --admin-token warning, the error
    # what the app makes itself, and what `openssl rand -hex 16` or -base64 24 make, pass
    assert min(token_bits(secrets.token_urlsafe(24)) for _ in range(2000)) >= TOKEN_BITS
    assert min(token_bits(secrets.token_hex(16)) for _ in range(2000)) >= TOKEN_BITS
    assert min(token_bits(secrets.token_urlsafe(24).replace("-", "+").replace("_", "/")) for _ in range(2000)) >= TOKEN_BITS


def test_invites_trade_once_for_sessions_that_the_admin_can_revoke(live_app):
    srv = live_app
    setup_campaign(srv)
    lid, invite = accounts.create_labeler(srv.engine, "uma")
    with httpx.Client(base_url=srv.url) as c:
        for _ in range(2):  # opening the link (a chat app's preview, a mail scanner) spends nothing
            r = c.get(f"/join/{invite}")
            assert r.status_code == 200 and "Sign in as uma" in r.text and "sg_labeler" not in c.cookies
        r = c.post(f"/join/{invite}")
        assert r.status_code == 303
        cookie = c.cookies["sg_labeler"]
        assert cookie != invite and invite not in r.headers["set-cookie"]  # the cookie holds a session, not the link
        assert c.get("/label").status_code == 200
    with httpx.Client(base_url=srv.url) as other:  # the link works once
        r = other.get(f"/join/{invite}")
        assert r.status_code == 404 and "used already" in r.text
        assert other.post("/api/session", headers=bearer(invite)).status_code == 401
    _, script_invite = accounts.create_labeler(srv.engine, "script")
    with httpx.Client(base_url=srv.url) as s:
        r = s.post("/api/session", headers=bearer(script_invite))
        assert r.status_code == 201 and r.json()["name"] == "script"
        session = r.json()["session"]
        assert s.post("/api/next", headers=bearer(session)).status_code == 200
        assert s.post("/api/next", headers=bearer(script_invite)).status_code == 401  # the invite is no session
    with httpx.Client(base_url=srv.url) as admin:
        r = admin_sign_in(admin)
        assert admin.cookies["sg_admin"] != ADMIN and ADMIN not in r.headers["set-cookie"]
        page = admin.get(f"/admin/labelers/{lid}").text
        r = admin.post(f"/admin/labelers/{lid}/revoke", data={"csrf": csrf_of(page)})
        assert r.status_code == 200 and "Revoked" in r.text
        r = admin.post(f"/admin/labelers/{lid}/invite", data={"csrf": csrf_of(page)})
        assert r.status_code == 201
        link = r.text.split('id="invite-link">')[1].split("<")[0]
    with httpx.Client(base_url=srv.url, cookies={"sg_labeler": cookie}) as c:
        assert c.get("/label").status_code == 401  # revoked: the old session ends at once
    with httpx.Client(base_url=srv.url) as c:
        assert c.post(link.replace(srv.url, "")).status_code == 303 and c.get("/label").status_code == 200


def test_invites_expire(live_app):
    srv = live_app
    lid, invite = accounts.create_labeler(srv.engine, "vic")
    with writing(srv.engine) as s:
        s.execute(update(Invite).where(Invite.labeler_id == lid).values(expires_at=1.0))
    with httpx.Client(base_url=srv.url) as c:
        assert c.get(f"/join/{invite}").status_code == 404


def test_sign_out_ends_the_session(live_app):
    srv = live_app
    setup_campaign(srv)
    _, invite = accounts.create_labeler(srv.engine, "wes")
    with httpx.Client(base_url=srv.url) as c:
        c.post(f"/join/{invite}")
        cookie = c.cookies["sg_labeler"]
        page = c.get("/label").text
        csrf = csrf_of(page)
        assert c.post("/logout", data={"csrf": "forged"}).status_code == 403
        r = c.post("/logout", data={"csrf": csrf})
        assert r.status_code == 200 and "signed out" in r.text
        assert c.get("/label").status_code == 401
    with httpx.Client(base_url=srv.url, cookies={"sg_labeler": cookie}) as c:
        assert c.get("/label").status_code == 401  # a copy of the cookie is worthless too


def test_a_link_does_not_silently_switch_who_is_signed_in(live_app):
    """Login CSRF: a link from someone else, opened while signed in, asks first."""
    srv = live_app
    setup_campaign(srv)
    _, mine = accounts.create_labeler(srv.engine, "xena")
    _, theirs = accounts.create_labeler(srv.engine, "yuri")
    _, third = accounts.create_labeler(srv.engine, "zora")
    with httpx.Client(base_url=srv.url) as c:
        c.post(f"/join/{mine}")
        real = c.cookies["sg_labeler"]
        r = c.get(f"/join/{theirs}")
        assert r.status_code == 200 and "Switch labeler?" in r.text and "xena" in r.text and "yuri" in r.text
        assert "xena" in c.get("/label").text  # still xena
        assert c.post(f"/join/{theirs}", headers={"Origin": "http://evil.example"}).status_code == 403
        r = c.post(f"/join/{theirs}", headers={"Origin": srv.url})
        assert r.status_code == 303 and "yuri" in c.get("/label").text
    # A sibling subdomain can plant a second sg_labeler (Domain=the parent) that the browser sends beside the
    # real one, in an order the planter steers: reading either one would let it dodge "Switch labeler?".
    for planted in (f"sg_labeler={real}; sg_labeler=planted", f"sg_labeler=planted; sg_labeler={real}"):
        with httpx.Client(base_url=srv.url, headers={"Cookie": planted}) as c:
            r = c.get(f"/join/{third}")
            assert r.status_code == 400 and "2 different sg_labeler cookies" in r.text and "Sign in as" not in r.text
            assert c.get("/label").status_code == 400 and c.post("/api/next").status_code == 400
    with httpx.Client(base_url=srv.url, headers={"Cookie": f"sg_labeler={real}; sg_labeler={real}"}) as c:
        assert "Switch labeler?" in c.get(f"/join/{third}").text  # the same value twice is one cookie


def test_a_new_admin_token_ends_admin_sessions(tmp_path):
    from fastapi.testclient import TestClient

    from shoggoth.feedback.app import create_app

    url = f"sqlite:///{tmp_path / 'f.db'}"
    with TestClient(create_app(url, admin_token=ADMIN)) as c:
        admin_sign_in(c)
        cookie = c.cookies["sg_admin"]
        assert c.get("/admin").status_code == 200
    with TestClient(create_app(url, admin_token="another-admin-token-9f3k"), cookies={"sg_admin": cookie}) as c:
        assert c.get("/admin").status_code == 401  # rotated: the old admin sessions end


def test_revise_own_ranking_over_http(live_app):
    """PUT /api/rankings/{id}: a labeler revises their ranking (a new version; the export gives the latest);
    not someone else's (403), not an unknown one (404), not bad input (422), not from a cookie without CSRF."""
    srv = live_app
    setup_campaign(srv, n_tasks=2, k=3, per_task=2)
    alice, bob = signed_in(srv, "alice"), signed_in(srv, "bob")
    with httpx.Client(base_url=srv.url) as c:
        task = c.post("/api/next", headers=bearer(alice)).json()["task"]
        shown = task["completions"]
        ids = [x["id"] for x in shown]
        rid = c.post(f"/api/tasks/{task['task_id']}/ranking", json={"ranking": [[i] for i in ids]},
                     headers=bearer(alice)).json()["ranking_id"]
        (mine,) = c.get("/api/rankings", headers=bearer(alice)).json()["rankings"]
        assert mine["ranking_id"] == rid and mine["version"] == 1 and mine["revisable"]
        assert mine["task_id"] == task["task_id"] and mine["prompt"] == task["prompt"]
        assert mine["shown"] == shown and mine["groups"] == [[i] for i in ids]  # as shown, the current order
        new = [[ids[2]], [ids[0], ids[1]]]
        r = c.put(f"/api/rankings/{rid}", json={"ranking": new, "flags": ["all_bad"]}, headers=bearer(alice))
        assert r.status_code == 200 and r.json() == {"ranking_id": rid, "version": 2}
        (mine,) = c.get("/api/rankings", headers=bearer(alice)).json()["rankings"]
        assert mine["version"] == 2 and mine["groups"] == new and mine["flags"] == ["all_bad"]
        for who, path, body, status, message in [
            (bob, f"/api/rankings/{rid}", {"ranking": new}, 403, "is not yours"),
            (alice, "/api/rankings/424242", {"ranking": new}, 404, "no ranking 424242"),
            (alice, f"/api/rankings/{rid}", {"ranking": new[:1]}, 422, "places 1 completions; this task has 3"),
            (alice, f"/api/rankings/{rid}", {"ranking": new, "flags": ["meh"]}, 422, "flags must be"),
            (alice, f"/api/rankings/{rid}", {}, 422, "ranking: Field required"),
            (alice, "/api/rankings/0", {"ranking": new}, 422, "greater than or equal"),
            ("wrong", f"/api/rankings/{rid}", {"ranking": new}, 401, "not signed in"),
        ]:
            r = c.put(path, json=body, headers=bearer(who))
            assert r.status_code == status and message in r.json()["error"], (path, body, r.status_code, r.text)
        # a browser's cookie session needs the page's CSRF token, as for every other write
        c.cookies.set("sg_labeler", alice)
        r = c.put(f"/api/rankings/{rid}", json={"ranking": [[ids[0]], [ids[1]], [ids[2]]]})
        assert r.status_code == 403 and "CSRF" in r.json()["error"]
        csrf = csrf_of(c.get("/label").text)
        r = c.put(f"/api/rankings/{rid}", json={"ranking": [[ids[0]], [ids[1]], [ids[2]]]}, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200 and r.json()["version"] == 3
    admin = httpx.get(f"{srv.url}/admin/export.jsonl", headers=bearer(ADMIN)).text.splitlines()
    (row,) = [json.loads(x) for x in admin]
    by_id = dict(zip(sorted(ids, key=lambda i: next(x["text"] for x in shown if x["id"] == i)), row["ranks"]))
    assert [by_id[i] for i in ids] == [0, 1, 2] and row["flags"] == []  # version 3, not 1 or 2
    assert [v["version"] for v in ranking_history(srv.engine, rid)] == [1, 2, 3]


# ------------------------------------------------------------ what one labeler action may cost (#33, item 3)

def eval_campaign(srv, n=2):
    models = ["alpha", "beta"]
    campaigns.add_tasks(srv.engine, "ev", [{"prompt": f"q{i}", "models": models, "completions": [f"x{i}", f"yy{i}"]}
                                   for i in range(n)], rankings_per_task=1, settings={"models": models})


def rank_one(srv, token):
    with httpx.Client(base_url=srv.url) as c:
        task = c.post("/api/next", headers=bearer(token)).json()["task"]
        r = c.post(f"/api/tasks/{task['task_id']}/ranking", headers=bearer(token),
                   json={"ranking": [[x["id"]] for x in task["completions"]]})
        assert r.status_code == 201


class Gate:
    """winrate.summary, each call recorded (its thread's name) and held until the test opens the gate."""

    def __init__(self):
        self.calls, self.open = [], threading.Event()

    def __call__(self, rows, models):

        self.calls.append(threading.current_thread().name)
        assert self.open.wait(60)
        return winrate.summary(rows, models, resamples=20)


def overview_until(c, state, timeout=60):
    deadline = time.monotonic() + timeout
    while (camp := c.get("/admin/api/overview").json()["campaigns"][0])["winrate_status"]["state"] != state:
        assert time.monotonic() < deadline, camp["winrate_status"]
        time.sleep(0.05)
    return camp


def test_admin_pages_never_compute_win_rates_in_the_request(live_app):
    """A submit changes an evaluation's judgements; the next admin loads answer at once, from the last
    finished win rates (none yet: "computing"; else "stale", with their age) while one background
    thread computes them (held here until the test lets it finish, so a request that waited for it
    would never return)."""

    srv = live_app
    gate = Gate()
    srv.app.state.winrates = WinRates(gate, debounce=0)
    eval_campaign(srv)
    ann = signed_in(srv, "ann")
    rank_one(srv, ann)
    with httpx.Client(base_url=srv.url, headers=bearer(ADMIN), timeout=10) as c:
        started = time.monotonic()
        camp = c.get("/admin/api/overview").json()["campaigns"][0]
        page = c.get("/admin").text
        assert time.monotonic() - started < 5
        assert camp["winrate"] is None and camp["winrate_status"]["state"] == "computing"
        assert 'data-state="computing"' in page and "computing" in page and 'id="winrate-1"' not in page
        assert camp["agreement"]["pairs"] == 0  # agreement needs no bootstrap: there at once
        gate.open.set()
        camp = overview_until(c, "ready")
        assert camp["winrate"]["judgements"] == 1 and 'id="winrate-1"' in c.get("/admin").text
        gate.open.clear()
        rank_one(srv, ann)  # a change: computed again, in the background
        started = time.monotonic()
        camp = c.get("/admin/api/overview").json()["campaigns"][0]
        page = c.get("/admin").text
        assert time.monotonic() - started < 5
        assert camp["winrate_status"]["state"] == "stale" and camp["winrate"]["judgements"] == 1  # the last result
        assert camp["winrate_status"]["age_s"] >= 0 and "newer rankings are being included" in page
        assert 'id="winrate-1"' in page
        gate.open.set()
        assert overview_until(c, "ready")["winrate"]["judgements"] == 2
    assert gate.calls == ["win rates", "win rates"]  # the background thread's, never a request's


def test_concurrent_admin_loads_start_one_computation(live_app):
    srv = live_app
    gate = Gate()
    srv.app.state.winrates = WinRates(gate, debounce=0)
    eval_campaign(srv)
    rank_one(srv, signed_in(srv, "ann"))
    with httpx.Client(base_url=srv.url, headers=bearer(ADMIN), timeout=10) as c:
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda path: c.get(path).status_code, ["/admin", "/admin/api/overview"] * 6))
        assert codes == [200] * 12
        gate.open.set()
        overview_until(c, "ready")
        c.get("/admin")
    assert len(gate.calls) == 1


def test_win_rates_are_computed_again_at_most_once_per_debounce(live_app):
    srv = live_app
    gate, now = Gate(), [0.0]
    gate.open.set()
    srv.app.state.winrates = rates = WinRates(gate, debounce=60)
    rates.clock = lambda: now[0]
    eval_campaign(srv, n=3)
    ann = signed_in(srv, "ann")
    rank_one(srv, ann)
    with httpx.Client(base_url=srv.url, headers=bearer(ADMIN), timeout=10) as c:
        assert overview_until(c, "ready")["winrate"]["judgements"] == 1  # the first at once
        rank_one(srv, ann)
        rank_one(srv, ann)
        now[0] = 59.0
        for _ in range(5):
            assert c.get("/admin/api/overview").json()["campaigns"][0]["winrate_status"]["state"] == "stale"
        assert len(gate.calls) == 1
        now[0] = 61.0  # a minute after the first began: the two changes computed once
        assert overview_until(c, "ready")["winrate"]["judgements"] == 3
    assert len(gate.calls) == 2


def test_revisions_are_rate_limited_per_labeler(live_app):
    srv = live_app
    setup_campaign(srv, n_tasks=2, k=3, per_task=2)
    alice, bob = signed_in(srv, "alice"), signed_in(srv, "bob")
    limiter, now = srv.app.state.revisions, [1000.0]
    limiter.clock = lambda: now[0]
    with httpx.Client(base_url=srv.url) as c:
        rids = {}
        for who in (alice, bob):
            task = c.post("/api/next", headers=bearer(who)).json()["task"]
            groups = [[x["id"]] for x in task["completions"]]
            rids[who] = c.post(f"/api/tasks/{task['task_id']}/ranking", json={"ranking": groups},
                               headers=bearer(who)).json()["ranking_id"], groups
        rid, groups = rids[alice]
        for i in range(REVISIONS):
            now[0] += 1
            r = c.put(f"/api/rankings/{rid}", json={"ranking": groups[::-1] if i % 2 else groups}, headers=bearer(alice))
            assert r.status_code == 200 and r.json()["version"] == i + 2
        r = c.put(f"/api/rankings/{rid}", json={"ranking": groups}, headers=bearer(alice))
        assert r.status_code == 429 and "too many revisions" in r.json()["error"]
        assert r.headers["retry-after"] == str(int(REVISION_WINDOW) - REVISIONS + 1)  # until the oldest is a window old
        assert len(ranking_history(srv.engine, rid)) == REVISIONS + 1  # nothing stored
        r = c.put(f"/api/rankings/{rids[bob][0]}", json={"ranking": rids[bob][1][::-1]}, headers=bearer(bob))
        assert r.status_code == 200  # per labeler
        now[0] += REVISION_WINDOW
        r = c.put(f"/api/rankings/{rid}", json={"ranking": groups[::-1]}, headers=bearer(alice))
        assert r.status_code == 200 and r.json()["version"] == REVISIONS + 2
    assert len(limiter.seen) <= 2  # labelers idle for a window are forgotten


# ------------------------------------------------------------ labeler quality


def shape(x):
    """The shape of a JSON value: its keys and the types of its leaves, not their values."""
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [shape(v) for v in x]
    return type(x).__name__


def rank_by_text(c, token, task, reverse=False):
    """Submit the ranking that orders the task's completions by their text (reversed: worst first)."""
    order = sorted(task["completions"], key=lambda x: x["text"], reverse=reverse)
    r = c.post(f"/api/tasks/{task['task_id']}/ranking", json={"ranking": [[x["id"]] for x in order]},
               headers=bearer(token))
    assert r.status_code == 201, r.text


def test_known_answer_tasks_look_like_any_other_to_a_labeler(live_app):
    """The admin marks tasks with an expected order and sets the campaign's rate; a labeler meets them
    unannounced: what the labeler API answers for them has the shape (and campaign) of any other
    task's, and names no expected order."""
    srv = live_app
    setup_campaign(srv, n_tasks=8, k=4, per_task=1)
    known = [2, 5, 7]
    with httpx.Client(base_url=srv.url) as c:
        for tid in known:
            r = c.post(f"/admin/api/tasks/{tid}/expected", json={"ranks": [0, 1, 2, 2]}, headers=bearer(ADMIN))
            assert r.status_code == 200 and r.json() == {"task_id": tid, "expected": [0, 1, 2, 2]}
        r = c.post("/admin/api/campaigns/1/quality", json={"gold_rate": 0.5}, headers=bearer(ADMIN))
        assert r.json() == {"gold_rate": 0.5, "flag_below": None}
        token = signed_in(srv, "ann")
        seen = {}
        while (r := c.post("/api/next", headers=bearer(token))).json()["task"] is not None:
            task = r.json()["task"]
            seen[task["task_id"]] = r
            rank_by_text(c, token, task)
        assert set(known) <= set(seen)
        shapes = {tid: shape(r.json()) for tid, r in seen.items()}
        assert all(shapes[tid] == shapes[known[0]] for tid in seen)
        assert {r.json()["task"]["campaign"] for r in seen.values()} == {"camp"}
        assert not any(w in r.text for r in seen.values() for w in ("expected", "known", "gold"))
        mine = c.get("/api/rankings", headers=bearer(token)).json()["rankings"]
        assert len({json.dumps(shape(x)) for x in mine}) == 1
        assert not any(w in json.dumps(mine) for w in ("expected", "known", "gold"))
        overview = c.get("/admin/api/overview", headers=bearer(ADMIN)).json()
        q = overview["campaigns"][0]["quality"]
        assert q["known"] == 3 and q["gold_rate"] == 0.5 and q["flag_below"] == 0.3
        assert q["labelers"]["ann"]["known"]["tasks"] == 3  # ranked by text: c.0 c.1 c.2 c.3, ties at the end
        assert q["labelers"]["ann"]["known"]["tau"] == pytest.approx(kendall_tau_b([0, 1, 2, 3], [0, 1, 2, 2]))


def test_admin_pauses_a_labeler_and_sets_quality_over_http(live_app):
    srv = live_app
    setup_campaign(srv, n_tasks=2, k=3, per_task=1)
    alice, bob = signed_in(srv, "alice"), signed_in(srv, "bob")
    lid = accounts.session(srv.engine, alice)[1][0]
    with httpx.Client(base_url=srv.url) as c:
        held = c.post("/api/next", headers=bearer(alice)).json()["task"]
        r = c.post(f"/admin/api/labelers/{lid}/pause", headers=bearer(ADMIN))
        assert r.status_code == 200 and r.json()["paused"] > 0
        for r in (c.post("/api/next", headers=bearer(alice)),
                  c.post(f"/api/tasks/{held['task_id']}/ranking", headers=bearer(alice),
                         json={"ranking": [[x["id"]] for x in held["completions"]]})):
            assert r.status_code == 423 and "paused by the admin" in r.json()["error"]
        assert n_rankings(srv) == 0
        assert c.post("/api/next", headers=bearer(bob)).json()["task"]["task_id"] == held["task_id"]  # released
        labs = {x["name"]: x for x in c.get("/admin/api/overview", headers=bearer(ADMIN)).json()["labelers"]}
        assert labs["alice"]["paused"] and labs["bob"]["paused"] is None
        assert c.post(f"/admin/api/labelers/{lid}/resume", headers=bearer(ADMIN)).json() == {"id": lid, "paused": None}
        assert c.post("/api/next", headers=bearer(alice)).json()["task"]["task_id"] != held["task_id"]
        # bad input: a clear 4xx, nothing changed
        for r, status, msg in (
                (c.post("/admin/api/labelers/999/pause", headers=bearer(ADMIN)), 404, "no labeler 999"),
                (c.post("/admin/api/tasks/999/expected", json={"ranks": [0, 1, 2]}, headers=bearer(ADMIN)), 404,
                 "no task 999"),
                (c.post("/admin/api/tasks/1/expected", json={"ranks": [0, 1]}, headers=bearer(ADMIN)), 422,
                 "a list of 3 integers"),
                (c.post("/admin/api/tasks/1/expected", json={"ranks": ["0", 1, 2]}, headers=bearer(ADMIN)), 422, ""),
                (c.post("/admin/api/tasks/1/expected", json={}, headers=bearer(ADMIN)), 422, "ranks"),
                (c.post("/admin/api/campaigns/1/quality", json={"gold_rate": 0.9}, headers=bearer(ADMIN)), 422,
                 "gold_rate"),
                (c.post("/admin/api/campaigns/1/quality", content=b'{"flag_below": NaN}', headers=bearer(ADMIN)),
                 422, ""),
                (c.post("/admin/api/campaigns/9/quality", json={"gold_rate": 0.1}, headers=bearer(ADMIN)), 404,
                 "no campaign 9"),
                (c.post(f"/admin/api/labelers/{lid}/pause", headers=bearer(bob)), 401, "admin only"),
                (c.get("/admin/export.jsonl?min_agreement=2", headers=bearer(ADMIN)), 422, "min_agreement")):
            assert r.status_code == status and msg in r.json()["error"], (r.status_code, r.text)
        assert oversight.quality_settings(srv.engine) == ({1: {"gold_rate": 0.0, "flag_below": None, "expected": {},
                                                       "known": 0}}, {})
    # the page's forms, with an admin cookie and the page's CSRF token
    with httpx.Client(base_url=srv.url, cookies={"sg_admin": accounts.admin_session(srv.engine, ADMIN)}) as admin:
        csrf = csrf_of(admin.get("/admin").text)
        assert admin.post(f"/admin/labelers/{lid}/pause", data={}).status_code == 403  # no CSRF token
        assert admin.post(f"/admin/labelers/{lid}/pause", data={"csrf": csrf}).status_code == 303
        page = admin.get("/admin").text
        assert f'action="/admin/labelers/{lid}/resume"' in page and 'class="paused-state">paused' in page
        r = admin.post("/admin/campaigns/1/quality", data={"csrf": csrf, "gold_rate": "0.1", "flag_below": ""})
        assert r.status_code == 303 and oversight.quality_settings(srv.engine)[0][1]["gold_rate"] == 0.1
        for bad in ({"gold_rate": "abc"}, {"gold_rate": "nan"}, {"flag_below": "-3"}):
            r = admin.post("/admin/campaigns/1/quality", data={"csrf": csrf, **bad})
            assert r.status_code == 422 and r.headers["content-type"].startswith("text/html"), r.text
        assert oversight.quality_settings(srv.engine)[0][1] == {"gold_rate": 0.1, "flag_below": None, "expected": {},
                                                        "known": 0}


def test_export_leaves_out_labelers_below_min_agreement(live_app):
    srv = live_app
    setup_campaign(srv, n_tasks=6, k=4, per_task=3)
    tokens = {name: signed_in(srv, name) for name in ("ann", "ben", "cy")}
    with httpx.Client(base_url=srv.url) as c:
        for name, token in tokens.items():
            while (task := c.post("/api/next", headers=bearer(token)).json()["task"]) is not None:
                rank_by_text(c, token, task, reverse=name == "cy")  # cy ranks every task the other way round
        every = c.get("/admin/export.jsonl", headers=bearer(ADMIN)).text.splitlines()
        kept = [json.loads(x) for x in c.get("/admin/export.jsonl?min_agreement=0.5", headers=bearer(ADMIN)).text.splitlines()]
        assert len(every) == 18 and len(kept) == 12 and {x["labeler"] for x in kept} == {"ann", "ben"}
        q = c.get("/admin/api/overview", headers=bearer(ADMIN)).json()["campaigns"][0]["quality"]
        assert q["flagged"] == ["cy"] and q["labelers"]["cy"]["others"]["high"] < 0.3
        assert q["labelers"]["ann"]["others"]["tau"] == pytest.approx(1.0)
        page = c.get("/admin", headers=bearer(ADMIN)).text
        assert re.search(r'<td class="flagged"><a href="#quality-1" class="flag-name">cy</a>', page)
