"""A campaign's guidelines: written or uploaded by the admin in Markdown (API, page, command line),
rendered and sanitised on the server, shown to each labeler before their first task of the campaign
and again after a change; hostile Markdown and HTML never run, in real Chromium."""

import re

import httpx
import pytest
from sqlalchemy import text

from common import shoggoth
from shoggoth.feedback import accounts, campaigns, guidelines
from shoggoth.feedback.db import connect, writing

ADMIN = {"Authorization": "Bearer admin-secret-token"}

# Each would set window.__pwned (or call alert) if anything of it ran.
HOSTILE = """# Rank helpful answers first

<script>window.__pwned = "script"; alert(1)</script>

<img src="x" onerror="window.__pwned = 'img'; alert(2)">

<svg onload="window.__pwned = 'svg'"><circle r="5"/></svg>

<iframe src="javascript:parent.__pwned='iframe'"></iframe>
<iframe srcdoc="<script>parent.__pwned='srcdoc'</script>"></iframe>
<object data="data:text/html,<script>parent.__pwned='object'</script>"></object>
<embed src="javascript:window.__pwned='embed'">

<style>body { display: none } * { background: url("javascript:window.__pwned='css'") }</style>

<meta http-equiv="Content-Security-Policy" content="script-src 'unsafe-inline'">
<meta http-equiv="refresh" content="0;url=javascript:window.__pwned='refresh'">
<base href="javascript:window.__pwned='base'//">

<form action="javascript:window.__pwned='form'"><button id="hostile-submit">go</button></form>

<details open ontoggle="window.__pwned='details'"><summary>more</summary>hidden</details>

<a id="cover" href="#" onclick="window.__pwned='onclick'" style="position:fixed;inset:0">cover</a>

<math><mtext><table><mglyph><style><img src=x onerror="window.__pwned='mxss'"></style></mglyph></table></mtext></math>

[a javascript link](javascript:window.__pwned='link')
[an encoded one](jav&#x09;ascript:window.__pwned='encoded')
[a data link](data:text/html;base64,PHNjcmlwdD5wYXJlbnQuX19wd25lZD0nZGF0YSc8L3NjcmlwdD4=)
<a href="JaVaScRiPt:window.__pwned='case'">mixed case</a>
![an image](javascript:window.__pwned='image')
![a data image](data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9ImFsZXJ0KDEpIi8+)

| do | don't |
|----|-------|
| quote the prompt | guess |

Keep <kbd>Enter</kbd> for submit. [Read more](https://example.com/guide).
"""


def tags_of(html):
    """[(tag, {attribute: value})] of every element in `html`."""
    from html.parser import HTMLParser

    found = []
    parser = HTMLParser()
    parser.handle_starttag = lambda tag, attrs: found.append((tag, dict(attrs)))
    parser.handle_startendtag = parser.handle_starttag
    parser.feed(html)
    return found


def test_render_keeps_markdown_and_drops_everything_that_could_run():
    html = guidelines.render(HOSTILE)
    for tag, attrs in tags_of(html):
        assert tag not in ("script", "style", "iframe", "object", "embed", "svg", "math", "meta", "base", "form",
                           "button", "link"), (tag, html)
        for name, value in attrs.items():
            assert not name.startswith("on") and name not in ("style", "srcdoc", "action", "formaction"), (name, html)
            scheme = re.match(r"\s*([a-z][a-z0-9+.-]*):", value or "", re.I)  # none: a relative URL
            if name in ("href", "src") and scheme:
                assert scheme.group(1).lower() in ("http", "https", "mailto"), (value, html)
    assert not re.search(r"<\s*script|on(error|load|click|toggle)\s*=", html, re.I)  # not even as a tag's text
    assert "<h1>Rank helpful answers first</h1>" in html and "<td>quote the prompt</td>" in html
    assert '<a href="https://example.com/guide" rel="noopener noreferrer nofollow">Read more</a>' in html
    assert "<kbd>Enter</kbd>" in html and "<details" in html and guidelines.render(None) == guidelines.render("") == ""


def test_an_older_database_gets_the_guidelines_column(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    e = connect(url)
    campaigns.add_tasks(e, "old", [{"prompt": "p", "completions": ["a", "b"]}])
    with writing(e) as s:  # as a database made before guidelines were
        s.execute(text("DROP TABLE guidelines_read"))
        s.execute(text("ALTER TABLE campaigns DROP COLUMN guidelines"))
    e.dispose()
    e = connect(url)
    cid = campaigns.campaign_id(e, "old")
    assert guidelines.campaign_guidelines(e, cid) is None
    version = guidelines.set_guidelines(e, cid, "# Be kind")
    lid = accounts.create_labeler(e, "olga")[0]
    guidelines.read_guidelines(e, lid, cid, version)
    assert guidelines.labeler_guidelines(e, lid)[0]["read"] is True


def signed_in(srv, name, campaign_id=None):
    return accounts.trade_invite(srv.engine, accounts.create_labeler(srv.engine, name, campaign_id)[1])[2]


def test_guidelines_over_the_api_and_the_admin_form(live_app):
    """The admin writes (JSON), uploads (the page's form) or clears them; a labeler's next task says
    whether they have read this version, and a change makes it unread again."""
    srv = live_app
    cid = campaigns.add_tasks(srv.engine, "camp", [{"prompt": f"p{i}", "completions": ["a", "b"]} for i in range(3)])
    other = campaigns.add_tasks(srv.engine, "other", [{"prompt": "q", "completions": ["a", "b"]}])
    ann = signed_in(srv, "ann")
    scoped = signed_in(srv, "ben", campaign_id=other)
    me = {"Authorization": f"Bearer {ann}"}
    with httpx.Client(base_url=srv.url) as c:
        assert c.post("/api/next", headers=me).json()["task"]["guidelines"] is None  # none yet
        assert c.get(f"/api/guidelines/{cid}", headers=me).status_code == 404
        r = c.put(f"/admin/api/campaigns/{cid}/guidelines", json={"markdown": HOSTILE}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["markdown"] == HOSTILE.strip()
        version = r.json()["version"]
        g = c.post("/api/next", headers=me).json()["task"]["guidelines"]
        assert g == {"campaign_id": cid, "version": version, "read": False}
        shown = c.get(f"/api/guidelines/{cid}", headers=me).json()
        assert shown["html"] == guidelines.render(HOSTILE) and "markdown" not in shown and shown["campaign"] == "camp"
        assert c.post(f"/api/guidelines/{cid}/read", json={"version": "0" * 16}, headers=me).status_code == 409
        assert c.post(f"/api/guidelines/{cid}/read", json={"version": version}, headers=me).json() == {"read": True}
        assert c.post("/api/next", headers=me).json()["task"]["guidelines"]["read"] is True
        assert c.get(f"/admin/api/campaigns/{cid}/guidelines", headers=ADMIN).json()["readers"] == 1
        # ben labels another campaign only: this one's guidelines are not his to read
        assert c.get(f"/api/guidelines/{cid}", headers={"Authorization": f"Bearer {scoped}"}).status_code == 404
        assert c.post(f"/api/guidelines/{cid}/read", json={"version": version},
                      headers={"Authorization": f"Bearer {scoped}"}).status_code == 404
        # a change: unread again
        r = c.put(f"/admin/api/campaigns/{cid}/guidelines", json={"markdown": "# New rules"}, headers=ADMIN)
        assert r.json()["readers"] == 0 and c.post("/api/next", headers=me).json()["task"]["guidelines"]["read"] is False
        # bad input: a clear 4xx, nothing stored
        for body, code in (({"markdown": "x" * (guidelines.MAX_GUIDELINES + 1)}, 422), ({"markdown": 5}, 422), ({}, 422)):
            assert c.put(f"/admin/api/campaigns/{cid}/guidelines", json=body, headers=ADMIN).status_code == code
        assert c.put("/admin/api/campaigns/999/guidelines", json={"markdown": "x"}, headers=ADMIN).status_code == 404
        assert c.put(f"/admin/api/campaigns/{cid}/guidelines", json={"markdown": "x"}, headers=me).status_code == 401
        assert guidelines.campaign_guidelines(srv.engine, cid) == "# New rules"
    with httpx.Client(base_url=srv.url) as admin:  # the page's form: a file upload, or the text area
        admin.post("/admin/sign-in", data={"token": "admin-secret-token"})
        page = admin.get(f"/admin/campaigns/{cid}/guidelines").text
        assert "# New rules" in page and "<h1>New rules</h1>" in page
        csrf = re.search(r'name="csrf" value="([^"]*)"', page).group(1)
        url = f"/admin/campaigns/{cid}/guidelines"
        assert admin.post(url, data={"markdown": "forged"}, files={"file": ("", b"")}).status_code == 403
        r = admin.post(url, data={"csrf": csrf}, files={"file": ("g.md", "\ufeff# Uploaded\n\nRank *carefully*.".encode())})
        assert r.status_code == 303 and guidelines.campaign_guidelines(srv.engine, cid) == "# Uploaded\n\nRank *carefully*."
        r = admin.post(url, data={"csrf": csrf}, files={"file": ("g.md", b"\xff\xfe bad")})
        assert r.status_code == 422 and "not UTF-8" in r.text
        assert guidelines.campaign_guidelines(srv.engine, cid) == "# Uploaded\n\nRank *carefully*."  # nothing half-stored
        r = admin.post(url, data={"csrf": csrf, "markdown": "# Typed"}, files={"file": ("", b"")})
        assert r.status_code == 303 and guidelines.campaign_guidelines(srv.engine, cid) == "# Typed"
        assert 'href="/admin/campaigns/%d/guidelines"' % cid in admin.get("/admin").text
        assert admin.post(url, data={"csrf": csrf, "markdown": ""}).status_code == 303  # blank clears
        assert guidelines.campaign_guidelines(srv.engine, cid) is None


def test_guidelines_from_the_command_line(tmp_path):
    db = tmp_path / "f.db"
    campaigns.add_tasks(connect(db), "camp", [{"prompt": "p", "completions": ["a", "b"]}])
    (tmp_path / "g.md").write_text("# Guidelines\n\nBe kind.\n")
    r = shoggoth("feedback", "guidelines", "--db", db, "--campaign", "camp", tmp_path / "g.md")
    assert "guidelines set (22 characters, version" in r.stdout
    assert guidelines.campaign_guidelines(connect(db), 1) == "# Guidelines\n\nBe kind."
    r = shoggoth("feedback", "guidelines", "--db", db, "--campaign", "camp", "-", input="# From stdin")
    assert guidelines.campaign_guidelines(connect(db), 1) == "# From stdin"
    (tmp_path / "bad.md").write_bytes(b"\xff\xfe")
    for args, message in (([tmp_path / "none.md"], "cannot read it"), ([tmp_path / "bad.md"], "not UTF-8"),
                          (["--campaign", "nope", tmp_path / "g.md"], "no campaign named 'nope'"),
                          ([], "give a Markdown FILE or --clear"), ([tmp_path / "g.md", "--clear"], "not both")):
        if "--campaign" not in args:
            args = ["--campaign", "camp", *args]
        r = shoggoth("feedback", "guidelines", "--db", db, *args, check=False)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert guidelines.campaign_guidelines(connect(db), 1) == "# From stdin"  # nothing stored by a failed command
    r = shoggoth("feedback", "guidelines", "--db", db, "--campaign", "camp", "--clear")
    assert "guidelines removed" in r.stdout and guidelines.campaign_guidelines(connect(db), 1) is None


@pytest.mark.slow
def test_hostile_guidelines_never_run_in_chromium(live_app, chromium):
    """The first-visit screen, the guidelines page and the admin's preview show hostile guidelines with
    nothing running: no script, handler, javascript: or data: URL; the CSP header is the app's own."""
    from shoggoth.feedback.app import CSP

    srv = live_app
    cid = campaigns.add_tasks(srv.engine, "camp", [{"prompt": f"prompt {i}", "completions": ["one", "two"]} for i in range(2)],
                      rankings_per_task=1)
    guidelines.set_guidelines(srv.engine, cid, HOSTILE)
    _, token = accounts.create_labeler(srv.engine, "lea")
    # bypass_csp: the sanitiser alone must stop them; the CSP is checked on the responses
    ctx = chromium.new_context(bypass_csp=True)
    ctx.set_default_timeout(10_000)
    dialogs, errors = [], []
    ctx.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    csps = []
    ctx.on("response", lambda r: csps.append((r.url, r.headers.get("content-security-policy")))
           if "/static/" not in r.url else None)

    def nothing_ran(page):
        for link in page.locator(".guidelines a:not([href]), .guidelines a[href^='#']").all():
            link.click(force=True)  # a javascript: link would run now (sanitised, they have no href left)
        # every URL left, as the browser itself reads it, is a web page or a mail address
        urls = page.evaluate("[...document.querySelectorAll('.guidelines [href], .guidelines [src]')]"
                             ".map((e) => new URL(e.href || e.src, location.href).protocol)")
        assert urls and set(urls) <= {"http:", "https:", "mailto:"}, urls
        page.locator(".guidelines").first.hover()
        page.wait_for_timeout(200)
        assert page.evaluate("window.__pwned") is None
        assert page.locator(".guidelines script, .guidelines style, .guidelines iframe, .guidelines svg, "
                            ".guidelines [onerror], .guidelines [onclick], meta[http-equiv], base").count() == 0
        assert page.locator("body").is_visible()  # no injected style hid the page

    try:
        page = ctx.new_page()
        page.on("pageerror", lambda e: errors.append(e))
        page.goto(f"{srv.url}/join/{token}")
        page.click("#join")
        page.wait_for_selector("#guidelines-screen:not([hidden])")  # the first visit: guidelines before any task
        assert page.locator("#work").is_hidden()
        assert page.locator("#guidelines-body h1").text_content() == "Rank helpful answers first"
        assert page.locator("#guidelines-body td").first.text_content() == "quote the prompt"
        assert page.evaluate("document.activeElement.id") == "guidelines-ok"  # Enter reads on
        nothing_ran(page)
        page.focus("#guidelines-ok")  # (the clicks above took the focus)
        page.keyboard.press("Enter")
        page.wait_for_selector(".card")
        assert page.locator("#guidelines-screen").is_hidden()
        assert page.locator("#guidelines-link").is_visible()  # the link to read them again, always there
        assert page.locator("#guidelines-link").get_attribute("href") == f"/guidelines?campaign={cid}"
        page.reload()  # read once: remembered on the server, not shown again
        page.wait_for_selector(".card")
        assert page.locator("#guidelines-screen").is_hidden()
        with ctx.expect_page() as opened:
            page.click("#guidelines-link")  # a new tab: the task stays as it was
        guide = opened.value
        guide.wait_for_selector(".guidelines h1")
        assert guide.url.endswith(f"/guidelines?campaign={cid}")
        nothing_ran(guide)
        admin = ctx.new_page()  # signed in with the sign-in form (a POST); the preview; a change through the form
        admin.goto(f"{srv.url}/admin")
        admin.fill("#sign-in-form input[name=token]", srv.app.state.admin_token)
        admin.click("#sign-in-form button")
        admin.wait_for_url(f"{srv.url}/admin")
        assert srv.app.state.admin_token not in admin.url
        admin.click(f'a[href="/admin/campaigns/{cid}/guidelines"]')
        admin.wait_for_selector("#guidelines-preview h1")
        nothing_ran(admin)
        admin.fill("textarea[name=markdown]", "# Changed\n\nRead me again.")
        admin.click("#guidelines-form button[type=submit]")
        admin.wait_for_selector("#guidelines-preview h1:text('Changed')")
        page.reload()  # a new version: shown again
        page.wait_for_selector("#guidelines-screen:not([hidden])")
        assert page.locator("#guidelines-body h1").text_content() == "Changed"
        page.click("#guidelines-ok")
        page.wait_for_selector(".card")
        assert dialogs == [] and errors == []
        pages = [(u, c) for u, c in csps if re.search(r"/(label|guidelines|admin)", u)]
        assert pages and all(c == CSP for _, c in pages), pages
    finally:
        ctx.close()
