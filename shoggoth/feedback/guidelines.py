"""A campaign's guidelines: written by the admin in Markdown and stored with the campaign, read by
each labeler once per version (the first-visit screen), and rendered as HTML that is safe to show them.

markdown-it-py renders CommonMark (with tables and strikethrough; inline HTML allowed, so that an
admin may use <details>, <kbd> or a table's markup), then nh3 (the Rust ammonia sanitiser) keeps
only the tags, attributes and URL schemes below: no script, event handler, style, frame, form,
javascript: or data: URL survives, whatever the text holds. The page's Content-Security-Policy
(no inline script) is a second wall, not the first.
"""

import hashlib
import time

import nh3
from markdown_it import MarkdownIt
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .campaigns import shown_name
from .db import Campaign, GuidelinesRead, Labeler, Rejected, Task, clean_text, reading, retrying, writing

MARKDOWN = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
TAGS = {"a", "abbr", "b", "blockquote", "br", "code", "dd", "del", "details", "div", "dl", "dt", "em", "h1", "h2",
        "h3", "h4", "h5", "h6", "hr", "i", "img", "kbd", "li", "mark", "ol", "p", "pre", "q", "s", "samp", "small",
        "span", "strong", "sub", "summary", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "u", "ul"}
ATTRIBUTES = {"a": {"href", "title"}, "img": {"src", "alt", "title", "width", "height"}, "ol": {"start"},
              "td": {"colspan", "rowspan"}, "th": {"colspan", "rowspan"}, "abbr": {"title"}}
SCHEMES = {"http", "https", "mailto"}  # and relative URLs; never javascript:, data:, vbscript:


def render(markdown):
    """Markdown -> sanitised HTML ("" for none)."""
    if not markdown:
        return ""
    return nh3.clean(MARKDOWN.render(markdown), tags=TAGS, attributes=ATTRIBUTES, url_schemes=SCHEMES,
                     link_rel="noopener noreferrer nofollow", strip_comments=True)


# ---------------------------------------------------------------- storage


MAX_GUIDELINES = 100_000  # characters of Markdown: a long instruction document with examples


def guidelines_version(markdown):
    """The version of a text of guidelines: labelers read each version once (a change shows them again)."""
    return hashlib.sha256(markdown.encode()).hexdigest()[:16] if markdown else None


def set_guidelines(engine, campaign_id, markdown):
    """Store a campaign's guidelines (Markdown; None or blank clears them); returns their version."""
    markdown = clean_text(markdown or "").strip() or None
    if markdown is not None and len(markdown) > MAX_GUIDELINES:
        raise Rejected(422, f"guidelines of {len(markdown)} characters: at most {MAX_GUIDELINES}")
    with writing(engine) as s:
        if s.execute(update(Campaign).where(Campaign.id == campaign_id).values(guidelines=markdown)).rowcount != 1:
            raise Rejected(404, f"no campaign {campaign_id}")
    return guidelines_version(markdown)


def campaign_guidelines(engine, campaign_id):
    """A campaign's guidelines (Markdown) or None; 404 for an unknown campaign."""
    with Session(reading(engine)) as s:
        row = s.execute(select(Campaign.guidelines).where(Campaign.id == campaign_id)).first()
    if row is None:
        raise Rejected(404, f"no campaign {campaign_id}")
    return row[0]


def labeler_guidelines(engine, labeler_id, campaign_id=None):
    """The guidelines a labeler may read, of the campaigns open to them (their own, or every one when
    they may label any), or only of campaign_id: [{campaign_id, campaign (as labelers see its name),
    markdown, version, read (whether they have read this version)}], oldest campaign first."""
    with Session(reading(engine)) as s:
        scope = s.scalar(select(Labeler.campaign_id).where(Labeler.id == labeler_id))
        q = select(Campaign.id, Campaign.name, Campaign.evaluation, Campaign.guidelines).where(
            Campaign.guidelines.is_not(None)).order_by(Campaign.id)
        if scope is not None:
            q = q.where(Campaign.id == scope)
        if campaign_id is not None:
            q = q.where(Campaign.id == campaign_id)
        read = dict(s.execute(select(GuidelinesRead.campaign_id, GuidelinesRead.version)
                              .where(GuidelinesRead.labeler_id == labeler_id)).all())
        return [{"campaign_id": cid, "campaign": shown_name(name, ev), "markdown": md,
                 "version": guidelines_version(md), "read": read.get(cid) == guidelines_version(md)}
                for cid, name, ev, md in s.execute(q).all()]


def guidelines_of_task(engine, labeler_id, task_id):
    """{campaign_id, version, read} of the guidelines of a task's campaign, or None when it has none."""
    with Session(reading(engine)) as s:
        cid = s.scalar(select(Task.campaign_id).where(Task.id == task_id))
    found = labeler_guidelines(engine, labeler_id, cid) if cid is not None else []
    return {k: found[0][k] for k in ("campaign_id", "version", "read")} if found else None


def read_guidelines(engine, labeler_id, campaign_id, version):
    """Note that the labeler has read `version` of a campaign's guidelines: 404 if they cannot see
    them, 409 if they changed meanwhile (the labeler reads the new ones first)."""
    found = labeler_guidelines(engine, labeler_id, campaign_id)
    if not found:
        raise Rejected(404, f"no guidelines of campaign {campaign_id} for you")
    if found[0]["version"] != version:
        raise Rejected(409, "the guidelines changed meanwhile: read them again")

    def attempt():
        with writing(engine) as s:
            row = s.scalar(select(GuidelinesRead).where(GuidelinesRead.labeler_id == labeler_id,
                                                        GuidelinesRead.campaign_id == campaign_id))
            if row is None:
                s.add(GuidelinesRead(labeler_id=labeler_id, campaign_id=campaign_id, version=version, read_at=time.time()))
            else:
                row.version, row.read_at = version, time.time()

    retrying(attempt)  # two tabs at once: the loser's insert clashes, its retry updates


def guidelines_summary(engine):
    """{campaign id: {characters, readers}} of the campaigns with guidelines: how long they are, and how
    many labelers have read their current version (for the admin page)."""
    with Session(reading(engine)) as s:
        texts = dict(s.execute(select(Campaign.id, Campaign.guidelines).where(Campaign.guidelines.is_not(None))).all())
        reads = s.execute(select(GuidelinesRead.campaign_id, GuidelinesRead.version)).all()
    out = {cid: {"characters": len(md), "readers": 0} for cid, md in texts.items()}
    for cid, version in reads:
        if cid in texts and version == guidelines_version(texts[cid]):
            out[cid]["readers"] += 1
    return out
