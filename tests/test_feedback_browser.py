"""The ranking app in real headless Chromium, on SQLite and on PostgreSQL: rank by keyboard and by
drag and drop, submit, get the next task, see it on the admin page; untrusted text never runs."""

import json
import re

import httpx
import pytest
from playwright.sync_api import expect

from common import ranking_history
from shoggoth.feedback import accounts, assignments, campaigns, oversight, queries

TEXTS = ["alpha answer", "beta answer", "gamma answer", "delta answer"]


@pytest.fixture
def context(chromium):
    ctx = chromium.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(10_000)
    yield ctx
    ctx.close()


def ranks_by_text(srv, prompt):
    (row,) = [r for r in queries.rankings(srv.engine) if r["prompt"] == prompt]
    return {c: r for c, r in zip(row["completions"], row["ranks"])}, row


def focused_text(page):
    return page.locator(".card.focused .card-text").text_content()


def focus(page, text):
    """Pick the card showing `text` with the keyboard alone: to the top with k, then down with j."""
    for _ in range(len(TEXTS)):
        page.keyboard.press("k")
    for _ in range(len(TEXTS)):
        if focused_text(page) == text:
            return
        page.keyboard.press("j")
    assert focused_text(page) == text


def drag(page, text, target):
    """Drag the card showing `text` with the mouse and drop it on the element `target` selects."""
    box = page.locator(".card", has_text=text).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 12, y + 12, steps=3)  # past the threshold: the drop targets open up
    assert page.locator("body.dragging").count() == 1
    tbox = page.locator(target).bounding_box()
    page.mouse.move(tbox["x"] + tbox["width"] / 2, tbox["y"] + tbox["height"] / 2, steps=8)
    assert page.locator(f"{target}.drop-over").count() == 1  # the target shows it will take the card
    page.mouse.up()
    assert page.locator("body.dragging").count() == 0


def signed_in_page(srv, context, name):
    """Two tasks of TEXTS and a labeler `name` signed in on a new page at /label: (page, its JS errors)."""
    campaigns.add_tasks(srv.engine, "camp", [{"prompt": f"prompt number {i}", "completions": TEXTS} for i in (1, 2)],
                rankings_per_task=1)
    return join_as(srv, context, name)


def join_as(srv, context, name):
    """A new labeler `name` signed in with their invite link on a new page at /label: (page, its JS errors)."""
    _, token = accounts.create_labeler(srv.engine, name)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(e))
    page.goto(f"{srv.url}/join/{token}")
    page.click("#join")
    page.wait_for_url(f"{srv.url}/label")
    page.wait_for_selector(".card")
    return page, errors


@pytest.mark.slow
def test_rank_by_keyboard_and_drag_then_admin_sees_it(live_app, context):
    srv = live_app
    page, errors = signed_in_page(srv, context, "lena")
    first_prompt = page.locator("#prompt").text_content()
    assert page.locator("#progress").text_content() == "0 ranked · 0 skipped · 2 to go"

    # 1. keyboard only: alpha best, beta = gamma, delta last; with a detour that undo takes back
    focus(page, "alpha answer")
    page.keyboard.press("1")
    focus(page, "delta answer")
    page.keyboard.press("Shift+ArrowUp")
    page.keyboard.press("z")
    focus(page, "beta answer")
    page.keyboard.press("2")
    focus(page, "gamma answer")
    page.keyboard.press("3")
    page.keyboard.press("=")
    assert page.locator(".group.tied .card-text").all_text_contents() == ["beta answer", "gamma answer"]
    assert page.locator(".group").nth(0).locator(".card-text").text_content() == "alpha answer"
    page.keyboard.press("f")
    assert page.locator('.flag[data-flag="all_bad"]').get_attribute("aria-pressed") == "true"
    page.wait_for_timeout(450)  # Enter is ignored in the first 400 ms of a task (a doubled key)
    page.keyboard.press("Enter")
    expect(page.locator("#prompt")).not_to_have_text(first_prompt)  # (the page's CSP forbids eval'd waits)
    expect(page.locator("#progress")).to_have_text(re.compile(r"^1 ranked"))
    ranks, row = ranks_by_text(srv, first_prompt)
    assert ranks == {"alpha answer": 0, "beta answer": 1, "gamma answer": 1, "delta answer": 2}
    assert row["flags"] == ["all_bad"] and row["labeler"] == "lena"

    # 2. the next task came without a page load; rank it by drag and drop: delta on top, beta tied with gamma
    second_prompt = page.locator("#prompt").text_content()
    assert second_prompt != first_prompt
    assert page.locator('.flag[aria-pressed="true"]').count() == 0
    drag(page, "delta answer", '.gap[data-gap="0"]')
    assert page.locator(".group").nth(0).locator(".card-text").all_text_contents() == ["delta answer"]
    drag(page, "beta answer", '.group:has(.card-text:text-is("gamma answer"))')
    assert sorted(page.locator(".group.tied .card-text").all_text_contents()) == ["beta answer", "gamma answer"]
    drag(page, "alpha answer", f'.gap[data-gap="{page.locator(".group").count()}"]')  # to the bottom
    page.click("#submit")
    page.wait_for_selector("#empty:not([hidden])")
    assert "Nothing left to rank" in page.locator("#empty").text_content()
    ranks, _ = ranks_by_text(srv, second_prompt)
    assert ranks == {"delta answer": 0, "beta answer": 1, "gamma answer": 1, "alpha answer": 2}
    assert not errors

    # 3. the admin sees both rankings
    admin = context.new_page()
    admin.goto(srv.admin_url)
    assert admin.url == f"{srv.url}/admin"  # the token left the address bar for a cookie
    camp = admin.locator('#campaigns tr[data-campaign="camp"]')
    assert re.search(r"\b2\s*/\s*2\b", camp.text_content())
    assert admin.locator('#labelers tr[data-labeler="lena"] .rankings').text_content() == "2"
    admin.fill("#invite-form input[name=name]", "otto")  # a form post: CSRF field and Origin must pass
    admin.click("#invite-form button")
    link = admin.locator("#invite-link").text_content()
    assert link.startswith(f"{srv.url}/join/") and accounts.labeler_by_token(srv.engine, link.rsplit("/", 1)[1])[1] == "otto"
    admin.locator('#labelers tr[data-labeler="lena"] a').click()
    admin.wait_for_selector("#rankings")
    body = admin.locator("#rankings").text_content()
    assert first_prompt in body and second_prompt in body and "all_bad" in body


PAYLOADS = [
    '<script>window.__xss = "script"</script>',
    '<img src=x onerror="window.__xss = \'img\'">',
    '<svg/onload="window.__xss = \'svg\'">',
    '"><iframe src="javascript:window.__xss=\'iframe\'"></iframe>',
    "</textarea><script>alert('alert')</script>",
    "<a href=\"javascript:window.__xss='link'\">click</a> {{ 7 * 7 }}",
]


@pytest.mark.slow
def test_untrusted_text_never_runs(live_app, chromium):
    """Payloads in prompts, completions, a campaign and a labeler's name stay text. The context
    bypasses the Content-Security-Policy, so the rendering alone must keep them from running."""
    srv = live_app
    prompt = " ".join(PAYLOADS[:3])
    completions = PAYLOADS[2:]
    campaigns.add_tasks(srv.engine, '<b onmouseover="window.__xss=1">camp</b>',
                [{"prompt": prompt, "completions": completions}], rankings_per_task=1)
    _, token = accounts.create_labeler(srv.engine, "<img src=x onerror=\"window.__xss='name'\">")
    ctx = chromium.new_context(bypass_csp=True)
    dialogs = []
    ctx.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        page = ctx.new_page()
        page.goto(f"{srv.url}/join/{token}")
        page.click("#join")  # the join page shows the hostile name as text too
        page.wait_for_selector(".card")
        assert page.locator("#prompt").text_content() == prompt
        assert sorted(page.locator(".card-text").all_text_contents()) == sorted(completions)
        page.locator(".card").first.hover()
        page.locator("text=camp").first.hover()  # the hostile campaign name, while its task is on screen
        page.locator(".card").first.click()
        page.wait_for_timeout(450)
        page.keyboard.press("Enter")
        page.wait_for_selector("#empty:not([hidden])")
        admin = ctx.new_page()
        admin.goto(srv.admin_url)
        admin.locator("#labelers a").first.click()
        admin.wait_for_selector("#rankings")
        assert prompt in admin.locator("#rankings").text_content()
        admin.locator("text=camp").first.hover()
        assert page.locator("#work").is_hidden()  # nothing left: the last task's panel is gone, not left on screen
        for p in (page, admin):
            p.locator("text=camp").first.dispatch_event("mouseover")  # (on the label page, in the hidden work area)
            assert p.evaluate("window.__xss") is None
            assert p.locator("img, iframe, svg, script:not([src])").count() == 0
            assert "{{ 7 * 7 }}" not in p.content() or "49" not in p.locator("body").text_content()
        assert dialogs == []
    finally:
        ctx.close()


def test_revise_the_last_ranking_by_keyboard_and_click(live_app, context):
    """Rank a task, start the next, revise the first with r (its order comes back), save with Enter: back
    to the next task as it was left; the export gives the revised order. The button shows version 2, Esc leaves."""
    srv = live_app
    page, errors = signed_in_page(srv, context, "rita")
    assert page.locator("#revising").is_hidden()
    page.keyboard.press("r")  # nothing to revise yet
    expect(page.locator("#toast")).to_have_text(re.compile("Nothing to revise yet"))
    first_prompt = page.locator("#prompt").text_content()
    focus(page, "alpha answer")
    page.keyboard.press("1")
    focus(page, "delta answer")
    page.keyboard.press("2")
    page.wait_for_timeout(450)
    page.keyboard.press("Enter")
    expect(page.locator("#prompt")).not_to_have_text(first_prompt)
    second_prompt = page.locator("#prompt").text_content()
    focus(page, "gamma answer")
    page.keyboard.press("1")  # a ranking in progress, which the revision must leave alone
    in_progress = page.locator(".card-text").all_text_contents()

    page.keyboard.press("r")
    expect(page.locator("#prompt")).to_have_text(first_prompt)
    expect(page.locator("#revising")).to_be_visible()
    assert "version 1" in page.locator("#revising").text_content()
    assert page.locator("#skip").is_hidden() and page.locator("#submit").text_content().startswith("Save revision")
    shown = page.locator(".card-text").all_text_contents()
    assert shown[:2] == ["alpha answer", "delta answer"]  # the order it was given
    focus(page, "beta answer")
    page.keyboard.press("1")
    page.keyboard.press("=")  # at the top: ties with the rank below (alpha)
    focus(page, "alpha answer")
    page.keyboard.press("Shift+ArrowDown")
    page.keyboard.press("Shift+ArrowDown")
    revised = [g.locator(".card-text").all_text_contents() for g in page.locator(".group").all()]
    assert revised == [["beta answer"], ["delta answer"], ["alpha answer"], ["gamma answer"]]
    page.keyboard.press("x")  # flag it unsafe too
    page.wait_for_timeout(450)
    page.keyboard.press("Enter")
    expect(page.locator("#toast")).to_have_text(re.compile(r"Revised ✓ \(version 2\)"))
    expect(page.locator("#prompt")).to_have_text(second_prompt)  # back to the current task, as it was
    assert page.locator("#revising").is_hidden() and page.locator("#skip").is_visible()
    assert page.locator(".card-text").all_text_contents() == in_progress

    ranks, row = ranks_by_text(srv, first_prompt)
    want = {t: r for r, g in enumerate(revised) for t in g}
    assert ranks == want and row["flags"] == ["unsafe"]
    export = [json.loads(x) for x in httpx.get(f"{srv.url}/admin/export.jsonl",
                                               headers={"Authorization": "Bearer admin-secret-token"}).text.splitlines()]
    assert [dict(zip(r["completions"], r["ranks"])) for r in export] == [want]
    assert len(ranking_history(srv.engine, row_id(srv, first_prompt))) == 2

    # the button: the revised order comes back as version 2; Escape leaves it unchanged
    page.click("#revise")
    expect(page.locator("#prompt")).to_have_text(first_prompt)
    assert "version 2" in page.locator("#revising").text_content()
    assert [g.locator(".card-text").all_text_contents() for g in page.locator(".group").all()] == revised
    page.keyboard.press("Escape")
    expect(page.locator("#prompt")).to_have_text(second_prompt)
    assert page.locator(".card-text").all_text_contents() == in_progress
    assert len(ranking_history(srv.engine, row_id(srv, first_prompt))) == 2
    assert not errors


def row_id(srv, prompt):
    (r,) = [r for r in assignments.my_rankings(srv.engine, 1) if r["prompt"] == prompt]
    return r["ranking_id"]


def test_rank_an_evaluation_task_by_keyboard(live_app, context):
    """A blind comparison: the labeler sees answers, never models (the page, its meta line, its source);
    ranks them with the keyboard alone; the ranking is stored against the right models."""
    from shoggoth.feedback import jobs

    srv = live_app
    models = {"walrus": "alpha answer", "ibis": "beta answer", "okapi": "gamma answer", "tapir": "delta answer"}
    jobs.add_comparison(srv.engine, "walrus-vs-ibis", [{"prompt": "Which is best?", "references": []}],
                        {m: [t] for m, t in models.items()}, {"seed": 0}, rankings_per_task=1)
    page, errors = join_as(srv, context, "eve")
    assert page.locator("#task-meta").text_content().startswith("evaluation · task")
    html = page.content().lower()
    assert not any(m in html for m in models)

    # keyboard only: gamma best, alpha = delta (delta put third, then tied with the rank above), beta last
    for answer, key in (("gamma answer", "1"), ("alpha answer", "2"), ("delta answer", "3")):
        focus(page, answer)
        page.keyboard.press(key)
    page.keyboard.press("=")
    assert [g.locator(".card-text").all_text_contents() for g in page.locator(".group").all()] == [
        ["gamma answer"], ["alpha answer", "delta answer"], ["beta answer"]]
    page.wait_for_timeout(450)
    page.keyboard.press("Enter")
    page.wait_for_selector("#empty:not([hidden])")
    assert not errors

    settings, rows = queries.judgements(srv.engine, "walrus-vs-ibis")
    (row,) = rows
    assert dict(zip(row["models"], row["ranks"])) == {"okapi": 0, "walrus": 1, "tapir": 1, "ibis": 2}
    assert row["labeler"] == "eve" and settings["models"] == list(models)
    assert queries.rankings(srv.engine, campaign="walrus-vs-ibis")[0]["campaign"] == "walrus-vs-ibis"
    assert list(queries.export_rows(srv.engine)) == []  # an evaluation: not exported for training


@pytest.mark.slow
def test_a_conversation_shows_as_a_transcript_and_stays_text(live_app, chromium):
    """A multi-turn task with a system prompt: the transcript shows the system prompt marked and boxed,
    the earlier turns, then the user message the answers reply to (#prompt), each message's payloads
    as text (the context bypasses the CSP); ranked by keyboard as any task; revising shows it again;
    the admin's page of the labeler shows it as text too."""
    srv = live_app
    chat = [{"role": "system", "content": "Be a pirate. " + PAYLOADS[0]}, {"role": "user", "content": "Hi " + PAYLOADS[1]},
            {"role": "assistant", "content": "Arr " + PAYLOADS[2]},
            {"role": "user", "content": "Treasure? " + PAYLOADS[3] + PAYLOADS[5]}]
    campaigns.add_tasks(srv.engine, "camp", [{"messages": chat, "completions": TEXTS}], rankings_per_task=1)
    ctx = chromium.new_context(bypass_csp=True, viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(10_000)
    dialogs = []
    ctx.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        page, errors = join_as(srv, ctx, "pat")
        assert page.locator("#transcript .turn-role").all_text_contents() == [
            "System prompt", "User", "Assistant", "User · the answers reply to this"]
        assert page.locator("#transcript .prompt-text").all_text_contents() == [m["content"] for m in chat]
        assert page.locator("#transcript .turn.answered #prompt").text_content() == chat[-1]["content"]
        system = page.locator("#transcript .turn.system")
        assert system.evaluate("e => getComputedStyle(e).borderTopStyle") == "dashed"  # boxed apart from the turns
        page.locator(".turn").first.hover()  # (while the task is shown: once it is done its panel is hidden)
        focus(page, "delta answer")
        page.keyboard.press("1")
        page.wait_for_timeout(450)
        page.keyboard.press("Enter")
        page.wait_for_selector("#empty:not([hidden])")
        (row,) = queries.export_rows(srv.engine)
        assert row["messages"] == chat and row["ranks"][TEXTS.index("delta answer")] == 0
        page.keyboard.press("r")  # the revision shows the same conversation
        expect(page.locator("#transcript .turn")).to_have_count(4)
        assert page.locator("#transcript .prompt-text").all_text_contents() == [m["content"] for m in chat]
        page.keyboard.press("Escape")
        admin = ctx.new_page()
        admin.goto(srv.admin_url)  # signs in
        admin.goto(f"{srv.url}/admin/labelers/1")  # pat's rankings
        admin.locator("#rankings summary").click()
        assert admin.locator("#rankings .conversation .turn").all_text_contents() == [
            m["role"] + m["content"] for m in chat]
        admin.locator(".turn").first.hover()
        for p in (page, admin):
            assert p.evaluate("window.__xss") is None
            assert p.locator("img, iframe, svg, script:not([src])").count() == 0
        assert dialogs == [] and not errors
    finally:
        ctx.close()
def rank_in_db(srv, name, reverse=False):
    """A labeler `name` ranks every task left for them, by the completions' text (reversed: worst first)."""
    lid = accounts.labeler_id(srv.engine, name, simulated=False)
    while (t := assignments.next_task(srv.engine, lid)) is not None:
        order = sorted(t["completions"], key=lambda c: c["text"], reverse=reverse)
        assignments.submit(srv.engine, lid, t["task_id"], [[c["id"]] for c in order])


@pytest.mark.slow
def test_team_lead_screen_flags_pauses_and_keeps_itself_current(live_app, context):
    """The admin page a team lead leaves open: each campaign's progress, agreement and flagged
    labelers on one screen; a flagged labeler paused with one click (their page says so, and works
    again once resumed); the known-answer rate set; the page loads itself again every minute."""
    srv = live_app
    campaigns.add_tasks(srv.engine, "team", [{"prompt": f"question {i}", "completions": TEXTS} for i in range(8)],
                rankings_per_task=4)
    for name in ("careful-1", "careful-2"):
        rank_in_db(srv, name)
    rank_in_db(srv, "contrarian", reverse=True)
    lena, errors = join_as(srv, context, "lena")  # a task of her own on screen

    admin = context.new_page()
    admin.clock.install()  # the page's refresh timer runs when the test says
    admin.goto(srv.admin_url)
    camp = admin.locator('#campaigns tr[data-campaign="team"]')
    assert re.search(r"\b24\s*/\s*32\b", camp.text_content()) and "(1 open)" in camp.text_content()
    assert camp.locator(".flagged").text_content().strip() == "contrarian"
    quality = admin.locator('section.quality[data-campaign="team"]')
    bad = quality.locator('tr[data-labeler="contrarian"]')
    assert "flagged-row" in bad.get_attribute("class") and "flagged: others" in bad.text_content()
    assert re.search(r"-1\.00\s*\[-1\.00, -1\.00\]", bad.text_content())
    for name in ("careful-1", "careful-2"):
        row = quality.locator(f'tr[data-labeler="{name}"]')
        assert row.get_attribute("class") is None and re.search(r"1\.00\s*\[1\.00, 1\.00\]", row.text_content())

    # pause the flagged labeler from the quality table, and lena from the labelers table
    bad.locator("button.pause").click()
    expect(quality.locator('tr[data-labeler="contrarian"] button.resume')).to_be_visible()
    admin.locator('#labelers tr[data-labeler="lena"] button.pause').click()
    expect(admin.locator('#labelers tr[data-labeler="lena"] .paused-state')).to_have_text("paused")
    assert re.search(r"\b24\s*/\s*32\b", admin.locator('#campaigns tr[data-campaign="team"]').text_content())
    assert "open" not in admin.locator('#campaigns tr[data-campaign="team"]').text_content()  # lena's released
    lena.locator("#submit").click()  # (a click, not Enter: no key timing to race on a loaded machine)
    expect(lena.locator("#paused")).to_be_visible()
    assert "paused by the admin" in lena.locator("#paused-why").text_content()
    assert lena.locator("#work").is_hidden() and n_rankings_of(srv, "lena") == 0
    admin.locator('#labelers tr[data-labeler="lena"] button.resume').click()
    expect(admin.locator('#labelers tr[data-labeler="lena"] button.pause')).to_be_visible()
    lena.click("#paused-again")
    expect(lena.locator("#work")).to_be_visible()
    expect(lena.locator("#paused")).to_be_hidden()
    assert not errors

    # the known-answer rate and the threshold, set on the page
    form = quality.locator("form.quality-settings")
    form.locator("input[name=gold_rate]").fill("0.2")
    form.locator("input[name=flag_below]").fill("0.5")
    form.locator("button").click()
    expect(quality.locator("input[name=gold_rate]")).to_have_value("0.2")
    assert oversight.quality_settings(srv.engine)[0][1]["gold_rate"] == 0.2
    admin.locator("body").click()  # nothing focused: the page may load itself again

    # left open: new rankings show within a minute, without a click
    rank_in_db(srv, "late")  # the 7 tasks lena does not hold
    admin.clock.fast_forward(61_000)
    expect(admin.locator('#campaigns tr[data-campaign="team"]')).to_contain_text("31 / 32")


def n_rankings_of(srv, name):
    return sum(r["labeler"] == name for r in queries.rankings(srv.engine))
