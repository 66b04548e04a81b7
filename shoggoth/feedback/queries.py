"""Reading the collected rankings back: the records `shoggoth reward` and `dpo` read (`export_rows`,
`export_jsonl`: streamed from the database a chunk at a time) or TRL pairs, the rank vectors that
agreement needs, an evaluation's judgements for win rates, the tasks simulated labelers rank, and
the admin's overview of campaigns and labelers. An evaluation campaign's rankings are left out of
the export unless the campaign is named.
"""

import json

from sqlalchemy import Text, false, func, select
from sqlalchemy.orm import Session

from ..errors import DataError
from .campaigns import task_counts
from .db import Assignment, Campaign, Completion, Labeler, Ranking, Task, conversation, reading

EXPORT_CHUNK = 900  # rankings read per query when streaming them all (their task ids, one parameter each, stay
# under the smallest limit on parameters a driver has, 999 in SQLite before 3.32)


def _ranking_query(*cols, campaign=None, labeler=None, evaluations=True):
    q = (select(*cols).select_from(Ranking).join(Task, Ranking.task_id == Task.id)
         .join(Campaign, Task.campaign_id == Campaign.id).join(Labeler, Ranking.labeler_id == Labeler.id))
    if campaign is not None:
        q = q.where(Campaign.name == campaign)
    if not evaluations:
        q = q.where(Campaign.evaluation == false())
    if labeler is not None:
        q = q.where(Ranking.labeler_id == labeler)
    return q


_ROW = (Ranking.id, Ranking.ranks, Ranking.flags, Ranking.seconds, Task.id, Task.prompt, Campaign.name, Labeler.name,
        Task.messages)


def _export_format(s, rows, task_ids):
    """Rows of _ROW as records {"prompt" (the last user message), "messages" (the whole conversation
    the completions answer, ending with it), "completions": [c0, ..., cK-1], "ranks": [r0, ..., rK-1]
    (0 best, ties share a rank), "labeler", "flags", "campaign", "task_id", "seconds"}, with
    `models` (the model of each completion) for an evaluation campaign's; task_ids: their tasks' ids."""
    texts, models = {}, {}
    for tid, text_, model in s.execute(select(Completion.task_id, Completion.text, Completion.model)
                                       .where(Completion.task_id.in_(task_ids))
                                       .order_by(Completion.task_id, Completion.idx)):
        texts.setdefault(tid, []).append(text_)
        models.setdefault(tid, []).append(model)
    out = [{"prompt": prompt, "messages": conversation(prompt, msgs), "completions": texts[tid], "ranks": list(ranks),
            "labeler": lab, "flags": list(flags), "campaign": camp, "task_id": tid, "seconds": round(seconds, 3)}
           for _, ranks, flags, seconds, tid, prompt, camp, lab, msgs in rows]
    for r in out:
        if models[r["task_id"]][0] is not None:
            r["models"] = models[r["task_id"]]
    return out


def iter_rankings(engine, campaign=None, labeler=None, chunk=EXPORT_CHUNK, evaluations=True):
    """Stored rankings as records of _export_format, oldest first, as a generator; without
    `evaluations`, none of an evaluation campaign's.

    Read `chunk` at a time, after the last id read (keyset pagination: no OFFSET; the
    texts of a chunk's tasks by their ids, at most `chunk` of them), each chunk in its
    own short read transaction: memory stays bounded however many there are, and a
    slow reader (a download) holds no connection between chunks. Rankings stored
    after the export began are left out."""
    with Session(reading(engine)) as s:
        top = s.scalar(select(func.max(Ranking.id)))
    after = 0
    while top is not None:
        with Session(reading(engine)) as s:
            # (no `id <= top` here: PostgreSQL, on fresh statistics, plans that range as a hash join of all of it)
            rows = s.execute(_ranking_query(*_ROW, campaign=campaign, labeler=labeler, evaluations=evaluations)
                             .where(Ranking.id > after).order_by(Ranking.id).limit(chunk)).all()
            last = len(rows) < chunk or rows[-1][0] >= top
            rows = [r for r in rows if r[0] <= top]
            out = _export_format(s, rows, {r[4] for r in rows}) if rows else []
        yield from out
        if last:
            return
        after = rows[-1][0]


def rankings(engine, campaign=None, labeler=None, limit=None):
    """Stored rankings as records of _export_format: all, oldest first, or the newest `limit`, newest first."""
    if limit is None:
        return list(iter_rankings(engine, campaign, labeler))
    with Session(reading(engine)) as s:
        rows = s.execute(_ranking_query(*_ROW, campaign=campaign, labeler=labeler)
                         .order_by(Ranking.id.desc()).limit(limit)).all()
        return _export_format(s, rows, {r[4] for r in rows})


def campaigns(engine):
    """(id, name, evaluation) of every campaign, oldest first."""
    with Session(reading(engine)) as s:
        return [tuple(r) for r in s.execute(select(Campaign.id, Campaign.name, Campaign.evaluation).order_by(Campaign.id))]


def task_ids(engine, campaign_id):
    """A campaign's task ids in the order its tasks were added."""
    with Session(reading(engine)) as s:
        return list(s.scalars(select(Task.id).where(Task.campaign_id == campaign_id).order_by(Task.id)))


def rank_vectors(engine, campaign_id):
    """{task_id, labeler, ranks} of a campaign's rankings: what agreement statistics need, without texts."""
    with Session(reading(engine)) as s:
        rows = s.execute(select(Ranking.task_id, Labeler.name, Ranking.ranks).join(Labeler, Ranking.labeler_id == Labeler.id)
                         .join(Task, Ranking.task_id == Task.id).where(Task.campaign_id == campaign_id)
                         .order_by(Ranking.id)).all()  # in one order: the win rates' cache compares them
    return [{"task_id": t, "labeler": name, "ranks": list(r)} for t, name, r in rows]


def judgements(engine, campaign):
    """An evaluation campaign's rankings, for win rates: (its settings, rows), rows {task_id, labeler,
    ranks, models, lengths}, the last two by completion position (lengths in characters)."""
    with Session(reading(engine)) as s:
        c = s.scalar(select(Campaign).where(Campaign.name == campaign))
        if c is None:
            raise DataError(f"no campaign named {campaign!r}")
        if not c.evaluation:
            raise DataError(f"campaign {campaign!r} is not an evaluation (`shoggoth feedback compare` makes those): "
                            "it has no models to compare")
        cid, settings = c.id, dict(c.settings)
        comps = {}
        for tid, model, n in s.execute(select(Completion.task_id, Completion.model, func.length(Completion.text))
                                       .join(Task, Completion.task_id == Task.id).where(Task.campaign_id == cid)
                                       .order_by(Completion.task_id, Completion.idx)):
            comps.setdefault(tid, []).append((model, n))
    rows = rank_vectors(engine, cid)
    for r in rows:
        r["models"], r["lengths"] = [m for m, _ in comps[r["task_id"]]], [n for _, n in comps[r["task_id"]]]
    return settings, rows


EXPORT_KEYS = ("prompt", "messages", "completions", "ranks", "labeler", "flags", "campaign", "task_id")


def export_rows(engine, campaign=None, as_pairs=False, leave_out=frozenset()):
    """Rankings as the records `shoggoth reward` and `dpo` read (data.rankings.ranking; the EXPORT_KEYS of
    _export_format's, and `models`), or as TRL pairs: a generator, streamed from the database.
    Evaluation campaigns never feed training: they are left out unless `campaign` names one; so are
    the rankings of the (campaign, labeler) names in `leave_out`.
    Pairs are in TRL's conversational form when a ranking exported is of a conversation beyond
    one user message, all of them, so that every line of the file has one shape."""
    evaluations = campaign is not None
    if as_pairs:
        with Session(reading(engine)) as s:
            conversational = s.scalar(_ranking_query(Ranking.id, campaign=campaign, evaluations=evaluations)
                                      .where(Task.messages.is_not(None)).limit(1)) is not None
    for r in iter_rankings(engine, campaign=campaign, evaluations=evaluations):
        if (r["campaign"], r["labeler"]) in leave_out:
            continue
        if as_pairs:
            yield from pairs(r, conversational)
        else:
            yield {k: r[k] for k in EXPORT_KEYS + ("models",) if k in r}


def export_jsonl(engine, campaign=None, as_pairs=False, block=1 << 16, leave_out=frozenset()):
    """export_rows as JSONL text, in pieces of about `block` characters (whole lines each)."""
    lines, size = [], 0
    for r in export_rows(engine, campaign, as_pairs, leave_out):
        lines.append(json.dumps(r, ensure_ascii=False) + "\n")
        size += len(lines[-1])
        if size >= block:
            yield "".join(lines)
            lines, size = [], 0
    if lines:
        yield "".join(lines)


def pairs(row, conversational=False):
    """TRL preference pairs from one ranking: every two completions with different ranks. Standard
    (strings: the prompt is the last user message), or conversational: `prompt` the whole
    conversation, `chosen` and `rejected` an assistant message each."""
    c, r = row["completions"], row["ranks"]
    if conversational:
        prompt, c = row["messages"], [[{"role": "assistant", "content": t}] for t in c]
    else:
        prompt = row["prompt"]
    return [{"prompt": prompt, "chosen": c[i], "rejected": c[j]}
            for i in range(len(c)) for j in range(len(c)) if r[i] < r[j]]


def tasks_for_simulation(engine, task_ids):
    """prompt, references and completion texts (by id) of tasks, for simulated labelers."""
    with Session(reading(engine)) as s:
        out = {t.id: {"prompt": t.prompt, "references": list(t.refs), "completions": {}}
               for t in s.scalars(select(Task).where(Task.id.in_(task_ids)))}
        for cid, tid, text in s.execute(select(Completion.id, Completion.task_id, Completion.text)
                                        .where(Completion.task_id.in_(task_ids))):
            out[tid]["completions"][cid] = text
    return out


def overview(engine):
    """Campaigns with their progress, labelers with their counts: what the admin page shows."""
    with Session(reading(engine)) as s:
        camps = []
        for c in s.scalars(select(Campaign).order_by(Campaign.id)):
            camps.append({"id": c.id, "name": c.name, "k": c.k, "n": c.rankings_per_task, "source": c.source,
                          "evaluation": c.evaluation, "settings": c.settings, **task_counts(s, c)})
        labs = []
        rows = s.execute(select(Labeler.id, Labeler.name, Labeler.simulated, Campaign.name)
                         .outerjoin(Campaign, Labeler.campaign_id == Campaign.id).order_by(Labeler.id)).all()
        stats = {lid: (n, sec, last) for lid, n, sec, last in s.execute(
            select(Ranking.labeler_id, func.count(), func.avg(Ranking.seconds), func.max(Ranking.created_at))
            .group_by(Ranking.labeler_id)).all()}
        skips = dict(s.execute(select(Assignment.labeler_id, func.count()).where(Assignment.status == "skipped")
                               .group_by(Assignment.labeler_id)).all())
        flagged = dict(s.execute(select(Ranking.labeler_id, func.count()).where(func.length(Ranking.flags.cast(Text)) > 2)
                                 .group_by(Ranking.labeler_id)).all())
        for lid, name, sim, camp in rows:
            n, sec, last = stats.get(lid, (0, None, None))
            labs.append({"id": lid, "name": name, "simulated": sim, "campaign": camp, "rankings": n,
                         "skipped": skips.get(lid, 0), "flagged": flagged.get(lid, 0),
                         "avg_seconds": sec, "last": last})
    return camps, labs
