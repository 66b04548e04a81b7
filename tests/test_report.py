"""`shoggoth report`: a real run directory (`shoggoth demo --quick`, run once for this module; then
cut short) rendered by the real command line, opened in real headless Chromium: every plot draws
every metric it names from the stages' real metrics.jsonl (a renamed metric fails here), the
headline and the answers table ("the mask") are there, untrusted model text shows as text and never runs,
nothing is fetched from outside the file."""

import json
import re
import shutil
from pathlib import Path

import pytest

from common import shoggoth
from shoggoth.train import metrics
from shoggoth.evaluation import report
from shoggoth.train.metrics import duration

PAYLOAD = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A complete run of every stage at toy scale (about a minute on 2 cores)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    shoggoth("demo", "--quick", "--out", out)
    return out


def copy_run(src, dest, stages=report.STAGES, answers=True, summary=True):
    """What `shoggoth report` reads from a run (metrics, answers, summary), without the models."""
    for stage in stages:
        (dest / stage).mkdir(parents=True)
        shutil.copy(src / stage / "metrics.jsonl", dest / stage / "metrics.jsonl")
    for name, keep in (("answers.json", answers), ("summary.json", summary)):
        if keep:
            shutil.copy(src / name, dest / name)
    return dest


def metric_rows(run, stage):
    return metrics.read(run / stage / "metrics.jsonl")


@pytest.fixture
def page(chromium):
    ctx = chromium.new_context(viewport={"width": 1400, "height": 1000})
    ctx.set_default_timeout(10_000)
    page = ctx.new_page()
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    yield page
    ctx.close()


@pytest.mark.slow
def test_full_run_report_in_chromium(demo_run, tmp_path, page):
    run = copy_run(demo_run, tmp_path / "run")
    # Untrusted text where a run holds it: a model's answer and a labeler's name.
    shown = json.loads((run / "answers.json").read_text())
    shown["prompts"][1]["answers"]["ppo"]["text"] = PAYLOAD
    (run / "answers.json").write_text(json.dumps(shown))
    summary = json.loads((run / "summary.json").read_text())
    labeler = summary["winrate"]["labelers"][1]
    for pair in summary["winrate"]["pairs"]:
        pair["per_labeler"][PAYLOAD] = pair["per_labeler"].pop(labeler)
    (run / "summary.json").write_text(json.dumps(summary))
    head = summary["headline"]

    r = shoggoth("report", run)
    out = run / "report.html"
    assert str(out) in r.stdout and out.exists()
    page.goto(out.resolve().as_uri())

    # Self-contained: the file itself is the only thing the browser loads; no script anywhere.
    assert page.requests == [out.resolve().as_uri()]
    assert page.locator("script").count() == 0
    assert page.locator("#missing").count() == 0

    # Every plot of every stage that ran, with its title and a drawn curve for every metric it
    # names: the stages' metric names and the report's agree.
    plots = [p for stage in report.STAGES for p in report.plots(stage)]
    assert {p.stage for p in plots} == set(report.STAGES) and len({p.id for p in plots}) == len(plots)
    for p in plots:
        svg = page.locator(f"svg#plot-{p.id}")
        assert svg.count() == 1, p.id
        assert svg.locator("title").first.text_content() == p.title
        for key, _ in p.left + p.right:
            series = svg.locator(f'path.series[data-key="{key}"]')
            assert series.count() == 1, f"{p.id}: no {key!r} in the run's {p.stage}/metrics.jsonl"
            assert series.get_attribute("d").startswith("M"), (p.id, key)
        assert svg.bounding_box()["height"] > 150
    assert page.get_by_text("Not logged").count() == 0
    # Over-optimisation: proxy and gold, one marker per PPO iteration.
    iterations = [r for r in metric_rows(run, "round-2/ppo") if "objective/kl" in r]
    assert iterations and all("objective/scores" in r and "objective/gold" in r for r in iterations)
    assert page.locator("svg#plot-round-2-ppo-overopt circle").count() == 2 * len(iterations)
    # the rounds: one row each, the reward model's accuracy before (none in round 1) and after
    rounds = page.locator("#rounds-table tbody tr")
    assert rounds.count() == 2 and rounds.first.locator("td.before").text_content() == "—"
    assert rounds.nth(1).locator("td.before").text_content().endswith("%")

    # The mask: one row per prompt, a column per model, scores in each cell.
    table = page.locator("table#answers")
    assert table.locator("thead th[data-model]").all_text_contents() == ["Pretrained", "SFT", "PPO, round 1", "PPO", "DPO"]
    rows = table.locator("tbody tr")
    assert rows.count() == len(shown["prompts"])
    for i, prompt in enumerate(shown["prompts"]):
        assert rows.nth(i).locator("td.answer").count() == 5
        assert prompt["prompt"] in rows.nth(i).locator("td.prompt").text_content()
    gold = shown["prompts"][0]["answers"]["dpo"]["gold"]
    assert f"gold {gold:.2f}" in rows.first.locator('td[data-model="dpo"]').text_content()
    # Untrusted model text: shown as text, never run.
    assert rows.nth(1).locator('td[data-model="ppo"] .text').text_content() == PAYLOAD
    assert page.evaluate("window.__pwned") is None
    assert table.locator("img").count() == 0

    # The report leads with the blind win rates, next to the gold and proxy rewards.
    lead = page.locator("#winrate-headline").text_content()
    assert re.fullmatch(r"PPO preferred over SFT \d+% \[\d+%, \d+%\] of the time; over PPO, round 1 \d+% \[\d+%, \d+%\]; "
                        r"over DPO \d+% \[\d+%, \d+%\]\.", lead)
    assert page.locator("section").first.get_attribute("id") == "winrate"
    assert page.locator("#winrates tbody tr").count() == len(summary["winrate"]["pairs"]) == 10
    assert "PPO over SFT" in page.locator('#winrates tr[data-pair="ppo/sft"]').text_content()
    assert page.locator('#rewards tr[data-model="ppo"]').locator("td").all_text_contents()[1:3] == [
        f"{head['gold_ppo']:.3f}", f"{head['proxy_ppo']:.3f}"]
    assert PAYLOAD in page.locator("#winrates").text_content()  # a labeler's name, as text

    # Headline numbers: every one the demo reports has its label (a renamed one would not),
    # and every answer target is measured.
    assert set(head) == set(report.HEADLINE)
    cards = page.locator("#headline .card .k").all_text_contents()
    assert sorted(cards) == sorted(report.HEADLINE[k] for k in head)
    verdicts = [r.locator("td").last.text_content() for r in page.locator("#targets tbody tr").all()]
    assert len(verdicts) == len(report.TARGETS) and set(verdicts) <= {"met", "missed"}

    # Timings (estimated, then actual) and each stage's configuration.
    timings, estimate = summary["timings"], summary["plan"]["estimate"]
    assert page.locator("#timings tbody tr").count() == len(timings) + 1  # and the total
    assert page.locator("#timings tbody tr").first.text_content() == (
        f"pretrain{duration(estimate['pretrain'])}{duration(timings['pretrain'])}")
    for stage, fields in summary["config"].items():
        want = f"{report.STAGE_NAMES[stage]} configuration ({len(fields)} fields)"
        assert page.locator("#config summary").filter(has_text=want).count() == 1, stage

    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    keep = Path(__file__).resolve().parents[1] / "runs" / "screenshots"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep / "report.png")  # to look at by eye; runs/ is not committed


@pytest.mark.slow
def test_partial_run_says_what_is_missing(demo_run, tmp_path, page):
    run = copy_run(demo_run, tmp_path / "run", stages=("pretrain",), answers=False, summary=False)
    with open(run / "pretrain/metrics.jsonl", "a") as f:
        f.write('{"step": 31, "loss": 3.')  # a run killed mid-write leaves a torn line
    out = tmp_path / "elsewhere" / "r.html"
    shoggoth("report", run, "--out", out)
    page.goto(out.resolve().as_uri())
    assert page.locator("svg#plot-pretrain-loss path.series").count() == 2  # train and held-out
    assert page.locator("svg#plot-round-2-ppo-overopt").count() == 0
    note = page.locator("#missing").text_content()
    for what in ("sft/metrics.jsonl", "round-1/reward/metrics.jsonl", "round-2/ppo/metrics.jsonl", "dpo/metrics.jsonl",
                 "answers.json", "summary.json"):
        assert what in note
    assert "unreadable line" not in note  # the torn last line a killed run leaves is no fault of the file
    assert "Missing" in page.locator("#stage-round-2-ppo .missing").text_content()
    assert page.locator("table#answers").count() == 0
    assert page.locator("#answers-section .missing").count() == 1
    assert page.locator("#winrate .missing").count() == 1
    page.screenshot(path=str(tmp_path / "partial.png"), full_page=True)
    assert (tmp_path / "partial.png").stat().st_size > 20_000


def test_torn_and_malformed_metrics_lines(tmp_path, capsys):
    """metrics.read, which every reader of metrics.jsonl uses: a torn last line (a run killed mid-write)
    is dropped without a word; a malformed line elsewhere (here one that an old resume glued onto a
    torn line) is skipped and said, in the report's note."""
    path = tmp_path / "run" / "pretrain" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    rows = [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 7)]
    lines = [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + '\n{"step": 7, "loss": 4.2')
    skipped = []
    assert metrics.read(path, skipped) == rows and skipped == []
    out = tmp_path / "r.html"
    shoggoth("report", path.parent.parent, "--out", out)
    page = out.read_text()
    assert 'id="plot-pretrain-loss"' in page and "pretrain: 6 steps" in page and "unreadable line" not in page

    lines[2] = '{"step": 3, "loss": 4.2{"step": 3, "loss": 4.7}'
    path.write_text("\n".join(lines + ["[3]", json.dumps(rows[-1])]))  # the last line whole, without its newline
    assert metrics.read(path, skipped) == rows[:2] + rows[3:] + rows[-1:] and skipped == [3, 7]
    shoggoth("report", path.parent.parent, "--out", out)
    assert "pretrain/metrics.jsonl: skipped 2 unreadable line(s)" in out.read_text()
    # A resumed run rewrites the file without them, says so, and writes on from a fresh line.
    m = metrics.Metrics(path.parent, 10, resume_step=5)
    m.log(6, echo=False, loss=1.0)
    m.close()
    assert f"{path}: warning: dropped 2 unreadable line(s): line 3, 7" in capsys.readouterr().out
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:2] + rows[3:5] + [{"step": 6, "loss": 1.0}])


def test_missing_run_directory_is_one_line_error(tmp_path):
    r = shoggoth("report", tmp_path / "nope", check=False)
    assert r.returncode == 1 and "no such run directory" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_active_selection_curves(demo_run, tmp_path, page):
    """bench/active.py's curves (RUN/active.json), averaged over seeds: one line per method."""
    run = copy_run(demo_run, tmp_path / "run")
    (run / "active.json").write_text(json.dumps({"random/0": [[100, 0.70], [200, 0.72]], "random/1": [[100, 0.68], [200, 0.74]],
                                                 "uncertain/0": [[100, 0.70], [200, 0.71]]}))
    shoggoth("report", run)
    page.goto((run / "report.html").resolve().as_uri())
    plot = page.locator("svg#plot-active-selection")
    assert plot.locator("path.series").count() == 2
    assert "2 seed(s)" in page.locator("#active").text_content()
