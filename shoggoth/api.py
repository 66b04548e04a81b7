"""The Python API: every stage as a function of its Config's fields, returning a Result (never
exiting the interpreter), for a notebook or a script of one's own. It runs what the command line
runs (`shoggoth sft --init DIR ...` is `shoggoth.sft(init="DIR", ...)`), with the same checks:
an unknown field or a value out of range raises config.UsageError before anything runs, bad
input raises errors.ShoggothError (DataError, ModelDirError) with the command line's one-line
message. The feedback jobs (sample, rank, export, win rates) are shoggoth.feedback.jobs's
functions. docs/python.md holds an end-to-end script; tests/test_api.py runs it."""

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Result:
    """What a stage leaves: its output directory (a Hugging Face model directory), its Config as it
    ran, the last value of each metric it logged, and what its run() returned (rounds: rounds.json)."""

    out: Path
    config: object
    metrics: dict = field(default_factory=dict)
    value: object = None


def run(command, preset=None, **fields):
    """Stage `command` ("pretrain", "sft", "reward", "ppo", "dpo", "grpo", "rounds") on a preset or
    TOML file (optional) and fields named as its Config's (the flags with _ for -) -> Result."""
    from . import config
    from .train import metrics

    if command not in config.STAGES:
        raise config.UsageError(f"no stage {command!r} (stages: {', '.join(config.STAGES)})")
    try:
        mod, cfg = config.load(command, preset, **fields)
    except TypeError as e:  # a field its Config lacks
        raise config.UsageError(f"shoggoth.{command}: {e}") from None
    value = mod.run(cfg)
    out = Path(cfg.out)
    last = {}
    if (out / "metrics.jsonl").exists():
        for row in metrics.read(out / "metrics.jsonl"):
            last.update(row)
    return Result(out, cfg, last, value)


def _stage(command, doc):
    def call(preset=None, **fields):
        return run(command, preset, **fields)

    call.__name__ = call.__qualname__ = command
    call.__doc__ = f"{doc}: `shoggoth {command}`. Fields as its Config's (`shoggoth {command} --help`); -> Result."
    return call


pretrain = _stage("pretrain", "A tokenizer and a GPT pretrained from scratch (or continued from init=DIR)")
sft = _stage("sft", "Supervised fine-tuning on conversations")
reward = _stage("reward", "A reward model on K-way rankings or pairs")
ppo = _stage("ppo", "PPO against a reward model with a KL leash")
dpo = _stage("dpo", "DPO on rankings or pairs")
grpo = _stage("grpo", "GRPO against a reward model")
rounds = _stage("rounds", "Rounds of online RLHF (sample, rank, reward model, RL); Result.value is rounds.json's content")
