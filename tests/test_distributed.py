"""Distributed training through real `torchrun` processes (gloo, 2 ranks on the CPU).

A 2-rank run with global batch B must train like one process with global batch
B (fp32, so that only the order of the gradient sums differs); FSDP2 must save
checkpoints and model directories that one process loads and resumes; a killed
2-rank run must resume to the uninterrupted run's weights. PPO and GRPO spread
their rollouts over the ranks with a seed per rank, so there a 2-rank run is
checked against itself: stopped and resumed, it ends where it would have.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common import bible_corpus, cut_after, shoggoth, tiny_lm_dir, tiny_model_dir
from shoggoth.lm import checkpoint
from shoggoth.data.conversations import chatterbot_conversations
from shoggoth.data.prompts import builtin_prompts
from shoggoth.train import metrics

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
              pytest.mark.slow]  # real torchrun processes, every test

STEPS = 20  # tiny checkpoints every 10 steps
TINY = ["--config", "tiny", "--vocab-size", "300", "--dtype", "fp32", "--max-steps", STEPS]
RTOL = 1e-5


def torchrun(*args, nproc=2):
    """The command line of `torchrun --standalone --nproc_per_node N -m shoggoth ARGS`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "shoggoth", *map(str, args)]


def run2(*args):
    r = subprocess.run(torchrun(*args), capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def losses(run_dir, key="loss"):
    return {r["step"]: r[key] for r in metrics.read(run_dir / "metrics.jsonl") if key in r}


def assert_same_run(a, b, rtol=RTOL):
    """Per-step losses and final weights of run directories a and b agree to rtol (relative)."""
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) and la
    worst = max(abs(la[s] - lb[s]) / abs(la[s]) for s in la)
    assert worst < rtol, f"losses differ by {worst:.2e} (relative)"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    rel = {k: ((wa[k] - wb[k]).norm() / wa[k].norm()).item() for k in wa}
    k = max(rel, key=rel.get)
    print(f"{b.name} vs {a.name}: losses within {worst:.1e}, weights within {rel[k]:.1e} ({k}) relative")
    assert rel[k] < rtol, f"{k} differs by {rel[k]:.2e} (relative norm)"
    return worst


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return bible_corpus(tmp_path_factory.mktemp("corpus") / "verses.jsonl")


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """One process, global batch 8."""
    out = tmp_path_factory.mktemp("single") / "p"
    shoggoth("pretrain", *TINY, "--corpus", corpus, "--out", out)
    return out


@pytest.fixture(scope="module")
def ddp(corpus, tmp_path_factory):
    """Two processes, global batch 8 (4 rows each)."""
    out = tmp_path_factory.mktemp("ddp") / "p"
    r = run2("pretrain", *TINY, "--corpus", corpus, "--out", out)
    assert "on 2 cpu process(es)" in r.stdout
    return out


def test_ddp_pretrain_matches_single_process(single, ddp):
    assert_same_run(single, ddp)
    assert losses(single, "val_loss").keys() == losses(ddp, "val_loss").keys() == {10, STEPS}
    # Rank 0 alone wrote the checkpoints, in the one-process format.
    a = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(single))
    b = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(ddp))
    assert a["model"].keys() == b["model"].keys() and a["optim"]["param_groups"] == b["optim"]["param_groups"]


def test_fsdp_checkpoints_load_and_resume_in_one_process(single, corpus, tmp_path):
    out = tmp_path / "fsdp"
    r = run2("pretrain", *TINY, "--corpus", corpus, "--out", out, "--fsdp", "--sample-every", 10, "--sample-tokens", 8)
    assert r.stdout.count("  sample> ") == 6  # every rank gathers the weights and samples; rank 0 prints
    assert_same_run(single, out)  # sharded training is the same training
    # The gathered checkpoint is a one-process checkpoint: same keys, shapes, optimizer layout.
    a = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(single))
    b = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(out))
    assert [(k, v.shape) for k, v in a["model"].items()] == [(k, v.shape) for k, v in b["model"].items()]
    assert a["optim"]["param_groups"] == b["optim"]["param_groups"]
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys()
    assert torch.equal(b["model"]["lm_head.weight"], b["model"]["model.embed_tokens.weight"])  # still tied
    # The model directory loads in one process.
    model = checkpoint.load_pretrained(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = checkpoint.load_pretrained(single)
    for (k, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        assert ((p - q).norm() / q.norm()).item() < RTOL, k

    # One process resumes the FSDP run's step-10 checkpoint ...
    one = tmp_path / "one"
    shutil.copytree(out, one)
    (one / "checkpoints" / f"step_{STEPS:06d}.pt").unlink()
    (one / "model.safetensors").unlink()
    r = shoggoth("pretrain", *TINY, "--corpus", corpus, "--out", one, "--resume")
    assert "step_000010.pt" in r.stdout
    assert_same_run(single, one)
    # ... and FSDP resumes the one-process run's (the optimizer state is sharded on load).
    sharded = tmp_path / "sharded"
    shutil.copytree(single, sharded)
    (sharded / "checkpoints" / f"step_{STEPS:06d}.pt").unlink()
    (sharded / "model.safetensors").unlink()
    r = run2("pretrain", *TINY, "--corpus", corpus, "--out", sharded, "--resume", "--fsdp")
    assert "step_000010.pt" in r.stdout
    assert_same_run(single, sharded)


def _descendants(pid):
    """Process ids below pid (torchrun starts each rank in a session of its own)."""
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            kids += map(int, open(f"/proc/{pid}/task/{task}/children").read().split())
        except FileNotFoundError:
            pass
    return kids + [d for k in kids for d in _descendants(k)]


def test_killed_two_process_run_resumes(ddp, corpus, tmp_path):
    out = tmp_path / "p"
    args = ["pretrain", *TINY, "--corpus", corpus, "--out", out]
    proc = subprocess.Popen(torchrun(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        if line.startswith("step 12/"):  # checkpoint 10 written, 20 still far
            pids = _descendants(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher ...
            for pid in pids:  # ... and every rank, as a lost machine would
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()
    assert checkpoint.latest_checkpoint(out).name == "step_000010.pt"
    r = run2(*args, "--resume")
    assert "resumed from" in r.stdout and "step_000010.pt" in r.stdout
    assert losses(out) == losses(ddp)  # the same curve, to the last bit
    a, b = load_file(out / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_must_split_evenly(corpus, tmp_path):
    r = subprocess.run(torchrun("pretrain", *TINY, "--corpus", corpus, "--out", tmp_path / "p", "--batch-size", 7),
                       capture_output=True, text=True)
    assert r.returncode != 0 and "batch_size 7 (summed over ranks) is not a multiple of the 2 ranks" in r.stdout + r.stderr


def test_ddp_sft_matches_single_process(tmp_path):
    init = tiny_model_dir(tmp_path / "init")
    convs = chatterbot_conversations("train")
    for name, part in (("train", convs[:300]), ("held", convs[-21:])):  # 21 held-out: a last batch of 1 row
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in part))
    args = ["--init", init, "--data", tmp_path / "train.jsonl", "--eval-data", tmp_path / "held.jsonl", "--dtype", "fp32", "--max-steps", 8, "--batch-size", 8, "--eval-every", 4,
            "--ckpt-every", 4, "--sample-every", 0]
    shoggoth("sft", *args, "--out", tmp_path / "one")
    run2("sft", *args, "--out", tmp_path / "two")
    assert_same_run(tmp_path / "one", tmp_path / "two")
    one, two = losses(tmp_path / "one", "val_loss"), losses(tmp_path / "two", "val_loss")
    assert one.keys() == two.keys() == {0, 4, 8}  # held-out: 17 rows, the last batch of 1 leaves rank 1 idle
    assert all(abs(one[s] - two[s]) / one[s] < RTOL for s in one)


def test_lora_sft_ddp_and_fsdp_match_single_process(tmp_path):
    """LoRA (peft's adapters injected in place) under DDP and FSDP2 trains like one process; the
    gathered checkpoints (adapters only) resume in one process to the same end."""
    init = tiny_model_dir(tmp_path / "init")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n"
                                                  for c in chatterbot_conversations("train")[:200]))
    args = ["sft", "--init", init, "--data", tmp_path / "train.jsonl", "--dtype", "fp32", "--max-steps", 6,
            "--batch-size", 8, "--eval-every", 3, "--ckpt-every", 3, "--sample-every", 0, "--lora-r", 4, "--lr", 1e-2]
    shoggoth(*args, "--out", tmp_path / "one")
    run2(*args, "--out", tmp_path / "two")
    run2(*args, "--out", tmp_path / "fsdp", "--fsdp")
    for run in ("two", "fsdp"):
        assert_same_run(tmp_path / "one", tmp_path / run)
        a, b = (load_file(tmp_path / r / "adapter" / "adapter_model.safetensors") for r in ("one", run))
        assert a.keys() == b.keys() and all(((a[k] - b[k]).norm() / a[k].norm()).item() < RTOL for k in a)
    one_process_checkpoints(tmp_path / "one", tmp_path / "fsdp")
    r = shoggoth(*args, "--out", cut(tmp_path / "fsdp", tmp_path / "resumed", 3), "--resume")
    assert "step_000003.pt" in r.stdout
    assert_same_run(tmp_path / "one", tmp_path / "resumed")


def test_grad_ckpt_under_ddp_and_fsdp_matches_single_process(tmp_path):
    """Activation checkpointing recomputes each block inside FSDP2's hooks and DDP's reducer: both train
    like one process without it."""
    init = tiny_model_dir(tmp_path / "init")
    args = ["sft", "--init", init, "--dtype", "fp32", "--max-steps", 4, "--batch-size", 8, "--eval-every", 2,
            "--sample-every", 0]
    shoggoth(*args, "--out", tmp_path / "one", "--grad-ckpt", "off")
    for run, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        assert "grad-ckpt on" in run2(*args, "--out", tmp_path / run, "--grad-ckpt", "on", *extra).stdout
        assert_same_run(tmp_path / "one", tmp_path / run)


# ---------------------------------------------------------------- reward, DPO, PPO, GRPO


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "init")


@pytest.fixture(scope="module")
def rankings(tmp_path_factory):
    """(train, held-out) rankings JSONL, K = 3, of chatterbot questions: the question's own answer
    first, two other questions' answers after it (tied in every third ranking); 32 and 5 of them."""
    convs = chatterbot_conversations("train")
    rows = [{"prompt": convs[i][0]["content"], "completions": [convs[i + j][1]["content"] for j in range(3)],
             "ranks": [0, 1, 1 if i % 9 == 0 else 2]} for i in range(0, 3 * 37, 3)]
    paths = tmp_path_factory.mktemp("rankings") / "train.jsonl", tmp_path_factory.mktemp("rankings") / "held.jsonl"
    for path, part in zip(paths, (rows[:32], rows[32:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def one_process_checkpoints(a, b):
    """The last checkpoints of runs a and b have the same models (names and shapes) and optimizer layout."""
    a = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(a))
    b = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(b))
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict) and k not in ("optim", "config"):
            assert [(n, v.shape) for n, v in a[k].items()] == [(n, v.shape) for n, v in b[k].items()], k
    assert a["optim"]["param_groups"] == b["optim"]["param_groups"]
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys()


def cut(run, to, step):
    """A copy of run as if it had stopped after the checkpoint of `step`."""
    shutil.copytree(run, to)
    return cut_after(to, step)


# 32 rankings, 4 per step: 8 steps; 5 held-out rankings: the last batch of 1 leaves rank 1 idle.
REWARD = ["--dtype", "fp32", "--batch-size", 4, "--lr", 1e-4, "--warmup-steps", 2, "--eval-every", 4, "--ckpt-every", 4,
          "--normalize-samples", 4, "--normalize-max-new-tokens", 8]


def test_ddp_and_fsdp_reward_match_single_process(tiny, rankings, tmp_path):
    args = ["reward", "--init", tiny, "--rankings", rankings[0], "--eval-rankings", rankings[1], *REWARD]
    shoggoth(*args, "--out", tmp_path / "one")
    run2(*args, "--out", tmp_path / "two")
    run2(*args, "--out", tmp_path / "fsdp", "--fsdp")
    shift = lambda run: json.loads((tmp_path / run / "config.json").read_text())["reward_shift"]  # noqa: E731
    for run in ("two", "fsdp"):
        assert_same_run(tmp_path / "one", tmp_path / run)
        one, two = losses(tmp_path / "one", "val_loss"), losses(tmp_path / run, "val_loss")
        assert one.keys() == two.keys() == {0, 4, 8}
        assert all(abs(one[s] - two[s]) / one[s] < RTOL for s in one)
        assert shift(run) == pytest.approx(shift("one"), abs=1e-5)  # every rank samples the same normalisation set
    one_process_checkpoints(tmp_path / "one", tmp_path / "fsdp")


DPO = ["--dtype", "fp32", "--batch-size", 4, "--lr", 1e-4, "--warmup-steps", 2, "--eval-every", 4, "--ckpt-every", 4,
       "--max-steps", 8]


def test_ddp_and_fsdp_dpo_match_single_process(tiny, rankings, tmp_path):
    args = ["dpo", "--policy", tiny, "--rankings", rankings[0], "--eval-rankings", rankings[1], *DPO]
    shoggoth(*args, "--out", tmp_path / "one")
    run2(*args, "--out", tmp_path / "two")
    run2(*args, "--out", tmp_path / "fsdp", "--fsdp")
    for run in ("two", "fsdp"):
        assert_same_run(tmp_path / "one", tmp_path / run)
        one, two = losses(tmp_path / "one", "val_loss"), losses(tmp_path / run, "val_loss")
        assert one.keys() == two.keys() == {0, 4, 8}
        assert all(abs(one[s] - two[s]) / one[s] < RTOL for s in one)
    model = checkpoint.load_pretrained(tmp_path / "fsdp")  # the gathered model directory loads in one process
    assert model.lm_head.weight is model.model.embed_tokens.weight
    one_process_checkpoints(tmp_path / "one", tmp_path / "fsdp")
    # One process resumes the FSDP run's step-4 checkpoint to the same end.
    r = shoggoth(*args, "--out", cut(tmp_path / "fsdp", tmp_path / "resumed", 4), "--resume")
    assert "step_000004.pt" in r.stdout
    assert_same_run(tmp_path / "one", tmp_path / "resumed")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm_dir(tmp_path_factory.mktemp("lm") / "lm")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """16 chatterbot questions with their answers as references; no held-out prompts, so no evaluation."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p["messages"], "references": p["references"]}) + "\n"
                            for p in builtin_prompts("train")[:16]))
    return path


def rl_args(stage, lm, prompts):
    """A tiny run on the toy reward (the fraction of " the" in a response), a checkpoint every 2 iterations."""
    args = [stage, "--policy", lm, "--prompts", prompts, "--toy-reward", "the", "--dtype", "fp32", "--batch-size", 4,
            "--max-new-tokens", 8, "--lr", 1e-3, "--missing-eos-penalty", 0, "--ckpt-every", 2]
    if stage == "ppo":
        return args + ["--minibatch-size", 2, "--ppo-epochs", 2]
    return args + ["--group-size", 2, "--minibatch-size", 4]


def rl_records(run):
    """metrics.jsonl of a run without the timings."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in metrics.read(run / "metrics.jsonl")]


def same_weights(a, b):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def rl_runs(lm, prompts, tmp_path_factory):
    """stage -> an uninterrupted 2-process DDP run of 4 iterations, made on first use."""
    made = {}

    def run(stage):
        if stage not in made:
            made[stage] = tmp_path_factory.mktemp(stage) / "full"
            run2(*rl_args(stage, lm, prompts), "--iterations", 4, "--out", made[stage])
        return made[stage]
    return run


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_two_process_rl_run_resumes_exactly(stage, lm, prompts, rl_runs, tmp_path):
    args = rl_args(stage, lm, prompts)
    full, part = rl_runs(stage), tmp_path / "part"
    run2(*args, "--iterations", 2, "--out", part)
    r = run2(*args, "--iterations", 4, "--out", part, "--resume")
    assert "resumed from" in r.stdout and "step_000002.pt" in r.stdout
    assert same_weights(full, part) and rl_records(full) == rl_records(part)
    assert [x["step"] for x in rl_records(full)] == [1, 2, 3, 4]
    # A Hugging Face directory that one process loads, and the run trained it.
    model, init = checkpoint.load_pretrained(full), checkpoint.load_pretrained(lm)
    assert not torch.equal(model.model.embed_tokens.weight, init.model.embed_tokens.weight)


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_fsdp_rl_run_trains_like_ddp_and_resumes_in_one_process(stage, lm, prompts, rl_runs, tmp_path):
    # Held-out evaluation too (3 prompts: 1 and 2 per rank); it does not touch training.
    args = [*rl_args(stage, lm, prompts), "--iterations", 4, "--eval-prompts", prompts, "--eval-samples", 3,
            "--eval-every", 2]
    out = tmp_path / "fsdp"
    run2(*args, "--out", out, "--fsdp")
    # The same rollouts and, to float noise, the same weights as DDP: sharded training is the same training.
    ddp = rl_runs(stage)
    series = lambda run: [x["objective/scores"] for x in rl_records(run) if "objective/scores" in x]  # noqa: E731
    assert series(out) == series(ddp)
    wa, wb = load_file(ddp / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(((wa[k] - wb[k]).norm() / wa[k].norm()).item() < RTOL for k in wa)
    assert [x["step"] for x in rl_records(out) if "eval/scores" in x] == [0, 2, 4]
    # The collapse monitor counts the answers of both ranks: a share of 3 held-out prompts.
    assert all(x["eval/distinct"] in (1 / 3, 2 / 3, 1) for x in rl_records(out) if "eval/scores" in x)
    model = checkpoint.load_pretrained(out)  # the gathered model directory loads in one process
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # FSDP resumes its step-2 checkpoint to the same end ...
    again = cut(out, tmp_path / "again", 2)
    r = run2(*args, "--out", again, "--resume", "--fsdp")
    assert "step_000002.pt" in r.stdout
    assert same_weights(out, again) and rl_records(out) == rl_records(again)
    # ... and one process resumes it (with its own rollouts from there: one rank, other seeds),
    # writing checkpoints of the same layout.
    one = cut(out, tmp_path / "one", 2)
    r = shoggoth(*args, "--out", one, "--resume")
    assert "step_000002.pt" in r.stdout
    checkpoint.load_pretrained(one)
    one_process_checkpoints(one, out)


GATHER = """
import json
from shoggoth.train import dist
from shoggoth.evaluation import scoring
d = dist.setup("cpu")
answers = dist.gathered(["Amen."] if d.rank == 0 else ["amen", "Let there be light"], d)
if d.main:
    print(json.dumps([answers, scoring.answer_diversity(answers)]))
dist.cleanup()
"""


def test_collapse_monitor_reads_every_ranks_answers(tmp_path):
    """An RL evaluation's collapse monitor (scoring.answer_diversity) over all ranks' answers, in rank order."""
    (tmp_path / "gather.py").write_text(GATHER)
    root = str(Path(__file__).resolve().parents[1])  # this checkout's shoggoth
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "gather.py")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    answers, (distinct, similarity) = json.loads(r.stdout.splitlines()[-1])
    assert answers == ["Amen.", "amen", "Let there be light"]
    assert distinct == 2 / 3 and similarity == pytest.approx(1 / 3)  # pairs: 1, 0, 0


def test_lora_ppo_with_reward_model_fsdp_trains_like_ddp(lm, prompts, tmp_path):
    """LoRA PPO against a reward model: the value model shares the reward model's trunk (with its
    own adapters and head), under DDP and sharded by FSDP2 alike."""
    from shoggoth.lm.model import RewardModel

    torch.manual_seed(1)
    rm = RewardModel(checkpoint.load_pretrained(lm).config)
    checkpoint.load_trunk(rm, lm)
    checkpoint.save_reward(rm, tmp_path / "rm", tokenizer_dir=lm)
    args = ["ppo", "--policy", lm, "--reward", tmp_path / "rm", "--prompts", prompts, "--dtype", "fp32",
            "--batch-size", 4, "--minibatch-size", 2, "--iterations", 3, "--max-new-tokens", 8, "--lr", 1e-3,
            "--lora-r", 4, "--eval-prompts", prompts, "--eval-samples", 3, "--eval-every", 3]
    run2(*args, "--out", tmp_path / "ddp")
    run2(*args, "--out", tmp_path / "fsdp", "--fsdp")
    series = lambda run: [x["objective/scores"] for x in rl_records(run) if "objective/scores" in x]  # noqa: E731
    assert series(tmp_path / "ddp") == series(tmp_path / "fsdp")
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        wa, wb = load_file(tmp_path / "ddp" / name), load_file(tmp_path / "fsdp" / name)
        assert wa.keys() == wb.keys() and all(((wa[k] - wb[k]).norm() / wa[k].norm()).item() < RTOL for k in wa)
    one_process_checkpoints(tmp_path / "ddp", tmp_path / "fsdp")
