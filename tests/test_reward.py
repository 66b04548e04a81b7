"""Reward model: the ranking loss by hand, rankings and TRL pairs, transformers parity, a tiny run, resume."""

import json
import math
import random
import shutil

import pytest
import torch
import transformers

from common import shoggoth, tiny_model_dir, token_id
from shoggoth.lm import checkpoint, tokenizer
from shoggoth.data.rankings import (flatten_rankings, grouped_batches, pad_right, ranking, read_rankings, reward_rows,
                                    split_rankings)
from shoggoth.train import losses, metrics
from shoggoth.errors import DataError
from shoggoth.lm.model import RewardModel


def sp(x):  # softplus(x) = -log sigmoid(-x)
    return math.log1p(math.exp(x))


def test_ranking_loss_by_hand_with_ties():
    # Ranking 0: K = 3, completions 1 and 2 tied. Ranking 1: K = 2, the model has it backwards.
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0])
    ranks = torch.tensor([0, 1, 1, 1, 0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    loss, margins = losses.ranking_loss(rewards, ranks, groups)
    # Ranking 0's untied pairs: (0 over 1) margin 1.0, (0 over 2) margin 0.5; the tie (1, 2) is no pair.
    # Ranking 1: (4 over 3) margin -1 - 2 = -3.
    assert sorted(margins.tolist()) == [-3.0, 0.5, 1.0]
    # -log sigmoid(m) = softplus(-m): log(1 + e^-1) = 0.3132617, log(1 + e^-0.5) = 0.4740770, log(1 + e^3) = 3.0485874.
    # Per ranking: (0.3132617 + 0.4740770) / 2 = 0.3936693 and 3.0485874; their mean 1.7211284.
    assert loss.item() == pytest.approx(((0.3132617 + 0.4740770) / 2 + 3.0485874) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(((sp(-1.0) + sp(-0.5)) / 2 + sp(3.0)) / 2, abs=1e-6)
    # Not the mean over the three pairs: a large K must not outweigh a small one.
    assert loss.item() != pytest.approx((sp(-1.0) + sp(-0.5) + sp(3.0)) / 3, abs=1e-3)
    # Groups need not be contiguous or ordered.
    perm = torch.tensor([3, 0, 4, 2, 1])
    assert losses.ranking_loss(rewards[perm], ranks[perm], groups[perm])[0].item() == pytest.approx(loss.item())


def test_labelers_rankings_of_one_task_share_a_batch_and_its_scored_rows():
    # Three labelers rank the same K = 3 completions of task "a"; one labeler ranks task "b".
    rec = lambda prompt, ranks: {"prompt": prompt, "completions": ["x", "y", "z"], "ranks": ranks,  # noqa: E731
                                 "rows": [[ord(prompt), 1], [ord(prompt), 2], [ord(prompt), 3]]}
    recs = [rec("a", [0, 1, 2]), rec("b", [2, 1, 0]), rec("a", [0, 2, 1]), rec("a", [1, 0, 2])]
    for seed in range(5):
        batches = grouped_batches(recs, 3, 2, seed, 1)
        assert sorted(len(b) for b in batches) == [1, 1, 3, 3]  # task a whole in one batch, each epoch
        assert all(len({r["prompt"] for r in b}) == 1 for b in batches)
    rows, which, ranks, groups = flatten_rankings(recs)
    assert len(rows) == 6 and len(which) == 12  # 12 ranked completions, 6 distinct rows scored
    # The loss over the shared rows is the loss over every ranking's own rows.
    scores = torch.randn(6)
    full = torch.stack([scores[i] for i in which.tolist()])
    assert losses.ranking_loss(scores[which], ranks, groups)[0].item() == losses.ranking_loss(full, ranks, groups)[0].item()
    assert [rows[i] for i in which.tolist()] == [row for r in recs for row in r["rows"]]


def test_k2_ranking_is_a_trl_pair():
    pair = ranking({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, "f:1")
    k2 = ranking({"prompt": "Hi", "completions": ["Hello!", "Go away."], "ranks": [0, 1]}, "f:2")
    assert {**pair, "where": ""} == {**k2, "where": ""}
    conv = ranking({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                    "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}, "f:3")
    assert {**conv, "where": ""} == {**k2, "where": ""}  # TRL's conversational format, implicit prompt
    r = torch.tensor([0.3, -0.4, 1.0, 2.0])
    loss, _ = losses.ranking_loss(r, torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, 1]))
    assert loss.item() == pytest.approx(-(torch.nn.functional.logsigmoid(torch.tensor([0.7, 1.0]))).mean().item())


def test_an_exported_ranking_is_read_with_its_whole_conversation():
    """The feedback export writes the conversation as `messages`, its last user message as `prompt`
    (for tools that read a string): the conversation is the prompt the completions answer."""
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    r = ranking({"prompt": "Hi", "messages": chat, "completions": ["Hello!", "Go away."], "ranks": [0, 1]}, "f:1")
    assert r["prompt"] == chat


@pytest.mark.parametrize("line, message", [
    ({"prompt": "p", "completions": ["a", "b", "c"], "ranks": [0, 1]}, "2 ranks for 3 completions"),
    ({"prompt": "p", "completions": ["a", "b"], "ranks": [0, 1.5]}, "non-negative integers"),
    ({"prompt": "p", "completions": ["a", "b"], "ranks": [0, True]}, "non-negative integers"),
    ({"prompt": "p", "completions": ["a"], "ranks": [0]}, "at least 2"),
    ({"prompt": 3, "completions": ["a", "b"], "ranks": [0, 1]}, "'prompt'"),
    ({"prompt": "p", "chosen": "a"}, "'completions'"),
    ("not json", "invalid JSON"),
])
def test_bad_rankings_lines_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "r.jsonl"
    good = {"prompt": [{"role": "user", "content": "p"}], "completions": ["a", "b"], "ranks": [0, 1], "labeler": "x"}
    f.write_text(json.dumps(good) + "\n\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    with pytest.raises(DataError, match=f"{f}:3: .*{message}"):
        read_rankings(f, log=lambda *a: None)
    assert len(read_rankings(f, skip_invalid=True, log=lambda *a: None)) == 1


def test_all_tied_rankings_are_left_out_and_counted(tmp_path):
    f = tmp_path / "r.jsonl"
    tied = {"prompt": "p", "completions": ["a", "b", "c"], "ranks": [1, 1, 1]}
    f.write_text(json.dumps({**tied, "ranks": [0, 1, 1]}) + "\n" + json.dumps(tied) + "\n")
    said = []
    recs = read_rankings(f, log=said.append)
    assert [r["ranks"] for r in recs] == [[0, 1, 1]] and "1 ranking(s) tie all" in said[-1] and f"{f}:2" in said[-1]
    f.write_text(json.dumps(tied) + "\n")
    with pytest.raises(DataError, match="no ranking holds two different texts"):
        read_rankings(f, log=said.append)
    # a TRL pair whose chosen is its rejected orders nothing either (held-out accuracy read 0.000 on such pairs)
    same = {"prompt": "p", "chosen": "x", "rejected": "x"}
    f.write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "y"}) + "\n" + json.dumps(same) + "\n")
    assert [r["completions"] for r in read_rankings(f, log=said.append)] == [["x", "y"]]
    assert f"{f}:2" in said[-1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m") / "m")


def test_reward_model_matches_transformers(model_dir, tmp_path):
    tok = tokenizer.load(model_dir)
    c = checkpoint.gpt_config(checkpoint.read_config(model_dir))
    torch.manual_seed(0)
    model = RewardModel(c)
    checkpoint.load_trunk(model, model_dir)
    assert model.score.weight.std().item() == pytest.approx(1 / math.sqrt(c.n_embd + 1), rel=0.3)
    checkpoint.save_reward(model, tmp_path / "rm", shift=0.25, tokenizer_dir=model_dir)
    tokenizer.save(tok, tmp_path / "rm")
    ours, shift = checkpoint.load_reward(tmp_path / "rm")
    assert shift == 0.25

    prompt = [{"role": "user", "content": "And God said, Let there be light"}]
    rows = reward_rows(tok, prompt, ["and there was light.", "", "In the beginning God created the heaven and the earth."])
    assert all(r[-1] == token_id(tok, tokenizer.IM_END) for r in rows)
    idx, last = pad_right(rows, tok.pad_id)
    with torch.no_grad():
        want = ours(idx, last=last)  # (B,) raw
        alone = torch.cat([ours(torch.tensor([r])) for r in rows])  # unpadded, one at a time
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
        assert hf.config.num_labels == 1 and hf.config.pad_token_id == tok.pad_id
        got = hf(idx, attention_mask=(idx != tok.pad_id).long()).logits[:, 0]
    assert torch.allclose(want, alone, atol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ours(idx, last=last)
    assert mixed.dtype == torch.float32 and len(set(mixed.tolist())) == len(rows)  # the head stays fp32
    # transformers gives raw scores (it knows nothing of reward_shift); shoggoth's score is raw - shift.
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    r = shoggoth("score", tmp_path / "rm", "--prompt", prompt[0]["content"], "--completion", "and there was light.")
    assert float(r.stdout) == pytest.approx(want[0].item() - 0.25, abs=1e-4)
    r = shoggoth("score", tmp_path / "rm", "--raw", "--prompt", prompt[0]["content"], "--completion", "and there was light.")
    assert float(r.stdout) == pytest.approx(want[0].item(), abs=1e-4)


WORDS = "the and of to in that he shall unto for his a they be is him not them it with all thou was".split()


def synthetic(path, n, seed, pairs=False):
    """Rankings with a learnable taste: more 'LORD' is better (ties when equal), K = 3."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        prompt = " ".join(rng.choices(WORDS, k=4))
        counts = [rng.randint(0, 2) for _ in range(3)]
        while len(set(counts)) == 1:
            counts = [rng.randint(0, 2) for _ in range(3)]
        comps = []
        for c in counts:
            w = rng.choices(WORDS, k=6)
            for _ in range(c):
                w.insert(rng.randrange(len(w) + 1), "LORD")
            comps.append(" ".join(w))
        ranks = [sorted(set(counts), reverse=True).index(c) for c in counts]
        if pairs:
            best, worst = ranks.index(min(ranks)), ranks.index(max(ranks))
            lines.append({"prompt": prompt, "chosen": comps[best], "rejected": comps[worst]})
        else:
            lines.append({"prompt": prompt, "completions": comps, "ranks": ranks, "labeler": f"sim-{i % 3}"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


ARGS = ["--batch-size", 8, "--lr", 1e-3, "--warmup-steps", 3, "--dtype", "fp32", "--eval-every", 5, "--ckpt-every", 3,
        "--normalize-samples", 8, "--normalize-max-new-tokens", 8]  # 64 rankings, one epoch: 8 steps


@pytest.mark.slow
def test_tiny_reward_run_learns_rankings_and_resumes(model_dir, tmp_path):
    train = synthetic(tmp_path / "train.jsonl", 64, 0)
    held = synthetic(tmp_path / "held.jsonl", 32, 1, pairs=True)  # TRL pairs are accepted too
    out = tmp_path / "rm"
    r = shoggoth("reward", "--init", model_dir, "--rankings", train, "--eval-rankings", held, "--out", out, *ARGS)
    assert "held-out: pairwise accuracy" in r.stdout
    recs = metrics.read(out / "metrics.jsonl")
    evals = [x for x in recs if "val_accuracy" in x]
    assert {"loss", "accuracy", "margin"} <= set(recs[1]) and evals[0]["step"] == 0
    assert evals[-1]["val_accuracy"] > 0.85 and evals[-1]["val_tau"] > 0.7, evals
    # The normalisation: SFT-policy completions of training prompts average 0 after the shift.
    shift = json.loads((out / "config.json").read_text())["reward_shift"]
    assert shift == recs[-1]["reward_shift"] and shift != 0.0

    # Stopped after step 3 (later checkpoints and the model gone) and resumed: the same final model.
    part = tmp_path / "part"
    shutil.copytree(out, part)
    (part / "model.safetensors").unlink()
    for f in sorted((part / "checkpoints").glob("*.pt"))[1:]:
        f.unlink()
    assert [f.name for f in (part / "checkpoints").glob("*.pt")] == ["step_000003.pt"]
    r = shoggoth("reward", "--init", model_dir, "--rankings", train, "--eval-rankings", held, "--out", part, *ARGS,
                 "--resume")
    assert "resumed from" in r.stdout
    a, b = checkpoint.load_state_dict(out), checkpoint.load_state_dict(part)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.loads((part / "config.json").read_text())["reward_shift"] == pytest.approx(shift, abs=1e-5)
    assert [r["step"] for r in metrics.read(part / "metrics.jsonl")].count(4) == 1
    r = shoggoth("reward", "--init", model_dir, "--rankings", train, "--out", part, check=False)
    assert r.returncode == 1 and "--resume" in r.stderr


def test_bad_rankings_file_fails_cleanly(model_dir, tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"], "ranks": [0]}) + "\n")
    r = shoggoth("reward", "--init", model_dir, "--rankings", f, "--out", tmp_path / "o", check=False)
    assert r.returncode == 1 and f"{f}:1: 1 ranks for 2 completions" in r.stderr and "Traceback" not in r.stderr


def test_rankings_of_heldout_prompts_are_refused(tmp_path):
    ok = {"prompt": "How are you today?", "completions": ["fine", "bad"], "ranks": [0, 1]}
    held = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  HELLO "}],
            "completions": ["hi", "go"], "ranks": [0, 1]}  # the built-in held-out "Hello", case and spaces aside
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(ok) + "\n" + json.dumps(held) + "\n")
    with pytest.raises(DataError, match=r"1 of 2 training rankings .* first .*r.jsonl:2: '  HELLO '"):
        split_rankings(f, log=lambda *_: None)
    assert len(split_rankings(f, eval_frac=0, log=lambda *_: None, heldout="none")[0]) == 2
    mine = tmp_path / "eval.jsonl"
    mine.write_text(json.dumps({"prompt": "how are you TODAY?"}) + "\n")
    with pytest.raises(DataError, match="r.jsonl:1"):
        split_rankings(f, log=lambda *_: None, heldout=str(mine))
    f.write_text(json.dumps(ok) + "\n")
    assert len(split_rankings(f, eval_frac=0, log=lambda *_: None)[0]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_reward_and_dpo_refuse_heldout_prompts_cleanly(tmp_path, model_dir, stage):
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "completions": ["yes", "no"], "ranks": [0, 1]}) + "\n"
                         for p in ("How are you?", "What is the largest planet in our solar system?")))
    flag = "--init" if stage == "reward" else "--policy"
    r = shoggoth(stage, flag, model_dir, "--rankings", f, "--out", tmp_path / "o", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "held out for evaluation" in r.stderr and "r.jsonl:2" in r.stderr
    assert not (tmp_path / "o" / "config.json").exists()
