"""Inter-annotator agreement on rankings: Kendall's tau-b and Krippendorff's alpha.

Pure functions over plain lists, so that tests can check them against published values.
"""

import itertools
import math
from collections import defaultdict


def kendall_tau_b(x, y):
    """Kendall's tau-b of two rank vectors (ties allowed); None when either is all ties.

    tau_b = (C - D) / sqrt((n0 - n1) (n0 - n2)), n0 = n(n-1)/2, n1/n2 the pairs tied in x/y."""
    conc = disc = tie_x = tie_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            tie_x += 1
            tie_y += 1
        elif dx == 0:
            tie_x += 1
        elif dy == 0:
            tie_y += 1
        elif (dx > 0) == (dy > 0):
            conc += 1
        else:
            disc += 1
    n0 = len(x) * (len(x) - 1) // 2
    denom = math.sqrt((n0 - tie_x) * (n0 - tie_y))
    return None if denom == 0 else (conc - disc) / denom


def krippendorff_alpha(units, metric="ordinal"):
    """Krippendorff's alpha over units, each a list of the values its coders gave (None: no value).

    Built from the coincidence matrix o_ck (Krippendorff 2011, "Computing Krippendorff's
    alpha-reliability"): alpha = 1 - (n - 1) * sum o_ck d_ck / sum n_c n_k d_ck.
    metric: "nominal", "ordinal" or "interval". None when there is no variation to measure."""
    o = defaultdict(float)  # 1. coincidences within units that have 2+ values
    for values in units:
        vals = [v for v in values if v is not None]
        m = len(vals)
        if m < 2:
            continue
        for i, j in itertools.permutations(range(m), 2):
            o[vals[i], vals[j]] += 1.0 / (m - 1)
    cats = sorted({c for c, _ in o})
    n_c = {c: sum(o[c, k] for k in cats) for c in cats}  # 2. marginals
    n = sum(n_c.values())
    if n <= 1:
        return None

    def delta(c, k):  # 3. squared difference under the metric
        if metric == "nominal":
            return 0.0 if c == k else 1.0
        if metric == "interval":
            return float(c - k) ** 2
        if metric == "ordinal":
            lo, hi = min(c, k), max(c, k)
            between = sum(n_c[g] for g in cats if lo <= g <= hi)
            return (between - (n_c[c] + n_c[k]) / 2) ** 2
        raise ValueError(f"unknown metric {metric!r}")

    observed = sum(o[c, k] * delta(c, k) for c in cats for k in cats)
    expected = sum(n_c[c] * n_c[k] * delta(c, k) for c in cats for k in cats)
    if expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected  # 4.


def agreement(rows):
    """Agreement of the rankings of a campaign; rows in the export format.

    Returns {"tau": mean Kendall tau-b over pairs of labelers on a shared task,
    "pairs": how many such pairs, "alpha": Krippendorff's ordinal alpha with
    (task, completion) as units and ranks as values, "per_labeler": {name: mean tau
    of that labeler against the others}}."""
    by_task = defaultdict(dict)
    for r in rows:
        by_task[r["task_id"]][r["labeler"]] = r["ranks"]
    taus, per = [], defaultdict(list)
    units = []
    for ranks in by_task.values():
        names = sorted(ranks)
        for a, b in itertools.combinations(names, 2):
            t = kendall_tau_b(ranks[a], ranks[b])
            if t is not None:
                taus.append(t)
                per[a].append(t)
                per[b].append(t)
        if len(names) > 1:
            k = len(ranks[names[0]])
            units += [[ranks[name][i] for name in names] for i in range(k)]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"tau": mean(taus), "pairs": len(taus), "alpha": krippendorff_alpha(units, "ordinal"),
            "per_labeler": {name: mean(ts) for name, ts in per.items()}}
