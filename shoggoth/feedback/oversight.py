"""The admin's watch over labeler quality: known-answer tasks (a task's expected ranking,
`set_expected`), each campaign's quality settings (the share of known-answer tasks dealt to each
labeler, the agreement below which a labeler is flagged), and pausing a labeler. Dealing the known
answers and refusing a paused labeler happen in the labeling loop (`assignments`); the measures
of agreement are `agreement`'s.
"""

import time

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .db import IS_OPEN, Assignment, Campaign, Completion, Labeler, Rejected, Task, reading, release, writing

def dense_ranks(ranks, k):
    """`ranks` (a rank per completion position, 0 best, ties equal) checked for a task of k completions
    and made dense (0, 1, 2, ... without gaps), as a ranking of the labeler page is stored."""
    if not isinstance(ranks, list) or len(ranks) != k or \
            any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < k for r in ranks):
        raise Rejected(422, f"expected ranks must be a list of {k} integers from 0 (best) to {k - 1}, one per "
                            "completion in its stored order; ties share a rank")
    levels = sorted(set(ranks))
    return [levels.index(r) for r in ranks]


def set_expected(engine, task_id, ranks):
    """Make a task a known-answer task with `ranks` its expected ranking (dense_ranks' form), or an
    ordinary task again with ranks None. Returns the expected ranks stored."""
    with writing(engine) as s:
        task = s.get(Task, task_id)
        if task is None:
            raise Rejected(404, f"there is no task {task_id}")
        if s.scalar(select(Campaign.evaluation).where(Campaign.id == task.campaign_id)):
            raise Rejected(409, f"task {task_id} is in an evaluation campaign: its labelers' rankings are the "
                                "measure, there is no known answer")
        k = s.scalar(select(func.count()).select_from(Completion).where(Completion.task_id == task_id))
        task.expected = None if ranks is None else dense_ranks(ranks, k)
        return task.expected


def set_quality(engine, campaign_id, gold_rate=None, flag_below=None):
    """Set a campaign's share of known-answer tasks (0 to 0.5) and its flag threshold (a Kendall tau,
    -1 to 1), those given. Returns {gold_rate, flag_below} as stored."""
    if gold_rate is not None and not 0 <= gold_rate <= 0.5:
        raise Rejected(422, "the known-answer rate must be between 0 and 0.5 (a share of each labeler's tasks)")
    if flag_below is not None and not -1 <= flag_below <= 1:
        raise Rejected(422, "the flag threshold is a Kendall tau: between -1 and 1")
    with writing(engine) as s:
        c = s.get(Campaign, campaign_id)
        if c is None:
            raise Rejected(404, f"no campaign {campaign_id}")
        if gold_rate is not None:
            c.gold_rate = gold_rate
        if flag_below is not None:
            c.flag_below = flag_below
        return {"gold_rate": c.gold_rate, "flag_below": c.flag_below}


def pause_labeler(engine, labeler_id, paused=True):
    """Pause a labeler (no new tasks, no submissions; their open assignment released, its slot freed
    for others) or resume them. Their rankings stay. Returns when they were paused, or None."""
    with writing(engine) as s:
        lab = s.get(Labeler, labeler_id)
        if lab is None:
            raise Rejected(404, f"no labeler {labeler_id}")
        if not paused:
            lab.paused_at = None
            return None
        lab.paused_at = lab.paused_at or time.time()
        release(s, s.execute(select(Assignment.id, Assignment.task_id)
                              .where(Assignment.labeler_id == labeler_id, IS_OPEN)).all())
        return lab.paused_at


def quality_settings(engine):
    """{campaign id: {gold_rate, flag_below, known: its known-answer tasks, expected: {task id: ranks}}}
    and {labeler id: when paused} of the paused ones: what the admin's overview adds to queries.overview."""
    with Session(reading(engine)) as s:
        out = {cid: {"gold_rate": rate, "flag_below": below, "expected": {}}
               for cid, rate, below in s.execute(select(Campaign.id, Campaign.gold_rate, Campaign.flag_below))}
        for tid, cid, exp in s.execute(select(Task.id, Task.campaign_id, Task.expected)
                                       .where(Task.expected.is_not(None))):
            out[cid]["expected"][tid] = list(exp)
        paused = dict(s.execute(select(Labeler.id, Labeler.paused_at).where(Labeler.paused_at.is_not(None))).all())
    for q in out.values():
        q["known"] = len(q["expected"])
    return out, paused
