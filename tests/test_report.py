"""`shoggoth report`: a run directory (complete, or stopped early) rendered by the real command line,
opened in real headless Chromium: the plots and the mask table are there, untrusted model text
shows as text and never runs, nothing is fetched from outside the file."""

import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest

from common import shoggoth

PAYLOAD = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
PROMPTS = ["What is AI?", "Do you like music?", "Tell me a joke.", "What is your name?"]
MODELS = ["pretrained", "sft", "ppo", "dpo"]
PLOTS = {  # svg id -> title, for a complete run
    "plot-pretrain-loss": "Pretraining loss", "plot-pretrain-optim": "Pretraining gradient norm and learning rate",
    "plot-sft-loss": "SFT loss (response tokens)", "plot-sft-optim": "SFT gradient norm and learning rate",
    "plot-reward-loss": "Reward model ranking loss", "plot-reward-accuracy": "Reward model pairwise accuracy",
    "plot-ppo-reward-kl": "PPO: proxy reward and KL per iteration",
    "plot-ppo-overopt": "PPO: gold vs proxy reward as KL grows", "plot-ppo-heldout": "PPO held-out prompts: gold vs proxy as KL grows",
    "plot-ppo-loss": "PPO losses", "plot-dpo-loss": "DPO loss", "plot-dpo-accuracy": "DPO implicit-reward accuracy",
}


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def lm_metrics(rng, steps, start, end, every):
    """A language-model stage's lines: a decaying noisy loss, lr, grad norm, tok/s, mfu; val_loss every `every`."""
    rows = []
    for s in range(1, steps + 1):
        loss = end + (start - end) * math.exp(-4 * s / steps) + rng.gauss(0, 0.05)
        lr = 3e-4 * min(1, s / 10) * (0.55 + 0.45 * math.cos(math.pi * s / steps))  # warmup, then cosine
        rows.append({"step": s, "loss": loss, "lr": lr, "grad_norm": rng.uniform(0.3, 1.2), "tok/s": 40000.0, "mfu": 0.2})
        if s % every == 0:
            rows.append({"step": s, "val_loss": loss + 0.1})
    return rows


def fake_run(root, stages=("pretrain", "sft", "reward", "ppo", "dpo"), mask=True, summary=True):
    """A run directory shaped like `shoggoth demo`'s, with plausible metric values (the keys the stages log)."""
    rng = random.Random(0)
    if "pretrain" in stages:
        jsonl(root / "pretrain/metrics.jsonl", lm_metrics(rng, 300, 8.3, 3.6, 50))
    if "sft" in stages:
        jsonl(root / "sft/metrics.jsonl", [{"step": 0, "val_loss": 4.1}, *lm_metrics(rng, 120, 4.0, 2.3, 20)])
    if "reward" in stages:
        rows = [{"step": 0, "val_loss": 1.8, "val_accuracy": 0.5, "val_margin": 0.0, "val_tau": 0.0}]
        for s in range(1, 61):
            acc = 0.5 + 0.2 * (1 - math.exp(-s / 15)) + rng.gauss(0, 0.03)
            rows.append({"step": s, "loss": 1.8 - acc, "accuracy": acc, "margin": acc - 0.5, "lr": 1e-5, "grad_norm": 1.0, "tok/s": 9000.0})
            if s % 20 == 0:
                rows.append({"step": s, "val_loss": 1.9 - acc, "val_accuracy": acc - 0.03, "val_margin": 0.2, "val_tau": 2 * acc - 1.1})
        rows.append({"step": 60, "reward_shift": -0.42})
        jsonl(root / "reward/metrics.jsonl", rows)
    if "ppo" in stages:
        rows = [{"step": 0, "eval/scores": 0.0, "eval/gold": 0.45, "eval/kl": 0.0, "eval/eot_rate": 0.9, "eval/length": 20.0}]
        for it in range(1, 41):
            kl = 0.2 * it + rng.gauss(0, 0.1)
            score = 2.5 * (1 - math.exp(-kl / 3)) + rng.gauss(0, 0.1)
            gold = 0.45 + 0.06 * kl - 0.009 * kl ** 2 + rng.gauss(0, 0.01)  # rises, then falls: over-optimisation
            rows.append({"step": it, "objective/scores": score, "objective/kl": kl, "objective/non_score_reward": -0.05 * kl,
                         "objective/rlhf_reward": score - 0.05 * kl, "objective/gold": gold, "policy/approxkl": 0.01,
                         "policy/clipfrac": 0.1, "policy/entropy": 2.0, "loss/policy": rng.gauss(-0.01, 0.01),
                         "loss/value": 0.5 * math.exp(-it / 10), "eot_rate": 0.9, "response_length": 20.0, "beta": 0.05})
            if it % 10 == 0:
                rows.append({"step": it, "eval/scores": score, "eval/gold": gold, "eval/kl": kl, "eval/eot_rate": 0.9,
                             "eval/length": 20.0})
        jsonl(root / "ppo/metrics.jsonl", rows)
    if "dpo" in stages:
        rows = [{"step": 0, "val_loss": 0.693, "val/rewards/accuracies": 0.5, "val/rewards/margins": 0.0}]
        for s in range(1, 51):
            rows.append({"step": s, "loss": 0.693 - 0.2 * s / 50 + rng.gauss(0, 0.02), "rewards/chosen": 0.1,
                         "rewards/rejected": -0.1, "rewards/accuracies": 0.5 + 0.3 * s / 50 + rng.gauss(0, 0.05),
                         "rewards/margins": 0.01 * s + rng.gauss(0, 0.05), "logps/chosen": -40.0,
                         "logps/rejected": -42.0, "lr": 1e-6, "grad_norm": 1.0, "tok/s": 5000.0})
        jsonl(root / "dpo/metrics.jsonl", rows)
    if mask:
        prompts = []
        for i, q in enumerate(PROMPTS):
            answers = {m: {"text": f"{m} answer to {q!r}: " + "and it came to pass " * (j + 1), "proxy": j * 0.5 - 0.3 + i * 0.1,
                           "gold": 0.3 + 0.1 * j} for j, m in enumerate(MODELS)}
            prompts.append({"prompt": q, "references": [f"reference {i}"], "answers": answers})
        prompts[1]["answers"]["ppo"]["text"] = PAYLOAD
        (root / "mask.json").write_text(json.dumps({"prompts": prompts}))
    if summary:
        (root / "summary.json").write_text(json.dumps({
            "started": "2026-01-01T00:00:00+00:00", "machine": "x86_64, 2 CPUs",
            "config": {"pretrain": {"n_layer": 4, "lr": 3e-3, "corpus": [], "compile": False}, "ppo": {"iterations": 40, "init_kl_coef": 0.05}},
            "timings": {"pretrain": 312.4, "sft": 95.0, "feedback": 60.2, "reward": 41.0, "ppo": 400.0, "dpo": 80.0},
            "headline": {"sft_val_loss_base": 4.1, "sft_val_loss": 2.4, "reward_accuracy": 0.68, "labeler_agreement": 0.55,
                         "gold_sft": 0.45, "gold_ppo": 0.52, "kl_ppo": 7.9, "gold_dpo": 0.5, "proxy_ppo": 1.25,
                         "winrate_ppo_sft": 0.61, "winrate_ppo_dpo": 0.55,
                         "real_words_sft": 0.93, "real_words_ppo": 0.71, "distinct_ppo": 0.85},
            "plan": {"estimate": {"pretrain": 300.0, "sft": 100.0}},
            "winrate": winrates()}))
    return root


def winrates():
    """A `feedback.winrate.summary` of four models, as the demo stores it; a labeler's name is a payload."""
    from shoggoth.feedback import winrate

    rng = random.Random(1)
    rows = []
    for task in range(12):
        for lab in ("sim-0", PAYLOAD):
            order = sorted(MODELS, key=lambda m: rng.random() - 0.2 * MODELS.index(m))
            rows.append({"task_id": task, "labeler": lab, "ranks": [order.index(m) for m in MODELS], "models": MODELS,
                         "lengths": [rng.randint(10, 90) for _ in MODELS]})
    return winrate.summary(rows, MODELS, resamples=200)


@pytest.fixture
def page(chromium):
    ctx = chromium.new_context(viewport={"width": 1400, "height": 1000})
    ctx.set_default_timeout(10_000)
    page = ctx.new_page()
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    yield page
    ctx.close()


def test_full_run_report_in_chromium(tmp_path, page):
    run = fake_run(tmp_path / "run")
    r = shoggoth("report", run)
    out = run / "report.html"
    assert str(out) in r.stdout and out.exists()
    page.goto(out.resolve().as_uri())

    # Self-contained: the file itself is the only thing the browser loads; no script anywhere.
    assert page.requests == [out.resolve().as_uri()]
    assert page.locator("script").count() == 0
    assert page.locator("#missing").count() == 0

    # Every plot, with its title and a drawn curve of many points.
    for pid, title in PLOTS.items():
        svg = page.locator(f"svg#{pid}")
        assert svg.count() == 1, pid
        assert svg.locator("title").first.text_content() == title
        ds = svg.locator("path.series").evaluate_all("ps => ps.map(p => p.getAttribute('d'))")
        assert ds and max(d.count("L") for d in ds) >= 3, pid
        assert svg.bounding_box()["height"] > 150
    # Over-optimisation: proxy and gold, one marker per PPO iteration.
    over = page.locator("svg#plot-ppo-overopt")
    assert over.locator('path[data-key="objective/scores"]').count() == 1
    assert over.locator('path[data-key="objective/gold"]').count() == 1
    assert over.locator("circle").count() == 2 * 40

    # The mask: one row per prompt, a column per model, scores in each cell.
    table = page.locator("table#mask")
    assert table.locator("thead th[data-model]").all_text_contents() == ["Pretrained", "SFT", "PPO", "DPO"]
    rows = table.locator("tbody tr")
    assert rows.count() == len(PROMPTS)
    for i in range(len(PROMPTS)):
        assert rows.nth(i).locator("td.answer").count() == 4
        assert PROMPTS[i] in rows.nth(i).locator("td.prompt").text_content()
    assert "gold 0.60" in rows.first.locator('td[data-model="dpo"]').text_content()
    # Untrusted model text: shown as text, never run.
    assert rows.nth(1).locator('td[data-model="ppo"] .text').text_content() == PAYLOAD
    assert page.evaluate("window.__pwned") is None
    assert table.locator("img").count() == 0

    # The report leads with the blind win rates, next to the gold and proxy rewards.
    lead = page.locator("#winrate-headline").text_content()
    assert re.fullmatch(r"PPO preferred over SFT \d+% \[\d+%, \d+%\] of the time; over DPO \d+% \[\d+%, \d+%\]\.", lead)
    assert page.locator("section").first.get_attribute("id") == "winrate"
    assert page.locator("#winrates tbody tr").count() == 6
    assert "PPO over SFT" in page.locator('#winrates tr[data-pair="ppo/sft"]').text_content()
    assert page.locator('#rewards tr[data-model="ppo"]').locator("td").all_text_contents()[1:3] == ["0.520", "1.250"]
    assert PAYLOAD in page.locator("#winrates").text_content()  # a labeler's name, as text

    # Headline numbers, timings and config.
    assert "0.68" in page.locator("#headline").text_content()
    assert page.locator("#timings tbody tr").count() == 7  # six steps and the total
    assert page.locator("#timings tbody tr").first.text_content() == "pretrain5m00s5m12s"  # estimated, then actual
    verdicts = [r.locator("td").last.text_content() for r in page.locator("#targets tbody tr").all()]
    assert verdicts == ["met", "missed", "met", "met"]  # words SFT 0.93, PPO 0.71; distinct 0.85; gold 0.52 > 0.45
    assert "init_kl_coef" in page.locator("#config").text_content()

    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 100_000
    keep = Path(__file__).resolve().parents[1] / "runs" / "screenshots"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep / "report.png")  # to look at by eye; runs/ is not committed


def test_partial_run_says_what_is_missing(tmp_path, page):
    run = fake_run(tmp_path / "run", stages=("pretrain",), mask=False, summary=False)
    with open(run / "pretrain/metrics.jsonl", "a") as f:
        f.write('{"step": 301, "loss": 3.')  # a run killed mid-write leaves a torn line
    out = tmp_path / "elsewhere" / "r.html"
    shoggoth("report", run, "--out", out)
    page.goto(out.resolve().as_uri())
    assert page.locator("svg#plot-pretrain-loss path.series").count() == 2  # train and held-out
    assert page.locator("svg#plot-ppo-overopt").count() == 0
    note = page.locator("#missing").text_content()
    for what in ("sft/metrics.jsonl", "ppo/metrics.jsonl", "dpo/metrics.jsonl", "mask.json", "summary.json",
                 "skipped 1 unreadable line"):
        assert what in note
    assert "Missing" in page.locator("#stage-ppo .missing").text_content()
    assert page.locator("table#mask").count() == 0
    assert page.locator("#mask-section .missing").count() == 1
    assert page.locator("#winrate .missing").count() == 1
    page.screenshot(path=str(tmp_path / "partial.png"), full_page=True)
    assert (tmp_path / "partial.png").stat().st_size > 20_000


def test_missing_run_directory_is_one_line_error(tmp_path):
    r = shoggoth("report", tmp_path / "nope", check=False)
    assert r.returncode == 1 and "no such run directory" in r.stderr and "Traceback" not in r.stderr
