"""Shoggoth: pretraining, SFT and RLHF of a chat assistant, every layer of it."""

__version__ = "0.1.0"
