"""`shoggoth <command>`: turns flags and TOML presets into a stage Config, nothing else.

Stage commands get one flag per field of the stage's Config dataclass
(`--n-layer 4`, `--compile/--no-compile`), with the field's comment as help.
Precedence: dataclass defaults < `--config FILE.toml` (or a preset name) < flags.
"""

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import sys
import types
import typing
from pathlib import Path

from .config import STAGES, UsageError, build, field_docs
from .errors import ShoggothError


def _kind(tp):
    """(python type, is_list) for a field annotation like int, str | None, list[str]."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def stage_parser(command, cls):
    p = argparse.ArgumentParser(prog=f"shoggoth {command}", description=(cls.__doc__ or "").strip(),
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="TOML file, or the name of a preset in shoggoth/configs/")
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    own = inspect.get_annotations(cls)
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):  # the stage's own flags, then inherited ones
        tp, is_list = _kind(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%")  # argparse formats help with %
        if tp is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_)
        else:
            p.add_argument(flag, dest=f.name, type=tp, nargs="+" if is_list else None, help=help_)
    return p


def make_config(cls, argv, command="stage"):
    """Config instance from defaults, an optional TOML file and flags."""
    args = vars(stage_parser(command, cls).parse_args(argv))
    try:
        return build(cls, args.pop("config", None), command, **args)
    except ShoggothError:  # a model that cannot be found (checkpoint.resolve): the stage's own kind of error
        raise
    except (TypeError, ValueError) as e:
        raise UsageError(f"shoggoth {command}: {e}") from None


# ---------------------------------------------------------------- commands


def cmd_tokenizer(argv):
    p = argparse.ArgumentParser(prog="shoggoth tokenizer", description="Train a byte-level BPE tokenizer.")
    p.add_argument("--corpus", nargs="*", default=[], help="text/markdown files, folders, JSONL with 'text' (or Parquet, Arrow, a save_to_disk folder, a hub ID:SPLIT), builtin:bible or builtin:chitchat (default: builtin:bible)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from .data.corpus import read_corpus
    from .lm import tokenizer

    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: a file, not a directory")
    if (out / "config.json").exists():  # a model's tokenizer is part of it: replacing it breaks the model
        raise UsageError(f"--out {out} holds a model (config.json): pick another directory")
    if a.vocab_size < 257 + len(tokenizer.SPECIALS):
        raise UsageError(f"--vocab-size must be at least {257 + len(tokenizer.SPECIALS)} (256 bytes, the special tokens "
                         f"and one merge; got {a.vocab_size})")
    docs = read_corpus(a.corpus)
    tok = tokenizer.train(docs, a.vocab_size)
    tokenizer.save(tok, a.out)
    print(f"tokenizer: {len(tok)} tokens ({a.vocab_size} asked) saved to {a.out}")


def cmd_sample(argv):
    p = argparse.ArgumentParser(prog="shoggoth sample", description="Print completions of a prompt.")
    model_flags(p, "model_dir", "a model directory")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("-n", "--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    check_sampling(a)
    from .lm import sampling
    from .lm.checkpoint import resolve

    for text in sampling.complete(resolve(a.model_dir, a.revision), [a.prompt] * a.num_samples,
                                  max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                                  top_p=a.top_p, seed=a.seed):
        print(a.prompt + text)
        print("-" * 40)


def model_flags(p, name, what):
    """A command's model argument (`name`: positional or a flag), which may be a Hugging Face hub id
    (checkpoint.resolve makes it a directory), and its --revision."""
    p.add_argument(name, **({"required": True} if name.startswith("-") else {}),
                   help=f"{what}, or a Hugging Face hub id (org/name)")
    p.add_argument("--revision", default="", help=f"branch, tag or commit of {name.lstrip('-').upper()} when it is a "
                                                  f"hub id (default: main)")


def check_sampling(a):
    """sample's and chat's flags in range and their prompt valid text, or a UsageError."""
    if getattr(a, "num_samples", 1) < 1:
        raise UsageError(f"-n must be at least 1 (got {a.num_samples})")
    if a.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1 (got {a.max_new_tokens})")
    if not 0 <= a.temperature < float("inf"):
        raise UsageError(f"--temperature must be 0 (greedy) or more (got {a.temperature})")
    if not 0 < a.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1] (got {a.top_p})")
    if a.top_k < 0:
        raise UsageError(f"--top-k must be 0 (off) or more (got {a.top_k})")
    for flag in ("prompt", "system"):
        if not valid_text(getattr(a, flag, None) or ""):
            raise UsageError(f"--{flag} is not valid UTF-8 text")


def valid_text(text):
    """False for a string holding bytes that were not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def cmd_score(argv):
    p = argparse.ArgumentParser(prog="shoggoth score", description="Print a reward model's score of a completion.")
    model_flags(p, "model_dir", "a `shoggoth reward` output directory")
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--completion", required=True, help="the assistant's reply")
    p.add_argument("--raw", action="store_true", help="without the normalisation shift (what transformers gives)")
    a = p.parse_args(argv)
    from .lm.checkpoint import resolve
    from .evaluation.scoring import score_texts

    print(f"{score_texts(resolve(a.model_dir, a.revision), a.prompt, [a.completion], raw=a.raw)[0]:.4f}")


def cmd_chat(argv):
    p = argparse.ArgumentParser(prog="shoggoth chat", description="Talk to a model directory in the terminal.")
    model_flags(p, "model_dir", "a model directory")
    p.add_argument("--prompt", help="answer this once and exit (for scripts)")
    p.add_argument("--system", help="a system message opening the conversation")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args(argv)
    check_sampling(a)
    from .lm import sampling
    from .lm.checkpoint import resolve
    from .errors import DataError

    model = sampling.load(resolve(a.model_dir, a.revision))
    opts = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    start = [{"role": "system", "content": a.system}] if a.system else []
    history = list(start)

    def answer(text):
        history.append({"role": "user", "content": text})
        reply = ""
        for piece in sampling.chat_stream(model, history, **opts):
            print(piece, end="", flush=True)
            reply += piece
        print(flush=True)
        history.append({"role": "assistant", "content": reply})

    if a.prompt is not None:
        answer(a.prompt)
        return
    print(f"chatting with {a.model_dir}; /reset clears the history, /quit exits")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history[:] = start
            print("(history cleared)")
        elif not valid_text(text):
            print("(that line is not valid UTF-8 text; not sent)")
        elif text:
            print("assistant> ", end="", flush=True)
            try:
                answer(text)
            except DataError as e:  # the conversation outgrew the context window: say so, keep the session
                history.pop()
                print(f"\n({e}; /reset starts over)")


def cmd_report(argv):
    p = argparse.ArgumentParser(prog="shoggoth report",
                                description="One self-contained HTML page of a run: every stage's curves and the mask.")
    p.add_argument("run_dir", help="a `shoggoth demo` output directory (a run that stopped early works too)")
    p.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html)")
    a = p.parse_args(argv)
    from .evaluation import report

    print(f"report written to {report.write(a.run_dir, a.out)}")


def cmd_demo(argv):
    p = argparse.ArgumentParser(prog="shoggoth demo", description="Every stage on the built-in defaults.")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="the same pipeline at toy scale, for smoke tests")
    p.add_argument("--budget", default="20m", type=seconds,
                   help="time for the whole run, e.g. 20m, 1h, 900s (default 20m): a pretraining step timed at the "
                        "start sets the pretraining steps to fit it (with --init: the prompts a round)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast dtype of every stage (auto: bf16 where this CPU runs it fast, else fp32)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when PyTorch sees a GPU)")
    p.add_argument("--init", default="", metavar="DIR",
                   help="your model (a Hugging Face directory or hub id, with a chat template): run the RLHF half (two rounds of "
                        "simulated rankings, reward model, PPO; DPO; blind win rates) on it instead of pretraining one, "
                        "its prompts a round sized to --budget from its sampling speed: a pre-flight before paying people")
    p.add_argument("--scale", default="cpu", choices=["cpu", "small-gpu"],
                   help="cpu: a 4M-parameter model, pretraining steps fitted to --budget; small-gpu: a 30M-parameter "
                        "model at fixed steps (minutes on one GPU; no budget)")
    a = p.parse_args(argv)
    from . import demo

    demo.run(a.out, a.quick, a.dtype, a.budget, a.device, a.scale, a.init)


def seconds(text):
    """'20m', '1h', '90s' or '90' as seconds (argparse type)."""
    units = {"s": 1, "m": 60, "h": 3600}
    num, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 20m, 1h or 900s") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the budget must be positive")
    return value


def sampling_flags(p):
    """The flags of how completions are sampled into ranking tasks (`feedback generate` and `compare`)."""
    p.add_argument("--rankings-per-task", type=int, default=3, help="N: rankings each task collects")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def cmd_feedback(argv):
    from .feedback.agreement import FLAG_BELOW
    from .evaluation.simulated import MODES

    p = argparse.ArgumentParser(prog="shoggoth feedback", description="Human (and simulated) rankings of completions.")
    sub = p.add_subparsers(dest="action", required=True)
    db_help = "SQLAlchemy URL (postgresql://user@host/db) or a SQLite file path (default: feedback.db)"
    g = sub.add_parser("generate", help="sample K completions per prompt and store them as ranking tasks")
    model_flags(g, "--policy", "model directory to sample from")
    g.add_argument("--prompts", required=True, help="{prompt} or {messages} records, optionally {references}: JSONL, Parquet, Arrow, a save_to_disk folder or a hub ID:SPLIT")
    g.add_argument("-k", type=int, default=4, help="completions per prompt")
    g.add_argument("--db", default="feedback.db", help=db_help)
    g.add_argument("--campaign", help="campaign name (default: the prompts file's name)")
    sampling_flags(g)
    c = sub.add_parser("compare", help="a blind evaluation: one answer per prompt from each model, ranked by labelers")
    c.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR",
                   help="the models to compare, e.g. sft=runs/sft ppo=runs/ppo (win rates: each over those before it); "
                        "a DIR may be a Hugging Face hub id (org/name, at main)")
    c.add_argument("--prompts", required=True,
                   help="held-out prompts (as generate's --prompts)")
    c.add_argument("--db", default="feedback.db", help=db_help)
    c.add_argument("--campaign", help="campaign name, new (default: eval-<the prompts file's name>); labelers "
                                      "see only 'evaluation'")
    sampling_flags(c)
    w = sub.add_parser("winrate", help="win rates of the models of an evaluation campaign, with 95%% intervals")
    w.add_argument("--db", default="feedback.db", help=db_help)
    w.add_argument("--campaign", required=True, help="an evaluation campaign (made by `feedback compare`)")
    w.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the prompts")
    w.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    w.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    s = sub.add_parser("serve", help="run the ranking web app")
    s.add_argument("--db", default="feedback.db", help=db_help)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--admin-token", help="admin token, 128+ bits (visible to every user of this machine in `ps`: prefer "
                                         "$SHOGGOTH_ADMIN_TOKEN or --admin-token-file; default: a random one, printed)")
    s.add_argument("--admin-token-file", help="a file holding the admin token (default: $SHOGGOTH_ADMIN_TOKEN, else "
                                              "a random one, printed)")
    s.add_argument("--trusted-proxy", help="address of a TLS reverse proxy whose X-Forwarded-Proto is believed "
                                           "(cookies are then Secure); see docs/deploy.md")
    m = sub.add_parser("simulate", help="simulated labelers rank the open tasks")
    m.add_argument("--db", default="feedback.db", help=db_help)
    m.add_argument("--persona", default="balanced", help="balanced, helpful, friendly or concise")
    m.add_argument("--labelers", type=int, default=3)
    m.add_argument("--campaign", help="only this campaign's tasks")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--noise", type=float, help="score noise of each labeler (default: the persona's)")
    m.add_argument("--max-tasks", type=int, help="at most this many rankings per labeler")
    m.add_argument("--mode", default="normal", choices=MODES,
                   help="normal: by the persona's taste; random or reverse (worst first): a careless or adversarial "
                        "labeler, sim-<persona>-<mode>-<i>")
    i = sub.add_parser("import", help="a preference set (rankings, TRL pairs, HH transcripts, scored completions) as a "
                                      "new campaign for people to re-rank; its order kept as a hidden reference")
    i.add_argument("--data", required=True, help="JSONL, Parquet, Arrow, a save_to_disk folder or a hub ID:SPLIT")
    i.add_argument("--db", default="feedback.db", help=db_help)
    i.add_argument("--campaign", help="a new campaign's name (default: import-<the file's name>)")
    i.add_argument("--rankings-per-task", type=int, default=3, help="rankings each task collects")
    i.add_argument("--skip-invalid", action="store_true", help="skip (and count) invalid rows instead of stopping")
    i.add_argument("--known-answer", action="store_true",
                   help="the rows are known-answer tasks, their order the expected one, added to --campaign (made if "
                        "new) and mixed into its labelers' tasks at its --gold-rate (`feedback quality`)")
    r = sub.add_parser("agreement", help="how the labelers of a campaign agree with each other, and with an imported "
                                         "set's own order")
    r.add_argument("--db", default="feedback.db", help=db_help)
    r.add_argument("--campaign", required=True)
    r.add_argument("--seed", type=int, default=0, help="the seed of the bootstrap intervals")
    u = sub.add_parser("guidelines", help="set a campaign's guidelines for labelers from a Markdown file (shown before "
                                          "their next task; a change is shown again)")
    u.add_argument("--db", default="feedback.db", help=db_help)
    u.add_argument("--campaign", required=True)
    u.add_argument("file", nargs="?", help="a Markdown file, UTF-8 ('-': standard input)")
    u.add_argument("--clear", action="store_true", help="remove the campaign's guidelines")
    q = sub.add_parser("quality", help="a campaign's known-answer rate and flag threshold: show or set them")
    q.add_argument("--db", default="feedback.db", help=db_help)
    q.add_argument("--campaign", required=True)
    q.add_argument("--gold-rate", type=float, help="share of each labeler's tasks drawn from the known-answer ones, "
                                                   "unannounced (0 to 0.5; default 0: none)")
    q.add_argument("--flag-below", type=float, help="flag a labeler whose agreement interval lies wholly below this "
                                                    f"Kendall tau (default {FLAG_BELOW})")
    x = sub.add_parser("expect", help="make a task a known-answer task (its expected ranking), or an ordinary one again")
    x.add_argument("--db", default="feedback.db", help=db_help)
    x.add_argument("--task", type=int, required=True, help="the task's id (as exported: task_id)")
    x.add_argument("--ranks", type=int, nargs="+", help="the expected rank of each completion in its stored (exported) "
                                                        "order, 0 best, ties share a rank")
    x.add_argument("--clear", action="store_true", help="no known answer any more")
    for verb, what in (("pause", "no new tasks for a labeler, their open one released"), ("resume", "undo pause")):
        v = sub.add_parser(verb, help=what)
        v.add_argument("name", help="the labeler's name")
        v.add_argument("--db", default="feedback.db", help=db_help)
    e = sub.add_parser("export", help="write rankings (or TRL pairs) as JSONL")
    e.add_argument("--db", default="feedback.db", help=db_help)
    e.add_argument("--out", required=True)
    e.add_argument("--pairs", action="store_true", help="TRL pairs {prompt, chosen, rejected} instead of rankings")
    e.add_argument("--campaign", help="only this campaign (evaluation campaigns are exported only when named)")
    e.add_argument("--min-agreement", type=float, metavar="TAU",
                   help="leave out the rankings of labelers whose agreement with the others in a campaign (Kendall tau "
                        "with their consensus, as `feedback agreement` shows) is below TAU; which, on stderr")
    a = p.parse_args(argv)
    from .lm.checkpoint import resolve
    from .feedback import accounts, campaigns, jobs, oversight
    from .feedback.db import connect, shown_url

    if a.action == "generate":
        name, n = jobs.generate(resolve(a.policy, a.revision), a.prompts, a.k, a.db, a.campaign, a.rankings_per_task,
                                a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed)
        print(f"campaign {name!r}: {n} tasks of {a.k} completions stored in {shown_url(a.db)}")
    elif a.action == "compare":
        models = {m: resolve(d) for m, d in jobs.parse_models(a.models).items()}
        name, n = jobs.compare(models, a.prompts, a.db, a.campaign, a.rankings_per_task,
                               a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed)
        print(f"evaluation campaign {name!r}: {n} prompts, one answer from each of {len(a.models)} models, stored in "
              f"{shown_url(a.db)}; labelers rank them blind (`feedback serve` or `feedback simulate --campaign {name}`)")
    elif a.action == "winrate":
        from .feedback import winrate

        if a.resamples < 1:
            raise UsageError("--resamples must be at least 1")
        s = jobs.winrates(a.db, a.campaign, a.resamples, a.seed)
        print(json.dumps(s, indent=1) if a.json else f"campaign {a.campaign!r}: " + "\n".join(winrate.table(s)))
    elif a.action == "serve":
        from .feedback.app import serve

        if a.admin_token is not None:
            print("warning: --admin-token is visible to every user of this machine (ps, /proc); "
                  "prefer $SHOGGOTH_ADMIN_TOKEN or --admin-token-file", file=sys.stderr)
        serve(a.db, a.host, a.port, a.admin_token, trusted_proxy=a.trusted_proxy, admin_token_file=a.admin_token_file)
    elif a.action == "simulate":
        done = jobs.simulate(a.db, a.persona, a.labelers, a.campaign, a.seed, a.noise, a.max_tasks, a.mode)
        print(f"{sum(done.values())} rankings by {len(done)} simulated labelers: "
              + ", ".join(f"{k} {v}" for k, v in done.items()))
    elif a.action == "import":
        name, n, k = jobs.import_preferences(a.data, a.db, a.campaign, a.rankings_per_task, a.skip_invalid,
                                             known=a.known_answer)
        if a.known_answer:
            print(f"campaign {name!r}: {n} known-answer tasks of {k} completions added from {a.data}; labelers meet "
                  f"them unannounced at the campaign's gold rate (`feedback quality --campaign {name} --gold-rate R`)")
        else:
                print(f"campaign {name!r}: {n} tasks of {k} completions imported from {a.data} into {shown_url(a.db)}, "
                  f"their order kept as a hidden reference (`feedback agreement --campaign {name}`)")
    elif a.action == "agreement":
        g, ref, (threshold, labs) = jobs.agreements(a.db, a.campaign, a.seed)
        print(f"campaign {a.campaign!r}: labelers agree with each other at Kendall tau {tau_text(g['tau'])} "
              f"({g['pairs']} pairs of rankings of one task), Krippendorff alpha {tau_text(g['alpha'])}")
        for name, m in labs.items():
            print(f"  {name}: " + "; ".join(f"tau {tau_text(x['tau'])} {interval_text(x)} with {what} over {x['tasks']} tasks"
                                             for what, x in (("the others' consensus", m["others"]),
                                                             ("the known answers", m["known"])) if x)
                  + (f"  FLAGGED ({', '.join(m['flagged'])})" if m["flagged"] else ""))
        for name, (tau, n) in (ref or {}).items():
            print(f"  {name}: tau {tau_text(tau)} with the imported order over {n} rankings")
        flagged = [name for name, m in labs.items() if m["flagged"]]
        print(f"flagged (a 95% interval wholly below tau {threshold:g}): {', '.join(flagged) or 'nobody'}")
    elif a.action == "guidelines":
        if (a.file is None) == (not a.clear):
            raise UsageError("give a Markdown FILE or --clear (not both)")
        version, n = jobs.set_guidelines(a.db, a.campaign, a.file)
        print(f"campaign {a.campaign!r}: guidelines " + (f"set ({n} characters, version {version}); each labeler reads "
              "them before their next task" if version else "removed"))
    elif a.action == "quality":
        engine = connect(a.db)
        cid = campaigns.campaign_id(engine, a.campaign)
        set_ = oversight.set_quality(engine, cid, a.gold_rate, a.flag_below)
        below = FLAG_BELOW if set_["flag_below"] is None else set_["flag_below"]
        known = oversight.quality_settings(engine)[0][cid]["known"]
        print(f"campaign {a.campaign!r}: {known} known-answer tasks, met at rate {set_['gold_rate']:g}; labelers "
              f"flagged below tau {below:g}")
    elif a.action == "expect":
        if (a.ranks is None) == (not a.clear):
            raise UsageError("feedback expect: give --ranks R0 R1 ... or --clear")
        got = oversight.set_expected(connect(a.db), a.task, a.ranks)
        print(f"task {a.task}: " + (f"a known-answer task, expected ranks {got}" if got else "an ordinary task"))
    elif a.action in ("pause", "resume"):
        engine = connect(a.db)
        oversight.pause_labeler(engine, accounts.find_labeler(engine, a.name), a.action == "pause")
        print(f"{a.name}: " + ("paused (no new tasks; their open one released)" if a.action == "pause" else "resumed"))
    else:
        n = jobs.export(a.db, a.out, a.pairs, a.campaign, a.min_agreement, log=lambda m: print(m, file=sys.stderr))
        print(f"{n} {'pairs' if a.pairs else 'rankings'} written to {a.out}")


def tau_text(v):
    """A Kendall tau as `feedback agreement` prints it ("-": none)."""
    return "-" if v is None else f"{v:.3f}"


def interval_text(m):
    """A measure's interval as `feedback agreement` prints it."""
    return "[too few tasks for an interval]" if m["low"] is None else f"[{m['low']:.2f}, {m['high']:.2f}]"


COMMANDS = {"tokenizer": cmd_tokenizer, "sample": cmd_sample, "chat": cmd_chat, "demo": cmd_demo, "feedback": cmd_feedback,
            "score": cmd_score, "report": cmd_report}


def main(argv=None):
    rc = _main(argv)
    d = sys.modules.get("shoggoth.train.dist")
    if d is not None and d.launched:
        # A torchrun worker leaves without finalizing the interpreter. Its gloo process
        # group outlives destroy_process_group (DDP and FSDP2's device mesh still hold
        # it), and a gloo worker thread may drop its last finished collective, whose
        # tensors hold Python references, while Py_FinalizeEx runs: taking the GIL then
        # kills the thread inside C++ and the rank aborts ("terminate called without an
        # active exception": 5 of 141 two-rank FSDP pretrain runs here, 0 of 120 since;
        # gdb: ~AsyncAllgatherCoalescedWork -> gil_scoped_acquire -> PyThread_exit_thread).
        # Files a run writes are closed or flushed line by line by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _main(argv):
    argv = sys.argv[1:] if argv is None else argv
    names = sorted([*COMMANDS, *STAGES])
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: shoggoth <command> [flags]\ncommands: {', '.join(names)}\n`shoggoth <command> --help` lists a command's flags.")
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd in STAGES:
            mod = importlib.import_module(STAGES[cmd])
            mod.run(make_config(mod.Config, rest, cmd))
        elif cmd in COMMANDS:
            COMMANDS[cmd](rest)
        else:
            raise UsageError(f"unknown command {cmd!r} (commands: {', '.join(names)})")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ShoggothError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
