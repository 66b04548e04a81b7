"""`shoggoth demo`, the README's main job, end to end at toy scale (--quick): every stage
runs, the headline is printed, the report is written, and a run killed midway continues
where it stopped when the same command runs again."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from common import shoggoth
from shoggoth.feedback import campaigns, queries
from shoggoth.feedback.db import connect


@pytest.mark.slow
def test_quick_demo_is_killed_then_finishes_where_it_stopped(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "shoggoth", "demo", "--quick", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "round 2: sampling" in line:  # pretrain, sft and round 1 are done
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert (out / "round-1" / "rankings.jsonl").exists() and (out / "round-1" / "ppo" / "model.safetensors").exists()
    assert not (out / "report.html").exists()

    r = shoggoth("demo", "--quick", "--out", out)
    for stage in ("pretrain", "sft", "round-1"):
        assert f"{stage}: done earlier" in r.stdout  # not run again
    for stage in ("round-2", "dpo"):
        assert f"{stage}: finished" in r.stdout
    assert "round 1: sampling" not in r.stdout
    engine = connect(out / "feedback" / "feedback.db")  # killed while sampling: round 2's campaign opened once
    assert [campaigns.round_progress(engine, f"round-{n}")["tasks"] for n in (1, 2)] == [20, 20]
    assert "=== What each layer did" in r.stdout and "reward model: held-out pairwise accuracy" in r.stdout
    # The headline leads with the blind win rates (12 held-out prompts at --quick, 3 labelers each).
    lead = r.stdout.split("=== What each layer did (held-out data, default seed) ===\n")[1].splitlines()[0]
    assert re.fullmatch(r"blind win rate: PPO preferred over SFT \d+% \[\d+%, \d+%\] of the time; over PPO, round 1 "
                        r"\d+% \[\d+%, \d+%\]; over DPO \d+% \[\d+%, \d+%\] \(length-controlled \d+% and \d+%; 36 "
                        r"rankings of 5 models' answers to 12 held-out prompts by simulated labelers\)", lead), lead
    assert re.search(r"PPO - SFT [+-]\d\.\d{3}, (the same sign as|against) the win rate", r.stdout)
    summary = json.loads((out / "summary.json").read_text())
    h = summary["headline"]
    for key in ("pretrain_val_loss", "sft_val_loss", "sft_val_loss_base", "reward_accuracy", "gold_sft", "gold_ppo",
                "gold_dpo", "proxy_ppo", "kl_ppo", "labeler_agreement", "gold_pretrained", "winrate_ppo_sft",
                "winrate_ppo_dpo", "reward_accuracy_before", "proxy_ppo-1", "prefer_ppo-1", "prefer_ppo-1_round-1",
                "winrate_ppo_ppo-1"):
        assert isinstance(h[key], float), key
    assert 0 <= h["reward_accuracy"] <= 1 and h["sft_val_loss"] < h["sft_val_loss_base"]
    assert set(summary["timings"]) >= {"pretrain", "sft", "round-1", "round-2", "dpo", "answers", "winrate"}
    # two rounds: fresh prompts each, round 2's reward model measured on its rankings before and after
    assert [x["round"] for x in summary["rounds"]] == [1, 2] and all(x["prompts"] == 20 for x in summary["rounds"])
    assert summary["rounds"][0]["reward_accuracy_before"] is None and 0 <= h["reward_accuracy_before"] <= 1
    assert "round 2     : 20 prompts, 60 rankings; reward accuracy on the round's held-out rankings" in r.stdout
    assert re.search(r"exploits    : round 2's reward model scores round 1's answer above SFT's \d+% of the time, "
                     r"round 1's did \d+% \((less: |not less: no )exploit caught\)", r.stdout)
    w = summary["winrate"]
    assert w["models"] == ["pretrained", "sft", "ppo-1", "ppo", "dpo"] and len(w["pairs"]) == 10
    assert all(p["n"] == 36 and p["ci"][0] <= p["win_rate"] <= p["ci"][1] for p in w["pairs"])
    db = connect(out / "feedback" / "feedback.db")  # the evaluation is there, and out of the training export
    assert {r["campaign"] for r in queries.export_rows(db)} == {"round-1", "round-2"}
    assert len(list(queries.export_rows(db, "heldout"))) == 36
    plan = summary["plan"]
    assert plan["pretrain_steps"] == 30 and set(plan["estimate"]) == set(summary["timings"]) and plan["matmul_flops"] > 0
    assert summary["config"]["pretrain"]["dtype"] == plan["dtype"] == summary["config"]["round-2/ppo"]["dtype"]
    assert summary["config"]["round-2/ppo"]["ref"] == str(out / "sft")  # the leash stays on the SFT model
    table = r.stdout[r.stdout.index("stage      estimated"):].splitlines()
    assert [ln.split()[0] for ln in table[1:9]] == ["pretrain", "sft", "round-1", "round-2", "dpo", "answers", "winrate",
                                                 "total"]
    assert "answers     : real English words SFT" in r.stdout
    for key in ("real_words_sft", "real_words_ppo", "distinct_ppo"):
        assert 0 <= h[key] <= 1, key
    shown = json.loads((out / "answers.json").read_text())["prompts"]
    assert shown and all(set(row["answers"]) == {"pretrained", "sft", "ppo-1", "ppo", "dpo"} for row in shown)
    html = (out / "report.html").read_text()
    assert "the mask" in html.lower() and "<svg" in html


def test_the_budget_sizes_pretraining_to_the_machine():
    from shoggoth import demo

    fast_steps, fast = demo.plan(1e12, "bf16", 20 * 60)
    slow_steps, slow = demo.plan(1e11, "bf16", 20 * 60)
    assert fast_steps > slow_steps >= demo.PRETRAIN_STEPS[0] and fast_steps <= demo.PRETRAIN_STEPS[1]
    assert slow["sft"] == 10 * fast["sft"]  # a stage of fixed size takes rate-times longer
    mid_steps, mid = demo.plan(3e11, "fp32", 20 * 60)
    if demo.PRETRAIN_STEPS[0] < mid_steps < demo.PRETRAIN_STEPS[1]:
        assert abs(sum(mid.values()) - 20 * 60) < 5  # what the budget leaves goes to pretraining
    assert demo.plan(1e12, "bf16", 20 * 60, quick=True)[0] == 30


def test_the_budget_sizes_the_rlhf_half_on_the_users_model():
    """--init: prompts, PPO iterations, DPO steps and held-out prompts follow the budget and the
    model's measured costs, between their minimums and the demo's own sizes."""
    from shoggoth import config, demo

    ppo, dpo = config.load("ppo", "demo-ppo")[1], config.load("dpo", "demo-dpo")[1]
    big = {"row": 0.19, "step": 5.3, "fwd": 1.6}  # measured on a 135M model (LoRA), bf16, 2-core AMD EPYC
    sizes = [demo.init_plan(big, budget, 665, 83) for budget in (1200, 3600, 7200)]
    keys = ("prompts_per_round", "ppo_iterations", "dpo_steps", "heldout")
    for key in keys:  # more budget, never less of anything
        assert [s[key] for s in sizes] == sorted(s[key] for s in sizes), key
    assert sizes[2]["ppo_iterations"] > sizes[0]["ppo_iterations"] and sizes[2]["prompts_per_round"] > 48
    small = sizes[0]  # 20 minutes are too few for a 135M model even at the smallest sizes: said, not hidden
    assert [small[k] for k in keys] == [demo.INIT_MIN[k] for k in ("prompts", "ppo", "dpo", "heldout")]
    assert small["over"] and sum(small["estimate"].values()) > 1200
    for s, budget in zip(sizes[1:], (3600, 7200)):  # within the budget once it allows more than the minimums
        assert not s["over"] and budget * 0.9 < sum(s["estimate"].values()) <= budget * 1.05
    fast = demo.init_plan({"row": 0.004, "step": 0.06, "fwd": 0.02}, 1200, 665, 83)  # the demo's own 4M model
    assert [fast[k] for k in keys] == [665 // demo.ROUNDS, ppo.iterations // demo.ROUNDS, dpo.max_steps, 83]
    assert set(fast["estimate"]) == set(demo.ORDER[2:])


@pytest.mark.slow
def test_the_plan_reads_the_machine_from_a_real_pretraining_step(tmp_path, monkeypatch):
    import torch

    from shoggoth import demo
    from shoggoth.train import dist

    amp = dist.autocast_dtype(torch.device("cpu"), "auto")
    assert 0 < demo.step_seconds(amp) < 60
    for step in (0.5, 1.0):
        monkeypatch.setattr(demo, "step_seconds", lambda amp: step)
        p = demo.Run(tmp_path / str(step)).summary["plan"]
        assert p["step_seconds"] == step
        steps, est = demo.plan(demo.WORK[p["dtype"]]["pretrain_step"] / step, p["dtype"], demo.BUDGET)
        assert (p["pretrain_steps"], p["estimate"]) == (steps, est)
        assert abs(est["sft"] - demo.WORK[p["dtype"]]["sft"] / demo.WORK[p["dtype"]]["pretrain_step"] * step) < 1e-6


def test_demo_flags_are_checked(tmp_path):
    bad = [["--budget", "soon"], ["--budget", "0m"], ["--dtype", "fp16"], ["--scale", "huge"], ["--device", "tpu"]]
    if not torch.cuda.is_available():
        bad.append(["--device", "cuda"])
    for flags in bad:
        r = shoggoth("demo", *flags, "--out", str(tmp_path / "run"), check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, flags
        assert not (tmp_path / "run").exists(), flags  # refused before anything is written
    r = shoggoth("demo", "--device", "tpu", check=False)
    assert "--device tpu" in r.stderr


def test_small_gpu_scale_is_a_30m_model_without_a_budget(tmp_path):
    from shoggoth import config, demo
    from shoggoth.lm.model import GPT, GPTConfig

    _, cfg = config.load("pretrain", demo.SCALES["small-gpu"])
    model = GPT(GPTConfig(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                          max_seq_len=cfg.seq_len))
    assert 25e6 < model.num_params() < 35e6  # what --help and the preset say
    run = demo.Run(tmp_path / "run", device="cpu", scale="small-gpu")
    plan = json.loads((tmp_path / "run" / "summary.json").read_text())["plan"]
    assert (plan["scale"], plan["device"], plan["pretrain_steps"], plan["estimate"]) == ("small-gpu", "cpu", None, None)
    assert run.estimate("sft") == "-"
    again = demo.Run(tmp_path / "run", device="cpu", scale="cpu")  # a re-run keeps the first plan
    assert (again.scale, again.device) == ("small-gpu", "cpu")


@pytest.mark.slow
def test_the_rlhf_half_runs_on_the_users_model(tmp_path, monkeypatch):
    """`shoggoth demo --init DIR`: two rounds, DPO and the blind win rates on a real family's model
    (SmolLM2's tokenizer and chat template, tiny random weights), through LoRA as a big model
    would be; no pretraining or SFT; a run directory keeps the model it started on."""
    import hf_families

    from shoggoth import demo

    model = hf_families.build("smollm2", tmp_path / "smol")
    monkeypatch.setattr(demo, "LORA_PARAMS", 0)  # as for a model above 50M parameters
    out = tmp_path / "demo"
    r = shoggoth("demo", "--quick", "--init", model, "--out", out)
    assert f"--init {model}" in r.stdout and "LoRA rank 16" in r.stdout and "your model  :" in r.stdout
    assert not (out / "pretrain").exists() and not (out / "sft").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan"]["prompts_per_round"] == demo.QUICK_PROMPTS // demo.ROUNDS
    for stage in ("round-1/reward", "round-2/ppo", "dpo"):
        assert summary["config"][stage]["lora_r"] == 16, stage
    assert summary["config"]["round-1/ppo"]["ref"] == str(model)  # the KL leash is to the user's model
    h = summary["headline"]
    for key in ("gold_sft", "gold_ppo", "gold_dpo", "winrate_ppo_sft", "reward_accuracy"):
        assert isinstance(h[key], float), key
    assert "gold_pretrained" not in h and set(summary["winrate"]["models"]) == {"sft", "ppo-1", "ppo", "dpo"}

    again = shoggoth("demo", "--quick", "--out", out, check=False)  # the same directory without --init
    assert again.returncode != 0 and "Traceback" not in again.stderr and f"--init {model}" in again.stderr
    bad = shoggoth("demo", "--quick", "--init", tmp_path / "nothing", "--out", tmp_path / "d2", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "nothing" in bad.stderr
