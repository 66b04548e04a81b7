"""Shoggoth: pretraining, SFT and RLHF of a chat assistant, every layer of it.

From Python (docs/python.md): shoggoth.pretrain, sft, reward, ppo, dpo and grpo take their
Config's fields and return a Result; rounds is shoggoth.run("rounds", ...) (shoggoth.rounds is
the module); the feedback jobs are in shoggoth.feedback.jobs. Importing shoggoth does not import
torch: each call loads what it needs."""

from .api import Result, dpo, grpo, ppo, pretrain, reward, run, sft

__version__ = "0.1.0"
__all__ = ["Result", "run", "pretrain", "sft", "reward", "ppo", "dpo", "grpo"]
