"""Who is asking the ranking app, as FastAPI dependencies: a route declares `who: Labeler`, `_: Admin`
or `_: AdminForm` among its parameters, and `db: DB` for the database (app.state.engine).

The order of answers is part of the contract: a malformed request gets 422 whoever sends it, then a
stranger gets 401 and a forged write 403, then the database has its say (404, 409). FastAPI calls
dependencies before it validates the route's own parameters and body, so a dependency that raised
would answer a stranger's malformed request with 401. Ours hand their refusal to the endpoint as a
value instead (`handed_over`), and the routers' ValidateFirst raises it once FastAPI has checked
the input, before the endpoint's first line.
"""

import functools
import hashlib
import hmac
import ipaddress
import math
import string
import threading
import time
from collections import Counter, OrderedDict, deque
from typing import Annotated, NamedTuple
from urllib.parse import urlsplit

from fastapi import Depends, Form, HTTPException, Request
from fastapi.routing import APIRoute
from sqlalchemy import Engine

from . import accounts
from .contract import ADMIN_COOKIE, LABELER_COOKIE

GUESSES, GUESS_WINDOW = 10, 60.0  # wrong tokens per client address, per seconds
ALL_GUESSES = 1000  # wrong tokens from all addresses together per window: many addresses guess no faster
ADDRESSES = 10_000  # client addresses the limiter remembers at most
REVISIONS, REVISION_WINDOW = 10, 60.0  # revisions (PUTs) per labeler, per seconds: fixing mistakes needs fewer
TOKEN_BITS = 128  # estimated entropy an admin token needs to face a network
CLASSES = (string.ascii_lowercase, string.ascii_uppercase, string.digits, string.punctuation + " ")
NOT_SIGNED_IN = "not signed in: open your invite link"
NOT_ADMIN = "admin only: sign in at /admin"


class Caller(NamedTuple):
    """A signed-in labeler."""
    id: int
    name: str


async def database(request: Request) -> Engine:
    return request.app.state.engine


DB = Annotated[Engine, Depends(database)]


class Guesses:
    """Wrong tokens over the last `window` seconds: from one client address, at most `limit` (an IPv6 /64
    counts as one address, since one host may hold all of it), and from all addresses together at most
    `total`; past either, the token checks it covers answer 429 until the oldest is `window` old.
    `addresses` bounds the table; an address is forgotten `window` seconds after its last wrong token.

    Check and record are one step: `guess` counts a token as in flight before it is checked, and
    waits while this address's wrong and in-flight tokens together reach the limit, so concurrent
    wrong tokens cannot all pass the check before any is recorded; `settle` records the outcome."""

    def __init__(self, limit=GUESSES, window=GUESS_WINDOW, total=ALL_GUESSES, addresses=ADDRESSES):
        self.limit, self.window, self.total, self.addresses = limit, window, total, addresses
        self.clock = time.monotonic  # a test may turn it
        self.seen = OrderedDict()  # address -> times of its wrong tokens, the most recently wrong last
        self.everyone = deque()  # times of every address's wrong tokens, oldest first
        self.pending = Counter()  # address -> its tokens being checked now
        self.cond = threading.Condition()

    def guess(self, request):
        """Count one token from `request` as in flight (429 if its address or everyone is over the
        limit); returns the address to hand to `settle` once the token is checked."""
        who = address(request)
        with self.cond:
            while True:
                now = self.clock()
                self.forget(now)
                wrong = [t for t in self.seen.get(who, ()) if now - t < self.window]
                if len(wrong) >= self.limit:
                    raise self.too_many("from your address", wrong[0], now)
                if len(self.everyone) >= self.total:
                    raise self.too_many("from all addresses", self.everyone[0], now)
                if (len(wrong) + self.pending[who] < self.limit
                        and len(self.everyone) + self.pending.total() < self.total):
                    break
                self.cond.wait(1.0)  # others from here are being checked: their outcome decides ours
            self.pending[who] += 1
        return who

    def settle(self, who, wrong):
        with self.cond:
            self.pending[who] -= 1
            if not self.pending[who]:
                del self.pending[who]
            if wrong:
                now = self.clock()
                self.seen[who] = [t for t in self.seen.pop(who, []) if now - t < self.window] + [now]
                self.everyone.append(now)
                while len(self.seen) > self.addresses:
                    self.seen.popitem(last=False)  # the address wrong longest ago
            self.cond.notify_all()

    def forget(self, now):
        """Drop what is older than the window: the table stays as small as the last window's guesses."""
        while self.everyone and now - self.everyone[0] >= self.window:
            self.everyone.popleft()
        while self.seen and now - next(iter(self.seen.values()))[-1] >= self.window:
            self.seen.popitem(last=False)

    def too_many(self, where, oldest, now):
        return too_many(f"too many wrong tokens {where}", self.window - (now - oldest))

    def clear(self):
        with self.cond:
            self.seen.clear()
            self.everyone.clear()


def too_many(what, wait):
    """429: `what`, and how many seconds to wait (at least 1, in Retry-After too)."""
    wait = max(1, math.ceil(wait))
    return HTTPException(429, f"{what}: wait {wait} s", {"Retry-After": str(wait)})


class Rate:
    """At most `limit` actions per key (a labeler) over the last `window` seconds; `take` raises 429 past
    that. A key is forgotten `window` seconds after its last action, so the table stays small."""

    def __init__(self, what, limit, window):
        self.what, self.limit, self.window = what, limit, window
        self.clock = time.monotonic  # a test may turn it
        self.seen = OrderedDict()  # key -> times of its actions in the window, the most recently active last
        self.lock = threading.Lock()

    def take(self, key):
        with self.lock:
            now = self.clock()
            while self.seen and now - next(iter(self.seen.values()))[-1] >= self.window:
                self.seen.popitem(last=False)
            times = [t for t in self.seen.pop(key, []) if now - t < self.window]
            if len(times) >= self.limit:
                self.seen[key] = times
                raise too_many(f"too many {self.what} (at most {self.limit} in {self.window:.0f} s)",
                               self.window - (now - times[0]))
            self.seen[key] = times + [now]


def address(request):
    """The client's address as the limiter counts it: an IPv6 address by its /64 network."""
    host = request.client.host if request.client else ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def counted(request, check):
    """check() checks a token and returns what it opens; a falsy result counts as a wrong token."""
    guesses = request.app.state.guesses
    who, found = guesses.guess(request), None
    try:
        found = check()
    finally:
        guesses.settle(who, wrong=not found)
    return found


# ------------------------------------------------------------ tokens, CSRF, Origin

def bearer(request):
    h = request.headers.get("authorization", "")
    return h[7:].strip() if h[:7].lower() == "bearer " else None


def token_bits(token):
    """An estimate of a token's entropy in bits: log2 of the alphabet of the character classes it uses
    (lower case, upper case, digits, punctuation, anything else) for each character that does not
    continue a run or a sequence (aaaa, 1234, fedc), a repeat of an earlier stretch (passwordpassword)
    counting as one character. A random token's estimate is near its true entropy; a pattern's far
    below, though its length alone would make it look strong. Words count as random letters."""
    token = token[:256]  # longer ones are judged by this much: enough for 128 bits, and the search stays cheap
    sizes = [len(c) for c in CLASSES if any(ch in c for ch in token)]
    alphabet = sum(sizes) + (100 if any(not any(ch in c for c in CLASSES) for ch in token) else 0)
    free, i, code = 0, 0, [ord(ch) for ch in token]
    while i < len(token):
        copy = 0  # the longest stretch from i that also starts before i
        while i + copy < len(token) and token[i:i + copy + 1] in token[:i + copy]:
            copy += 1
        if copy >= 3:
            free, i = free + 1, i + copy
            continue
        if not (i >= 2 and code[i] - code[i - 1] == code[i - 1] - code[i - 2]):
            free += 1
        i += 1
    return free * math.log2(alphabet) if alphabet > 1 else 0.0


def csrf_for(request, role, token):
    """The CSRF token of `role`'s pages for session `token`: an HMAC under the database's secret."""
    return hmac.new(request.app.state.csrf_key, f"{role}:{token}".encode(), hashlib.sha256).hexdigest()[:40]


def csrf_ok(request, role, token, sent):
    # Bytes: compare_digest refuses str with non-ASCII characters (a forged header would be a 500).
    return bool(sent) and hmac.compare_digest(str(sent).encode(), csrf_for(request, role, token).encode())


def check_origin(request):
    """403 for a write a browser sends from another site: an `Origin` that is not this server, or, when a
    browser leaves Origin out, a `Sec-Fetch-Site` other than same-origin (a sibling subdomain is
    "same-site": refused too). A script that sends neither header is no browser: nothing to forge."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):  # none: typed in, or a bookmark
        raise HTTPException(403, f"cross-site request refused (Sec-Fetch-Site: {site[:20]})")
    origin = request.headers.get("origin")
    if origin is not None:
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:  # "http://[" and the like
            netloc = None
        if netloc != request.headers.get("host"):
            raise HTTPException(403, "cross-origin request refused")


def check_csrf(request, role, token, sent):
    check_origin(request)
    if not csrf_ok(request, role, token, sent):
        raise HTTPException(403, "missing or stale CSRF token: reload the page")


def is_admin_token(request, token):
    return bool(token) and hmac.compare_digest(token.encode(), request.app.state.admin_token.encode())


# ------------------------------------------------------------ the checks, raising 401/403

def labeler(request: Request, db: DB) -> Caller:
    """The signed-in labeler, or 401; a write signed in by a cookie needs the page's CSRF token."""
    token, via_cookie = bearer(request), False
    if token is None:
        token, via_cookie = cookie(request, LABELER_COOKIE), True
    who = accounts.session(db, token)
    if who is None or who[0] != "labeler":
        raise HTTPException(401, NOT_SIGNED_IN)
    if via_cookie and request.method != "GET":
        check_csrf(request, "labeler", token, request.headers.get("x-csrf-token"))
    return Caller(*who[1])


def admin(request: Request, db: DB):
    """Nothing for the admin, else 401; a write signed in by a cookie needs the X-CSRF-Token header."""
    check_admin(request, db, request.headers.get("x-csrf-token"))


def admin_form(request: Request, db: DB, csrf: str = Form("", max_length=100)):
    """`admin` for a page's form: the CSRF token is its `csrf` field, when filled, else the header."""
    check_admin(request, db, csrf or request.headers.get("x-csrf-token"))


def check_admin(request, db, csrf):
    token = bearer(request)
    if token is not None:  # counted as the sign-in form's is: either way the admin token can be guessed
        if not counted(request, lambda: is_admin_token(request, token)):
            raise HTTPException(401, NOT_ADMIN)
        return
    token = cookie(request, ADMIN_COOKIE)
    if accounts.session(db, token, request.app.state.admin_token) != ("admin", None):
        raise HTTPException(401, NOT_ADMIN)
    if request.method != "GET":
        check_csrf(request, "admin", token, csrf)


# ------------------------------------------------------------ as dependencies, answering after validation

def handed_over(check):
    """`check` as a dependency that returns its refusal (an HTTPException) rather than raising it."""
    @functools.wraps(check)  # FastAPI reads the parameters from check's signature
    def dependency(*args, **kwargs):
        try:
            return check(*args, **kwargs)
        except HTTPException as refusal:
            return refusal
    return dependency


class ValidateFirst(APIRoute):
    """A route whose endpoint raises the first refusal among its arguments before it runs. FastAPI calls
    the endpoint only once parameters and body are valid, so a refusal answers after a 422, as it should."""

    def __init__(self, path, endpoint, **kwargs):
        @functools.wraps(endpoint)  # the same parameters, name and docstring: the same OpenAPI operation
        def refusals_first(**values):
            for value in values.values():
                if isinstance(value, HTTPException):
                    raise value
            return endpoint(**values)
        super().__init__(path, refusals_first, **kwargs)


Labeler = Annotated[Caller, Depends(handed_over(labeler))]
Admin = Annotated[None, Depends(handed_over(admin))]
AdminForm = Annotated[None, Depends(handed_over(admin_form))]


def https(request):
    """Whether the request came over HTTPS: its scheme, which uvicorn takes from X-Forwarded-Proto only
    when the request comes from the --trusted-proxy (so a client cannot claim it)."""
    return request.url.scheme == "https"


def cookie_name(request, name):
    """A session cookie's name: over HTTPS with the `__Host-` prefix, which a browser keeps only when it
    is Secure, Path=/ and has no Domain: no sibling subdomain and no plain-HTTP page can plant one."""
    return "__Host-" + name if https(request) else name


def cookie(request, name):
    """The value of session cookie `name` (as cookie_name spells it here), or None; 400 when the request
    carries two different values of it. A sibling subdomain can plant a second `sg_labeler` (Domain=
    the parent), and the browser sends both: which one a server reads is up to the order the browser
    picks, which the planter steers (a longer Path first), so neither is trusted."""
    name = cookie_name(request, name)
    values = set()
    for header in request.headers.getlist("cookie"):
        for part in header.split(";"):
            key, _, value = part.partition("=")
            if key.strip() == name:
                values.add(value.strip().strip('"'))
    if len(values) > 1:
        raise HTTPException(400, f"this browser sent {len(values)} different {name} cookies (another site may have "
                                 "set one): clear this site's cookies, then open your link again")
    return values.pop() if values else None


def set_cookie(request, resp, name, value):
    # The browser keeps the cookie as long as the session it holds lasts, not longer.
    ttl = accounts.SESSION_TTL["admin" if name == ADMIN_COOKIE else "labeler"]
    resp.set_cookie(cookie_name(request, name), value, httponly=True, samesite="lax", max_age=int(ttl), path="/",
                    secure=https(request))


def delete_cookie(request, resp, name):
    resp.delete_cookie(cookie_name(request, name), path="/", secure=https(request), httponly=True, samesite="lax")
