"""Blind win rates of models from an evaluation campaign's rankings (InstructGPT's headline measure).

Each ranking of a prompt's answers (one per model) is a judgement of every pair of
models in it: A beats B when A's answer is ranked above B's, a tie counts half.

- Win rate of A over B: the mean outcome over the judgements holding both.
- 95% interval: a percentile bootstrap over prompts (a prompt's judgements, from
  all its labelers, are drawn together, since they share the answers), seeded.
- Length-controlled win rate (AlpacaEval 2, Dubois et al. 2024): a logistic
  regression of every pairwise outcome on the models' identities and their
  answers' normalised length difference,
      logit P(A beats B) = theta_A - theta_B + phi * tanh((len A - len B) / s),
  fitted once over the whole campaign, so that the labelers' taste for length
  (phi) is learnt from every pair; the win rate at equal length is then
  sigmoid(theta_A - theta_B). Lengths are in characters; s is the root mean
  square of all the campaign's length differences (AlpacaEval divides by their
  standard deviation against one baseline: here a pooled scale, so that a model
  whose answers are all much longer than another's does not push every x to
  +-1, where length and model could not be told apart). AlpacaEval's
  per-instruction difficulty term is left out (every model answers every prompt).
  Where one model's answers are always far longer, the data cannot say what
  equal length would give: the interval is wide and says so.

Pure functions over plain lists (numpy for the arithmetic), so that tests can check
them against hand-computed values.
"""

from collections import defaultdict

import numpy as np

from .agreement import agreement

RESAMPLES = 2000  # bootstrap resamples of the prompts
LEVEL = 0.95  # interval coverage
RIDGE = 1e-3  # L2 penalty of the length-controlled fit: finite when one model wins every judgement
NEWTON_STEPS = 50
CHUNK = 1_000_000  # resamples x pairwise outcomes held in memory at once


def observations(rows, models):
    """Every pair of the models in every judgement, as arrays: prompt (n,), i and j (n,) the indices
    in `models` of the later-listed and the earlier model, y (n,) the outcome of i against j (1 when
    i's answer is ranked above j's, 0.5 for a tie, 0 below), diff (n,) i's length less j's, labeler
    (n,). rows: {task_id, labeler, ranks, models, lengths}, the last three by completion position."""
    out = []
    for r in rows:
        at = {m: k for k, m in enumerate(r["models"])}
        for i, b in enumerate(models):
            for j, a in enumerate(models[:i]):
                if a in at and b in at:
                    rb, ra = r["ranks"][at[b]], r["ranks"][at[a]]
                    out.append((r["task_id"], i, j, 1.0 if rb < ra else 0.5 if rb == ra else 0.0,
                                r["lengths"][at[b]] - r["lengths"][at[a]], r["labeler"]))
    prompt, i, j, y, diff, lab = zip(*out) if out else ((),) * 6
    return (list(prompt), np.array(i, dtype=int), np.array(j, dtype=int), np.array(y, dtype=float),
            np.array(diff, dtype=float), list(lab))


def length_feature(diffs):
    """The normalised length difference: tanh(diff / s), s the root mean square of diffs; 0 when all are 0."""
    d = np.asarray(diffs, dtype=float)
    s = np.sqrt(np.mean(d ** 2)) if d.size else 0.0
    return np.tanh(d / s) if s > 0 else np.zeros_like(d)


def fit(i, j, x, y, w, m, ridge=RIDGE, steps=NEWTON_STEPS):
    """theta (B, m) of B weighted fits at once of logit P(i beats j) = theta_i - theta_j + phi x.
    i, j, x, y: (n,), y in [0, 1] (a tie a soft 0.5); w: (B, n) weights; m models. Newton's method
    on the log-likelihood less ridge/2 * |(theta, phi)|^2, strictly concave: one optimum (the ridge
    also fixes theta's free shift, which no difference sees)."""
    n = len(y)
    X = np.zeros((n, m + 1))  # (n, m + 1): +1 at i, -1 at j, x last
    X[np.arange(n), i] = 1.0
    X[np.arange(n), j] = -1.0
    X[:, m] = x
    P, c = m + 1, max(1, CHUNK // (m + 1) ** 2)  # c rows' outer products (c, P * P) at a time: memory stays bounded
    beta = np.zeros((w.shape[0], P))
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(beta @ X.T, -30, 30)))  # (B, n)
        grad = (w * (y - p)) @ X - ridge * beta  # (B, P)
        s = w * p * (1 - p)  # (B, n)
        hess = sum(s[:, k:k + c] @ (X[k:k + c, :, None] * X[k:k + c, None, :]).reshape(-1, P * P)
                   for k in range(0, n, c)).reshape(-1, P, P) + ridge * np.eye(P)  # X^T diag(s) X, (B, P, P)
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        beta += step
        if np.abs(step).max() < 1e-9:
            break
    return beta[:, :m]


def sigmoid(t):
    return 1 / (1 + np.exp(-t))


def prompt_weights(prompts, resamples, seed):
    """Bootstrap weights (resamples, n) of n outcomes: how often each one's prompt was drawn when
    the distinct prompts are drawn with replacement, as many as there are (seeded). Yielded in
    chunks, so that memory stays bounded for large campaigns."""
    keys = {p: k for k, p in enumerate(sorted(set(prompts), key=str))}
    col = np.array([keys[p] for p in prompts], dtype=int)
    rng = np.random.default_rng(seed)
    per = max(1, CHUNK // max(1, len(prompts)))
    for start in range(0, resamples, per):
        counts = rng.multinomial(len(keys), np.full(len(keys), 1 / len(keys)), size=min(per, resamples - start))
        yield counts[:, col].astype(float)  # (chunk, n)


def summary(rows, models, resamples=RESAMPLES, seed=0, level=LEVEL):
    """Everything `feedback winrate` shows about an evaluation campaign: for every pair of models
    (each model over every one listed before it: `--models sft=.. ppo=..` gives "ppo over sft") the
    win rate, its bootstrap interval, the length-controlled win rate and its interval, the number
    of judgements and prompts, and each labeler's own win rate; the judgements, prompts and
    labelers of the campaign; each model's mean answer length; the labelers' agreement."""
    models = list(models)
    prompt, i, j, y, diff, labs = observations(rows, models)
    x, m = length_feature(diff), len(models)
    pairs = [(b, a) for b in range(m) for a in range(b)]
    in_pair = {p: (i == p[0]) & (j == p[1]) for p in pairs}
    raw, thetas = defaultdict(list), []
    if len(y):
        for w in prompt_weights(prompt, resamples, seed):
            for p, sel in in_pair.items():
                if sel.any():
                    raw[p].append(w[:, sel] @ y[sel] / w[:, sel].sum(1))
            thetas.append(fit(i, j, x, y, w, m))
        theta, thetas = fit(i, j, x, y, np.ones((1, len(y))), m)[0], np.concatenate(thetas)
    q = [(1 - level) / 2, (1 + level) / 2]
    quantiles = lambda v: [float(e) for e in np.quantile(v, q)]  # noqa: E731
    out = []
    for (b, a), sel in in_pair.items():
        ks = np.flatnonzero(sel)
        res = {"a": models[b], "b": models[a], "n": len(ks), "prompts": len({prompt[k] for k in ks}), "win_rate": None,
               "ci": None, "lc_win_rate": None, "lc_ci": None, "per_labeler": {}}
        if len(ks):
            by = defaultdict(list)
            for k in ks:
                by[labs[k]].append(y[k])
            res.update(win_rate=float(y[sel].mean()), ci=quantiles(np.concatenate(raw[b, a])),
                       lc_win_rate=float(sigmoid(theta[b] - theta[a])),
                       lc_ci=quantiles(sigmoid(thetas[:, b] - thetas[:, a])),
                       per_labeler={lab: {"win_rate": float(np.mean(v)), "n": len(v)} for lab, v in sorted(by.items())})
        out.append(res)
    lengths = defaultdict(dict)
    for r in rows:
        for mod, n in zip(r["models"], r["lengths"]):
            lengths[mod][r["task_id"]] = n
    return {"models": models, "judgements": len(rows), "prompts": len({r["task_id"] for r in rows}),
            "labelers": sorted({r["labeler"] for r in rows}), "level": level, "resamples": resamples,
            "mean_length": {mod: (sum(lengths[mod].values()) / len(lengths[mod]) if lengths[mod] else None)
                            for mod in models},
            "pairs": out, "agreement": agreement(rows)}


def pair(rows, a, b, resamples=RESAMPLES, seed=0, level=LEVEL):
    """The win rates of model a over model b alone (summary's, for these two models)."""
    return summary(rows, [b, a], resamples, seed, level)["pairs"][0]


def lookup(s, a, b):
    """The pair a over b of a summary, turned around when it holds b over a (1 - each rate, the
    interval's ends swapped: the bootstrap draws are the same)."""
    for p in s["pairs"]:
        if (p["a"], p["b"]) == (a, b):
            return p
        if (p["a"], p["b"]) == (b, a):
            flip = lambda v: None if v is None else 1 - v  # noqa: E731
            ci = lambda c: None if c is None else [1 - c[1], 1 - c[0]]  # noqa: E731
            return {**p, "a": a, "b": b, "win_rate": flip(p["win_rate"]), "ci": ci(p["ci"]),
                    "lc_win_rate": flip(p["lc_win_rate"]), "lc_ci": ci(p["lc_ci"]),
                    "per_labeler": {k: {**v, "win_rate": 1 - v["win_rate"]} for k, v in p["per_labeler"].items()}}
    raise KeyError(f"no pair {a} / {b} in this summary")


def pct(v):
    return "n/a" if v is None else f"{100 * v:.0f}%"


def interval(ci):
    """'[54%, 68%]'; empty for none."""
    return "" if ci is None else f"[{pct(ci[0])}, {pct(ci[1])}]"


def rate(v, ci):
    """'61% [54%, 68%]'."""
    return f"{pct(v)} {interval(ci)}".strip()


def sentence(s, a, others, names=None):
    """'PPO preferred over SFT 61% [54%, 68%] of the time; over DPO 55% [48%, 62%]': the headline."""
    name = lambda m: (names or {}).get(m, m)  # noqa: E731
    parts = []
    for i, b in enumerate(others):
        p = lookup(s, a, b)
        parts.append(f"{'' if i else f'{name(a)} preferred '}over {name(b)} {rate(p['win_rate'], p['ci'])}"
                     f"{' of the time' if i == 0 else ''}")
    return "; ".join(parts)


def table(s):
    """The summary as lines of text: what `shoggoth feedback winrate` prints."""
    ag = s["agreement"]
    num = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    ci_head = f"{100 * s['level']:.0f}% CI"
    lines = [f"{s['prompts']} prompts, {s['judgements']} judgements by {len(s['labelers'])} labelers; agreement: "
             f"Kendall tau {num(ag['tau'])} ({ag['pairs']} pairs of labelers on a task), Krippendorff alpha "
             f"{num(ag['alpha'])}",
             "mean answer length (characters): " + ", ".join(
                 f"{m} {'n/a' if v is None else f'{v:.0f}'}" for m, v in s["mean_length"].items()),
             f"{'pair':<24} {'win rate':>8} {ci_head:>12}   {'length-controlled':>17} {ci_head:>12}   judgements"]
    for p in s["pairs"]:
        lines.append(f"{p['a'] + ' over ' + p['b']:<24} {pct(p['win_rate']):>8} {interval(p['ci']):>12}   "
                     f"{pct(p['lc_win_rate']):>17} {interval(p['lc_ci']):>12}   {p['n']:>10}")
        if p["per_labeler"]:
            lines.append("    per labeler: " + ", ".join(f"{k} {pct(v['win_rate'])} ({v['n']})"
                                                        for k, v in p["per_labeler"].items()))
    return lines
