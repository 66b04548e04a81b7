"""The ranking web app: `create_app(db)` returns a FastAPI app; `serve` runs it with uvicorn.

Who may do what:
- An invite link `/join/<token>` is traded once, before it expires, for a session:
  a separate random token, stored hashed, with an expiry, in an HttpOnly cookie.
  Scripts trade it with `POST /api/session` (`Authorization: Bearer <invite>`) and
  send `Authorization: Bearer <session>`. The admin can revoke a labeler (their
  sessions end at once) and issue a new link; anyone can sign out. Opening a link
  while signed in as someone else asks before switching (no login CSRF). Every
  labeler endpoint acts on the caller's own assignments and rankings only.
- The admin signs in with `/admin?token=<admin token>` (printed at start), traded
  for an admin session: the admin token itself never sits in a cookie, and a
  restart with another admin token ends every admin session. Scripts may send
  the admin token as a Bearer header.
- A state-changing request (POST, PUT) authenticated by a cookie must carry the CSRF token
  of the page (header `X-CSRF-Token`, or form field `csrf`), an HMAC of the
  session token under a secret kept in the database, and an `Origin`, when the
  browser sends one, that is this server. A bearer header needs neither: no
  other site can make a browser send it.
- Model output is untrusted: the labeler page puts it into the DOM as text
  only, templates autoescape, and a Content-Security-Policy forbids inline
  script as a second wall.
- The contract is published at /openapi.json (OpenAPI 3.1): the security schemes above
  (bearer session, invite or admin token; cookie session + X-CSRF-Token header),
  every status an operation gives and the `{"error": ...}` body of JSON errors. Errors
  are JSON under /api/, /admin/api/ and /admin/export, an HTML page elsewhere.
- Strangers reach it: every request body is bounded (MAX_BODY) before anything
  parses it or asks who sent it; bad tokens on /join and /admin?token= from one
  address are refused for a while after GUESSES of them (429); cookies are
  Secure when the app is reached over HTTPS (directly, or through a proxy the
  admin names with `--trusted-proxy`).
"""

import hashlib
import hmac
import re
import secrets
import threading
import time
from pathlib import Path as FsPath
from urllib.parse import urlsplit

from fastapi import Body, FastAPI, Form, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import db as D
from . import winrate
from .agreement import agreement

HERE = FsPath(__file__).parent
LABELER_COOKIE, ADMIN_COOKIE = "sg_labeler", "sg_admin"
ID = dict(ge=1, le=2**31 - 1)  # ids fit the database's integer column
MAX_BODY = 16 * 1024  # bytes: a ranking is a few hundred, a form a few dozen
GUESSES, GUESS_WINDOW = 10, 60.0  # bad tokens per client address, per seconds
JSON_PATHS = ("/api/", "/admin/api/", "/admin/export")  # errors there are JSON; elsewhere an HTML page
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def is_json_path(path):
    return path.startswith(JSON_PATHS)


# ------------------------------------------------------------ the published contract (/openapi.json)

class Error(BaseModel):
    """The body of every JSON error: one clear message."""
    error: str


SECURITY_SCHEMES = {
    "session": {"type": "http", "scheme": "bearer", "description":
                "A labeler's session token, as `POST /api/session` gives it. Needs no CSRF token."},
    "invite": {"type": "http", "scheme": "bearer", "description":
               "An invite token (the last part of an invite link `/join/<token>`); good once, for 7 days."},
    "adminToken": {"type": "http", "scheme": "bearer", "description":
                   "The admin token printed by `shoggoth feedback serve`. Needs no CSRF token."},
    "labelerCookie": {"type": "apiKey", "in": "cookie", "name": LABELER_COOKIE, "description":
                      "A labeler's browser session, set by opening an invite link (HttpOnly)."},
    "adminCookie": {"type": "apiKey", "in": "cookie", "name": ADMIN_COOKIE, "description":
                    "The admin's browser session, set by opening `/admin?token=<admin token>` (HttpOnly)."},
    "csrf": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token", "description":
             "With a cookie session, every POST or PUT carries the CSRF token of the page (its `csrf-token` meta or "
             "`csrf` form field), here or as the form field `csrf`; an `Origin` header, when sent, must be "
             "this server."},
}
LABELER_READ = [{"session": []}, {"labelerCookie": []}]
LABELER_WRITE = [{"session": []}, {"labelerCookie": [], "csrf": []}]
ADMIN_READ = [{"adminToken": []}, {"adminCookie": []}]
ADMIN_WRITE = [{"adminToken": []}, {"adminCookie": [], "csrf": []}]
PUBLIC = [{}]
WHY = {400: "Bad Content-Length", 401: "Not signed in, or a wrong token", 403: "Refused: a missing or stale CSRF "
       "token, a foreign Origin, or not yours", 404: "No such thing", 409: "Conflicts with what is there",
       413: "Request body over 16 KB", 422: "Invalid input", 429: "Too many wrong tokens from this address: "
       "wait a minute", 503: "The database is busy: try again"}
ALWAYS = (400, 413, 503)  # the body limit answers before routing; any database may be busy


def doc(security, *codes, html=False, redirect=None):
    """Route keywords that publish an operation's security and its error responses (documentation only)."""
    responses = {}
    for code in sorted(set(codes + ALWAYS)):
        if html:
            responses[code] = {"description": WHY[code], "content": {"text/html": {"schema": {"type": "string"}}}}
        else:
            responses[code] = {"description": WHY[code], "model": Error}
    if redirect:
        responses[303] = {"description": redirect, "headers": {"Location": {"schema": {"type": "string"}}}}
    return {"responses": responses, "openapi_extra": {"security": security}}


class BodyLimit:
    """ASGI middleware: a request body larger than limit bytes gets 413 before the app (and so
    routing, authentication and parsing) sees any of it. Bodies are read in full up to the
    limit, so chunked uploads without a Content-Length are bounded too."""

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await self.refuse(send, 413 if length.isdigit() else 400, scope["path"])
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.limit:
                return await self.refuse(send, 413, scope["path"])
        body = b"".join(chunks)

        async def replay():
            # The body once; then the client's own channel, where the app waits for a disconnect
            # (a streamed response listens for one: answering at once would spin the event loop).
            nonlocal body
            if body is None:
                return await receive()
            msg, body = {"type": "http.request", "body": body, "more_body": False}, None
            return msg

        return await self.app(scope, replay, send)

    async def refuse(self, send, status, path):
        text = (f"request body over {self.limit} bytes" if status == 413 else "bad Content-Length").encode()
        if is_json_path(path):
            kind, body = b"application/json", b'{"error": "' + text + b'"}'
        else:  # a browser's form: a page, like every other error there
            kind, body = b"text/html; charset=utf-8", (b"<!doctype html><meta charset=utf-8><title>Error %d</title>"
                                                      b"<h1>Error %d</h1><p>%s</p>" % (status, status, text))
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class Guesses:
    """Bad tokens per client address over the last `window` seconds; over `limit`, refuse."""

    def __init__(self, limit=GUESSES, window=GUESS_WINDOW):
        self.limit, self.window, self.seen, self.lock = limit, window, {}, threading.Lock()

    def check(self, request):
        with self.lock:
            now, who = time.monotonic(), self.address(request)
            recent = [t for t in self.seen.get(who, []) if now - t < self.window]
            self.seen[who] = recent
            if len(recent) >= self.limit:
                raise HTTPException(429, f"too many wrong tokens from your address: wait {self.window:.0f} s")

    def failed(self, request):
        with self.lock:
            self.seen.setdefault(self.address(request), []).append(time.monotonic())

    @staticmethod
    def address(request):
        return request.client.host if request.client else ""


class RankingIn(BaseModel):
    ranking: list[list[StrictInt]] = Field(max_length=D.MAX_K, description="groups of completion ids, best first")
    flags: list[StrictStr] = Field(default=[], max_length=len(D.FLAGS))


EXPORT_DOC = doc(ADMIN_READ, 401, 422)
EXPORT_DOC["responses"][200] = {"description": "One JSON object a line (a download)",
                                "content": {"application/jsonl": {"schema": {"type": "string"}}}}


def create_app(db, admin_token=None):
    """The app on database `db` (URL or SQLite path); admin_token None makes a random one (app.state.admin_token)."""
    engine = D.connect(db)
    key = D.secret(engine).encode()
    admin_token = admin_token or secrets.token_urlsafe(24)
    app = FastAPI(title="Shoggoth feedback", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", version="1")
    app.state.engine, app.state.admin_token = engine, admin_token
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(BodyLimit, limit=MAX_BODY)
    guesses = app.state.guesses = Guesses()
    templates = Jinja2Templates(directory=HERE / "templates")

    def csrf_for(role, token):
        return hmac.new(key, f"{role}:{token}".encode(), hashlib.sha256).hexdigest()[:40]

    def page(request, template, status=200, **ctx):
        return templates.TemplateResponse(request, template, ctx, status_code=status)

    # ------------------------------------------------------------ errors: 4xx with one clear message

    def error(request, status, message, headers=None):
        """JSON `{"error": message}` under JSON_PATHS, the message page elsewhere (as /openapi.json says)."""
        if is_json_path(request.url.path):
            resp = JSONResponse({"error": message}, status)
        else:
            resp = page(request, "message.html", status, title=f"Error {status}", message=message)
        resp.headers.update(headers or {})
        return resp

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (404 route, 405 method)
    async def http_error(request, exc):
        return error(request, exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(D.Rejected)
    async def rejected(request, exc):
        return error(request, exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        msgs = []
        for e in exc.errors()[:3]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            msgs.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return error(request, 422, "; ".join(msgs) or "invalid request")

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=__doc__, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.middleware("http")
    async def headers(request, call_next):
        resp = await call_next(request)
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        # invite tokens are in URLs: never sent to other sites ("no-referrer" would make form posts send Origin: null)
        resp.headers["Referrer-Policy"] = "same-origin"
        if not request.url.path.startswith("/static/"):
            resp.headers["Cache-Control"] = "no-store"
        return resp

    # ------------------------------------------------------------ who is asking

    def bearer(request):
        h = request.headers.get("authorization", "")
        return h[7:].strip() if h[:7].lower() == "bearer " else None

    def check_origin(request):
        origin = request.headers.get("origin")
        if origin is not None:
            try:
                netloc = urlsplit(origin).netloc
            except ValueError:  # "http://[" and the like
                netloc = None
            if netloc != request.headers.get("host"):
                raise HTTPException(403, "cross-origin request refused")

    def csrf_ok(role, token, sent):
        # Bytes: compare_digest refuses str with non-ASCII characters (a forged header would be a 500).
        return bool(sent) and hmac.compare_digest(str(sent).encode(), csrf_for(role, token).encode())

    def check_csrf(request, role, token, sent):
        check_origin(request)
        if not csrf_ok(role, token, sent):
            raise HTTPException(403, "missing or stale CSRF token: reload the page")

    def labeler(request, csrf=None):
        """(id, name) of the signed-in labeler, or 401; checks CSRF where a cookie signed in."""
        token, via_cookie = bearer(request), False
        if token is None:
            token, via_cookie = request.cookies.get(LABELER_COOKIE), True
        who = D.session(engine, token)
        if who is None or who[0] != "labeler":
            raise HTTPException(401, "not signed in: open your invite link")
        if via_cookie and request.method != "GET":
            check_csrf(request, "labeler", token, request.headers.get("x-csrf-token") if csrf is None else csrf)
        return who[1]

    def is_admin_token(token):
        return bool(token) and hmac.compare_digest(token.encode(), admin_token.encode())

    def admin(request, csrf=None):
        token = bearer(request)
        if token is not None:
            if not is_admin_token(token):
                raise HTTPException(401, "admin only: open the admin link printed by `shoggoth feedback serve`")
            return
        token = request.cookies.get(ADMIN_COOKIE)
        if D.session(engine, token, admin_token) != ("admin", None):
            raise HTTPException(401, "admin only: open the admin link printed by `shoggoth feedback serve`")
        if request.method != "GET":
            check_csrf(request, "admin", token, request.headers.get("x-csrf-token") if csrf is None else csrf)

    def set_cookie(request, resp, name, value):
        resp.set_cookie(name, value, httponly=True, samesite="lax", max_age=90 * 24 * 3600, path="/",
                        secure=request.url.scheme == "https")  # https: directly, or from a trusted proxy's header

    # ------------------------------------------------------------ labelers

    @app.get("/", include_in_schema=False)
    def home(request: Request):
        return RedirectResponse("/label", 303)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    def invite_or_404(request, token):
        guesses.check(request)
        who = D.labeler_by_token(engine, token)
        if who is None:
            guesses.failed(request)
            raise HTTPException(404, "this invite link is not valid: it was used already, has expired, or was "
                                     "revoked (ask for a new one)")
        return who

    def sign_in(request, token):
        traded = D.trade_invite(engine, token)
        if traded is None:  # used by another request meanwhile
            raise HTTPException(404, "this invite link was used already (ask for a new one)")
        resp = RedirectResponse("/label", 303)
        set_cookie(request, resp, LABELER_COOKIE, traded[2])
        return resp

    @app.get("/join/{token}", response_class=HTMLResponse, summary="Open an invite link (a page)",
             **doc(PUBLIC, 404, 422, 429, html=True, redirect="Signed in (a session cookie): on to /label"))
    def join(request: Request, token: str = Path(max_length=200)):
        """Trade the invite for a session; someone already signed in here is asked first (a link
        sent by someone else must not silently switch who is labeling)."""
        _, name = invite_or_404(request, token)
        current = D.session(engine, request.cookies.get(LABELER_COOKIE))
        if current is not None and current[0] == "labeler":
            return page(request, "join.html", current=current[1][1], name=name, token=token)
        return sign_in(request, token)

    @app.post("/join/{token}", response_class=RedirectResponse, status_code=303,
              summary="Switch to this invite's labeler (the page's button)",
              **doc(PUBLIC, 403, 404, 422, 429, html=True, redirect="Signed in (a session cookie): on to /label"))
    def join_confirmed(request: Request, token: str = Path(max_length=200)):
        check_origin(request)
        invite_or_404(request, token)
        return sign_in(request, token)

    @app.post("/api/session", status_code=201, **doc([{"invite": []}], 401, 429))
    def api_session(request: Request):
        """A script's sign-in: Authorization: Bearer <invite token> -> a session token."""
        guesses.check(request)
        traded = D.trade_invite(engine, bearer(request))
        if traded is None:
            guesses.failed(request)
            raise HTTPException(401, "not a valid invite token (used already, expired or revoked)")
        return {"session": traded[2], "name": traded[1], "expires_in": D.SESSION_TTL["labeler"]}

    @app.post("/logout", response_class=HTMLResponse, summary="Sign out of this browser (a page)",
              **doc(PUBLIC + [{"labelerCookie": []}, {"adminCookie": []}], 403, 422, html=True))
    def logout(request: Request, csrf: str = Form("", max_length=100)):
        """Sign out of this browser's labeler and admin sessions."""
        check_origin(request)
        ended, signed_in = [], False
        for cookie, role in ((LABELER_COOKIE, "labeler"), (ADMIN_COOKIE, "admin")):
            token = request.cookies.get(cookie)
            who = D.session(engine, token, admin_token)
            if who is not None and who[0] == role:
                signed_in = True
                if csrf_ok(role, token, csrf):  # the page's own form
                    D.end_session(engine, token)
                    ended.append(cookie)
        if signed_in and not ended:
            raise HTTPException(403, "missing or stale CSRF token: reload the page")
        resp = page(request, "message.html", title="Signed out", message="You are signed out of this browser."
                    if ended else "You were not signed in.")
        for cookie in ended:
            resp.delete_cookie(cookie, path="/")
        return resp

    @app.get("/label", response_class=HTMLResponse, summary="The labeling page", **doc(LABELER_READ, 401, html=True))
    def label_page(request: Request):
        lid, name = labeler(request)
        token = request.cookies.get(LABELER_COOKIE) or bearer(request)
        return page(request, "label.html", name=name, csrf=csrf_for("labeler", token), flags=D.FLAGS)

    @app.get("/api/me", **doc(LABELER_READ, 401))
    def me(request: Request):
        lid, name = labeler(request)
        return {"name": name, "progress": D.progress(engine, lid)}

    @app.post("/api/next", **doc(LABELER_WRITE, 401, 403))
    def next_(request: Request):
        lid, _ = labeler(request)
        return {"task": D.next_task(engine, lid), "progress": D.progress(engine, lid)}

    @app.post("/api/tasks/{task_id}/ranking", status_code=201, **doc(LABELER_WRITE, 401, 403, 404, 409, 422))
    def submit(request: Request, body: RankingIn, task_id: int = Path(**ID)):
        lid, _ = labeler(request)
        return {"ranking_id": D.submit(engine, lid, task_id, body.ranking, body.flags)}  # /api/next tells progress

    @app.post("/api/tasks/{task_id}/skip", **doc(LABELER_WRITE, 401, 403, 404, 409, 422))
    def skip(request: Request, task_id: int = Path(**ID)):
        lid, _ = labeler(request)
        D.skip(engine, lid, task_id)
        return {"progress": D.progress(engine, lid)}

    @app.get("/api/rankings", **doc(LABELER_READ, 401, 422))
    def my_rankings(request: Request, limit: int = Query(20, ge=1, le=500)):
        """Your rankings, newest first: the export's fields, and ranking_id, version, revisable (one of
        your last 20), `shown` (the completions {id, text} in the order you saw them) and `groups`
        (the current ranking, groups of completion ids best first): what revising one needs."""
        lid, _ = labeler(request)
        return {"rankings": D.my_rankings(engine, lid, limit=limit)}

    @app.put("/api/rankings/{ranking_id}", **doc(LABELER_WRITE, 401, 403, 404, 409, 422))
    def revise(request: Request, body: RankingIn, ranking_id: int = Path(**ID)):
        """Revise one of your last 20 rankings (the body as for submitting): it becomes a new version,
        the earlier ones are kept, the export gives the latest. 409: older than your last 20."""
        lid, _ = labeler(request)
        return {"ranking_id": ranking_id, "version": D.revise(engine, lid, ranking_id, body.ranking, body.flags)}

    # ------------------------------------------------------------ admin

    summaries = {}  # campaign id -> (its judgements, their win rates): the bootstrap runs again only on a change

    def overview_with_agreement():
        """The overview, each campaign with its labelers' agreement and an evaluation with its win rates."""
        camps, labs = D.overview(engine)
        for c in camps:
            if c["evaluation"]:
                settings, rows = D.judgements(engine, c["name"])
                if summaries.get(c["id"], (None,))[0] != rows:
                    summaries[c["id"]] = rows, winrate.summary(rows, settings["models"])
                c["winrate"] = summaries[c["id"]][1]
                c["agreement"] = c["winrate"]["agreement"]
            else:
                c["agreement"] = agreement(D.rank_vectors(engine, c["id"]))
        return camps, labs

    def admin_page(request, status=200, **extra):
        camps, labs = overview_with_agreement()
        per = {}
        for c in camps:
            for name, t in c["agreement"]["per_labeler"].items():
                per.setdefault(name, []).append(t)
        for lab in labs:
            ts = [t for t in per.get(lab["name"], []) if t is not None]
            lab["tau"] = sum(ts) / len(ts) if ts else None
        return page(request, "admin.html", status, campaigns=camps, labelers=labs,
                    csrf=csrf_for("admin", request.cookies.get(ADMIN_COOKIE, "")), **extra)

    @app.get("/admin", response_class=HTMLResponse, summary="The admin page; ?token= signs in",
             **doc(ADMIN_READ + PUBLIC, 401, 422, 429, html=True, redirect="Signed in (an admin cookie): on to /admin"))
    def admin_home(request: Request, token: str | None = Query(None, max_length=200)):
        if token is not None:  # the admin link: trade the token in the URL for a cookie
            guesses.check(request)
            if not is_admin_token(token):
                guesses.failed(request)
                raise HTTPException(401, "wrong admin token")
            resp = RedirectResponse("/admin", 303)
            set_cookie(request, resp, ADMIN_COOKIE, D.admin_session(engine, admin_token))
            return resp
        admin(request)
        return admin_page(request)

    @app.post("/admin/invite", response_class=HTMLResponse, status_code=201, summary="Invite a labeler (a page)",
              **doc(ADMIN_WRITE, 401, 403, 404, 409, 422, html=True))
    def invite(request: Request, name: str = Form(min_length=1, max_length=100), campaign_id: str = Form(""),
               csrf: str = Form("", max_length=100)):
        admin(request, csrf or None)
        cid = None
        if campaign_id:
            if not re.fullmatch(r"[0-9]{1,10}", campaign_id) or not 1 <= int(campaign_id) < 2**31:  # ASCII digits only
                raise HTTPException(422, "campaign_id must be a campaign's id")
            cid = int(campaign_id)
        try:
            _, token = D.create_labeler(engine, name, cid)
        except D.Rejected as e:
            return admin_page(request, e.status, error=str(e))
        link = str(request.base_url).rstrip("/") + f"/join/{token}"
        return admin_page(request, 201, invite={"name": name.strip(), "link": link})

    @app.post("/admin/campaigns/{cid}/n", response_class=RedirectResponse, status_code=303,
              summary="Set a campaign's rankings per task (the page's form)",
              **doc(ADMIN_WRITE, 401, 403, 404, 422, html=True, redirect="Done: back to /admin"))
    def set_n(request: Request, cid: int = Path(**ID), n: int = Form(ge=1, le=100), csrf: str = Form("", max_length=100)):
        admin(request, csrf or None)
        D.set_rankings_per_task(engine, cid, n)
        return RedirectResponse("/admin", 303)

    def labeler_page(request, lid, status=200, **extra):
        labs = {lab["id"]: lab for lab in D.overview(engine)[1]}
        if lid not in labs:
            raise HTTPException(404, f"no labeler {lid}")
        rows = D.rankings(engine, labeler=lid, limit=200)
        for r in rows:
            r["ordered"] = sorted(zip(r["ranks"], r["completions"]), key=lambda x: x[0])
        return page(request, "labeler.html", status, labeler=labs[lid], rows=rows,
                    csrf=csrf_for("admin", request.cookies.get(ADMIN_COOKIE, "")), **extra)

    @app.get("/admin/labelers/{lid}", response_class=HTMLResponse, summary="A labeler's rankings (a page)",
             **doc(ADMIN_READ, 401, 404, 422, html=True))
    def labeler_detail(request: Request, lid: int = Path(**ID)):
        admin(request)
        return labeler_page(request, lid)

    @app.post("/admin/labelers/{lid}/revoke", response_class=HTMLResponse, summary="Revoke a labeler (a page)",
              **doc(ADMIN_WRITE, 401, 403, 404, 422, html=True))
    def revoke(request: Request, lid: int = Path(**ID), csrf: str = Form("", max_length=100)):
        """End the labeler's sessions and unused links now; their rankings stay."""
        admin(request, csrf or None)
        D.revoke_labeler(engine, lid)
        return labeler_page(request, lid, notice="Revoked: their sessions and unused links no longer work.")

    @app.post("/admin/labelers/{lid}/invite", response_class=HTMLResponse, status_code=201,
              summary="A new invite link for a labeler (a page)", **doc(ADMIN_WRITE, 401, 403, 404, 422, html=True))
    def reinvite(request: Request, lid: int = Path(**ID), csrf: str = Form("", max_length=100)):
        """A new invite link for the labeler (their earlier unused links stop working)."""
        admin(request, csrf or None)
        token = D.new_invite(engine, lid)
        return labeler_page(request, lid, 201, link=str(request.base_url).rstrip("/") + f"/join/{token}")

    @app.get("/admin/api/overview", **doc(ADMIN_READ, 401))
    def overview(request: Request):
        admin(request)
        camps, labs = overview_with_agreement()
        return {"campaigns": camps, "labelers": labs}

    @app.get("/admin/export.jsonl", response_class=Response, **EXPORT_DOC)
    def export(request: Request, campaign: str | None = Query(None, max_length=200, pattern=r"^[^\x00]*$"),
               pairs: bool = False):
        admin(request)
        fname = re.sub(r"[^A-Za-z0-9._-]", "_", f"{'pairs' if pairs else 'rankings'}-{campaign or 'all'}.jsonl")
        # streamed a piece at a time from the database (each piece read in a worker thread)
        return StreamingResponse(D.export_jsonl(engine, campaign, pairs), media_type="application/jsonl",
                                 headers={"Content-Disposition": f'attachment; filename="{fname}"'})

    return app


def serve(db, host="127.0.0.1", port=8000, admin_token=None, log_level="warning", trusted_proxy=None):
    """Run the app with uvicorn. trusted_proxy: the address of a TLS-terminating reverse proxy
    whose X-Forwarded-Proto/For headers are believed (so cookies are Secure behind it)."""
    import uvicorn

    from ..errors import ShoggothError

    if admin_token is not None and (len(admin_token) < 16 or len(set(admin_token)) < 6):
        raise ShoggothError("--admin-token is too weak to face a network: use 16 or more varied characters "
                            "(or leave it out for a random one)")
    app = create_app(db, admin_token)
    shown = f"[{host}]" if ":" in host else host
    print(f"feedback app on http://{shown}:{port}/  (database {D.normalize_url(db)})")
    print(f"admin: http://{shown}:{port}/admin?token={app.state.admin_token}", flush=True)
    # Keep idle connections 75 s (nginx's default), not uvicorn's 5 s: a labeler reading a task for a while
    # would otherwise race the server's close with their next request.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=75,
                proxy_headers=trusted_proxy is not None, forwarded_allow_ips=trusted_proxy or "127.0.0.1")
