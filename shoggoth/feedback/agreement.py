"""Inter-annotator agreement on rankings: Kendall's tau-b and Krippendorff's alpha, and each
labeler's agreement with the others and with known answers, with bootstrap intervals and a flag.

Pure functions over plain lists (numpy for the bootstrap), so that tests can check them against
published values.
"""

import itertools
import math
import zlib
from collections import defaultdict

import numpy as np

FLAG_BELOW = 0.3  # the default threshold: a labeler is flagged when their interval lies wholly under it (see docs)
MIN_TASKS = 5  # a labeler measured on fewer tasks gets no interval and is never flagged
RESAMPLES = 1000  # bootstrap resamples of a labeler's tasks
LEVEL = 0.95  # the intervals' coverage
ROUNDS = 3  # rounds of re-weighting the others' consensus by each one's own agreement
MIN_WEIGHT = 0.01  # a labeler who agrees with nobody still weighs this much (never all weights 0)


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


def consensus_taus(rows, rounds=ROUNDS):
    """{labeler: {task_id: Kendall tau-b of their ranking against the consensus of the others who ranked
    that task}}; rows in the export format (task_id, labeler, ranks).

    The consensus is the others' ranks averaged, each weighted by that labeler's own mean agreement
    (at least MIN_WEIGHT), found by `rounds` rounds from equal weights. Plain mean pairwise tau lets
    bad labelers pull good ones down: among five, one random and one reversed, a careful labeler's
    mean tau with the others is about a quarter of their tau with another careful one, near the
    random labeler's; the weighted consensus leaves the two out after one round.

    In numpy over all rankings at once (a team's campaign has tens of thousands, and the admin page
    shows this on every load); the consensus is rounded to 9 decimals, so that the others' tie stays
    a tie whatever the order the weights were summed in."""
    latest = {(r["task_id"], r["labeler"]): r["ranks"] for r in rows}  # one ranking per labeler and task
    names = sorted({lab for _, lab in latest})
    index = {name: i for i, name in enumerate(names)}
    by_k = defaultdict(list)  # rankings by their number of completions (a campaign has one K)
    for (tid, lab), ranks in latest.items():
        by_k[len(ranks)].append((tid, index[lab], ranks))
    groups = []
    for entries in by_k.values():
        tids = np.array([t for t, _, _ in entries])
        task = np.unique(tids, return_inverse=True)[1]
        groups.append((tids, task, np.array([i for _, i, _ in entries]),
                       np.array([r for _, _, r in entries], dtype=float)))
    weight = np.ones(len(names))
    for _ in range(rounds):
        total, count, found = np.zeros(len(names)), np.zeros(len(names)), []
        for tids, task, lab, ranks in groups:
            w = weight[lab][:, None]  # (n, 1)
            wr = w * ranks  # (n, K)
            s = np.zeros((task.max() + 1, ranks.shape[1]))
            np.add.at(s, task, wr)  # each task's weighted sum of ranks
            others = np.bincount(task, weights=w[:, 0])[task] - w[:, 0]  # (n,) the others' total weight
            has = others > 1e-12  # a ranking with someone else's beside it
            mean = np.round((s[task][has] - wr[has]) / others[has, None], 9)  # the others' consensus
            tau = tau_b_rows(ranks[has], mean)
            ok = ~np.isnan(tau)
            found.append((tids[has][ok], lab[has][ok], tau[ok]))
            np.add.at(total, lab[has][ok], tau[ok])
            np.add.at(count, lab[has][ok], 1)
        weight = np.where(count > 0, np.maximum(MIN_WEIGHT, total / np.maximum(count, 1)), 1.0)
    per = defaultdict(dict)
    for tids, lab, tau in found:
        for t, i, v in zip(tids.tolist(), lab.tolist(), tau.tolist()):
            per[names[i]][t] = v
    return dict(per)


def tau_b_rows(x, y):
    """Kendall's tau-b (kendall_tau_b) of each row of x (n, K) with the same row of y; NaN where either
    row is all ties."""
    i, j = np.triu_indices(x.shape[1], 1)
    dx, dy = np.sign(x[:, i] - x[:, j]), np.sign(y[:, i] - y[:, j])  # (n, pairs)
    denom = np.sqrt((len(i) - (dx == 0).sum(1)) * (len(i) - (dy == 0).sum(1)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (dx * dy).sum(1) / denom, np.nan)


def interval(values, seed, resamples=RESAMPLES, level=LEVEL):
    """(low, high): the percentile bootstrap interval of the mean of `values` (one per task), the
    tasks drawn with replacement `resamples` times from a generator seeded by `seed`."""
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _measure(values, seed, resamples, min_tasks):
    """{tau: the mean, low, high: its interval (None under min_tasks tasks), tasks}."""
    vals = list(values)
    low = high = None
    if len(vals) >= min_tasks:
        low, high = interval(vals, seed, resamples)
    return {"tau": sum(vals) / len(vals), "low": low, "high": high, "tasks": len(vals)}


def labeler_quality(rows, expected=None, threshold=FLAG_BELOW, resamples=RESAMPLES, seed=0, min_tasks=MIN_TASKS):
    """How far each labeler of a campaign can be trusted; rows in the export format, expected
    {task_id: ranks} the campaign's known answers.

    Returns {name: {"others": measure of their tau with the others' consensus (consensus_taus),
    "known": measure of their tau with the known answers they ranked (None: they ranked none),
    "flagged": the reasons they are flagged, [] if not}}, a measure {tau, low, high, tasks}
    with a bootstrap interval over tasks (seeded per labeler, so that one labeler's interval does
    not change with who else is measured). A labeler is flagged ("others", "known answers") when
    an interval lies wholly below `threshold`: their agreement is low beyond what chance in their
    few tasks explains, so that a labeler new to the campaign is not flagged on a bad first task."""
    expected = expected or {}
    known = defaultdict(list)
    for r in rows:
        if r["task_id"] in expected:
            t = kendall_tau_b(r["ranks"], expected[r["task_id"]])
            if t is not None:
                known[r["labeler"]].append(t)
    mutual = consensus_taus(rows)
    out = {}
    for name in sorted(set(mutual) | set(known)):
        key = zlib.crc32(name.encode())
        m = _measure(mutual[name].values(), [seed, key, 0], resamples, min_tasks) if mutual.get(name) else None
        k = _measure(known[name], [seed, key, 1], resamples, min_tasks) if known.get(name) else None
        flagged = [why for why, x in (("others", m), ("known answers", k))
                   if x is not None and x["high"] is not None and x["high"] < threshold]
        out[name] = {"others": m, "known": k, "flagged": flagged}
    return out
