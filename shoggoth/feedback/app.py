"""The ranking web app: `create_app(db)` returns a FastAPI app; `serve` runs it with uvicorn.

Who may do what:
- An invite link `/join/<token>` opens a page whose button (a POST) trades the invite, once and
  before it expires, for a session (opening the link spends nothing, so a link preview cannot):
  a separate random token, stored hashed, with an expiry, in an HttpOnly cookie.
  Scripts trade it with `POST /api/session` (`Authorization: Bearer <invite>`) and
  send `Authorization: Bearer <session>`. The admin can revoke a labeler (their
  sessions end at once) and issue a new link; anyone can sign out. Opening a link
  while signed in as someone else asks before switching (no login CSRF). Every
  labeler endpoint acts on the caller's own assignments and rankings only.
- The admin signs in with the admin token in /admin's form (a POST: the token never
  travels in a URL, so no proxy log or browser history keeps it), or with a one-time
  link `/admin/sign-in/<code>` that `serve` prints (good once, for 12 hours), traded
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
  script as a second wall. A campaign's guidelines are the one HTML the pages
  take from the database: the admin's Markdown, rendered and sanitised on the
  server (guidelines.py), behind the same CSP.
- The contract is published at /openapi.json (OpenAPI 3.1): the security schemes above
  (bearer session, invite or admin token; cookie session + X-CSRF-Token header),
  every status an operation gives and the `{"error": ...}` body of JSON errors. Errors
  are JSON under /api/, /admin/api/ and /admin/export, an HTML page elsewhere.
- Strangers reach it: every request body is bounded (MAX_BODY) before anything
  parses it or asks who sent it; wrong tokens (invites, the admin token in
  the sign-in form or a Bearer header, one-time sign-in links) from one address, an IPv6 /64 counting as one,
  are refused for a while after GUESSES of them, and from everyone after
  ALL_GUESSES (429, auth.Guesses); over HTTPS (directly, or through a proxy the admin names with `--trusted-proxy`,
  whose X-Forwarded-Proto is then believed), session cookies are Secure and named
  `__Host-sg_...` (no sibling subdomain can plant one), and responses carry HSTS; two
  session cookies of one name are refused (400), not picked from.
"""

import ipaddress
import os
import re
import secrets
import sys
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ShoggothError
from . import admin, labeling
from .db import Rejected, connect, normalize_url, secret, shown_url
from .auth import REVISION_WINDOW, REVISIONS, TOKEN_BITS, Guesses, Rate, https, token_bits
from .contract import SECURITY_SCHEMES, error, is_json_path

HERE = Path(__file__).parent
ADMIN_TOKEN_ENV = "SHOGGOTH_ADMIN_TOKEN"  # where `serve` finds the admin token that no flag gives
MAX_BODY = 16 * 1024  # bytes: a ranking is a few hundred, a form a few dozen
# A campaign's guidelines (guidelines.MAX_GUIDELINES characters of Markdown) as a form, an upload or JSON's \u escapes
LONG_BODIES = {re.compile(r"/admin/(api/)?campaigns/[^/]+/guidelines"): 1024 * 1024}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# Over HTTPS, the browser refuses plain HTTP to this host for a year. Not includeSubDomains: the app may
# live beside other sites under one parent domain, and it does not speak for them.
HSTS = "max-age=31536000"


class BodyLimit:
    """ASGI middleware: a request body larger than limit bytes gets 413 before the app (and so
    routing, authentication and parsing) sees any of it. Bodies are read in full up to the
    limit, so chunked uploads without a Content-Length are bounded too. `longer`: {path pattern: its
    limit} for the few routes that take more (the guidelines)."""

    def __init__(self, app, limit, longer=None):
        self.app, self.limit, self.longer = app, limit, longer or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = next((n for pattern, n in self.longer.items() if pattern.fullmatch(scope["path"])), self.limit)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > limit:
            return await self.refuse(send, 413 if length.isdigit() else 400, scope["path"], limit)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > limit:
                return await self.refuse(send, 413, scope["path"], limit)
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

    async def refuse(self, send, status, path, limit):
        text = (f"request body over {limit} bytes" if status == 413 else "bad Content-Length").encode()
        if is_json_path(path):
            kind, body = b"application/json", b'{"error": "' + text + b'"}'
        else:  # a browser's form: a page, like every other error there
            kind, body = b"text/html; charset=utf-8", (b"<!doctype html><meta charset=utf-8><title>Error %d</title>"
                                                      b"<h1>Error %d</h1><p>%s</p>" % (status, status, text))
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_app(db, admin_token=None):
    """The app on database `db` (URL or SQLite path); admin_token None makes a random one (app.state.admin_token).
    Its routes are in labeling.py (labelers) and admin.py (the admin); who may call them, in auth.py."""
    app = FastAPI(title="Shoggoth feedback", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", version="1")
    engine = app.state.engine = connect(db)  # what the DB dependency gives every route
    app.state.admin_token = admin_token or secrets.token_urlsafe(24)
    app.state.csrf_key = secret(engine).encode()
    app.state.guesses = Guesses()
    app.state.revisions = Rate("revisions", REVISIONS, REVISION_WINDOW)  # PUT /api/rankings/{id}, per labeler
    app.state.sign_in_links = admin.SignInLinks()  # one-time admin sign-in links (`serve` prints one)
    app.state.winrates = admin.WinRates()  # the evaluations' win rates, for the admin's overview
    app.state.templates = Jinja2Templates(directory=HERE / "templates")
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(labeling.router)
    app.include_router(admin.router)
    app.add_middleware(BodyLimit, limit=MAX_BODY, longer=LONG_BODIES)
    app.middleware("http")(security_headers)  # added last, so outermost: the body limit's 413 gets them too
    answer_errors_in_one_shape(app)
    app.openapi = lambda: openapi(app)
    return app


async def security_headers(request, call_next):
    resp = await call_next(request)
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    # invite tokens are in URLs: never sent to other sites ("no-referrer" would make form posts send Origin: null)
    resp.headers["Referrer-Policy"] = "same-origin"
    if https(request):
        resp.headers["Strict-Transport-Security"] = HSTS
    if not request.url.path.startswith("/static/"):
        resp.headers["Cache-Control"] = "no-store"
    return resp


def answer_errors_in_one_shape(app):
    """Every 4xx, whoever raised it, as `contract.error` shapes it: 4xx with one clear message."""

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (404 route, 405 method)
    async def http_error(request, exc):
        return error(request, exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(Rejected)
    async def rejected(request, exc):
        return error(request, exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        msgs = []
        for e in exc.errors()[:3]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            msgs.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return error(request, 422, "; ".join(msgs) or "invalid request")


def openapi(app):
    """FastAPI's document with the security schemes the routes' `doc(...)` name, made once."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=__doc__, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
        app.openapi_schema = schema
    return app.openapi_schema


def serve(db, host="127.0.0.1", port=8000, admin_token=None, log_level="warning", trusted_proxy=None,
          admin_token_file=None):
    """Run the app with uvicorn. The admin token: admin_token, or the text of admin_token_file, or
    $SHOGGOTH_ADMIN_TOKEN, or else a random one (printed). trusted_proxy: the address of a
    TLS-terminating reverse proxy whose X-Forwarded-Proto/For headers are believed (so cookies are
    Secure behind it)."""
    import uvicorn

    token, where = admin_token_from(admin_token, admin_token_file)
    if trusted_proxy is not None and any(everyone(p.strip()) for p in trusted_proxy.split(",")):
        raise ShoggothError(f"--trusted-proxy {trusted_proxy!r} would believe any client's X-Forwarded-For (each "
                            "guess could claim a new address, past the wrong-token limit): name the proxy's address")
    app = create_app(db, token)
    shown = f"[{host}]" if ":" in host else host
    print(f"feedback app on http://{shown}:{port}/  (database {shown_url(normalize_url(db))})")
    # The admin token never goes into a URL (a proxy's log, the browser's history); a one-time link may.
    print(f"admin: http://{shown}:{port}/admin/sign-in/{app.state.sign_in_links.new()}  (a one-time sign-in link; "
          f"then sign in at /admin with the token of {where or 'the next line'})")
    if token is None:  # made here: the admin has no other way to learn it
        print(f"admin token (for /admin's sign-in form and scripts' Authorization: Bearer): {app.state.admin_token}")
    sys.stdout.flush()
    # Keep idle connections 75 s (nginx's default), not uvicorn's 5 s: a labeler reading a task for a while
    # would otherwise race the server's close with their next request.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=75,
                proxy_headers=trusted_proxy is not None, forwarded_allow_ips=trusted_proxy or "127.0.0.1")


def admin_token_from(token=None, file=None):
    """(the admin token, where it came from): `token`, else `file`'s text, else $SHOGGOTH_ADMIN_TOKEN;
    (None, None) when none is given. One under TOKEN_BITS bits of estimated entropy is refused."""
    if token is not None and file is not None:
        raise ShoggothError("give the admin token one way: --admin-token or --admin-token-file, not both")
    if file is not None:
        where = f"--admin-token-file {file}"
        try:
            token = Path(file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ShoggothError(f"--admin-token-file {file}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    elif token is not None:
        where = "--admin-token"
    elif ADMIN_TOKEN_ENV in os.environ:
        token, where = os.environ[ADMIN_TOKEN_ENV], f"${ADMIN_TOKEN_ENV}"
    else:
        return None, None
    bits = token_bits(token)
    if bits < TOKEN_BITS:
        raise ShoggothError(f"{where} is too weak to face a network (about {bits:.0f} bits; {TOKEN_BITS} wanted): use 22 "
                            "or more random letters and digits, e.g. `python -c 'import secrets; "
                            "print(secrets.token_urlsafe(24))'`, or none for a random one")
    return token, where


def everyone(proxy):
    """Whether a --trusted-proxy entry names every address ('*', 0.0.0.0/0, ::/0)."""
    try:
        return proxy == "*" or ipaddress.ip_network(proxy, strict=False).prefixlen == 0
    except ValueError:
        return False
