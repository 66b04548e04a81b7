"""`shoggoth report RUN_DIR`: one self-contained HTML file showing what every stage of a run did.

Reads what the run directory holds (each stage's metrics.jsonl, answers.json,
summary.json) and renders whatever is there, naming what is missing: a run that
stopped early still gets a report. Plots are inline SVG (svgplot.py: no plotting
library, no script, nothing fetched), so the file opens anywhere, offline.
Everything read from the run directory, model text above all, is untrusted and
goes through html.escape.
"""

import html
import json
from datetime import datetime, timezone
from pathlib import Path

from ..train import metrics
from .svgplot import Plot, number, svg
from ..errors import ShoggothError
from ..train.metrics import duration

ROUNDS = 2  # the demo's rounds of RLHF (demo.ROUNDS), each a reward model and PPO in run/round-n/
ROUND_STAGES = [f"round-{n}/{s}" for n in range(1, ROUNDS + 1) for s in ("reward", "ppo")]
STAGES = ["pretrain", "sft", *ROUND_STAGES, "dpo"]  # a full demo run; others are shown only when present
STAGE_NAMES = {"pretrain": "Pretraining", "sft": "Supervised fine-tuning", "reward": "Reward model",
               "ppo": "PPO", "dpo": "DPO", "grpo": "GRPO",
               **{s: f"Round {s[6:s.index('/')]}: {'reward model' if s.endswith('reward') else 'PPO'}"
                  for s in ROUND_STAGES}}
MODELS = {"pretrained": "Pretrained", "sft": "SFT", "ppo-1": "PPO, round 1", "ppo": "PPO", "dpo": "DPO",
          "grpo": "GRPO"}  # mask columns; the demo's "ppo" is its last round's policy
HEADLINE = {
    "winrate_ppo_sft": "PPO preferred over SFT (blind)",
    "winrate_ppo_dpo": "PPO preferred over DPO (blind)",
    "pretrain_val_loss": "Pretraining held-out loss",
    "sft_val_loss_base": "SFT held-out loss, pretrained model",
    "sft_val_loss": "SFT held-out loss, after SFT",
    "labeler_agreement": "Labelers' mutual Kendall τ",
    "labeler_alpha": "Labelers' Krippendorff α",
    "reward_accuracy": "Reward model held-out accuracy",
    "gold_pretrained": "Gold reward, pretrained", "gold_sft": "Gold reward, SFT", "gold_ppo": "Gold reward, PPO",
    "gold_dpo": "Gold reward, DPO", "proxy_pretrained": "Proxy reward, pretrained", "proxy_sft": "Proxy reward, SFT",
    "proxy_ppo": "Proxy reward, PPO", "proxy_dpo": "Proxy reward, DPO",
    "kl_ppo": "KL(PPO ‖ SFT) per reply",
    "real_words_sft": "Real English words, SFT answers", "real_words_ppo": "Real English words, PPO answers",
    "real_words_dpo": "Real English words, DPO answers", "real_words_pretrained": "Real English words, pretrained",
    "distinct_sft": "Distinct answers per question, SFT", "distinct_ppo": "Distinct answers per question, PPO",
    "distinct_dpo": "Distinct answers per question, DPO", "distinct_pretrained": "Distinct answers per question, pretrained",
    "on_topic_pretrained": "On-topic answers, pretrained", "on_topic_sft": "On-topic answers, SFT",
    "on_topic_ppo": "On-topic answers, PPO", "on_topic_dpo": "On-topic answers, DPO",
    "gold_constant": "Gold reward, best single reply to every question", "constant_reply": "That single reply",
    "gold_echo": "Gold reward, each question echoed back as its answer",
    "winrate_ppo_sft_low": "PPO over SFT, lower end of the 95% interval",
    "lc_winrate_ppo_sft": "PPO over SFT, length-controlled",
    "shown_ppo_distinct": "Different PPO answers among the 6 shown", "shown_ppo_on_topic": "On-topic PPO answers among the 6 shown",
    "taste": "The simulated labelers' taste",
    "gold_ppo-1": "Gold reward, PPO round 1", "proxy_ppo-1": "Proxy reward, PPO round 1",
    "prefer_ppo-1": "Last reward model: round 1's answer above SFT's",
    "prefer_ppo-1_round-1": "Round 1's reward model: round 1's answer above SFT's",
    "real_words_ppo-1": "Real English words, PPO round 1", "distinct_ppo-1": "Distinct answers per question, PPO round 1",
    "on_topic_ppo-1": "On-topic answers, PPO round 1",
    "reward_accuracy_before": "Last round's rankings: the previous reward model's accuracy",
    "winrate_ppo_ppo-1": "Last round's PPO preferred over round 1's (blind)",
    "winrate_ppo_ppo-1_low": "Last round over round 1, lower end of the 95% interval",
}
# What a person reading the answers needs, checked on the held-out questions (greedy answers,
# except the gold rewards and win rates, which are of sampled ones). A key pair (a, b) reads a OP b.
# On-topic: the answer holds a content word of the question or of a reference answer.
TARGETS = [("real_words_sft", ">=", 0.9, "at least 90% of the words in SFT answers are real English words"),
           ("real_words_ppo", ">=", 0.9, "at least 90% of the words in PPO answers are real English words"),
           ("distinct_ppo", ">=", 0.8, "PPO gives different questions different answers (distinct answers / questions ≥ 0.8)"),
           (("on_topic_ppo", "on_topic_sft"), ">", None, "PPO answers on topic more often than SFT"),
           (("gold_ppo", "gold_sft"), ">", None, "PPO's gold reward stays above SFT's"),
           (("gold_sft", "gold_constant"), ">", None,
            "no single reply given to every question earns SFT's gold reward (the taste cannot be won by a trick)"),
           (("gold_sft", "gold_echo"), ">", None, "echoing each question back does not earn SFT's gold reward"),
           ("winrate_ppo_sft", ">=", 0.65, "labelers prefer PPO's answer over SFT's at least 65% of the time"),
           ("winrate_ppo_sft_low", ">", 0.5, "the lower end of that win rate's 95% interval is above 50%"),
           ("shown_ppo_distinct", ">=", 6, "the six PPO answers shown side by side all differ"),
           ("shown_ppo_on_topic", ">=", 6, "each of the six PPO answers shown is on the question's topic"),
           (("prefer_ppo-1_round-1", "prefer_ppo-1"), ">", None, "the last round's reward model prefers round 1's "
            "answers to SFT's less often than round 1's did (its exploits caught)"),
           ("winrate_ppo_ppo-1", ">", 0.5, "labelers prefer the last round's policy over the first round's")]
OVEROPT = ("Each point is one iteration; the line is a running mean along KL. The policy climbs the reward "
           "model (proxy); the gold reward is the simulated labelers' own taste. Proxy still rising while gold "
           "flattens or falls as KL grows is over-optimisation: the policy exploits the reward model's mistakes "
           "(Gao et al., 2022).")
KL = "KL(policy ‖ SFT) per reply"
COLLAPSE = ("The policy's answers to the held-out prompts. Collapse looks like the reward still climbing while "
            "distinct answers fall toward 1 / prompts and similarity rises toward 1: one answer to every question "
            "(the stage prints a warning below 0.5 distinct).")


def collapse_plot(stage):
    """An RL stage's collapse monitor: how many of its held-out answers differ, how alike they are,
    and the reward beside them."""
    return Plot(stage, f"{stage}-collapse", f"{STAGE_NAMES[stage]}: distinct held-out answers and their similarity",
                "step", [("eval/distinct", "distinct answers / prompts"), ("eval/similarity", "mean pairwise similarity")],
                [("eval/scores", "held-out proxy reward")], COLLAPSE, "iteration")


PLOTS = [
    Plot("pretrain", "pretrain-loss", "Pretraining loss", "step", [("loss", "train"), ("val_loss", "held-out")]),
    Plot("pretrain", "pretrain-optim", "Pretraining gradient norm and learning rate", "step",
         [("grad_norm", "grad norm")], [("lr", "learning rate")]),
    Plot("sft", "sft-loss", "SFT loss (response tokens)", "step", [("loss", "train"), ("val_loss", "held-out")]),
    Plot("sft", "sft-optim", "SFT gradient norm and learning rate", "step",
         [("grad_norm", "grad norm")], [("lr", "learning rate")]),
    Plot("reward", "reward-loss", "Reward model ranking loss", "step", [("loss", "train"), ("val_loss", "held-out")]),
    Plot("reward", "reward-accuracy", "Reward model pairwise accuracy", "step",
         [("accuracy", "train"), ("val_accuracy", "held-out")], [("val_tau", "held-out Kendall τ")],
         "How often the reward model orders a pair of completions as the labelers did."),
    Plot("ppo", "ppo-reward-kl", "PPO: proxy reward and KL per iteration", "step",
         [("objective/scores", "proxy reward"), ("objective/rlhf_reward", "proxy − β·KL")],
         [("objective/kl", "KL to SFT")], xlabel="iteration"),
    collapse_plot("ppo"),
    Plot("ppo", "ppo-overopt", "PPO: gold vs proxy reward as KL grows", "objective/kl",
         [("objective/scores", "proxy (reward model)")], [("objective/gold", "gold (labelers)")], OVEROPT, KL),
    Plot("ppo", "ppo-heldout", "PPO held-out prompts: gold vs proxy as KL grows", "eval/kl",
         [("eval/scores", "proxy (reward model)")], [("eval/gold", "gold (labelers)")],
         "The same held-out prompts and sampling seed at every evaluation.", KL),
    Plot("ppo", "ppo-loss", "PPO losses", "step", [("loss/policy", "policy")], [("loss/value", "value")],
         xlabel="iteration"),
    Plot("dpo", "dpo-loss", "DPO loss", "step", [("loss", "train"), ("val_loss", "held-out")]),
    Plot("dpo", "dpo-accuracy", "DPO implicit-reward accuracy", "step",
         [("rewards/accuracies", "train"), ("val/rewards/accuracies", "held-out")], [("rewards/margins", "margin")]),
    Plot("grpo", "grpo-reward-kl", "GRPO: proxy reward and KL per iteration", "step",
         [("objective/scores", "proxy reward")], [("objective/kl", "KL to SFT")], xlabel="iteration"),
    collapse_plot("grpo"),
    Plot("grpo", "grpo-overopt", "GRPO: gold vs proxy reward as KL grows", "objective/kl",
         [("objective/scores", "proxy (reward model)")], [("objective/gold", "gold (labelers)")], OVEROPT, KL),
    Plot("grpo", "grpo-loss", "GRPO loss", "step", [("loss/policy", "policy")], xlabel="iteration"),
]

e = html.escape


def plots(stage):
    """The plots of a stage's directory: a round's reward model and PPO (round-n/reward, round-n/ppo)
    get their kind's plots, titled and named for the round."""
    kind = stage.rsplit("/", 1)[-1]
    if kind == stage:
        return [p for p in PLOTS if p.stage == stage]
    head = STAGE_NAMES.get(stage, stage).split(":")[0]
    return [p._replace(stage=stage, id=f"{stage.split('/')[0]}-{p.id}", title=f"{head}: {p.title}")
            for p in PLOTS if p.stage == kind]


ACTIVE = Plot("active", "active-selection", "Active selection: held-out reward accuracy by prompts ranked", "prompts",
              [("random", "random prompts"), ("uncertain", "prompts the reward heads disagree on most")],
              note="Mean over seeds of the reward model's pairwise accuracy on a fixed test set of rankings, as more "
                   "prompts are ranked and the model is retrained warm (bench/active.py).", xlabel="prompts ranked")


def active_section(active):
    """bench/active.py's curves (run/active.json: {"method/seed": [[prompts, accuracy], ...]}), averaged over seeds."""
    if not isinstance(active, dict) or not active:
        return ""
    by = {}
    for key, curve in active.items():
        method = str(key).split("/")[0]
        for point in curve if isinstance(curve, list) else []:
            if isinstance(point, list) and len(point) == 2 and number(point[0]) and number(point[1]):
                by.setdefault(point[0], {}).setdefault(method, []).append(point[1])
    rows = [{"prompts": n, **{m: sum(v) / len(v) for m, v in ms.items()}} for n, ms in sorted(by.items())]
    fig = svg(ACTIVE, rows)
    seeds = len({str(k).split("/", 1)[-1] for k in active})
    return section("active", "Which prompts to rank: random or uncertain", (
        f'<p class="lead">{seeds} seed(s), from the run\'s active.json.</p><div class="plots">{fig or ""}</div>'))


def rounds_section(rounds):
    """Per round of RLHF (summary.json's "rounds", from `shoggoth rounds`): its rankings, the reward
    model's accuracy on them before and after retraining, and PPO's held-out rewards after it."""
    rows = [r for r in rounds if isinstance(r, dict)] if isinstance(rounds, list) else []
    if not rows:
        return ""
    pct = lambda v: e(f"{100 * v:.0f}%") if number(v) else "—"  # noqa: E731
    body = "".join(f'<tr data-round="{e(fmt(r.get("round")))}"><td>{e(fmt(r.get("round")))}</td>'
                   f'<td class="num">{e(fmt(r.get("prompts")))}</td><td class="num">{e(fmt(r.get("rankings")))}</td>'
                   f'<td class="num before">{pct(r.get("reward_accuracy_before"))}</td>'
                   f'<td class="num after">{pct(r.get("reward_accuracy_after"))}</td>'
                   f'<td class="num">{e(fmt(r.get("eval_gold"), 3))}</td><td class="num">{e(fmt(r.get("eval_scores"), 3))}</td>'
                   f'<td class="num">{e(fmt(r.get("eval_kl"), 2))}</td><td class="num">{e(fmt(r.get("eval_distinct"), 2))}</td>'
                   "</tr>" for r in rows)
    return section("rounds", "Rounds of RLHF", (
        '<p class="lead">Each round ranks the current policy\'s answers to fresh prompts; the reward model is then '
        "retrained on every round so far, warm from the last one, and PPO goes on from the current policy with the "
        "KL leash to the SFT model. <b>Before</b>: the previous reward model's pairwise accuracy on the round's "
        "held-out rankings, how much of what the new policy writes it still judged as the labelers do; "
        "<b>after</b>: the retrained model's on the same rankings. Gold, proxy, KL and distinct answers: PPO's last "
        "held-out evaluation of the round (greedy answers for distinct).</p>"
        '<table id="rounds-table" class="kv"><thead><tr><th>Round</th><th>Prompts</th><th>Rankings</th>'
        "<th>Reward accuracy before</th><th>after</th><th>Gold</th><th>Proxy</th><th>KL</th><th>Distinct</th></tr>"
        f"</thead><tbody>{body}</tbody></table>"))


# ---------------------------------------------------------------- reading the run


def read_json(path, notes):
    """The JSON object in path, or {} with a note in `notes` saying why not."""
    if not path.exists():
        notes.append(f"no {path.name}")
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as err:
        notes.append(f"{path.name} is not valid JSON ({err})")
        return {}
    if not isinstance(obj, dict):
        notes.append(f"{path.name} does not hold a JSON object")
        return {}
    return obj


# ---------------------------------------------------------------- sections


def fmt(v, digits=None):
    """A value for a table: floats to `digits` decimals, else 4 significant digits; None as a dash."""
    if v is None:
        return "—"
    if number(v):
        return str(v) if isinstance(v, int) else f"{v:.{digits}f}" if digits is not None else f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def section(sid, title, body):
    return f'<section id="{sid}"><h2>{e(title)}</h2>{body}</section>'


def missing(text):
    return f'<p class="missing">{e(text)}</p>'


def headline_section(head):
    keys = [k for k in HEADLINE if k in head] + [k for k in head if k not in HEADLINE]
    cards = "".join(f'<div class="card"><div class="v">{e(fmt(head[k]))}</div><div class="k">{e(HEADLINE.get(k, k))}'
                    "</div></div>" for k in keys)
    return section("headline", "Headline numbers", f'<div class="cards">{cards}{targets(head)}</div>') if cards else ""


def target_verdicts(head):
    """[(target's text, "met" | "missed" | "not measured")] of a run's headline numbers."""
    out = []
    for key, op, bound, text in TARGETS:
        value, bound = (head.get(key[0]), head.get(key[1])) if isinstance(key, tuple) else (head.get(key), bound)
        if not (number(value) and number(bound)):
            out.append((text, "not measured"))
        else:
            out.append((text, "met" if (value >= bound if op == ">=" else value > bound) else "missed"))
    return out


def targets(head):
    """The answer-quality targets, each met, missed or not measured in this run."""
    rows = []
    for (key, _, bound, _), (text, verdict) in zip(TARGETS, target_verdicts(head)):
        value = head.get(key[0]) if isinstance(key, tuple) else head.get(key)
        rows.append(f'<tr class="{verdict.replace(" ", "-")}"><td>{e(text)}</td><td>{e(fmt(value, 3))}</td>'
                    f"<td>{e(verdict)}</td></tr>")
    return ('<table id="targets" class="kv"><thead><tr><th>Answer targets (held-out questions)</th><th>value</th>'
            f'<th></th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def winrate_section(w, head):
    """The blind win rates (summary.json's "winrate", as feedback.winrate.summary makes it) next to
    each model's gold and proxy reward: the report leads with them."""
    title = "Blind win rates: which answer the labelers preferred"
    if not isinstance(w, dict) or not isinstance(w.get("pairs"), list) or not isinstance(w.get("models"), list):
        return section("winrate", title, missing("No win rates in this run (it stopped before the blind comparison)."))
    from ..feedback import winrate

    lead = ""
    try:
        others = ["sft", "ppo-1", "dpo"] if "ppo-1" in w["models"] else ["sft", "dpo"]
        lead = f'<p class="lead-big" id="winrate-headline">{e(winrate.sentence(w, "ppo", others, MODELS))}.</p>'
    except (KeyError, TypeError):  # a run without those models
        pass
    name = lambda m: e(MODELS.get(m, str(m)))  # noqa: E731
    ci = lambda c: e(winrate.interval(c)) if isinstance(c, list) and len(c) == 2 else "—"  # noqa: E731
    rows = []
    for p in w["pairs"]:
        if not isinstance(p, dict):
            continue
        per = ", ".join(f"{e(str(k))} {e(winrate.pct(v.get('win_rate')))} ({e(str(v.get('n')))})"
                        for k, v in (p.get("per_labeler") or {}).items() if isinstance(v, dict))
        rows.append(f'<tr data-pair="{e(str(p.get("a")))}/{e(str(p.get("b")))}"><td>{name(p.get("a"))} over '
                    f'{name(p.get("b"))}</td><td class="num">{e(winrate.pct(p.get("win_rate")))}</td>'
                    f'<td class="num">{ci(p.get("ci"))}</td><td class="num">{e(winrate.pct(p.get("lc_win_rate")))}</td>'
                    f'<td class="num">{ci(p.get("lc_ci"))}</td><td class="num">{e(fmt(p.get("n")))}</td>'
                    f'<td class="per">{per}</td></tr>')
    lengths = w.get("mean_length") if isinstance(w.get("mean_length"), dict) else {}
    models = "".join(f'<tr data-model="{e(str(m))}"><td>{name(m)}</td><td class="num">{e(fmt(head.get(f"gold_{m}"), 3))}'
                     f'</td><td class="num">{e(fmt(head.get(f"proxy_{m}"), 3))}</td>'
                     f'<td class="num">{e(fmt(lengths.get(m), 0))}</td></tr>' for m in w["models"])
    ag = w.get("agreement") if isinstance(w.get("agreement"), dict) else {}
    return section("winrate", title, (
        f'{lead}<p class="lead">{e(fmt(w.get("judgements")))} blind rankings of every model\'s answer to '
        f'{e(fmt(w.get("prompts")))} held-out prompts by {e(str(len(w.get("labelers") or [])))} simulated labelers '
        f'(who agree at Kendall τ {e(fmt(ag.get("tau"), 2))}), through the feedback app as people rank. Win rate: how '
        "often the first model's answer was ranked above the second's, ties counting half, with a 95% bootstrap "
        "interval over prompts. Length-controlled: the same at equal answer length (AlpacaEval 2's logistic fit).</p>"
        '<div class="side"><table id="winrates" class="winrates"><thead><tr><th>Pair</th><th>Win rate</th><th>95% CI</th>'
        "<th>Length-controlled</th><th>95% CI</th><th>Rankings</th><th>Per labeler</th></tr></thead>"
        f'<tbody>{"".join(rows)}</tbody></table>'
        '<table id="rewards" class="rewards"><thead><tr><th>Model</th><th>Gold reward</th><th>Proxy reward</th>'
        f'<th>Answer length (chars)</th></tr></thead><tbody>{models}</tbody></table></div>'))


def answers_section(shown):
    """"The mask": the same held-out prompts answered by every model, side by side (answers.json)."""
    prompts = shown.get("prompts") if isinstance(shown.get("prompts"), list) else []
    prompts = [p for p in prompts if isinstance(p, dict)]
    title = "The mask: same prompts, every model"
    if not prompts:
        return section("answers-section", title, missing("No answers.json in this run (it stopped before the comparison)."))
    seen = {m for p in prompts if isinstance(p.get("answers"), dict) for m in p["answers"]}
    cols = [m for m in MODELS if m in seen] + sorted(seen - set(MODELS))
    head = "".join(f'<th data-model="{e(m)}">{e(MODELS.get(m, m))}</th>' for m in cols)
    body = []
    for p in prompts:
        answers = p.get("answers") if isinstance(p.get("answers"), dict) else {}
        golds = [a.get("gold") for a in answers.values() if isinstance(a, dict) and number(a.get("gold"))]
        refs = [r for r in p.get("references") or [] if isinstance(r, str)]
        refs = f'<div class="refs">references: {" | ".join(e(r) for r in refs[:3])}</div>' if refs else ""
        cells = [f'<td class="prompt">{e(str(p.get("prompt", "")))}{refs}</td>']
        for m in cols:
            a = answers.get(m)
            if not isinstance(a, dict):
                cells.append('<td class="answer empty">—</td>')
                continue
            best = len(golds) > 1 and number(a.get("gold")) and a["gold"] == max(golds)
            cells.append(f'<td class="answer{" best" if best else ""}" data-model="{e(m)}">'
                         f'<div class="text">{e(str(a.get("text", "")))}</div><div class="scores">'
                         f'proxy <b>{e(fmt(a.get("proxy"), 2))}</b> · gold <b>{e(fmt(a.get("gold"), 2))}</b>'
                         f'{" ★" if best else ""}</div></td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return section("answers-section", title, (
        '<p class="lead">Held-out prompts answered by each stage\'s model. <b>Proxy</b>: the learned reward model. '
        '<b>Gold</b>: the simulated labelers\' taste the reward model tries to learn. ★ best gold in the row.</p>'
        f'<table id="answers" class="answers"><thead><tr><th class="prompt">Prompt</th>{head}</tr></thead>'
        f'<tbody>{"".join(body)}</tbody></table>'))


def config_section(config, timings, estimate):
    parts = []
    timings = {k: v for k, v in timings.items() if number(v)} if isinstance(timings, dict) else {}
    estimate = {k: v for k, v in estimate.items() if number(v)} if isinstance(estimate, dict) else {}
    est = lambda k: duration(estimate[k]) if k in estimate else "—"  # noqa: E731
    if timings:
        top = max(timings.values()) or 1
        rows = "".join(f'<tr><td>{e(k)}</td><td class="num">{est(k)}</td><td class="num">{duration(v)}</td>'
                       f'<td class="barcell"><div class="bar" style="width:{100 * v / top:.1f}%"></div></td></tr>'
                       for k, v in timings.items())
        total = sum(v for k, v in timings.items() if k != "total")
        total_est = duration(sum(estimate.values())) if estimate else "—"
        parts.append('<table id="timings" class="timings"><thead><tr><th>Part of the run</th><th>Estimated</th>'
                     f'<th>Time</th><th></th></tr></thead><tbody>{rows}<tr class="total"><td>total</td>'
                     f'<td class="num">{total_est}</td><td class="num">{duration(total)}</td><td></td></tr></tbody></table>')
    if isinstance(config, dict) and config:
        for stage, fields in config.items():
            if not isinstance(fields, dict):
                continue
            rows = "".join(f"<tr><td>{e(str(k))}</td><td>{e(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
                           for k, v in fields.items())  # exact values: this is what reproduces the run
            parts.append(f'<details><summary>{e(STAGE_NAMES.get(stage, stage))} configuration ({len(fields)} fields)'
                         f'</summary><table class="kv">{rows}</table></details>')
    return section("config", "Configuration and timings", "".join(parts) or missing("Not recorded (no summary.json)."))


# ---------------------------------------------------------------- the page


def write(run_dir, out=None) -> Path:
    """Render RUN_DIR's metrics, answers and summary into one HTML file (default RUN_DIR/report.html); its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ShoggothError(f"{run}: no such run directory")
    notes = []
    summary = read_json(run / "summary.json", notes)
    shown = read_json(run / "answers.json", notes)
    stages = STAGES + [s for s in STAGE_NAMES if s not in STAGES and (run / s / "metrics.jsonl").exists()]
    sections, status = [], []
    for stage in stages:
        path = run / stage / "metrics.jsonl"
        if not path.exists():
            notes.append(f"no {stage}/metrics.jsonl")
            status.append(f'<span class="pill missing-pill">{stage}: missing</span>')
            sections.append(section(f"stage-{stage.replace('/', '-')}", STAGE_NAMES[stage], missing(
                f"Missing: {stage}/metrics.jsonl not found (the stage did not run, or the run stopped before it).")))
            continue
        bad = []
        rows = metrics.read(path, bad)  # a torn last line (a run killed mid-write) is not counted
        if bad:
            notes.append(f"{stage}/metrics.jsonl: skipped {len(bad)} unreadable line(s)")
        figs = [f for f in (svg(p, rows) for p in plots(stage)) if f]
        last = max((r["step"] for r in rows if number(r.get("step"))), default=0)
        status.append(f'<span class="pill">{stage}: {e(str(last))} steps</span>')
        body = f'<div class="plots">{"".join(figs)}</div>' if figs else missing("metrics.jsonl holds no plottable values.")
        sections.append(section(f"stage-{stage.replace('/', '-')}", STAGE_NAMES[stage], body))

    plan = summary.get("plan") if isinstance(summary.get("plan"), dict) else {}
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = [f"run <code>{e(str(run.resolve()))}</code>"]
    meta += [f"{k} {e(str(summary[k]))}" for k in ("started", "machine") if summary.get(k)]
    gaps = (f'<div class="missing" id="missing"><b>Missing or unreadable:</b> {e("; ".join(notes))}. The report '
            "shows what is there; re-run the same command to continue a stopped run.</div>") if notes else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Shoggoth report: {e(run.name)}</title><style>{CSS}</style></head>
<body><main>
<header><h1>Shoggoth run report</h1>
<p class="meta">{" · ".join(meta)} · generated {when}</p>
<p class="meta">pretrain → SFT → rounds of (rankings → reward model → PPO) (DPO for comparison)</p>
<div class="pills">{"".join(status)}</div>{gaps}</header>
{winrate_section(summary.get("winrate"), summary.get("headline") if isinstance(summary.get("headline"), dict) else {})}
{headline_section(summary.get("headline") if isinstance(summary.get("headline"), dict) else {})}
{rounds_section(summary.get("rounds"))}
{active_section(read_json(run / "active.json", []) if (run / "active.json").exists() else {})}
{answers_section(shown)}
{"".join(sections)}
{config_section(summary.get("config"), summary.get("timings"), plan.get("estimate"))}
</main></body></html>
"""
    dest = Path(out) if out else run / "report.html"
    if dest.is_dir():
        raise ShoggothError(f"--out {dest}: a directory; name the HTML file to write")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(page, encoding="utf-8")
    return dest


CSS = """
:root{--fg:#1e293b;--muted:#64748b;--line:#e2e8f0;--bg:#f8fafc;--accent:#2563eb}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:1320px;margin:0 auto;padding:28px 32px 72px}
h1{margin:0 0 4px;font-size:30px}
h2{font-size:20px;margin:40px 0 14px;padding-bottom:6px;border-bottom:1px solid var(--line)}
code{font-size:13px}
.meta,.lead{color:var(--muted);margin:2px 0}
.lead-big{font-size:20px;font-weight:650;margin:4px 0 8px}
.side{display:grid;grid-template-columns:2fr 1fr;gap:16px;margin-top:10px;align-items:start}
td.per{font-size:12px;color:var(--muted)}
.winrates td.num{white-space:nowrap}
.pills{margin:12px 0}
.pill{display:inline-block;padding:2px 10px;margin:0 6px 6px 0;border-radius:999px;font-size:13px;
  background:#dbeafe;color:#1e40af}
.missing-pill{background:#ffedd5;color:#9a3412}
.missing{background:#fff7ed;border:1px solid #fed7aa;color:#9a3412;border-radius:10px;padding:10px 14px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px}
.card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.card .v{font-size:24px;font-weight:650}
.card .k{color:var(--muted);font-size:13px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:16px}
figure{margin:0;background:#fff;border:1px solid var(--line);border-radius:10px;padding:12px 14px}
figcaption{font-weight:600}
.legend{font-size:13px;color:var(--muted);margin:2px 0 4px}
.legend span{margin-right:14px;white-space:nowrap}
.legend i{display:inline-block;width:16px;height:3px;vertical-align:middle;margin-right:5px;border-radius:2px}
.note{font-size:13px;color:var(--muted);margin:6px 0 0}
svg.plot{width:100%;height:auto;display:block;font-size:11px}
svg.plot text{fill:var(--muted)}
svg.plot text.axis{font-size:12px}
svg.plot .grid{stroke:#eef2f7}
svg.plot .frame{fill:none;stroke:#cbd5e1}
svg.plot .series{fill:none;stroke-width:2;stroke-linejoin:round}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid var(--line);padding:8px 10px;vertical-align:top;text-align:left}
th{background:#f1f5f9;font-weight:600}
table.answers{table-layout:fixed}
table.answers th.prompt{width:17%}
td.prompt{font-weight:600}
.refs{color:var(--muted);font-size:12px;font-weight:400;margin-top:6px}
td.answer .text{white-space:pre-wrap;overflow-wrap:anywhere;max-height:15em;overflow:auto;
  font:13px/1.45 ui-monospace,Menlo,Consolas,monospace}
td.answer.best{background:#f0fdf4}
td.empty{color:var(--muted);text-align:center}
.scores{margin-top:6px;font-size:12px;color:var(--muted)}
.scores b{color:var(--fg)}
.timings{width:auto;min-width:420px;margin-bottom:14px}
.num{text-align:right;font-variant-numeric:tabular-nums}
.barcell{width:200px}
.bar{height:8px;background:var(--accent);border-radius:4px}
tr.total td{font-weight:600}
details{margin:8px 0;background:#fff;border:1px solid var(--line);border-radius:10px;padding:8px 12px}
summary{cursor:pointer;font-weight:600}
.kv{margin-top:8px}
.kv td{padding:4px 8px;font-size:13px}
.kv td:first-child{font-family:ui-monospace,Menlo,Consolas,monospace;width:35%}
"""
