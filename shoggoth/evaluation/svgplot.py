"""Line and scatter plots as inline SVG, for the run report (report.py): no plotting library, no script,
nothing fetched, so the report opens anywhere, offline. Every label goes through html.escape."""

import html
import math
from typing import NamedTuple

e = html.escape

COLORS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#dc2626"]


class Plot(NamedTuple):
    stage: str
    id: str
    title: str
    x: str  # "step", or a metric key: one point per logged line holding both x and y
    left: list  # [(metric key, legend label)] on the left axis
    right: list = []  # the same on the right axis (other units), drawn dashed
    note: str = ""
    xlabel: str = "step"


def number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def points(rows, x, y):
    return [(r[x], r[y]) for r in rows if number(r.get(x)) and number(r.get(y))]


# ---------------------------------------------------------------- SVG plots

W, H, TOP, BOTTOM, LEFT = 560, 280, 14, 38, 58


def minmax(values):
    v = list(values)
    return min(v), max(v)


def ticks(lo, hi, n=5):
    """About n round values (1, 2, 2.5, 5 x 10^k apart) from at or below lo to at or above hi."""
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    start = math.floor(lo / step + 1e-9) * step
    count = math.ceil((hi - start) / step - 1e-9)
    return [start + i * step for i in range(count + 1)]


def tick_label(v):
    if abs(v) >= 1000 and float(v).is_integer():
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def thin(pts, n=400):
    """At most n points, as means of consecutive runs: a 5000-step loss curve stays small and readable."""
    if len(pts) <= n:
        return pts
    k = math.ceil(len(pts) / n)
    runs = [pts[i:i + k] for i in range(0, len(pts), k)]
    return [(sum(x for x, _ in r) / len(r), sum(y for _, y in r) / len(r)) for r in runs]


def trend(pts):
    """Running mean of the points sorted by x: the shape of a noisy scatter (gold rising, then falling)."""
    pts = sorted(pts)
    k = max(1, len(pts) // 5)
    windows = [pts[i:i + k] for i in range(len(pts) - k + 1)]
    return [(sum(x for x, _ in w) / k, sum(y for _, y in w) / k) for w in windows]


def svg(p: Plot, rows):
    """The plot as an inline <svg> in a <figure>, or None when none of its series was logged."""
    left = [(k, lbl, thin(points(rows, p.x, k))) for k, lbl in p.left]
    right = [(k, lbl, thin(points(rows, p.x, k))) for k, lbl in p.right]
    left, right = [s for s in left if s[2]], [s for s in right if s[2]]
    if not left and not right:
        return None
    if not left:  # only the right-hand series was logged: it gets the left axis
        left, right = right, []
    absent = [k for k, _ in p.left + p.right if k not in {s[0] for s in left + right}]
    r_margin = 58 if right else 16
    xt = ticks(*minmax(x for s in left + right for x, _ in s[2]))
    yt = ticks(*minmax(y for s in left for _, y in s[2]))
    rt = ticks(*minmax(y for s in right for _, y in s[2])) if right else None
    x0, x1, pw, ph = xt[0], xt[-1], W - LEFT - r_margin, H - TOP - BOTTOM

    def sx(x):
        return LEFT + (x - x0) / (x1 - x0) * pw

    def sy(y, t):
        return TOP + ph - (y - t[0]) / (t[-1] - t[0]) * ph

    out = [f'<svg id="plot-{e(p.id)}" class="plot" viewBox="0 0 {W} {H}" role="img">', f"<title>{e(p.title)}</title>"]
    for v in yt:  # grid and left axis labels
        y = sy(v, yt)
        out.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{tick_label(v)}</text>')
    for v in rt or []:
        out.append(f'<text x="{LEFT + pw + 6}" y="{sy(v, rt) + 4:.1f}">{tick_label(v)}</text>')
    for v in xt:
        out.append(f'<text x="{sx(v):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{tick_label(v)}</text>')
    out.append(f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}"/>')
    out.append(f'<text class="axis" x="{LEFT + pw / 2}" y="{H - 4}" text-anchor="middle">{e(p.xlabel)}</text>')
    # Scatter plots (x is a metric, not time): a marker per logged line and a trend line. Short series get markers too.
    scatter = p.x != "step"
    legend = []
    for i, (key, label, pts, t, dash) in enumerate([(*s, yt, False) for s in left] + [(*s, rt, True) for s in right]):
        color = COLORS[i % len(COLORS)]
        line = trend(pts) if scatter else pts
        d = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y, t):.1f}" for j, (x, y) in enumerate(line))
        style = ' stroke-dasharray="5 3"' if dash else ""
        out.append(f'<path class="series" data-key="{e(key)}" d="{d}" stroke="{color}"{style}/>')
        if scatter or len(pts) <= 40:
            dot = ' fill-opacity="0.45"' if scatter else ""
            for x, y in pts:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y, t):.1f}" r="3" fill="{color}"{dot}>'
                           f"<title>{e(label)}: {y:.4g} at {e(p.xlabel)} {x:.4g}</title></circle>")
        legend.append(f'<span><i style="background:{color}"></i>{e(label)}{" (right axis)" if dash else ""}</span>')
    out.append("</svg>")
    note = p.note + (f" Not logged: {', '.join(absent)}." if absent else "")
    return (f'<figure><figcaption>{e(p.title)}</figcaption><div class="legend">{"".join(legend)}</div>'
            f'{"".join(out)}{f"<p class=note>{e(note.strip())}</p>" if note else ""}</figure>')
