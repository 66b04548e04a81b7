"""The labelers' side of the ranking app: signing in with an invite link (a page, or a script's
`POST /api/session`), signing out, the labeling page and the JSON API it calls. Every labeler
route declares `who: Labeler` and acts on that labeler's own assignments and rankings only."""

from fastapi import APIRouter, Form, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field, StrictInt, StrictStr

from . import db as D
from .auth import DB, REVISIONS, Labeler, ValidateFirst, bearer, check_origin, counted, csrf_for, csrf_ok, set_cookie
from .contract import ADMIN_COOKIE, ID, LABELER_COOKIE, LABELER_READ, LABELER_WRITE, PUBLIC, doc, page

SIGNED_IN = "Signed in (a session cookie): on to /label"

router = APIRouter(route_class=ValidateFirst)


class RankingIn(BaseModel):
    ranking: list[list[StrictInt]] = Field(max_length=D.MAX_K, description="groups of completion ids, best first")
    flags: list[StrictStr] = Field(default=[], max_length=len(D.FLAGS))


@router.get("/", include_in_schema=False)
def home():
    return RedirectResponse("/label", 303)


@router.get("/favicon.ico", include_in_schema=False)
def favicon():
    return Response(status_code=204)


# ------------------------------------------------------------ signing in and out

def invite_or_404(request, db, token):
    who = counted(request, lambda: D.labeler_by_token(db, token))
    if who is None:
        raise HTTPException(404, "this invite link is not valid: it was used already, has expired, or was "
                                 "revoked (ask for a new one)")
    return who


def sign_in(request, db, token):
    traded = D.trade_invite(db, token)
    if traded is None:  # used by another request meanwhile
        raise HTTPException(404, "this invite link was used already (ask for a new one)")
    resp = RedirectResponse("/label", 303)
    set_cookie(request, resp, LABELER_COOKIE, traded[2])
    return resp


@router.get("/join/{token}", response_class=HTMLResponse, summary="Open an invite link (a page)",
            **doc(PUBLIC, 404, 422, 429, html=True))
def join(request: Request, db: DB, token: str = Path(max_length=200)):
    """A page whose button signs in with the invite. Opening the link spends nothing: a chat app's link
    preview or a mail scanner fetches it before the labeler does. Someone already signed in here is
    asked whether to switch (a link sent by someone else must not silently change who is labeling)."""
    _, name = invite_or_404(request, db, token)
    current = D.session(db, request.cookies.get(LABELER_COOKIE))
    signed_in = current is not None and current[0] == "labeler"
    return page(request, "join.html", current=current[1][1] if signed_in else None, name=name, token=token)


@router.post("/join/{token}", response_class=RedirectResponse, status_code=303,
             summary="Trade the invite for a session (the page's button)",
             **doc(PUBLIC, 403, 404, 422, 429, html=True, redirect=SIGNED_IN))
def join_confirmed(request: Request, db: DB, token: str = Path(max_length=200)):
    """Sign in with the invite (it is spent); a form posted from another site is refused."""
    check_origin(request)
    invite_or_404(request, db, token)
    return sign_in(request, db, token)


@router.post("/api/session", status_code=201, **doc([{"invite": []}], 401, 429))
def api_session(request: Request, db: DB):
    """A script's sign-in: Authorization: Bearer <invite token> -> a session token."""
    traded = counted(request, lambda: D.trade_invite(db, bearer(request)))
    if traded is None:
        raise HTTPException(401, "not a valid invite token (used already, expired or revoked)")
    return {"session": traded[2], "name": traded[1], "expires_in": D.SESSION_TTL["labeler"]}


@router.post("/logout", response_class=HTMLResponse, summary="Sign out of this browser (a page)",
             **doc(PUBLIC + [{"labelerCookie": []}, {"adminCookie": []}], 403, 422, html=True))
def logout(request: Request, db: DB, csrf: str = Form("", max_length=100)):
    """Sign out of this browser's labeler and admin sessions."""
    check_origin(request)
    ended, signed_in = [], False
    for cookie, role in ((LABELER_COOKIE, "labeler"), (ADMIN_COOKIE, "admin")):
        token = request.cookies.get(cookie)
        who = D.session(db, token, request.app.state.admin_token)
        if who is not None and who[0] == role:
            signed_in = True
            if csrf_ok(request, role, token, csrf):  # the page's own form
                D.end_session(db, token)
                ended.append(cookie)
    if signed_in and not ended:
        raise HTTPException(403, "missing or stale CSRF token: reload the page")
    resp = page(request, "message.html", title="Signed out", message="You are signed out of this browser."
                if ended else "You were not signed in.")
    for cookie in ended:
        resp.delete_cookie(cookie, path="/")
    return resp


# ------------------------------------------------------------ labeling

@router.get("/label", response_class=HTMLResponse, summary="The labeling page", **doc(LABELER_READ, 401, html=True))
def label_page(request: Request, who: Labeler):
    token = request.cookies.get(LABELER_COOKIE) or bearer(request)
    return page(request, "label.html", name=who.name, csrf=csrf_for(request, "labeler", token), flags=D.FLAGS)


@router.get("/api/me", **doc(LABELER_READ, 401))
def me(db: DB, who: Labeler):
    return {"name": who.name, "progress": D.progress(db, who.id)}


@router.post("/api/next", **doc(LABELER_WRITE, 401, 403, 423))
def next_(db: DB, who: Labeler):
    return {"task": D.next_task(db, who.id), "progress": D.progress(db, who.id)}


@router.post("/api/tasks/{task_id}/ranking", status_code=201, **doc(LABELER_WRITE, 401, 403, 404, 409, 422, 423))
def submit(db: DB, who: Labeler, body: RankingIn, task_id: int = Path(**ID)):
    return {"ranking_id": D.submit(db, who.id, task_id, body.ranking, body.flags)}  # /api/next tells progress


@router.post("/api/tasks/{task_id}/skip", **doc(LABELER_WRITE, 401, 403, 404, 409, 422))
def skip(db: DB, who: Labeler, task_id: int = Path(**ID)):
    D.skip(db, who.id, task_id)
    return {"progress": D.progress(db, who.id)}


@router.get("/api/rankings", **doc(LABELER_READ, 401, 422))
def my_rankings(db: DB, who: Labeler, limit: int = Query(20, ge=1, le=500)):
    """Your rankings, newest first: the export's fields, and ranking_id, version, revisable (one of
    your last 20), `shown` (the completions {id, text} in the order you saw them) and `groups`
    (the current ranking, groups of completion ids best first): what revising one needs."""
    return {"rankings": D.my_rankings(db, who.id, limit=limit)}


@router.put("/api/rankings/{ranking_id}", **doc(LABELER_WRITE, 401, 403, 404, 409, 422, 429,
                                                 why={429: f"Over {REVISIONS} revisions a minute: wait as Retry-After says"}))
def revise(request: Request, db: DB, who: Labeler, body: RankingIn, ranking_id: int = Path(**ID)):
    """Revise one of your last 20 rankings (the body as for submitting): it becomes a new version,
    the earlier ones are kept, the export gives the latest. 409: older than your last 20, or revised
    19 times already. 429: more than 10 revisions in a minute."""
    request.app.state.revisions.take(who.id)  # each version is kept: revisions are bounded in rate and number
    return {"ranking_id": ranking_id, "version": D.revise(db, who.id, ranking_id, body.ranking, body.flags)}
