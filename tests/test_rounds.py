"""`shoggoth rounds`: rounds of online RLHF through the real command line, on SQLite and PostgreSQL,
resumed after a kill in each step; the ensemble's selection; the refusal of evaluation campaigns."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from common import shoggoth, tiny_model_dir
from shoggoth.lm import checkpoint
from shoggoth import rounds
from shoggoth.data.rankings import prompt_key, read_rankings
from shoggoth.train import metrics
from shoggoth.lm.model import RewardModel
from shoggoth.feedback import accounts, assignments, campaigns, jobs
from shoggoth.feedback.db import connect
from shoggoth.evaluation.scoring import load_scorer, score_texts

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
REWARD = "epochs = 1\nbatch_size = 4\nlr = 3e-4\nwarmup_steps = 1\nnormalize_samples = 4\neval_every = 50\nckpt_every = 2\n"
PPO = ("iterations = 2\nbatch_size = 4\nminibatch_size = 2\nppo_epochs = 1\nmax_new_tokens = 8\nlr = 5e-5\nbeta = 0.2\n"
       "eval_samples = 4\neval_every = 1\nckpt_every = 1\n")


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("sft"))


def args(tmp_path, sft, db, *more):
    (tmp_path / "reward.toml").write_text(REWARD)
    (tmp_path / "ppo.toml").write_text(PPO)
    return ["rounds", "--sft", sft, "--db", db, "--out", tmp_path / "run", "--prompts-per-round", 6, "--k", 3,
            "--rankings-per-task", 2, "--labelers", 2, "--max-new-tokens", 8, "--reward-config",
            tmp_path / "reward.toml", "--ppo-config", tmp_path / "ppo.toml", "--dtype", "fp32", *more]


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_simulated_rounds_end_to_end(tmp_path, sft, db_url, chromium):
    r = shoggoth(*args(tmp_path, sft, db_url, "--rounds", 2, "--simulate", "balanced"), env=ENV)
    run = tmp_path / "run"
    summary = json.loads((run / "rounds.json").read_text())["rounds"]
    assert [s["round"] for s in summary] == [1, 2]
    assert summary[0]["policy"] == str(sft) and summary[1]["policy"] == str(run / "round-1" / "ppo")
    assert summary[0]["reward_accuracy_before"] is None  # no reward model before round 1
    assert 0 <= summary[1]["reward_accuracy_before"] <= 1 and 0 <= summary[1]["reward_accuracy_after"] <= 1
    assert "round 2: reward accuracy on this round's held-out rankings: before" in r.stdout
    for n in (1, 2):  # a reward model near chance is said to have learnt nothing (a tiny random model often is)
        assert (f"round {n}: warning: the reward model is near chance" in r.stdout) == \
            (summary[n - 1]["reward_accuracy_after"] < rounds.CHANCE)
    # fresh prompts each round; the campaigns and what the admin page shows of them
    asked = [json.loads((run / f"round-{n}" / "asked.json").read_text())["prompts"] for n in (1, 2)]
    assert len(asked[0]) == len(asked[1]) == 6 and not set(asked[0]) & set(asked[1])
    engine = connect(db_url)
    for n in (1, 2):
        p = campaigns.round_progress(engine, f"round-{n}")
        assert p["complete"] == p["tasks"] == 6 and p["done"] == 12 and not p["evaluation"]
        assert p["settings"]["round"] == n and p["settings"]["reward_accuracy_after"] == summary[n - 1]["reward_accuracy_after"]
        assert set(p["labelers"]) == {"sim-balanced-0", "sim-balanced-1"}
    # round 2's reward model trains on round 1's rankings and its own training share; its held-out
    # prompts are round 2's, and none of them is trained on
    r1, train, held = (rows(run / "round-1" / "rankings.jsonl"), rows(run / "round-2" / "train.jsonl"),
                       rows(run / "round-2" / "eval.jsonl"))
    assert len(r1) == 12 and all(x in train for x in r1) and held
    assert {x["campaign"] for x in held} == {"round-2"}
    assert not {prompt_key(x) for x in held} & {prompt_key(x) for x in train}
    # warm from round 1's reward model: round 2's accuracy before is round 1's model's on round 2's held-out rankings
    assert summary[1]["reward_warm_start"] == str(run / "round-1" / "reward")
    scorer = load_scorer(run / "round-1" / "reward")
    right = pairs = 0
    for x in held:
        s = score_texts(scorer, x["prompt"], x["completions"], raw=True)
        for i, a in enumerate(x["ranks"]):
            for j, b in enumerate(x["ranks"]):
                pairs += a < b
                right += a < b and s[i] > s[j]
    assert summary[1]["reward_accuracy_before"] == pytest.approx(right / pairs, abs=1e-6)
    # PPO continues from the last round's policy with the leash on the SFT model: round 1 starts at
    # KL 0 (policy = reference), round 2 from where round 1 left it
    kl = [[m["objective/kl"] for m in metrics.read(run / f"round-{n}" / "ppo" / "metrics.jsonl") if "objective/kl" in m]
          for n in (1, 2)]
    assert abs(kl[0][0]) < 1e-6 and kl[1][0] > 1e-4
    # the admin page lists the rounds with their progress and the reward model's accuracy (real Chromium)
    from conftest import LiveServer
    from shoggoth.feedback.app import create_app

    srv = LiveServer(create_app(db_url, admin_token="admin-secret-token"))
    page = chromium.new_context().new_page()
    try:
        page.goto(srv.admin_url)
        table = page.locator("table#rounds tr[data-round]")
        assert table.count() == 2
        assert page.locator('tr[data-round="1"] td.before').text_content() == "–"
        after = page.locator('tr[data-round="2"] td.after').text_content()
        assert after == f"{100 * summary[1]['reward_accuracy_after']:.0f}%"
        assert "12 / 12" in page.locator('tr[data-round="2"]').text_content()
    finally:
        page.context.close()
        srv.stop()
    # a finished run re-run does nothing again
    again = shoggoth(*args(tmp_path, sft, db_url, "--rounds", 2, "--simulate", "balanced"), env=ENV)
    assert "sampling" not in again.stdout and json.loads((run / "rounds.json").read_text())["rounds"] == summary


def test_people_rank_while_it_waits_and_a_rerun_goes_on(tmp_path, sft):
    db = f"sqlite:///{tmp_path / 'f.db'}"
    r = shoggoth(*args(tmp_path, sft, db, "--rounds", 1, "--no-wait"), env=ENV)
    assert "0 / 12 rankings, 0 / 6 prompts complete (nobody yet); no rankings yet" in r.stdout
    assert "not complete; re-run this command to go on" in r.stdout
    assert not (tmp_path / "run" / "round-1" / "reward").exists()
    jobs.simulate(db, persona="concise", labelers=1, campaign="round-1", max_tasks=3)  # one person ranks 3 prompts
    r = shoggoth(*args(tmp_path, sft, db, "--rounds", 1, "--no-wait"), env=ENV)
    assert "3 / 12 rankings, 0 / 6 prompts complete (sim-concise-0 3); about" in r.stdout
    assert "sampling" not in r.stdout  # the campaign is not made twice
    jobs.simulate(db, persona="concise", labelers=2, campaign="round-1")
    r = shoggoth(*args(tmp_path, sft, db, "--rounds", 1, "--no-wait"), env=ENV)
    assert "round 1: done" in r.stdout


def test_progress_line_eta_from_the_pace_so_far():
    p = {"tasks": 10, "done": 5, "wanted": 20, "complete": 2, "labelers": {"ann": 3, "bo": 2}, "first": 1000.0}
    assert rounds.progress_line(p, now=1100.0) == ("5 / 20 rankings, 2 / 10 prompts complete (ann 3, bo 2); "
                                                   "about 5m00s left at the pace so far")


def kill_when(cmd, *texts):
    """Start the command line, SIGKILL it once its output has shown each of `texts`, in order; its output so far."""
    proc = subprocess.Popen([sys.executable, "-m", "shoggoth", *map(str, cmd)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    seen, wanted = [], list(texts)
    for line in proc.stdout:
        seen.append(line)
        if wanted[0] in line:
            wanted.pop(0)
            if not wanted:
                os.killpg(proc.pid, signal.SIGKILL)
                break
    proc.wait()
    assert not wanted, "".join(seen)
    return "".join(seen)


# round 2, once its campaign is open (before the rankings), in the reward stage, in PPO
KILLS = {"ranking": ["campaign 'round-2' open"], "reward": ["round 2: training the reward model", "step 1/"],
         "ppo": ["round 2: reward accuracy", "step 1/"]}


@pytest.mark.slow
@pytest.mark.parametrize("step", KILLS)
def test_killed_in_any_step_resumes(tmp_path, sft, step):
    """SIGKILL in round 2 after its campaign opened, in the reward stage, in PPO: the same command
    again finishes both rounds, with no campaign made twice and every ranking kept once."""
    db = f"sqlite:///{tmp_path / 'f.db'}"
    cmd = args(tmp_path, sft, db, "--rounds", 2, "--simulate", "balanced")
    kill_when(cmd, *KILLS[step])
    r = shoggoth(*cmd, env=ENV)
    assert "sampling" not in r.stdout  # no round asks twice
    summary = json.loads((tmp_path / "run" / "rounds.json").read_text())["rounds"]
    assert [s["round"] for s in summary] == [1, 2]
    engine = connect(db)
    for n in (1, 2):
        p = campaigns.round_progress(engine, f"round-{n}")
        assert p["tasks"] == 6 and p["done"] == 12


def test_killed_between_campaign_and_its_record(tmp_path, sft):
    """The campaign is in the database but asked.json was never written: the re-run takes the
    round's record from the database instead of opening the campaign again."""
    db = f"sqlite:///{tmp_path / 'f.db'}"
    cmd = args(tmp_path, sft, db, "--rounds", 1, "--simulate", "balanced")
    shoggoth(*cmd, env=ENV)
    asked = json.loads((tmp_path / "run" / "round-1" / "asked.json").read_text())
    for f in ("asked.json", "rankings.jsonl", "train.jsonl"):
        (tmp_path / "run" / "round-1" / f).unlink()
    r = shoggoth(*cmd, env=ENV)
    assert "sampling" not in r.stdout
    assert json.loads((tmp_path / "run" / "round-1" / "asked.json").read_text()) == asked
    # another run's rounds in the same database are not taken for this one's
    other = args(tmp_path, sft, db, "--rounds", 1, "--simulate", "balanced")
    other[other.index("--out") + 1] = tmp_path / "other"
    r = shoggoth(*other, check=False, env=ENV)
    assert r.returncode == 1 and "belongs to another run" in r.stderr


def test_evaluation_campaigns_never_feed_training(tmp_path, sft):
    db = f"sqlite:///{tmp_path / 'f.db'}"
    engine = connect(db)
    jobs.add_comparison(engine, "round-1", [{"prompt": "hi", "references": []}], {"a": ["x"], "b": ["y"]}, {})
    r = shoggoth(*args(tmp_path, sft, db, "--rounds", 1, "--simulate", "balanced"), check=False, env=ENV)
    assert r.returncode == 1 and "'round-1' is an evaluation campaign" in r.stderr and "Traceback" not in r.stderr
    evals = tmp_path / "evals.jsonl"
    evals.write_text(json.dumps({"prompt": "hi", "completions": ["x", "y"], "ranks": [0, 1], "models": ["a", "b"]})
                     + "\n")
    r = shoggoth(*args(tmp_path, sft, f"sqlite:///{tmp_path / 'g.db'}", "--rankings", evals), check=False, env=ENV)
    assert r.returncode == 1 and f"{evals}:1: a ranking of an evaluation campaign" in r.stderr


def test_bad_flags_are_one_line_errors(tmp_path, sft):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "hi", "completions": ["a", "b"], "ranks": [0, 1]})
                                        + "\n{not json\n")
    for extra, msg in ((["--select", "loud"], "--select must be random or uncertain"),
                       (["--simulate", "nobody"], "nobody"), (["--rounds", "0"], "--rounds must be at least 1"),
                       (["--k", "40"], "--k must be between 2 and 16"), (["--heads", "1"], "--heads must be at least 2"),
                       (["--rankings", tmp_path / "bad.jsonl"], "bad.jsonl:2")):
        r = shoggoth(*args(tmp_path, sft, f"sqlite:///{tmp_path / 'f.db'}", *extra), check=False, env=ENV)
        assert r.returncode in (1, 2) and msg in r.stderr and "Traceback" not in r.stderr
    r = shoggoth("rounds", "--db", tmp_path / "f.db", check=False)
    assert r.returncode == 1 and "--sft DIR" in r.stderr


def test_the_ensemble_disagrees_where_the_rankings_do(tmp_path, sft):
    """Reward heads fitted on bootstrap resamples of rankings agree on a pair every labeler ranked the
    same way and disagree on a pair the labelers split on; the selection keeps the split one."""
    torch.manual_seed(0)
    rm = RewardModel(checkpoint.gpt_config(checkpoint.read_config(sft)))
    checkpoint.load_trunk(rm, sft)
    reward_dir = tmp_path / "rm"
    checkpoint.save_reward(rm, reward_dir, 0.0, tokenizer_dir=sft)
    agreed = ("And God said, Let there be light.", ["And there was light.", "the the the of of"])
    split = ("Who begat Enos?", ["Seth begat Enos.", "Enos begat Seth."])
    recs = [{"prompt": agreed[0], "completions": agreed[1], "ranks": [0, 1]} for _ in range(10)]
    recs += [{"prompt": split[0], "completions": split[1], "ranks": [i % 2, 1 - i % 2]} for i in range(10)]
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    model, tok, W = rounds.fit_heads(reward_dir, read_rankings(path, log=lambda *_: None), heads=8, seed=0)
    assert W.shape[0] == 8 and not torch.allclose(W[0], W[1])  # the resamples set the heads apart
    msgs = lambda p: [{"role": "user", "content": p}]  # noqa: E731
    d_agreed, d_split = rounds.disagreement(model, tok, W, [{"messages": msgs(agreed[0])}, {"messages": msgs(split[0])}],
                                            [agreed[1], split[1]])
    assert d_split > 3 * d_agreed


@pytest.mark.slow
def test_uncertain_selection_runs_a_round(tmp_path, sft):
    """--select uncertain from round 2 on (round 1 has no reward model of its own yet): it samples a
    pool of candidates and keeps those the heads disagree on most."""
    db = f"sqlite:///{tmp_path / 'f.db'}"
    r = shoggoth(*args(tmp_path, sft, db, "--rounds", 2, "--simulate", "balanced", "--select", "uncertain", "--pool",
                       3, "--iterations", 1), env=ENV)
    assert "round 1: no reward model or rankings yet to measure disagreement with: a random slice" in r.stdout
    assert "round 2: sampling 3 completions for each of 18 prompts" in r.stdout
    assert "round 2: kept the 6 of 18 prompts the 8 reward heads disagree on most" in r.stdout
    asked = json.loads((tmp_path / "run" / "round-2" / "asked.json").read_text())
    assert asked["select"] == "uncertain" and len(asked["disagreement"]) == 6
    assert campaigns.round_progress(connect(db), "round-2")["settings"]["select"] == "uncertain"


@pytest.mark.slow
def test_rounds_with_lora_on_a_qwen_checkpoint(tmp_path):
    """Rounds on a Hugging Face checkpoint (Qwen2.5's tokenizer and chat template, tiny random
    weights), reward model and PPO with LoRA adapters: round 2's PPO starts from round 1's merged
    policy, its KL reference is the checkpoint itself, and transformers loads every output."""
    import hf_families
    import transformers

    model = hf_families.build("qwen2.5", tmp_path / "qwen")
    (tmp_path / "reward.toml").write_text(REWARD + "lora_r = 4\n")
    (tmp_path / "ppo.toml").write_text(PPO + "lora_r = 4\n")
    cmd = ["rounds", "--sft", model, "--db", f"sqlite:///{tmp_path / 'f.db'}", "--out", tmp_path / "run",
           "--prompts-per-round", 6, "--k", 3, "--rankings-per-task", 2, "--labelers", 2, "--max-new-tokens", 8,
           "--reward-config", tmp_path / "reward.toml", "--ppo-config", tmp_path / "ppo.toml", "--dtype", "fp32",
           "--rounds", 2, "--simulate", "balanced"]
    r = shoggoth(*cmd, env=ENV)
    assert f"KL reference {model}" in r.stdout and "LoRA" in r.stdout
    for n in (1, 2):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / f"round-{n}" / "ppo")
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / f"round-{n}" / "reward")
        for f in ("tokenizer.json", "tokenizer_config.json"):  # Qwen's chat template sits in tokenizer_config.json
            assert (tmp_path / "run" / f"round-{n}" / "ppo" / f).read_bytes() == (model / f).read_bytes()
    kl = [m["objective/kl"] for m in metrics.read(tmp_path / "run" / "round-2" / "ppo" / "metrics.jsonl")
          if "objective/kl" in m]
    assert kl[0] > 1e-4  # round 2's policy (round 1's, adapters merged) starts away from the reference


@pytest.mark.slow
def test_rounds_with_online_dpo(tmp_path, sft):
    """--rl dpo: each round's DPO starts from the last round's policy, on every round's rankings so
    far, with the SFT model as its frozen reference; the next round samples the DPO policy."""
    (tmp_path / "dpo.toml").write_text("max_steps = 2\nbatch_size = 4\nlr = 1e-4\neval_every = 1\nckpt_every = 1\n")
    shoggoth(*args(tmp_path, sft, f"sqlite:///{tmp_path / 'f.db'}", "--rounds", 2, "--simulate", "balanced",
                   "--rl", "dpo", "--dpo-config", tmp_path / "dpo.toml"), env=ENV)
    run = tmp_path / "run"
    cfg = [json.loads((run / f"round-{n}" / "ppo" / "run_config.json").read_text()) for n in (1, 2)]
    assert [c["policy"] for c in cfg] == [str(sft), str(run / "round-1" / "ppo")]
    assert all(c["ref"] == str(sft) and c["rankings"] == str(run / f"round-{n}" / "train.jsonl")
               for n, c in zip((1, 2), cfg))
    assert json.loads((run / "rounds.json").read_text())["rounds"][1]["policy"] == str(run / "round-1" / "ppo")
    # at step 0 round 1's policy is its reference (implicit reward margin 0); round 2's is away from it
    m0 = [next(m["val/rewards/margins"] for m in metrics.read(run / f"round-{n}" / "ppo" / "metrics.jsonl")
               if "val/rewards/margins" in m) for n in (1, 2)]
    assert abs(m0[0]) < 1e-6 and abs(m0[1]) > 1e-4, m0


def test_rounds_with_grpo(tmp_path, sft):
    """--rl grpo: GRPO instead of PPO in each round, from the last round's policy, the leash on the SFT model.
    The rounds' --grad-ckpt and --report-to reach every round's reward and RL stage."""
    (tmp_path / "grpo.toml").write_text("iterations = 2\nbatch_size = 2\ngroup_size = 2\nminibatch_size = 4\n"
                                        "max_new_tokens = 8\neval_samples = 4\neval_every = 1\nckpt_every = 1\n")
    r = shoggoth(*args(tmp_path, sft, f"sqlite:///{tmp_path / 'f.db'}", "--rounds", 2, "--simulate", "balanced",
                       "--rl", "grpo", "--grpo-config", tmp_path / "grpo.toml", "--grad-ckpt", "on",
                       "--report-to", "tensorboard"), env=ENV)
    assert "grpo:" in r.stdout and "ppo: policy" not in r.stdout
    for n in (1, 2):
        for stage in ("reward", "ppo"):
            d = tmp_path / "run" / f"round-{n}" / stage
            cfg = json.loads((d / "run_config.json").read_text())
            assert (cfg["grad_ckpt"], cfg["report_to"]) == ("on", ["tensorboard"]), d
            assert list((d / "tb").glob("events.out.tfevents.*")), d
    kl = [[m["objective/kl"] for m in metrics.read(tmp_path / "run" / f"round-{n}" / "ppo" / "metrics.jsonl")
           if "objective/kl" in m] for n in (1, 2)]
    assert abs(kl[0][0]) < 1e-6 and abs(kl[1][0]) > 1e-4  # (GRPO logs the sampled log-ratio's mean: either sign)
    bad = shoggoth(*args(tmp_path, sft, f"sqlite:///{tmp_path / 'g.db'}", "--rl", "a2c"), check=False, env=ENV)
    assert bad.returncode == 1 and "--rl must be ppo, grpo or dpo" in bad.stderr


def test_a_rounds_export_leaves_out_labelers_below_min_agreement(tmp_path, capsys):
    """--min-agreement: a round's rankings by a labeler who ranks against the others stay out of its
    training data (rankings.jsonl), as `feedback export --min-agreement` leaves them out."""
    db = str(tmp_path / "f.db")
    engine = connect(db)
    campaigns.add_tasks(engine, "round-1", [{"prompt": f"q{i}", "completions": [f"a{i}", f"b{i}", f"c{i}"]} for i in range(6)],
                rankings_per_task=3)
    for name in ("ann", "ben", "cy"):
        lid = accounts.labeler_id(engine, name)
        while (t := assignments.next_task(engine, lid)) is not None:
            order = sorted(t["completions"], key=lambda x: x["text"], reverse=name == "cy")
            assignments.submit(engine, lid, t["task_id"], [[x["id"]] for x in order])
    for floor, who in ((-1.0, {"ann", "ben", "cy"}), (0.3, {"ann", "ben"})):
        c = rounds.Config(db=db, out=str(tmp_path / str(floor)), min_agreement=floor, eval_frac=0.0)
        (tmp_path / str(floor) / "round-1").mkdir(parents=True)
        rounds.export(c, 1, engine)
        got = [json.loads(x) for x in (tmp_path / str(floor) / "round-1" / "rankings.jsonl").read_text().splitlines()]
        assert {r["labeler"] for r in got} == who and len(got) == 6 * len(who)
    assert "leaving out 6 rankings of 1 labeler(s) below it" in capsys.readouterr().out
