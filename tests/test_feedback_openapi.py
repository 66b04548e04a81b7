"""The ranking app's published contract (/openapi.json), and a property-based fuzzer over it.

The fuzzer is schemathesis (Hypothesis underneath) against the app served by uvicorn over real
HTTP: as nobody, as a labeler and as the admin (bearer tokens), every response must be a non-5xx
that the document declares (status, content type, body schema); then with cookie sessions but a
missing or wrong CSRF token or a foreign Origin, every POST must be refused (401/403) and the
database left as it was. Bounded: a fixed number of examples per operation and phase.
"""

import time

import httpx
import pytest
from fastapi.routing import iter_route_contexts
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from shoggoth.feedback import accounts, campaigns, guidelines, queries
from shoggoth.feedback.db import Base, Ranking, Task

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance)

ADMIN = "admin-secret-token"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 12  # per operation and phase: the whole file runs in well under a minute on 2 cores


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def setup_campaign(srv):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "p4"}]
    campaigns.add_tasks(srv.engine, "camp", [{"messages": chat, "completions": ["c4.0", "c4.1", "c4.2"]}]  # task 1: the first given
                + [{"prompt": f"p{i}", "completions": [f"c{i}.{j}" for j in range(3)]} for i in range(4)],
                rankings_per_task=2)
    guidelines.set_guidelines(srv.engine, 1, "# Rules\n\nRank *carefully*.")  # so that the guidelines' routes reach them


def operations(srv):
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def known_ids(srv):
    """Path parameters that name things in the database (random ids alone would nearly all be 404s)."""
    camps, labs = queries.overview(srv.engine)
    with srv.engine.connect() as conn:
        tasks = [t for (t,) in conn.execute(select(Task.id))]
        rankings = [r for (r,) in conn.execute(select(Ranking.id))]
    return {"task_id": tasks, "lid": [lab["id"] for lab in labs], "cid": [c["id"] for c in camps],
            "campaign_id": [c["id"] for c in camps], "ranking_id": rankings}


def strategy(srv, op, mode):
    ids = known_ids(srv)
    names = [p.name for p in op.path_parameters]
    known = {n: ids[n] for n in names if ids.get(n)}
    if not known or mode is GenerationMode.NEGATIVE:
        return op.as_strategy(mode)
    return st.one_of(op.as_strategy(mode), st.fixed_dictionaries({n: st.sampled_from(v) for n, v in known.items()})
                     .flatmap(lambda params: op.as_strategy(mode, path_parameters=params)))


def fuzz(srv, ops, headers, examples=EXAMPLES, each=None, mode=GenerationMode.POSITIVE):
    """Every operation, `examples` generated requests each, with `headers` added; `each(op, case, response)`
    runs after the schema checks."""
    for op in ops:
        srv.app.state.guesses.clear()  # the wrong-token limiter is per address: each operation starts afresh

        @given(case=strategy(srv, op, mode))
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate, Phase.shrink],
                  suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call(base_url=srv.url, headers=headers, allow_redirects=False, timeout=30)
            case.validate_response(response, checks=CHECKS)
            if each is not None:
                each(op, case, response)

        run()


def snapshot(engine):
    """Every row of every table: what a refused request must leave alone."""
    with engine.connect() as conn:
        return {t.name: sorted(map(repr, conn.execute(select(t)).all())) for t in Base.metadata.sorted_tables}


def test_openapi_document_is_valid_and_declares_auth(live_app):
    from openapi_spec_validator import validate

    srv = live_app
    doc = httpx.get(f"{srv.url}/openapi.json").json()
    validate(doc)
    assert httpx.get(f"{srv.url}/docs").status_code == 404  # the interactive docs stay off
    schemes = doc["components"]["securitySchemes"]
    assert schemes["session"] == {**schemes["session"], "type": "http", "scheme": "bearer"}
    assert schemes["labelerCookie"]["in"] == "cookie" and schemes["labelerCookie"]["name"] == "sg_labeler"
    assert schemes["adminCookie"]["in"] == "cookie" and schemes["adminCookie"]["name"] == "sg_admin"
    assert schemes["csrf"]["in"] == "header" and schemes["csrf"]["name"] == "X-CSRF-Token"
    assert doc["components"]["schemas"]["Error"]["properties"] == {"error": {"type": "string", "title": "Error"}}
    routes = {(m.upper(), r.path) for r in iter_route_contexts(srv.app.routes)  # through the included routers
              if getattr(r, "include_in_schema", False) for m in r.methods}
    ops = {(m.upper(), p): op for p, item in doc["paths"].items() for m, op in item.items()}
    assert set(ops) == routes and len(ops) == 35
    for (method, path), op in ops.items():
        assert "security" in op, (method, path)
        for req in op["security"]:
            assert set(req) <= set(schemes), (method, path, req)
            if method in ("POST", "PUT") and any(s in req for s in ("labelerCookie", "adminCookie")) and path != "/logout":
                assert "csrf" in req, (method, path)  # a cookie alone never suffices to change anything
        assert {"400", "413", "503"} <= set(op["responses"]), (method, path)
        kind = "application/json" if path.startswith(("/api/", "/admin/api/", "/admin/export")) else "text/html"
        for code, resp in op["responses"].items():
            if code >= "400":
                assert list(resp["content"]) == [kind], (method, path, code)
                if kind == "application/json":
                    assert resp["content"][kind]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert ops[("POST", "/api/next")]["security"] == [{"session": []}, {"labelerCookie": [], "csrf": []}]
    assert ops[("GET", "/admin/api/overview")]["security"] == [{"adminToken": []}, {"adminCookie": []}]
    assert ops[("POST", "/api/session")]["security"] == [{"invite": []}]
    assert ops[("GET", "/join/{token}")]["security"] == [{}]
    # the admin token travels in a form's body, never in a URL: /admin takes no ?token= any more
    assert ops[("POST", "/admin/sign-in")]["security"] == [{}] and "parameters" not in ops[("GET", "/admin")]
    assert "token" in doc["components"]["schemas"]["Body_sign_in_admin_sign_in_post"]["properties"]
    assert ops[("PUT", "/admin/api/campaigns/{cid}/guidelines")]["security"] == [{"adminToken": []},
                                                                                {"adminCookie": [], "csrf": []}]
    assert ops[("POST", "/api/guidelines/{campaign_id}/read")]["security"] == [{"session": []},
                                                                              {"labelerCookie": [], "csrf": []}]
    assert "401" in ops[("POST", "/api/tasks/{task_id}/ranking")]["responses"]
    assert ops[("PUT", "/api/rankings/{ranking_id}")]["security"] == [{"session": []}, {"labelerCookie": [], "csrf": []}]
    revise = ops[("PUT", "/api/rankings/{ranking_id}")]["responses"]
    assert {"401", "403", "404", "409", "422", "429"} <= set(revise)
    assert "revisions" in revise["429"]["description"] and "Retry-After" in revise["429"]["headers"]
    # a task's answer is published: its whole conversation (`messages`) next to its last user message
    schemas = doc["components"]["schemas"]
    ok = ops[("POST", "/api/next")]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/NextOut"}
    assert {"$ref": "#/components/schemas/TaskOut"} in schemas["NextOut"]["properties"]["task"]["anyOf"]
    task = schemas["TaskOut"]
    assert {"task_id", "campaign", "prompt", "messages", "completions"} <= set(task["required"])
    assert task["properties"]["messages"]["items"] == {"$ref": "#/components/schemas/Message"}
    assert set(schemas["Message"]["required"]) == {"role", "content"}
    mine = ops[("GET", "/api/rankings")]["responses"]["200"]["content"]["application/json"]["schema"]
    assert mine == {"$ref": "#/components/schemas/MyRankings"} and "messages" in schemas["MyRanking"]["required"]
    for path in ("/api/next", "/api/tasks/{task_id}/ranking"):  # a paused labeler: 423, not a 403 of auth
        assert "Paused" in ops[("POST", path)]["responses"]["423"]["description"]
    for path in ("/admin/api/tasks/{task_id}/expected", "/admin/api/campaigns/{cid}/quality",
                 "/admin/api/labelers/{lid}/pause", "/admin/api/labelers/{lid}/resume"):
        assert ops[("POST", path)]["security"] == [{"adminToken": []}, {"adminCookie": [], "csrf": []}], path
    assert any(p["name"] == "min_agreement" for p in ops[("GET", "/admin/export.jsonl")]["parameters"])


@pytest.mark.slow
def test_fuzz_the_api_as_nobody_labeler_and_admin(live_app):
    """No 5xx, every answer as declared; a time bound on the whole (the fuzzer must stay cheap)."""
    srv = live_app
    setup_campaign(srv)
    ops = operations(srv)
    started = time.monotonic()
    fuzz(srv, ops, {})
    labeler = accounts.trade_invite(srv.engine, accounts.create_labeler(srv.engine, "fuzzy")[1])[2]
    with httpx.Client(base_url=srv.url) as c:  # a ranking made and a task in hand: ranking, revise, skip reach the database
        task = c.post("/api/next", headers=bearer(labeler)).json()["task"]
        assert task["messages"][0]["role"] == "system"  # the conversation's answers are checked against the schema too
        assert c.post(f"/api/tasks/{task['task_id']}/ranking", headers=bearer(labeler),
                      json={"ranking": [[x["id"]] for x in task["completions"]]}).status_code == 201
        assert c.post("/api/next", headers=bearer(labeler)).status_code == 200
    for mode in GenerationMode.POSITIVE, GenerationMode.NEGATIVE:  # valid input; then input the schema forbids
        fuzz(srv, ops, bearer(labeler), mode=mode)
        fuzz(srv, ops, bearer(ADMIN), mode=mode)
    assert time.monotonic() - started < 120


@pytest.mark.slow
def test_fuzz_forged_cookie_requests_are_refused(live_app):
    """A cookie session without the page's CSRF token, with a wrong one, or with the right one from a
    foreign Origin: every POST and PUT is refused and the database is unchanged."""
    srv = live_app
    setup_campaign(srv)
    ops = [op for op in operations(srv) if op.method.upper() in ("POST", "PUT")]
    assert len(ops) == 22
    labeler = accounts.trade_invite(srv.engine, accounts.create_labeler(srv.engine, "victim")[1])[2]
    admin = accounts.admin_session(srv.engine, ADMIN)
    with httpx.Client(base_url=srv.url, cookies={"sg_labeler": labeler}) as c:  # a ranking made, a task held
        task = c.post("/api/next", headers=bearer(labeler)).json()["task"]
        assert c.post(f"/api/tasks/{task['task_id']}/ranking", headers=bearer(labeler),
                      json={"ranking": [[x["id"]] for x in task["completions"]]}).status_code == 201
        assert c.post("/api/next", headers=bearer(labeler)).status_code == 200
        label_csrf = c.get("/label").text.split('name="csrf-token" content="')[1].split('"')[0]
    with httpx.Client(base_url=srv.url, cookies={"sg_admin": admin}) as c:
        admin_csrf = c.get("/admin").text.split('name="csrf" value="')[1].split('"')[0]
    before = snapshot(srv.engine)

    def refused(op, case, response):
        srv.app.state.guesses.clear()  # a wrong /join token counts; keep the answers about CSRF
        if op.path == "/join/{token}":  # public: the token is the credential (none valid here)
            assert response.status_code in (403, 404), (op.path, response.status_code)
        else:
            assert response.status_code in (401, 403), (op.path, response.status_code, response.text[:200])

    cookie = f"sg_labeler={labeler}; sg_admin={admin}"
    for extra in ({}, {"X-CSRF-Token": "0" * 40},
                  {"X-CSRF-Token": label_csrf, "Origin": "http://evil.example"},
                  {"X-CSRF-Token": admin_csrf, "Origin": "http://evil.example"}):
        fuzz(srv, ops, {"Cookie": cookie, **extra}, examples=8, each=refused)
        assert snapshot(srv.engine) == before, extra


def test_errors_keep_the_declared_shape(live_app):
    """Regressions from writing the contract down and fuzzing it: errors the app's own handlers did
    not shape (validation, database refusals and the body limit on page routes, Starlette's 404/405)."""
    srv = live_app
    with httpx.Client(base_url=srv.url) as c:
        for r in (c.post("/admin/campaigns/1/n", data={"n": "0"}, headers=bearer(ADMIN)),  # validation: 422
                  c.post("/admin/campaigns/7/n", data={"n": "3"}, headers=bearer(ADMIN)),  # Rejected: 404
                  c.post("/admin/labelers/999/revoke", headers=bearer(ADMIN)),
                  c.post("/admin/invite", content=b"x" * 20000)):  # the body limit: 413
            assert r.status_code in (404, 413, 422) and r.headers["content-type"].startswith("text/html"), r
        r = c.get("/api/no-such-thing")
        assert r.status_code == 404 and r.json() == {"error": "Not Found"}
        r = c.get("/api/next")
        assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"} and r.headers["allow"] == "POST"
        assert c.get("/no-such-page").headers["content-type"].startswith("text/html")
    doc = httpx.get(f"{srv.url}/openapi.json").json()
    form = doc["components"]["schemas"]["Body_invite_admin_invite_post"]["properties"]["name"]
    assert form["minLength"] == 1  # "" is refused as missing (422): the schema says so


def test_form_routes_take_the_csrf_header_too(live_app):
    """The docstring's promise: the CSRF token as header X-CSRF-Token or form field csrf, on every POST."""
    srv = live_app
    admin = accounts.admin_session(srv.engine, ADMIN)
    with httpx.Client(base_url=srv.url, cookies={"sg_admin": admin}) as c:
        csrf = c.get("/admin").text.split('name="csrf" value="')[1].split('"')[0]
        assert c.post("/admin/invite", data={"name": "hal"}).status_code == 403
        assert c.post("/admin/invite", data={"name": "hal"}, headers={"X-CSRF-Token": "0" * 40}).status_code == 403
        assert c.post("/admin/invite", data={"name": "hal"}, headers={"X-CSRF-Token": csrf}).status_code == 201
        assert c.post("/admin/invite", data={"name": "ida", "csrf": "0" * 40},  # a wrong field is not rescued
                      headers={"X-CSRF-Token": csrf}).status_code == 403
