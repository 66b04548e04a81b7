"""Small fixtures shared by tests: a corpus cut from the built-in Bible, a tiny model directory, the real
command line (in this process), a ranking's versions as the feedback database keeps them."""

import contextlib
import io
import json
import subprocess
import sys
import traceback

import torch

from shoggoth.lm import checkpoint, tokenizer
from shoggoth.data.corpus import bible_path
from shoggoth.lm.model import GPT, GPTConfig


def bible_corpus(path, verses=1500):
    """The first `verses` verses of the built-in corpus as a JSONL corpus with `text`."""
    lines = bible_path().read_text().splitlines()[:verses]
    path.write_text("".join(json.dumps({"text": json.loads(ln)["text"]}) + "\n" for ln in lines))
    return path


def tiny_model_dir(path, vocab=300, seed=0, **kw):
    """A random 2-layer GPT and a tokenizer trained on a few verses, saved as a HF directory."""
    docs = [json.loads(ln)["text"] for ln in bible_path().read_text().splitlines()[:300]]
    tok = tokenizer.train(docs, vocab)
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tok), n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=128,
               bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = GPT(GPTConfig(**{**cfg, **kw}))
    tokenizer.save(tok, path)
    checkpoint.save_pretrained(model, path)
    return path


def token_id(tok, token):
    """The id of `token` (a special token such as <|im_end|>) in a shoggoth.lm.tokenizer.Tok."""
    return tok.vocab()[token]


def ranking_history(engine, ranking_id):
    """Every version of a ranking in the feedback database, oldest first: {version, ranks, flags,
    created_at}; the last is the current one."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from shoggoth.feedback.db import Ranking, RankingVersion, reading

    with Session(reading(engine)) as s:
        r = s.get(Ranking, ranking_id)
        old = s.scalars(select(RankingVersion).where(RankingVersion.ranking_id == ranking_id)
                        .order_by(RankingVersion.version)).all()
        out = [{"version": v.version, "ranks": list(v.ranks), "flags": list(v.flags), "created_at": v.created_at}
               for v in old]
        out.append({"version": len(old) + 1, "ranks": list(r.ranks), "flags": list(r.flags), "created_at": r.created_at})
    return out


def shoggoth(*args, check=True, env=None, input=None):
    """Run the real command line, `shoggoth ARGS`, as a CompletedProcess: its main() in this process,
    with stdin, stdout and stderr redirected and torch on env's OMP_NUM_THREADS threads (a fresh
    interpreter would spend seconds importing torch and transformers again); an exception main()
    lets out is exit status 1 and its traceback. A test of what only a process of its own shows (a
    kill, torchrun, its environment, its imports) starts one with subprocess."""
    r = _in_process([str(a) for a in args], env, input)
    if check and r.returncode != 0:
        raise AssertionError(f"shoggoth {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def _in_process(args, env, stdin):
    from shoggoth import cli

    out, err, threads, was_stdin = io.StringIO(), io.StringIO(), torch.get_num_threads(), sys.stdin
    if env and env.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.stdin = io.StringIO(stdin or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(args)
            except SystemExit as e:  # argparse's usage errors
                rc = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:
                traceback.print_exc()
                rc = 1
    finally:
        sys.stdin = was_stdin
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["shoggoth", *args], rc, out.getvalue(), err.getvalue())


def cut_after(out, step):
    """A finished run's folder as if it had stopped after the checkpoint of `step`: the later
    checkpoints and the final model gone."""
    for f in (out / "checkpoints").glob("step_*.pt"):
        if int(f.stem.split("_")[1]) > step:
            f.unlink()
    (out / "model.safetensors").unlink()
    return out


def interrupt_and_resume(stage, args, out, ckpt_step, env=None):
    """Cut a finished run after ckpt_step, resume it with the same `args` (and `env`: the thread
    count changes float sums), and return the model's weights (before, after)."""
    before = checkpoint.load_state_dict(out)
    cut_after(out, ckpt_step)
    shoggoth(stage, *args, "--resume", env=env)
    return before, checkpoint.load_state_dict(out)


def tiny_lm_dir(path, steps=100):
    """tiny_model_dir trained for `steps` steps of next-token prediction on 2000 verses, so that it
    says " the" now and then (about 2% of its tokens): a toy reward has something to reinforce."""
    d = tiny_model_dir(path)
    tok, model = tokenizer.load(d), checkpoint.load_pretrained(d)
    lines = [json.loads(ln)["text"] for ln in bible_path().read_text().splitlines()[:2000]]
    ids = torch.tensor([t for row in tok.encode_batch(lines) for t in row + [tok.eos_id]])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (16,))
        w = torch.stack([ids[s:s + 65] for s in starts])
        model(w[:, :-1], targets=w[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    checkpoint.save_pretrained(model, d)
    return d
