"""What a client of the ranking app gets back: the contract /openapi.json publishes (each operation's
security and errors) and the two shapes of every answer, a JSON body under JSON_PATHS, a page elsewhere."""

from fastapi.responses import JSONResponse
from pydantic import BaseModel

LABELER_COOKIE, ADMIN_COOKIE = "sg_labeler", "sg_admin"
ID = dict(ge=1, le=2**31 - 1)  # path ids fit the database's integer column
JSON_PATHS = ("/api/", "/admin/api/", "/admin/export")  # errors there are JSON; elsewhere an HTML page


def is_json_path(path):
    return path.startswith(JSON_PATHS)


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
                      "A labeler's browser session, set by opening an invite link (HttpOnly; over HTTPS named "
                      f"`__Host-{LABELER_COOKIE}`)."},
    "adminCookie": {"type": "apiKey", "in": "cookie", "name": ADMIN_COOKIE, "description":
                    "The admin's browser session, set by the sign-in form of /admin (`POST /admin/sign-in`) or a "
                    f"one-time sign-in link (HttpOnly; over HTTPS named `__Host-{ADMIN_COOKIE}`)."},
    "csrf": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token", "description":
             "With a cookie session, every POST or PUT carries the CSRF token of the page (its `csrf-token` meta or "
             "`csrf` form field), here or as the form field `csrf`; an `Origin` header, when sent, must be "
             "this server, and a `Sec-Fetch-Site` header, when sent, same-origin."},
}
LABELER_READ = [{"session": []}, {"labelerCookie": []}]
LABELER_WRITE = [{"session": []}, {"labelerCookie": [], "csrf": []}]
ADMIN_READ = [{"adminToken": []}, {"adminCookie": []}]
ADMIN_WRITE = [{"adminToken": []}, {"adminCookie": [], "csrf": []}]
PUBLIC = [{}]
WHY = {400: "Bad Content-Length, or two different session cookies of one name", 401: "Not signed in, or a wrong token", 403: "Refused: a missing or stale CSRF "
       "token, a foreign Origin, or not yours", 404: "No such thing", 409: "Conflicts with what is there",
       413: "Request body over 16 KB", 422: "Invalid input", 423: "Paused by the admin: no new tasks until resumed",
       429: "Too many wrong tokens from this address (or from all "
       "addresses): wait as Retry-After says", 503: "The database is busy: try again"}
ALWAYS = (400, 413, 503)  # the body limit answers before routing; any database may be busy


def doc(security, *codes, html=False, redirect=None, why=None):
    """Route keywords that publish an operation's security and its error responses (documentation only);
    `why`: {code: description} where this operation's reason differs from WHY's."""
    responses, why = {}, {**WHY, **(why or {})}
    if any("adminToken" in way for way in security):
        codes += (429,)  # a wrong admin token counts toward the wrong-token limit, as in the sign-in form
    for code in sorted(set(codes + ALWAYS)):
        if html:
            responses[code] = {"description": why[code], "content": {"text/html": {"schema": {"type": "string"}}}}
        else:
            responses[code] = {"description": why[code], "model": Error}
        if code == 429:
            responses[code]["headers"] = {"Retry-After": {"description": "Seconds to wait",
                                                          "schema": {"type": "integer"}}}
    if redirect:
        responses[303] = {"description": redirect, "headers": {"Location": {"schema": {"type": "string"}}}}
    return {"responses": responses, "openapi_extra": {"security": security}}


def page(request, template, status=200, **ctx):
    """An HTML page from templates/ (autoescaped: names and model output are text, never markup)."""
    return request.app.state.templates.TemplateResponse(request, template, ctx, status_code=status)


def error(request, status, message, headers=None):
    """JSON `{"error": message}` under JSON_PATHS, the message page elsewhere (as /openapi.json says)."""
    if is_json_path(request.url.path):
        resp = JSONResponse({"error": message}, status)
    else:
        resp = page(request, "message.html", status, title=f"Error {status}", message=message)
    resp.headers.update(headers or {})
    return resp
