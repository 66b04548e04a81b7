"""Small fixtures shared by tests: a corpus cut from the built-in Bible, a tiny model directory."""

import json
import subprocess
import sys

import torch

from shoggoth import checkpoint, data, tokenizer
from shoggoth.model import GPT, GPTConfig


def bible_corpus(path, verses=1500):
    """The first `verses` verses of the built-in corpus as a JSONL corpus with `text`."""
    lines = data.bible_path().read_text().splitlines()[:verses]
    path.write_text("".join(json.dumps({"text": json.loads(ln)["text"]}) + "\n" for ln in lines))
    return path


def tiny_model_dir(path, vocab=300, seed=0, **kw):
    """A random 2-layer GPT and a tokenizer trained on a few verses, saved as a HF directory."""
    docs = [json.loads(ln)["text"] for ln in data.bible_path().read_text().splitlines()[:300]]
    tok = tokenizer.train(docs, vocab)
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tok), n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=128,
               bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = GPT(GPTConfig(**{**cfg, **kw}))
    tokenizer.save(tok, path)
    checkpoint.save_pretrained(model, path)
    return path


def shoggoth(*args, check=True, **kw):
    """Run the real command line in a subprocess."""
    r = subprocess.run([sys.executable, "-m", "shoggoth", *map(str, args)], capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"shoggoth {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r
