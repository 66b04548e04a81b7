"""The work behind `shoggoth feedback generate|simulate|export`: no argument parsing here."""

import itertools
import random
import re
import zlib
from collections import Counter
from pathlib import Path

from ..data.files import atomic_write
from ..data.prompts import load_prompts
from ..data.rankings import read_rankings
from ..errors import DataError
from . import accounts, assignments, campaigns, guidelines, oversight, queries
from .db import Rejected, connect, shown_url


def read_prompts(path):
    """Prompt records ({"messages", "references"}) of a prompts JSONL file, read and checked as
    PPO and GRPO read them (data.prompts.prompt_record): the replies are sampled for the same context."""
    return load_prompts(str(path), log=lambda *_: None)


def sample(policy, records, n, max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0, seed=0, batch_size=32,
           device="cpu"):
    """n completions of each prompt record sampled from `policy` (a model directory, run on device): a list of n
    texts per record (sampling.chat_replies, batch_size rows at a time)."""
    from ..lm import sampling

    flat = sampling.chat_replies(sampling.load(policy, device), [r["messages"] for r in records for _ in range(n)],
                                 max_new_tokens, temperature, top_k, top_p, seed, batch_size, strip=False, progress=True)
    return [flat[i * n:(i + 1) * n] for i in range(len(records))]


def generate(policy, prompts_path, k, db, campaign=None, rankings_per_task=3, max_new_tokens=64, temperature=1.0,
             top_k=0, top_p=1.0, seed=0, batch_size=32, device="cpu"):
    """Sample k completions per prompt from `policy` and store them as the ranking tasks of `campaign`."""
    if not 2 <= k <= campaigns.MAX_K:
        raise DataError(f"-k must be between 2 and {campaigns.MAX_K} (got {k})")
    records = read_prompts(prompts_path)  # bad input fails before the model loads
    texts = sample(policy, records, k, max_new_tokens, temperature, top_k, top_p, seed, batch_size, device)
    # the whole conversation the replies were sampled for: what labelers read and the export writes
    tasks = [{"messages": r["messages"], "references": r["references"], "completions": t}
             for r, t in zip(records, texts)]
    name = campaign or Path(prompts_path).stem
    engine = connect(db)
    campaigns.add_tasks(engine, name, tasks, rankings_per_task, source=str(policy))
    return name, len(tasks)


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,49}")


def parse_models(specs):
    """{name: directory} from `name=DIR` arguments, in their order."""
    models = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or not path or not MODEL_NAME.fullmatch(name):
            raise DataError(f"--models: expected NAME=DIR with a short name of letters, digits, '_', '.' or '-' "
                            f"(got {spec!r})")
        if name in models:
            raise DataError(f"--models: {name!r} given twice")
        models[name] = path
    if not 2 <= len(models) <= campaigns.MAX_K:
        raise DataError(f"--models: between 2 and {campaigns.MAX_K} models to compare (got {len(models)})")
    return models


def add_comparison(engine, campaign, records, answers, settings, rankings_per_task=3, rng=None):
    """Store an evaluation campaign: for each prompt record (its `messages`, or a `prompt` string, and
    `references`), the answer of each model (answers: {model: one text per record}), ranked blind
    (campaigns.add_tasks shuffles them per task). settings: how the answers were made; its "models" is set here."""
    models = list(answers)
    tasks = [{"prompt": r.get("prompt"), "messages": r.get("messages"), "references": r["references"],
              "completions": [answers[m][i] for m in models], "models": models} for i, r in enumerate(records)]
    campaigns.add_tasks(engine, campaign, tasks, rankings_per_task, settings={**settings, "models": models},
                source=" ".join(f"{m}={settings.get('dirs', {}).get(m, '')}" for m in models), rng=rng)
    return len(tasks)


def compare(models, prompts_path, db, campaign=None, rankings_per_task=3, max_new_tokens=64, temperature=1.0, top_k=0,
            top_p=1.0, seed=0, batch_size=32):
    """A blind evaluation campaign: one answer per prompt from each model ({name: directory}),
    all sampled with the same settings and seed (recorded in the campaign), ranked by labelers
    as ordinary tasks. Returns (campaign name, number of tasks)."""
    records = read_prompts(prompts_path)  # bad input fails before a model loads
    name = campaign or f"eval-{Path(prompts_path).stem}"
    engine = connect(db)
    if campaigns.campaign_id(engine, name, required=False) is not None:
        raise DataError(f"campaign {name!r} exists already: name the evaluation with --campaign")
    settings = {"dirs": {m: str(d) for m, d in models.items()}, "prompts": str(prompts_path),
                "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                "seed": seed}
    # stripped: a stray space or newline around an answer is no clue to its model
    answers = {m: [t[0].strip() for t in sample(d, records, 1, max_new_tokens, temperature, top_k, top_p, seed,
                                                batch_size)] for m, d in models.items()}
    return name, add_comparison(engine, name, records, answers, settings, rankings_per_task)


def import_preferences(path, db, campaign=None, rankings_per_task=3, skip_invalid=False, log=print, known=False):
    """A preference set (rankings as exported, TRL pairs, HH transcripts, scored completions: what
    `shoggoth reward` reads, from JSONL or a dataset) as a new campaign of ranking tasks, so that
    people re-rank or extend it; its own order is kept as the campaign's hidden reference
    (agreements), never shown to labelers. Every row is read and checked before anything
    is stored: a bad row is a one-line error and nothing is imported. Returns (name, tasks, K).

    With `known`, the rows are known-answer tasks instead, their order the expected one, added to
    `campaign` (made if new): they are mixed into its labelers' tasks at its gold rate."""
    recs = read_rankings(str(path), skip_invalid, log)
    ks = sorted({len(r["completions"]) for r in recs})
    if len(ks) > 1:
        raise DataError(f"{path}: a campaign's tasks all have one number of completions; this set has K = "
                        f"{', '.join(map(str, ks))}: split it by K and import each as its own campaign")
    name = campaign or f"import-{Path(str(path)).stem}"
    engine = connect(db)
    if known:
        tasks = [{"messages": r["prompt"], "references": [], "completions": r["completions"],
                  "expected": list(r["ranks"])} for r in recs]  # the whole conversation, as below
        campaigns.add_tasks(engine, name, tasks, rankings_per_task, source=f"import {path}")
        return name, len(tasks), ks[0]
    if campaigns.campaign_id(engine, name, required=False) is not None:
        raise DataError(f"campaign {name!r} exists already: import into a new campaign (--campaign)")
    tasks = [{"messages": r["prompt"], "references": [], "completions": r["completions"]} for r in recs]  # whole
    info = {"imported": str(path), "reference_ranks": [list(r["ranks"]) for r in recs]}
    campaigns.add_tasks(engine, name, tasks, rankings_per_task, source=f"import {path}", info=info)
    return name, len(tasks), ks[0]


def agreements(db, campaign, seed=0):
    """(how a campaign's labelers agree with each other: agreement.agreement's summary, {labeler:
    (mean Kendall tau-b with an imported campaign's own order, rankings compared)} or None for a
    campaign that was not imported, and `quality`'s (threshold, each labeler's measures and flags)),
    from one read of its rankings."""
    from .agreement import agreement, kendall_tau_b

    engine = connect(db)
    cid = campaigns.campaign_id(engine, campaign)
    rows = queries.rank_vectors(engine, cid)
    measured = quality(engine, cid, rows, seed=seed)
    ref = campaigns.round_progress(engine, campaign)["settings"].get("reference_ranks")
    if ref is None:
        return agreement(rows), None, measured
    order = dict(zip(queries.task_ids(engine, cid), ref))
    taus = {}
    for row in rows:
        if row["task_id"] not in order:  # a known-answer task added to the imported campaign later
            continue
        t = kendall_tau_b(row["ranks"], order[row["task_id"]])
        if t is not None:
            taus.setdefault(row["labeler"], []).append(t)
    return agreement(rows), {name: (sum(v) / len(v), len(v)) for name, v in sorted(taus.items())}, measured


def quality(engine, cid, rows=None, settings=None, seed=0):
    """(the campaign's flag threshold, agreement.labeler_quality of its labelers against each other
    and its known answers); rows: its rank_vectors, settings: its oversight.quality_settings, read if None."""
    from .agreement import FLAG_BELOW, labeler_quality

    settings = settings or oversight.quality_settings(engine)[0][cid]
    rows = queries.rank_vectors(engine, cid) if rows is None else rows
    threshold = FLAG_BELOW if settings["flag_below"] is None else settings["flag_below"]
    return threshold, labeler_quality(rows, settings["expected"], threshold, seed=seed)


def low_agreement(engine, below, campaign=None, log=print):
    """{(campaign, labeler)} whose agreement with the others (agreement.consensus_taus, the mean over
    their tasks) is below `below`, in the campaigns an export of `campaign` holds; says which on `log`.
    A labeler who shares no task with another has no measure and is kept."""
    from .agreement import consensus_taus

    out, kept = {}, 0
    for cid, name, evaluation in queries.campaigns(engine):
        if campaign not in (None, name) or (evaluation and campaign is None):
            continue
        rows = queries.rank_vectors(engine, cid)
        taus = consensus_taus(rows)
        n = Counter(r["labeler"] for r in rows)  # rankings per labeler
        for lab, ts in taus.items():
            tau = sum(ts.values()) / len(ts)
            if tau < below:
                out[name, lab] = (tau, n[lab])
        kept += len(set(n) - set(taus))
    left = sum(m for _, m in out.values())
    log(f"--min-agreement {below}: leaving out {left} rankings of {len(out)} labeler(s) below it"
        + "".join(f"\n  {lab} in {c!r}: tau {tau:.3f} with the others, {m} rankings"
                  for (c, lab), (tau, m) in sorted(out.items())))
    if kept:
        log(f"  kept {kept} labeler(s) who share no task with another (no agreement to measure)")
    return set(out)


def winrates(db, campaign, resamples=None, seed=0):
    """The win-rate summary (winrate.summary) of an evaluation campaign."""
    from . import winrate

    settings, rows = queries.judgements(connect(db), campaign)
    return winrate.summary(rows, settings["models"], resamples or winrate.RESAMPLES, seed)


def set_guidelines(db, campaign, path=None):
    """A campaign's guidelines from the Markdown file `path` ('-': standard input; None clears them):
    (their version or None, characters). Nothing is stored unless the whole file reads as UTF-8."""
    import sys

    text = None
    if path is not None:
        try:
            raw = sys.stdin.buffer.read() if path == "-" and hasattr(sys.stdin, "buffer") else (
                sys.stdin.read().encode() if path == "-" else Path(path).read_bytes())
            text = raw.decode("utf-8-sig")
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    engine = connect(db)
    cid = campaigns.campaign_id(engine, campaign)
    try:
        version = guidelines.set_guidelines(engine, cid, text)
    except Rejected as e:
        raise DataError(f"{path}: {e}") from None
    return version, len((text or "").strip())


def labeler_seed(persona, i, seed):
    return zlib.crc32(f"{persona}/{i}/{seed}".encode())


def simulate(db, persona="balanced", labelers=3, campaign=None, seed=0, noise=None, max_tasks=None, mode="normal"):
    """Simulated labelers `sim-<persona>-<i>` rank tasks through the same assignment and submission
    code as people, in turns, until nothing is left for them (or each did max_tasks; a paused one
    stops). `mode` (simulated.MODES) other than "normal": `sim-<persona>-<mode>-<i>`, who rank at
    random or worst first. Returns {labeler name: rankings submitted}."""
    from ..evaluation.simulated import SimulatedLabeler, persona as get_persona

    get_persona(persona)  # a clear error for an unknown name
    if labelers < 1:
        raise DataError("--labelers must be at least 1")
    engine = connect(db)
    cid = campaigns.campaign_id(engine, campaign) if campaign else None
    crowd = []
    kind = persona if mode == "normal" else f"{persona}-{mode}"
    for i in range(labelers):
        name = f"sim-{kind}-{i}"
        sim = SimulatedLabeler(persona, labeler_seed(kind, i, seed), noise, mode)
        # The order completions are shown in is shuffled (against position bias); seeded here,
        # so that the same seed gives the same rankings: the labeler's noise follows that order.
        shuffle = random.Random(f"display/{persona}/{i}/{seed}")
        crowd.append((name, accounts.labeler_id(engine, name), sim, shuffle))
    done = {entry[0]: 0 for entry in crowd}
    while crowd:
        for entry in list(crowd):
            name, lid, sim, shuffle = entry
            # max_tasks is checked first: next_task assigns a task, which stays open until its lease expires
            try:
                task = None if max_tasks is not None and done[name] >= max_tasks else \
                    assignments.next_task(engine, lid, rng=shuffle, campaign_id=cid)
            except Rejected as e:  # paused by the admin
                if e.status != 423:
                    raise
                task = None
            if task is None:
                crowd.remove(entry)
                continue
            refs = queries.tasks_for_simulation(engine, [task["task_id"]])[task["task_id"]]["references"]
            shown = task["completions"]
            ranks, flags = sim.rank(task["prompt"], [c["text"] for c in shown], refs)
            groups = [[c["id"] for c, r in zip(shown, ranks) if r == g] for g in range(max(ranks) + 1)]
            assignments.submit(engine, lid, task["task_id"], groups, flags)
            done[name] += 1
    return done


def export(db, out, pairs=False, campaign=None, min_agreement=None, log=print):
    """Write rankings (or TRL pairs) as JSONL, streamed from the database to a temporary file
    renamed over `out` at the end; returns how many lines. With min_agreement, the rankings of
    labelers whose agreement with the others is below it are left out (low_agreement, said on log)."""
    engine = connect(db, create=False)
    if engine.url.get_backend_name() == "sqlite" and engine.url.database \
            and Path(engine.url.database).resolve() == Path(out).resolve():
        raise DataError(f"--out {out} is the database itself: writing the export there would replace every ranking")
    if min_agreement is not None and not -1 <= min_agreement <= 1:
        raise DataError(f"--min-agreement {min_agreement}: a Kendall tau, between -1 and 1")
    leave_out = frozenset()
    if min_agreement is not None:
        try:
            leave_out = low_agreement(engine, min_agreement, campaign, log)
        except Exception as e:
            not_ours(e, db)
    blocks = queries.export_jsonl(engine, campaign, pairs, leave_out=leave_out)
    try:
        first = next(blocks, "")  # the first read: a database without our tables fails here
    except Exception as e:
        not_ours(e, db)
    out = Path(out)
    if out.is_dir():
        raise DataError(f"--out {out}: a directory; name the JSONL file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = 0

    def write(tmp):
        nonlocal lines
        with open(tmp, "w", encoding="utf-8") as f:
            for block in itertools.chain([first], blocks):
                f.write(block)
                lines += block.count("\n")  # JSON escapes the newlines inside strings

    atomic_write(out, write)
    return lines


def not_ours(e, db):
    """Raise e again, as a one-line error if the database could not answer (not a feedback database)."""
    if type(e).__module__.startswith("sqlalchemy"):
        raise DataError(f"--db {shown_url(db)}: not a feedback database ({type(e).__name__})") from None
    raise e
