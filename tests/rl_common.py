"""What the RL tests (test_rl, test_lora) share: one-thread runs, a tiny model trained for a moment on
verses, a reward model on its trunk, the toy reward a model expects, interrupt-and-resume, toy DPO pairs."""

import functools
import json
import os
import random

import pytest
import torch

import common
from common import tiny_lm_dir
from shoggoth.lm import checkpoint, sampling, tokenizer
from shoggoth.data.corpus import bible_path
from shoggoth.data.prompts import builtin_prompts
from shoggoth.train import metrics, rl
from shoggoth.evaluation import scoring
from shoggoth.lm.model import RewardModel


# One thread per run: the tiny models gain nothing from more, and a loaded machine
# makes OpenMP's spinning threads many times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST = ["--dtype", "fp32", "--max-new-tokens", "8", "--eval-samples", "16", "--missing-eos-penalty", "0"]
interrupt_and_resume = functools.partial(common.interrupt_and_resume, env=ENV)  # the runs above use ENV


def records(path):
    return metrics.read(path / "metrics.jsonl")


def series(path, key):
    return [r[key] for r in records(path) if key in r]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """The tiny model trained for a moment on verses (common.tiny_lm_dir)."""
    return tiny_lm_dir(tmp_path_factory.mktemp("lm") / "lm")


@pytest.fixture(scope="module")
def rm_dir(lm_dir, tmp_path_factory):
    """A reward model with a random head on the tiny model's trunk (for the reward-model code path)."""
    d = tmp_path_factory.mktemp("rm") / "rm"
    torch.manual_seed(1)
    model = RewardModel(checkpoint.load_pretrained(lm_dir).config)
    checkpoint.load_trunk(model, lm_dir)
    checkpoint.save_reward(model, d, shift=0.25, tokenizer_dir=lm_dir)
    tokenizer.save(tokenizer.load(lm_dir), d)
    return d


def toy_probability(model_dir, seed=0):
    """The toy reward a model expects: the probability it gives the toy word " the" at each position
    of its own 16-token responses to the held-out questions (sampled at temperature 1), averaged over
    the positions. It has the mean of the fraction of sampled tokens that are " the", without the
    noise of counting them: for lm_dir it read 0.0197 to 0.0214 over sampling seeds 0-3, where the
    fraction of 64 sampled responses read 0.010 to 0.029, a spread that RL's gains were lost in."""
    model, tok = sampling.load(model_dir)
    r = rl.generate(model, tok, rl.encode_prompts(tok, builtin_prompts("heldout"), 100), 16, 1.0, seed=seed)
    with torch.no_grad():
        p = rl.response_logits(model, r).float().softmax(-1)[..., scoring.toy_target_ids(tok, "the")].sum(-1)
    return ((p * r.mask).sum() / r.mask.sum()).item()


def toy_pairs(path, n, seed):
    """Pairs whose chosen response is a verse and whose rejected one is the same verse without " the "."""
    rng = random.Random(seed)
    verses = [json.loads(ln)["text"] for ln in bible_path().read_text().splitlines()[:3000]]
    verses = [v for v in verses if v.count(" the ") >= 2 and len(v) < 120]
    questions = [p["messages"][0]["content"] for p in builtin_prompts("train")]
    with open(path, "w") as f:
        for _ in range(n):
            v = rng.choice(verses)
            f.write(json.dumps({"prompt": rng.choice(questions), "chosen": v, "rejected": v.replace(" the ", " ")}) + "\n")
    return path
