"""PPO, GRPO and DPO end to end through the CLI on a tiny model: a toy reward with a known optimum
goes up while the KL stays bounded, runs resume exactly, outputs load in shoggoth and transformers;
the held-out evaluation's collapse monitor (how many different answers the policy gives) warns when
the policy answers every question alike.

The toy reward is the fraction of response tokens that are the word " the" (`--toy-reward the`).
The tiny model is first trained for a moment on Bible verses, so that it says " the" now and then
(about 2% of its tokens) and RL has something to reinforce.
"""

import json
import re

import pytest
import torch
import transformers

from common import bible_corpus, shoggoth, token_id
from rl_common import ENV, FAST, interrupt_and_resume, lm_dir, records, rm_dir, series, toy_pairs, toy_probability  # noqa: F401
from shoggoth.lm import checkpoint, sampling, tokenizer
from shoggoth.data.prompts import builtin_prompts
from shoggoth.data.shards import build_shards
from shoggoth.train import rl
from shoggoth.evaluation import scoring
from shoggoth.stages import grpo, ppo


pytestmark = pytest.mark.usefixtures("one_thread")  # in-process work here on one thread too (see ENV)


def check_outputs(out, lm_dir):
    """The output is a Hugging Face directory: shoggoth and transformers load it, with the same logits."""
    model, tok = sampling.load(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.tensor([tok.render_chat([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)[0]])
    with torch.no_grad():
        assert torch.allclose(model(x), hf(x).logits, atol=1e-4)
    assert not torch.equal(checkpoint.load_state_dict(out)["model.embed_tokens.weight"],
                           checkpoint.load_state_dict(lm_dir)["model.embed_tokens.weight"])  # it did train
    assert (out / "chat_template.jinja").exists()


def test_rollout_logprobs_are_the_training_forwards(lm_dir):
    """The Engine's log-probs at temperature T are log_softmax(logits / T) of a plain forward over the
    right-padded [prompt | response] rows, and <|im_end|> ends a response (pad is another token)."""
    model, tok = sampling.load(lm_dir)
    recs = builtin_prompts("train")[:6]
    r = rl.generate(model, tok, rl.encode_prompts(tok, recs, 100), 12, 0.7, seed=3)
    with torch.no_grad():
        lp = rl.token_logprobs(rl.response_logits(model, r), r.tokens, 0.7)
    assert torch.allclose(lp * r.mask, r.logprobs, atol=1e-4)
    assert tok.stop_ids == sorted([tok.eos_id, token_id(tok, tokenizer.IM_END)])
    for b in range(len(recs)):  # the response sits right after its prompt, pad after
        n = int(r.lengths[b])
        assert r.seq[b, r.start[b]:r.start[b] + n].tolist() == r.tokens[b, :n].tolist()


def evals(out):
    """The metrics.jsonl lines of a run's held-out evaluations."""
    return [x for x in records(out) if "eval/distinct" in x]


@pytest.mark.slow
def test_ppo_raises_toy_reward_with_bounded_kl(lm_dir, tmp_path):
    out = tmp_path / "ppo"
    r = shoggoth("ppo", "--policy", lm_dir, "--toy-reward", "the", "--out", out, "--iterations", 20,
                 "--batch-size", 32, "--minibatch-size", 16, "--ppo-epochs", 2, "--lr", 1e-3, "--beta", 0.05,
                 "--eval-every", 20, *FAST, env=ENV)
    scores, kl = series(out, "objective/scores"), series(out, "objective/kl")
    ref, late, policy = toy_probability(lm_dir), sum(scores[-10:]) / 10, toy_probability(out)
    print(f"ppo toy reward: reference {ref:.3f}, last 10 rollouts {late:.3f}, trained policy {policy:.3f}; "
          f"KL {kl[0]:.2f} -> {kl[-1]:.2f} (max {max(kl):.2f})")
    assert kl[0] == pytest.approx(0, abs=1e-4)  # the first rollout's policy is the reference
    # With beta = 0.05 over 8 tokens, the KL-regularised optimum says " the" with p ~ 0.27
    # (1 = 0.4 * log-odds ratio against the model's 3%), at a KL of ~3.1 nats per response.
    # Measured on an AVX-512 EPYC over seeds 1337, 0-3 in fp32 and bf16: the policy at 6.3-10x the
    # reference, the last 10 rollouts at 5.3-6.7x, max KL 2.5-3.6.
    assert policy > 3 * ref and late > 3 * ref
    assert max(kl) < 8
    rec = records(out)[-2]
    for key in ("objective/rlhf_reward", "objective/non_score_reward", "objective/gold", "policy/approxkl",
                "policy/clipfrac", "policy/entropy", "loss/policy", "loss/value", "val/ratio", "val/clipfrac",
                "eot_rate", "response_length", "time/generate", "time/update"):
        assert key in rec, key
    assert series(out, "eval/scores")[-1] > series(out, "eval/scores")[0]
    # The collapse monitor's greedy answers: a reward for one word pulls them together (9 of 16
    # distinct at step 0, 5 at step 20 on seed 1337); the warning's test is the one below.
    assert [x["step"] for x in evals(out)] == [0, 20]
    assert all(0 < x["eval/distinct"] <= 1 and 0 <= x["eval/similarity"] <= 1 for x in evals(out))
    assert r.stdout.count("warning: the policy is collapsing") == sum(x["eval/distinct"] < 0.5 for x in evals(out))
    check_outputs(out, lm_dir)


def test_answer_diversity_of_known_answers():
    alike = ["The LORD is my shepherd.", "the  LORD is my shepherd", "THE LORD IS MY SHEPHERD !",
             " The LORD\tis my shepherd"]
    assert scoring.answer_diversity(alike) == (1 / 4, 1.0)  # one answer once normalised
    assert scoring.answer_diversity(["In the beginning", "God created heaven", "and earth was void"]) == (1.0, 0.0)
    assert scoring.answer_diversity(["yes", "Yes.", "no"]) == (2 / 3, pytest.approx(1 / 3))  # pairs: 1, 0, 0
    assert scoring.answer_diversity(["good light", "good night"]) == (1.0, 0.5)  # token F1 of one word in two
    assert scoring.answer_diversity(["Amen."]) == (1.0, 0.0) and scoring.answer_diversity([]) == (1.0, 0.0)


def test_collapse_warning_names_the_stages_own_options():
    for name, c, fix in [("ppo", ppo.Config(), "lower --lr, raise --beta or set --target-kl"),
                         ("ppo", ppo.Config(target_kl=0.5), "lower --lr or --target-kl"),
                         ("grpo", grpo.Config(), "lower --lr or raise --beta")]:
        line = scoring.collapse_warning(name, c, 64, 12 / 64, 0.8349)
        assert line.startswith(f"{name}: warning: the policy is collapsing: 12 distinct answers to 64 held-out "
                               "prompts (0.19), mean pairwise similarity 0.83; ")
        assert line.endswith(f"({fix})") and "\n" not in line
        assert all(hasattr(c, flag.replace("-", "_")) for flag in re.findall(r"--([a-z-]+)", line))


@pytest.mark.slow
def test_ppo_collapse_monitor_warns_when_every_answer_is_alike(lm_dir, tmp_path):
    """Without the KL leash (beta 0) and at 3x test_ppo_raises_toy_reward's lr, the policy learns to answer
    every question " the the the ...": the toy reward's optimum, one answer to everything. Measured on
    seeds 0-11 (this run is seed 0) with sampled answers: 16 of 16 distinct at step 0; at iteration 20
    1 to 5 of 16 (0.06-0.31), similarity 0.87-1, held-out toy reward 0.85-1."""
    out = tmp_path / "ppo"
    r = shoggoth("ppo", "--policy", lm_dir, "--toy-reward", "the", "--out", out, "--iterations", 20,
                 "--batch-size", 32, "--minibatch-size", 16, "--ppo-epochs", 2, "--lr", 3e-3, "--beta", 0,
                 "--eval-every", 10, *FAST, env=ENV)
    first, last = evals(out)[0], evals(out)[-1]
    print("ppo collapse: distinct, similarity, reward", [(x["eval/distinct"], round(x["eval/similarity"], 3),
                                                          round(x["eval/scores"], 3)) for x in evals(out)])
    assert [x["step"] for x in evals(out)] == [0, 10, 20]
    # greedy answers (what the monitor reads), seed 0 on an AVX-512 EPYC: 9 of 16 distinct at step 0
    # (similarity 0.63), 1 of 16 at iterations 10 and 20 (similarity 1.0)
    assert first["eval/distinct"] > 2 * last["eval/distinct"] and last["eval/similarity"] > first["eval/similarity"]
    assert last["eval/distinct"] < 0.5 and last["eval/similarity"] > 0.7 and last["eval/scores"] > 0.5
    # One line per evaluation below half distinct answers, saying how many.
    warnings = [ln for ln in r.stdout.splitlines() if "warning" in ln]
    assert len(warnings) == sum(x["eval/distinct"] < 0.5 for x in evals(out))
    m = re.fullmatch(r"ppo: warning: the policy is collapsing: (\d+) distinct answers to 16 held-out prompts "
                     r"\((0\.\d\d)\), mean pairwise similarity ([01]\.\d\d); .*"
                     r"\(lower --lr, raise --beta or set --target-kl\)", warnings[-1])
    assert m and int(m[1]) == round(16 * last["eval/distinct"])
    assert float(m[3]) == round(last["eval/similarity"], 2)


@pytest.mark.slow
def test_ppo_with_reward_model_ptx_ema_adaptive_kl_resumes_exactly(lm_dir, rm_dir, tmp_path):
    tok = tokenizer.load(lm_dir)
    build_shards([bible_corpus(tmp_path / "corpus.jsonl", verses=300)], tok, tmp_path / "tokens", log=lambda *a: None)
    out = tmp_path / "ppo"
    args = ["--policy", lm_dir, "--reward", rm_dir, "--out", out, "--iterations", 4, "--batch-size", 8,
            "--minibatch-size", 4, "--ppo-epochs", 2, "--lr", 1e-4, "--ckpt-every", 2, "--eval-every", 2,
            "--target-kl", 0.5, "--ptx-coef", 0.5, "--ptx-data", tmp_path / "tokens", "--ema-decay", 0.9, *FAST[:6]]
    r = shoggoth("ppo", *args, env=ENV)
    assert "objective/gold" in r.stdout and "loss/ptx" in r.stdout
    betas = series(out, "beta")
    assert betas[0] == 0.05 and betas[-1] != 0.05  # the adaptive controller moved it
    before, after = interrupt_and_resume("ppo", args, out, 2)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    check_outputs(out, lm_dir)
    check_outputs(out / "ema", lm_dir)


@pytest.mark.slow
def test_grpo_raises_toy_reward(lm_dir, tmp_path):
    out = tmp_path / "grpo"
    shoggoth("grpo", "--policy", lm_dir, "--toy-reward", "the", "--out", out, "--iterations", 20, "--batch-size", 8,
             "--group-size", 4, "--minibatch-size", 16, "--lr", 1e-3, "--beta", 0.04, "--eval-every", 20, *FAST, env=ENV)
    scores, kl = series(out, "objective/scores"), series(out, "objective/kl")
    before, after = sum(scores[:2]) / 2, sum(scores[-5:]) / 5
    print(f"grpo toy reward {before:.3f} -> {after:.3f}, KL {kl[0]:.2f} -> {kl[-1]:.2f}")
    assert after > 5 * before and after > 0.15
    assert max(kl) < 8 * 5.7  # below 8 tokens x log(vocab): the policy never collapses onto one token
    assert [x["step"] for x in evals(out)] == [0, 20]
    assert all(0 < x["eval/distinct"] <= 1 and 0 <= x["eval/similarity"] <= 1 for x in evals(out))
    check_outputs(out, lm_dir)
    assert toy_probability(out) > 5 * toy_probability(lm_dir)  # measured 40-44x (seed 1337, fp32 and bf16)


@pytest.mark.slow
def test_grpo_rloo_with_reward_model_resumes_exactly(lm_dir, rm_dir, tmp_path):
    out = tmp_path / "grpo"
    args = ["--policy", lm_dir, "--reward", rm_dir, "--out", out, "--iterations", 4, "--batch-size", 4,
            "--group-size", 2, "--minibatch-size", 4, "--epochs", 2, "--advantage", "rloo", "--lr", 1e-4,
            "--ckpt-every", 2, "--eval-every", 2, *FAST[:6]]
    shoggoth("grpo", *args, env=ENV)
    assert "objective/gold" in records(out)[-2]
    before, after = interrupt_and_resume("grpo", args, out, 2)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dpo_sequence_logps_are_the_full_forwards():
    # DPO projects to the vocabulary at the labelled positions only; the summed
    # log-probs of ragged rows must be those of the whole forward pass.
    import numpy as np

    from shoggoth.lm.model import GPT, GPTConfig
    from shoggoth.stages.dpo import sequence_logps

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, max_seq_len=32)).eval()
    g = np.random.default_rng(0)
    rows = []
    for n, start in [(12, 4), (7, 2), (20, 15)]:
        x = g.integers(1, 50, n)
        y = np.full(n, -100)
        y[start - 1:n - 1] = x[start:]  # the next tokens after the prompt
        rows.append((x, y))
    with torch.no_grad():
        got = sequence_logps(m, rows, 0, "cpu")
        for (x, y), lp in zip(rows, got):
            logp = m(torch.as_tensor(x)[None])[0].log_softmax(-1)
            keep = torch.as_tensor(y) != -100
            want = logp[keep].gather(1, torch.as_tensor(y)[keep][:, None]).sum()
            torch.testing.assert_close(lp, want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_dpo_learns_toy_pairs(lm_dir, tmp_path):
    out = tmp_path / "dpo"
    shoggoth("dpo", "--policy", lm_dir, "--rankings", toy_pairs(tmp_path / "pairs.jsonl", 240, 0), "--out", out,
             "--lr", 1e-3, "--batch-size", 16, "--warmup-steps", 2, "--eval-every", 7, "--dtype", "fp32", env=ENV)
    acc, margin = series(out, "val/rewards/accuracies"), series(out, "val/rewards/margins")
    print(f"dpo held-out implicit-reward accuracy {acc[0]:.2f} -> {acc[-1]:.2f}, margin {margin[0]:.3f} -> {margin[-1]:.3f}")
    assert series(out, "val_loss")[0] == pytest.approx(0.6931, abs=1e-3)  # log 2 at the reference
    assert acc[-1] > 0.9 and margin[-1] > 0.3
    check_outputs(out, lm_dir)
    before, after = toy_probability(lm_dir), toy_probability(out)
    print(f"dpo toy reward the policy expects {before:.3f} -> {after:.3f}")
    assert after > 2 * before  # measured 7.0-7.8x over seeds 1337, 0-3 in fp32 and bf16


@pytest.mark.slow
def test_dpo_expands_rankings_and_resumes_exactly(lm_dir, tmp_path):
    rankings = tmp_path / "rankings.jsonl"
    rows = [{"prompt": q, "completions": ["In the beginning.", "the LORD", "And God said", "Let there be light"],
             "ranks": [0, 1, 1, 2]} for q in ["Hi", "Who are you?", "What is love?", "Tell me a joke."] * 3]
    rankings.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dpo"
    args = ["--policy", lm_dir, "--rankings", rankings, "--out", out, "--eval-frac", 0.25, "--lr", 1e-4,
            "--batch-size", 5, "--epochs", 2, "--ckpt-every", 3, "--dtype", "fp32"]
    r = shoggoth("dpo", *args, env=ENV)
    # 9 train rankings of ranks (0, 1, 1, 2): 5 untied pairs each (the tie is no pair).
    assert "-> 45 / 15 (better, worse) pairs" in r.stdout
    before, after = interrupt_and_resume("dpo", args, out, 12)
    assert all(torch.equal(before[k], after[k]) for k in before)
