"""A campaign's guidelines, written by the admin in Markdown, as HTML that is safe to show labelers.

markdown-it-py renders CommonMark (with tables and strikethrough; inline HTML allowed, so that an
admin may use <details>, <kbd> or a table's markup), then nh3 (the Rust ammonia sanitiser) keeps
only the tags, attributes and URL schemes below: no script, event handler, style, frame, form,
javascript: or data: URL survives, whatever the text holds. The page's Content-Security-Policy
(no inline script) is a second wall, not the first.
"""

import nh3
from markdown_it import MarkdownIt

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
