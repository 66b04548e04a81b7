"""The admin's side of the ranking app: the overview page (campaigns, their agreement, win rates and
labeler quality, labelers), signing in, inviting, revoking and pausing labelers, known-answer tasks and a
campaign's quality settings, a campaign's rankings per task and guidelines, and the export. Every route but
the sign-in's declares `_: Admin` (reads) or `_: AdminForm` (a page's form: its `csrf` field)."""

import logging
import math
import re
import secrets
import threading
import time

from fastapi import APIRouter, File, Form, HTTPException, Path, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, StrictInt, StrictStr

from . import accounts, campaigns, guidelines, jobs, oversight, queries, winrate
from .agreement import agreement
from .auth import DB, Admin, AdminForm, ValidateFirst, check_admin, check_origin, cookie, counted, csrf_for, is_admin_token, set_cookie
from .contract import ADMIN_COOKIE, ADMIN_READ, ADMIN_WRITE, ID, PUBLIC, doc, page
from .db import Rejected

router = APIRouter(route_class=ValidateFirst)
log = logging.getLogger("shoggoth.feedback")

EXPORT_DOC = doc(ADMIN_READ, 401, 422)
EXPORT_DOC["responses"][200] = {"description": "One JSON object a line (a download)",
                                "content": {"application/jsonl": {"schema": {"type": "string"}}}}


REFRESH_S = 60  # the admin page, left open, loads itself again this often (admin.js), when nobody is typing
DEBOUNCE_S = 30.0  # after a change, an evaluation's win rates are computed again at most this often


class WinRates:
    """The win rates the admin's overview shows, computed by one background thread, one campaign at a
    time, never inside a request: the bootstrap of a large evaluation takes seconds to minutes, and
    any submit or revision changes its judgements. A request hands over the judgements it read and
    gets the last finished result at once, with its age; a campaign is computed again at most once
    every `debounce` seconds, so a busy team does not keep the thread (and a core) busy for a page
    nobody may be looking at."""

    def __init__(self, compute=winrate.summary, debounce=DEBOUNCE_S):
        self.compute, self.debounce = compute, debounce
        self.clock = time.monotonic  # a test may turn it
        self.done = {}  # campaign id -> (the judgements, their summary or None if it failed, finished at, error)
        self.wanted = {}  # campaign id -> (judgements, models): the latest handed over, not computed yet
        self.started = {}  # campaign id -> when its last computation started
        self.running = None  # (campaign id, judgements) being computed now
        self.cond = threading.Condition()
        self.thread = None

    def get(self, cid, rows, models):
        """{"summary": the last finished summary or None, "state": "ready" (of these judgements),
        "stale" (of earlier ones; these are computed within `debounce` seconds), "computing" (none
        yet) or "failed", "age_s": seconds since it finished, "error"}; asks for these judgements."""
        with self.cond:
            done = self.done.get(cid)
            if done is not None and done[0] == rows:
                self.wanted.pop(cid, None)
            elif self.running != (cid, rows):
                self.wanted[cid] = rows, models
                if self.thread is None:
                    self.thread = threading.Thread(target=self.work, name="win rates", daemon=True)
                    self.thread.start()
                self.cond.notify_all()
            if done is None:
                return {"summary": None, "state": "computing", "age_s": None, "error": None}
            state = "stale" if done[0] != rows else "failed" if done[3] else "ready"
            return {"summary": done[1], "state": state, "age_s": round(self.clock() - done[2], 1), "error": done[3]}

    def work(self):
        while True:
            with self.cond:
                while True:  # the campaign due first, once its debounce has passed
                    now = self.clock()
                    due = {cid: self.started.get(cid, -math.inf) + self.debounce for cid in self.wanted}
                    cid = min(due, key=due.get, default=None)
                    if cid is not None and due[cid] <= now:
                        break
                    self.cond.wait(None if cid is None else due[cid] - now)
                rows, models = self.wanted.pop(cid)
                self.running, self.started[cid] = (cid, rows), now
            result, error = None, None
            try:
                result = self.compute(rows, models)
            except Exception as e:  # noqa: BLE001 - shown on the page; the thread must live on
                error = f"{type(e).__name__}: {e}"
            with self.cond:
                self.done[cid], self.running = (rows, result, self.clock(), error), None


class SignInLinks:
    """One-time admin sign-in links: random codes, kept hashed in this process, each good once within
    `ttl` seconds. `serve` prints one at start; unlike the admin token, a link that reaches a proxy's
    log or the browser's history once used opens nothing."""

    def __init__(self, ttl=accounts.SESSION_TTL["admin"]):
        self.ttl, self.codes, self.lock = ttl, {}, threading.Lock()
        self.clock = time.time  # a test may turn it

    def new(self):
        code = secrets.token_urlsafe(24)
        with self.lock:
            self.codes[accounts.hash_token(code)] = self.clock() + self.ttl
        return code

    def spend(self, code):
        """Whether `code` is a link made here, unused and unexpired; it is used up either way."""
        with self.lock:
            expires = self.codes.pop(accounts.hash_token(code), None)
        return expires is not None and expires > self.clock()


def overview_with_agreement(request, db):
    """The overview, each campaign with its labelers' agreement, and an evaluation with its win rates
    as app.state.winrates last computed them (`winrate`, None until the first is done) and how
    current they are (`winrate_status`: state and age, as WinRates.get says)."""
    camps, labs = queries.overview(db)
    measures, paused = oversight.quality_settings(db)
    for lab in labs:
        lab["paused"] = paused.get(lab["id"])
    for c in camps:
        if c["evaluation"]:
            settings, rows = queries.judgements(db, c["name"])
            status = request.app.state.winrates.get(c["id"], rows, settings["models"])
            c["winrate"] = status.pop("summary")
            c["winrate_status"] = status
        else:
            rows = queries.rank_vectors(db, c["id"])
        c["agreement"] = agreement(rows)
        c["quality"] = labeler_quality(db, c["id"], rows, measures[c["id"]])
    return camps, labs


def labeler_quality(db, cid, rows, settings):
    """What the overview shows of a campaign's labelers' quality: its gold_rate, known (known-answer
    tasks), flag_below (the threshold in force), labelers (jobs.quality's measures) and flagged (names)."""
    threshold, labs = jobs.quality(db, cid, rows, settings)
    return {"gold_rate": settings["gold_rate"], "known": settings["known"], "flag_below": threshold,
            "labelers": labs, "flagged": [name for name, m in labs.items() if m["flagged"]]}


def admin_csrf(request):
    return csrf_for(request, "admin", cookie(request, ADMIN_COOKIE) or "")


def admin_page(request, db, status=200, **extra):
    camps, labs = overview_with_agreement(request, db)
    per = {}
    for c in camps:
        for name, t in c["agreement"]["per_labeler"].items():
            per.setdefault(name, []).append(t)
    for lab in labs:
        ts = [t for t in per.get(lab["name"], []) if t is not None]
        lab["tau"] = sum(ts) / len(ts) if ts else None
    return page(request, "admin.html", status, campaigns=camps, labelers=labs, csrf=admin_csrf(request),
                guidelines=guidelines.guidelines_summary(db), by_name={lab["name"]: lab for lab in labs},
                refresh_s=REFRESH_S, **extra)


def labeler_page(request, db, lid, status=200, **extra):
    labs = {lab["id"]: lab for lab in queries.overview(db)[1]}
    if lid not in labs:
        raise HTTPException(404, f"no labeler {lid}")
    rows = queries.rankings(db, labeler=lid, limit=200)
    for r in rows:
        r["ordered"] = sorted(zip(r["ranks"], r["completions"]), key=lambda x: x[0])
    return page(request, "labeler.html", status, labeler=labs[lid], rows=rows, csrf=admin_csrf(request), **extra)


def join_link(request, token):
    return str(request.base_url).rstrip("/") + f"/join/{token}"


OLD_LINK = ("sign-in links with ?token= no longer work: they put the admin token in the proxy's log and the "
            "browser's history. Enter the admin token below, or open the one-time link `shoggoth feedback serve` printed.")
SIGNED_IN_ADMIN = "Signed in (an admin cookie): on to /admin"


def sign_in_page(request, message, status=401):
    return page(request, "sign_in.html", status, message=message)


def admin_session_cookie(request, db):
    resp = RedirectResponse("/admin", 303)
    set_cookie(request, resp, ADMIN_COOKIE, accounts.admin_session(db, request.app.state.admin_token))
    return resp


@router.get("/admin", response_class=HTMLResponse, summary="The admin page (a sign-in form when not signed in)",
            **doc(ADMIN_READ, 401, html=True, why={401: "Not signed in: the sign-in form"}))
def admin_home(request: Request, db: DB):
    try:
        check_admin(request, db, None)  # a GET: no CSRF token to check
    except HTTPException as e:
        if e.status_code != 401:
            raise
        # an old bookmark's ?token= is neither checked nor counted: the token must stop travelling in URLs
        return sign_in_page(request, OLD_LINK if "token" in request.query_params else "Sign in with the admin token.")
    return admin_page(request, db)


@router.post("/admin/sign-in", response_class=RedirectResponse, status_code=303,
             summary="Sign in with the admin token (the sign-in form)",
             **doc(PUBLIC, 401, 403, 422, 429, html=True, redirect=SIGNED_IN_ADMIN))
def sign_in(request: Request, db: DB, token: str = Form(min_length=1, max_length=200)):
    """Trade the admin token, sent in the form's body (never in a URL), for an admin session cookie."""
    check_origin(request)
    if not counted(request, lambda: is_admin_token(request, token)):
        return sign_in_page(request, "Wrong admin token.")
    return admin_session_cookie(request, db)


@router.get("/admin/sign-in/{code}", response_class=RedirectResponse, status_code=303,
            summary="A one-time admin sign-in link (printed by `shoggoth feedback serve`)",
            **doc(PUBLIC, 404, 422, 429, html=True, redirect=SIGNED_IN_ADMIN))
def sign_in_link(request: Request, db: DB, code: str = Path(max_length=200)):
    if not counted(request, lambda: request.app.state.sign_in_links.spend(code)):
        raise HTTPException(404, "this sign-in link was used already or has expired: sign in at /admin with the admin token")
    return admin_session_cookie(request, db)


@router.post("/admin/invite", response_class=HTMLResponse, status_code=201, summary="Invite a labeler (a page)",
             **doc(ADMIN_WRITE, 401, 403, 404, 409, 422, html=True))
def invite(request: Request, db: DB, _: AdminForm, name: str = Form(min_length=1, max_length=100),
           campaign_id: str = Form("")):
    cid = None
    if campaign_id:
        if not re.fullmatch(r"[0-9]{1,10}", campaign_id) or not 1 <= int(campaign_id) < 2**31:  # ASCII digits only
            raise HTTPException(422, "campaign_id must be a campaign's id")
        cid = int(campaign_id)
    try:
        token = accounts.create_labeler(db, name, cid)[1]
    except Rejected as e:
        return admin_page(request, db, e.status, error=str(e))
    return admin_page(request, db, 201, invite={"name": name.strip(), "link": join_link(request, token)})


@router.post("/admin/campaigns/{cid}/n", response_class=RedirectResponse, status_code=303,
             summary="Set a campaign's rankings per task (the page's form)",
             **doc(ADMIN_WRITE, 401, 403, 404, 422, html=True, redirect="Done: back to /admin"))
def set_n(db: DB, _: AdminForm, cid: int = Path(**ID), n: int = Form(ge=1, le=100)):
    campaigns.set_rankings_per_task(db, cid, n)
    return RedirectResponse("/admin", 303)


@router.get("/admin/labelers/{lid}", response_class=HTMLResponse, summary="A labeler's rankings (a page)",
            **doc(ADMIN_READ, 401, 404, 422, html=True))
def labeler_detail(request: Request, db: DB, _: Admin, lid: int = Path(**ID)):
    return labeler_page(request, db, lid)


@router.post("/admin/labelers/{lid}/revoke", response_class=HTMLResponse, summary="Revoke a labeler (a page)",
             **doc(ADMIN_WRITE, 401, 403, 404, 422, html=True))
def revoke(request: Request, db: DB, _: AdminForm, lid: int = Path(**ID)):
    """End the labeler's sessions and unused links now; their rankings stay."""
    accounts.revoke_labeler(db, lid)
    return labeler_page(request, db, lid, notice="Revoked: their sessions and unused links no longer work.")


@router.post("/admin/labelers/{lid}/invite", response_class=HTMLResponse, status_code=201,
             summary="A new invite link for a labeler (a page)", **doc(ADMIN_WRITE, 401, 403, 404, 422, html=True))
def reinvite(request: Request, db: DB, _: AdminForm, lid: int = Path(**ID)):
    """A new invite link for the labeler (their earlier unused links stop working)."""
    return labeler_page(request, db, lid, 201, link=join_link(request, accounts.new_invite(db, lid)))


@router.get("/admin/api/overview", **doc(ADMIN_READ, 401))
def overview(request: Request, db: DB, _: Admin):
    camps, labs = overview_with_agreement(request, db)
    return {"campaigns": camps, "labelers": labs}


@router.get("/admin/export.jsonl", response_class=Response, **EXPORT_DOC)
def export(db: DB, _: Admin, campaign: str | None = Query(None, max_length=200, pattern=r"^[^\x00]*$"),
           pairs: bool = False, min_agreement: float | None = Query(None, ge=-1, le=1)):
    """Rankings (or TRL pairs) as JSONL; min_agreement: without the rankings of labelers whose agreement
    with the others in a campaign is below it (as `feedback export --min-agreement`; which, in the log)."""
    fname = re.sub(r"[^A-Za-z0-9._-]", "_", f"{'pairs' if pairs else 'rankings'}-{campaign or 'all'}.jsonl")
    leave_out = frozenset() if min_agreement is None else jobs.low_agreement(db, min_agreement, campaign, log.info)
    # streamed a piece at a time from the database (each piece read in a worker thread)
    return StreamingResponse(queries.export_jsonl(db, campaign, pairs, leave_out=leave_out),
                             media_type="application/jsonl", headers={"Content-Disposition": f'attachment; filename="{fname}"'})


# ------------------------------------------------------------ a campaign's guidelines

class GuidelinesIn(BaseModel):
    markdown: StrictStr | None = Field(max_length=guidelines.MAX_GUIDELINES,
                                       description="Markdown; null or blank clears them")


def guidelines_of(db, cid):
    """{campaign_id, markdown, html (as labelers see it), version, readers (of this version)}."""
    md = guidelines.campaign_guidelines(db, cid)
    readers = guidelines.guidelines_summary(db).get(cid, {}).get("readers", 0)
    return {"campaign_id": cid, "markdown": md, "html": guidelines.render(md),
            "version": guidelines.guidelines_version(md), "readers": readers}


@router.get("/admin/api/campaigns/{cid}/guidelines", **doc(ADMIN_READ, 401, 404, 422))
def get_guidelines(db: DB, _: Admin, cid: int = Path(**ID)):
    return guidelines_of(db, cid)


@router.put("/admin/api/campaigns/{cid}/guidelines", **doc(ADMIN_WRITE, 401, 403, 404, 422))
def put_guidelines(db: DB, _: Admin, body: GuidelinesIn, cid: int = Path(**ID)):
    """Write a campaign's guidelines (Markdown): each labeler sees a new version before their next task."""
    guidelines.set_guidelines(db, cid, body.markdown)
    return guidelines_of(db, cid)


@router.get("/admin/campaigns/{cid}/guidelines", response_class=HTMLResponse,
            summary="A campaign's guidelines: write, upload, preview (a page)", **doc(ADMIN_READ, 401, 404, 422, html=True))
def guidelines_page(request: Request, db: DB, _: Admin, cid: int = Path(**ID)):
    camp = next((c for c in queries.overview(db)[0] if c["id"] == cid), None)
    if camp is None:
        raise HTTPException(404, f"no campaign {cid}")
    return page(request, "admin_guidelines.html", campaign=camp, csrf=admin_csrf(request), **guidelines_of(db, cid))


@router.post("/admin/campaigns/{cid}/guidelines", response_class=RedirectResponse, status_code=303,
             summary="Write or upload a campaign's guidelines (the page's form)",
             **doc(ADMIN_WRITE, 401, 403, 404, 422, html=True, redirect="Saved: back to the guidelines' page"))
def set_guidelines(db: DB, _: AdminForm, cid: int = Path(**ID),
                   markdown: str = Form("", max_length=guidelines.MAX_GUIDELINES),
                   file: UploadFile = File(None, description="a Markdown file (UTF-8); replaces `markdown`")):
    """The text of `file` when one is uploaded, else `markdown`; blank clears them."""
    if file is not None and file.filename:
        try:
            # the body limit bounds it too
            markdown = file.file.read(4 * guidelines.MAX_GUIDELINES + 1).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise HTTPException(422, f"{file.filename}: not UTF-8 text") from None
    guidelines.set_guidelines(db, cid, markdown)
    return RedirectResponse(f"/admin/campaigns/{cid}/guidelines", 303)
# ------------------------------------------------------------ labeler quality: known answers, thresholds, pausing

class QualityIn(BaseModel):
    gold_rate: float | None = Field(None, ge=0, le=0.5, description="share of each labeler's tasks drawn from the "
                                    "known-answer ones, unannounced")
    flag_below: float | None = Field(None, ge=-1, le=1, description="flag a labeler whose 95% interval of agreement "
                                     "lies wholly below this Kendall tau")


class ExpectedIn(BaseModel):
    ranks: list[StrictInt] | None = Field(max_length=campaigns.MAX_K,
                                          description="the expected rank of each completion in its stored (exported) "
                                          "order, 0 best, ties share a rank; null: no known answer")


def form_number(value, name, low, high):
    """A page form's number field: None when empty, else a float in [low, high] (else 422)."""
    if value.strip() == "":
        return None
    try:
        x = float(value)
    except ValueError:
        raise HTTPException(422, f"{name} must be a number") from None
    if not low <= x <= high:  # (NaN fails this too)
        raise HTTPException(422, f"{name} must be between {low} and {high}")
    return x


@router.post("/admin/campaigns/{cid}/quality", response_class=RedirectResponse, status_code=303,
             summary="Set a campaign's known-answer rate and flag threshold (the page's form)",
             **doc(ADMIN_WRITE, 401, 403, 404, 422, html=True, redirect="Done: back to /admin"))
def set_quality_form(db: DB, _: AdminForm, cid: int = Path(**ID), gold_rate: str = Form("", max_length=30),
                     flag_below: str = Form("", max_length=30)):
    oversight.set_quality(db, cid, form_number(gold_rate, "gold_rate", 0, 0.5),
                          form_number(flag_below, "flag_below", -1, 1))
    return RedirectResponse("/admin", 303)


@router.post("/admin/api/campaigns/{cid}/quality", **doc(ADMIN_WRITE, 401, 403, 404, 422))
def set_quality(db: DB, _: Admin, body: QualityIn, cid: int = Path(**ID)):
    """Set a campaign's known-answer rate and flag threshold (those given); returns both as stored
    (flag_below null: the default)."""
    return oversight.set_quality(db, cid, body.gold_rate, body.flag_below)


@router.post("/admin/api/tasks/{task_id}/expected", **doc(ADMIN_WRITE, 401, 403, 404, 409, 422))
def set_expected(db: DB, _: Admin, body: ExpectedIn, task_id: int = Path(**ID)):
    """Make a task a known-answer task with this expected ranking (ranks null: an ordinary task again).
    Labelers are never told: it is mixed into their tasks at its campaign's gold rate."""
    return {"task_id": task_id, "expected": oversight.set_expected(db, task_id, body.ranks)}


def pause_doc(verb):
    return dict(summary=f"{verb} a labeler (the page's form)",
                **doc(ADMIN_WRITE, 401, 403, 404, 422, html=True, redirect="Done: back to /admin"))


@router.post("/admin/labelers/{lid}/pause", response_class=RedirectResponse, status_code=303, **pause_doc("Pause"))
def pause_form(db: DB, _: AdminForm, lid: int = Path(**ID)):
    """No new tasks for the labeler (a clear message on their page), their open one released; rankings stay."""
    oversight.pause_labeler(db, lid, True)
    return RedirectResponse("/admin", 303)


@router.post("/admin/labelers/{lid}/resume", response_class=RedirectResponse, status_code=303, **pause_doc("Resume"))
def resume_form(db: DB, _: AdminForm, lid: int = Path(**ID)):
    oversight.pause_labeler(db, lid, False)
    return RedirectResponse("/admin", 303)


@router.post("/admin/api/labelers/{lid}/pause", **doc(ADMIN_WRITE, 401, 403, 404, 422))
def pause(db: DB, _: Admin, lid: int = Path(**ID)):
    """Pause a labeler: no new tasks, no submissions, their open task released; rankings stay."""
    return {"id": lid, "paused": oversight.pause_labeler(db, lid, True)}


@router.post("/admin/api/labelers/{lid}/resume", **doc(ADMIN_WRITE, 401, 403, 404, 422))
def resume(db: DB, _: Admin, lid: int = Path(**ID)):
    """Undo a pause: the labeler gets tasks again."""
    return {"id": lid, "paused": oversight.pause_labeler(db, lid, False)}
