"""The labelers' side of the ranking app: signing in with an invite link (a page, or a script's
`POST /api/session`), signing out, the labeling page and the JSON API it calls. Every labeler
route declares `who: Labeler` and acts on that labeler's own assignments and rankings only."""

from fastapi import APIRouter, Form, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field, StrictInt, StrictStr

from . import accounts, assignments, campaigns
from . import guidelines as guides  # (routes below are named guidelines and read_guidelines)
from .auth import DB, REVISIONS, Labeler, ValidateFirst, bearer, check_origin, cookie, counted, csrf_for, csrf_ok, delete_cookie, set_cookie
from .contract import ADMIN_COOKIE, ID, LABELER_COOKIE, LABELER_READ, LABELER_WRITE, PUBLIC, doc, page

SIGNED_IN = "Signed in (a session cookie): on to /label"

router = APIRouter(route_class=ValidateFirst)


class ReadIn(BaseModel):
    version: StrictStr = Field(max_length=64, description="the version of the guidelines read (as shown with them)")


class RankingIn(BaseModel):
    ranking: list[list[StrictInt]] = Field(max_length=campaigns.MAX_K,
                                           description="groups of completion ids, best first")
    flags: list[StrictStr] = Field(default=[], max_length=len(assignments.FLAGS))


# What the labeler API answers (published in /openapi.json; the fuzzer checks answers against it).

class Message(BaseModel):
    role: str = Field(description="system, user or assistant")
    content: str


class Shown(BaseModel):
    id: int = Field(description="the completion's id, what a ranking names")
    text: str


class GuidelinesState(BaseModel):
    campaign_id: int
    version: str = Field(description="changes whenever the guidelines' text does")
    read: bool = Field(description="whether you marked this version read")


class TaskOut(BaseModel):
    """A task as a labeler sees it: the conversation and the completions that answer it."""
    task_id: int
    campaign: str = Field(description="the campaign's name; an evaluation's shows as 'evaluation'")
    prompt: str = Field(description="the last user message of `messages`")
    messages: list[Message] = Field(description="the whole conversation the completions answer, oldest first: a "
                                                "system prompt (role system), earlier user and assistant turns, then "
                                                "the user message `prompt`")
    completions: list[Shown] = Field(description="in the order this labeler sees them")
    guidelines: GuidelinesState | None = Field(None, description="the campaign's guidelines and whether you read this "
                                                                 "version; null when it has none")


class Progress(BaseModel):
    done: int
    skipped: int
    open: int
    left: int = Field(description="tasks still open to this labeler")


class NextOut(BaseModel):
    task: TaskOut | None = Field(description="null when nothing is left for this labeler")
    progress: Progress


class MyRanking(BaseModel):
    """One of the labeler's rankings: the export's fields (prompt, messages, completions, ranks, ...)
    and what revising it needs."""
    ranking_id: int
    task_id: int
    campaign: str
    prompt: str = Field(description="the last user message of `messages`")
    messages: list[Message] = Field(description="the whole conversation the completions answer, as in a task")
    completions: list[str] = Field(description="in the export's order, which `ranks` follows")
    ranks: list[int] = Field(description="the rank of each completion, 0 best, ties share a rank")
    flags: list[str]
    version: int
    revisable: bool
    shown: list[Shown] = Field(description="the completions in the order this labeler saw them")
    groups: list[list[int]] = Field(description="the ranking as groups of completion ids, best first")


class MyRankings(BaseModel):
    rankings: list[MyRanking]


def answers(model, **doc_kw):
    """doc()'s route keywords, with `model` as the success answer's published body schema (documentation
    only: what the route returns is sent as it is)."""
    doc_kw["responses"][200] = {"model": model, "description": model.__doc__ or "Successful Response"}
    return doc_kw


@router.get("/", include_in_schema=False)
def home():
    return RedirectResponse("/label", 303)


@router.get("/favicon.ico", include_in_schema=False)
def favicon():
    return Response(status_code=204)


# ------------------------------------------------------------ signing in and out

def invite_or_404(request, db, token):
    who = counted(request, lambda: accounts.labeler_by_token(db, token))
    if who is None:
        raise HTTPException(404, "this invite link is not valid: it was used already, has expired, or was "
                                 "revoked (ask for a new one)")
    return who


def sign_in(request, db, token):
    traded = accounts.trade_invite(db, token)
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
    current = accounts.session(db, cookie(request, LABELER_COOKIE))  # 400 if a second one was planted
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
    traded = counted(request, lambda: accounts.trade_invite(db, bearer(request)))
    if traded is None:
        raise HTTPException(401, "not a valid invite token (used already, expired or revoked)")
    return {"session": traded[2], "name": traded[1], "expires_in": accounts.SESSION_TTL["labeler"]}


@router.post("/logout", response_class=HTMLResponse, summary="Sign out of this browser (a page)",
             **doc(PUBLIC + [{"labelerCookie": []}, {"adminCookie": []}], 403, 422, html=True))
def logout(request: Request, db: DB, csrf: str = Form("", max_length=100)):
    """Sign out of this browser's labeler and admin sessions."""
    check_origin(request)
    ended, signed_in = [], False
    for name, role in ((LABELER_COOKIE, "labeler"), (ADMIN_COOKIE, "admin")):
        token = cookie(request, name)
        who = accounts.session(db, token, request.app.state.admin_token)
        if who is not None and who[0] == role:
            signed_in = True
            if csrf_ok(request, role, token, csrf):  # the page's own form
                accounts.end_session(db, token)
                ended.append(name)
    if signed_in and not ended:
        raise HTTPException(403, "missing or stale CSRF token: reload the page")
    resp = page(request, "message.html", title="Signed out", message="You are signed out of this browser."
                if ended else "You were not signed in.")
    for name in ended:
        delete_cookie(request, resp, name)
    return resp


# ------------------------------------------------------------ labeling

@router.get("/label", response_class=HTMLResponse, summary="The labeling page", **doc(LABELER_READ, 401, html=True))
def label_page(request: Request, who: Labeler):
    token = cookie(request, LABELER_COOKIE) or bearer(request)
    return page(request, "label.html", name=who.name, csrf=csrf_for(request, "labeler", token), flags=assignments.FLAGS)


@router.get("/api/me", **doc(LABELER_READ, 401))
def me(db: DB, who: Labeler):
    return {"name": who.name, "progress": assignments.progress(db, who.id)}


@router.post("/api/next", **answers(NextOut, **doc(LABELER_WRITE, 401, 403, 423)))
def next_(db: DB, who: Labeler):
    """Your open task, or a new one assigned to you now (`task`: null when nothing is left), and your
    progress; the task carries `guidelines` ({campaign_id, version, read}, or null) of its campaign:
    the page shows them first when you have not read this version."""
    task = assignments.next_task(db, who.id)
    if task is not None:
        task["guidelines"] = guides.guidelines_of_task(db, who.id, task["task_id"])
    return {"task": task, "progress": assignments.progress(db, who.id)}


@router.post("/api/tasks/{task_id}/ranking", status_code=201, **doc(LABELER_WRITE, 401, 403, 404, 409, 422, 423))
def submit(db: DB, who: Labeler, body: RankingIn, task_id: int = Path(**ID)):
    return {"ranking_id": assignments.submit(db, who.id, task_id, body.ranking, body.flags)}  # /api/next tells progress


@router.post("/api/tasks/{task_id}/skip", **doc(LABELER_WRITE, 401, 403, 404, 409, 422))
def skip(db: DB, who: Labeler, task_id: int = Path(**ID)):
    assignments.skip(db, who.id, task_id)
    return {"progress": assignments.progress(db, who.id)}


@router.get("/api/rankings", **answers(MyRankings, **doc(LABELER_READ, 401, 422)))
def my_rankings(db: DB, who: Labeler, limit: int = Query(20, ge=1, le=500)):
    """Your rankings, newest first: the export's fields, and ranking_id, version, revisable (one of
    your last 20), `shown` (the completions {id, text} in the order you saw them) and `groups`
    (the current ranking, groups of completion ids best first): what revising one needs."""
    return {"rankings": assignments.my_rankings(db, who.id, limit=limit)}


@router.put("/api/rankings/{ranking_id}", **doc(LABELER_WRITE, 401, 403, 404, 409, 422, 429,
                                                 why={429: f"Over {REVISIONS} revisions a minute: wait as Retry-After says"}))
def revise(request: Request, db: DB, who: Labeler, body: RankingIn, ranking_id: int = Path(**ID)):
    """Revise one of your last 20 rankings (the body as for submitting): it becomes a new version,
    the earlier ones are kept, the export gives the latest. 409: older than your last 20, or revised
    19 times already. 429: more than 10 revisions in a minute."""
    request.app.state.revisions.take(who.id)  # each version is kept: revisions are bounded in rate and number
    return {"ranking_id": ranking_id, "version": assignments.revise(db, who.id, ranking_id, body.ranking, body.flags)}


# ------------------------------------------------------------ guidelines

def my_guidelines(db, who, campaign_id):
    """The guidelines `who` may read (of campaign_id, or all), each with `html`: rendered and sanitised."""
    found = guides.labeler_guidelines(db, who.id, campaign_id)
    for g in found:
        g["html"] = guides.render(g.pop("markdown"))
    return found


@router.get("/guidelines", response_class=HTMLResponse, summary="The guidelines of your campaigns (a page)",
            **doc(LABELER_READ, 401, 422, html=True))
def guidelines_page(request: Request, db: DB, who: Labeler, campaign: int | None = Query(None, **ID)):
    """The written guidelines of the campaigns you label (of one, with ?campaign=)."""
    return page(request, "guidelines.html", name=who.name, guidelines=my_guidelines(db, who, campaign))


@router.get("/api/guidelines/{campaign_id}", **doc(LABELER_READ, 401, 404, 422))
def guidelines(db: DB, who: Labeler, campaign_id: int = Path(**ID)):
    """A campaign's guidelines: {campaign_id, campaign, html (sanitised), version, read}."""
    found = my_guidelines(db, who, campaign_id)
    if not found:
        raise HTTPException(404, f"campaign {campaign_id} has no guidelines for you")
    return found[0]


@router.post("/api/guidelines/{campaign_id}/read", **doc(LABELER_WRITE, 401, 403, 404, 409, 422))
def read_guidelines(db: DB, who: Labeler, body: ReadIn, campaign_id: int = Path(**ID)):
    """Note that you have read this version of the guidelines (409: they changed meanwhile)."""
    guides.read_guidelines(db, who.id, campaign_id, body.version)
    return {"read": True}
