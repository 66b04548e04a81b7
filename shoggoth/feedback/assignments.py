"""The labeling loop: a labeler's next task (`next_task`), their ranking of it (`submit`), a skip,
a revision of one of their last rankings (`revise`), and what their page shows of their work.

Its invariants hold for any number of server threads, processes and simulated labelers at once
(the schema's own, one open assignment per labeler among them, are in `db`):

- A task's slots are `n_open + n_done < rankings_per_task`; a slot is taken by
  a conditional UPDATE, which the database serialises, so concurrent labelers
  cannot over-assign a task, and an assignment moves open -> done by another
  conditional UPDATE, so two submissions of one task cannot both count; one that finds the
  assignment changed since it read it (its lease released meanwhile) reads it again (`_answer`).
- Every change of a task's counters happens in the transaction that changes
  the assignment it counts.
- A known-answer task (its `expected` order set by the admin, `oversight.set_expected`) is also
  dealt beyond its slots, at its campaign's `gold_rate`, to labelers who still have
  ordinary work (`_known_answer`): every labeler meets some, unannounced.
- A paused labeler (`paused_at`, `oversight.pause_labeler`) gets no task and stores no ranking.
"""

import random
import time

from sqlalchemy import func, select, true, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from .campaigns import shown_name
from .db import IS_OPEN, Assignment, Campaign, Completion, Labeler, Ranking, RankingVersion, Rejected, Task, conversation, reading, release, retrying, writing

FLAGS = ("all_bad", "unsafe")  # what a labeler may flag a task as
LEASE_S = 3600.0  # an unanswered assignment frees its slot after this long
REVISABLE = 20  # a labeler may revise their own last this many rankings
# A ranking has at most this many versions (its first and 19 revisions); a further revision is refused
# rather than an old version dropped: every version stays, the first answer above all.
MAX_VERSIONS = 20


def _task_view(s, a):
    """What a labeler sees of assignment a's task: its conversation (`messages`, ending with `prompt`,
    the last user message) and its completions in the labeler's display order."""
    tid, prompt, msgs, camp, ev = s.execute(
        select(Task.id, Task.prompt, Task.messages, Campaign.name, Campaign.evaluation)
        .join(Campaign, Task.campaign_id == Campaign.id).where(Task.id == a.task_id)).one()
    texts = dict(s.execute(select(Completion.id, Completion.text).where(Completion.task_id == tid)).all())
    return {"task_id": tid, "campaign": shown_name(camp, ev), "prompt": prompt, "messages": conversation(prompt, msgs),
            "completions": [{"id": cid, "text": texts[cid]} for cid in a.display_order]}


def _release_expired(s, now):
    """Free the slots of assignments whose lease ran out (their labeler may still submit them)."""
    stale = s.execute(select(Assignment.id, Assignment.task_id).where(Assignment.status == "open",
                                                                      Assignment.expires_at < now)
                      .order_by(Assignment.id).limit(50)).all()
    release(s, stale)


def next_task(engine, labeler_id, lease_s=LEASE_S, rng=random, campaign_id=None):
    """The labeler's open task, or a new one assigned now; None when nothing is left for them.

    A new task is one that still wants rankings and that this labeler never had;
    among those, the fullest first (so tasks complete and agreement can be measured).
    A labeler holds one open task at most: asked for a campaign's task while holding
    another campaign's, that one is released as an expired lease is (a late answer
    still counts). Two calls that race for one labeler get the same task: the
    loser's insert breaks the one-open index and its retry finds the winner's."""

    def attempt():
        now = time.time()
        with writing(engine) as s:
            _check_not_paused(s, labeler_id)
            _release_expired(s, now)
            mine = s.execute(select(Assignment, Task.campaign_id).join(Task, Assignment.task_id == Task.id)
                             .where(Assignment.labeler_id == labeler_id, IS_OPEN)
                             .order_by(Assignment.id).limit(1)).first()
            if mine is not None and campaign_id in (None, mine[1]):
                return _task_view(s, mine[0])
            scope = s.scalar(select(Labeler.campaign_id).where(Labeler.id == labeler_id))
            if scope is not None and campaign_id is not None and scope != campaign_id:
                return None
            if mine is not None:  # held in another campaign
                release(s, [(mine[0].id, mine[0].task_id)])
            scope = scope if scope is not None else campaign_id
            had = select(Assignment.task_id).where(Assignment.labeler_id == labeler_id)
            q = (select(Task.id, Campaign.rankings_per_task).join(Campaign, Task.campaign_id == Campaign.id)
                 .where(Task.n_open + Task.n_done < Campaign.rankings_per_task, Task.id.not_in(had))
                 .order_by((Task.n_open + Task.n_done).desc(), Task.id).limit(5))
            if scope is not None:
                q = q.where(Task.campaign_id == scope)
            unlocked = q.with_for_update(of=Task, skip_locked=True)  # PostgreSQL: pass rows others hold now
            for _ in range(50):  # READ COMMITTED: candidates seen free may be filled meanwhile; look again
                candidates = s.execute(unlocked).all() or s.execute(q).all()  # (the held ones may have room)
                if not candidates:
                    return None
                known = _known_answer(s, labeler_id, had, candidates[0][0], rng)
                for tid, n in [(known, None)] if known else candidates:  # a known-answer task takes no slot
                    took = s.execute(update(Task).where(Task.id == tid, true() if n is None else
                                                        Task.n_open + Task.n_done < n)
                                     .values(n_open=Task.n_open + 1)).rowcount
                    if took != 1:
                        continue  # another labeler filled it meanwhile
                    order = list(s.scalars(select(Completion.id).where(Completion.task_id == tid)))
                    rng.shuffle(order)
                    a = Assignment(task_id=tid, labeler_id=labeler_id, status="open", display_order=order,
                                   created_at=now, expires_at=now + lease_s)
                    s.add(a)
                    s.flush()  # a race lost to another call for this labeler fails here (ONE_OPEN); retried
                    return _task_view(s, a)
            raise OperationalError("next_task", None, Exception("no free task after 50 looks"))  # retried

    return retrying(attempt)


def _known_answer(s, labeler_id, had, candidate, rng):
    """The id of a known-answer task to hand the labeler instead of `candidate` (a task with a free
    slot), or None: with the probability its campaign's gold_rate, one of that campaign's known-answer
    tasks this labeler never had (`had`: their tasks' ids, a subquery), drawn from rng. Known-answer
    tasks are dealt beyond their slots, so that every labeler meets them, but only while the labeler
    has ordinary work too: they are never all that is left for someone."""
    cid, rate = s.execute(select(Campaign.id, Campaign.gold_rate).join(Task, Task.campaign_id == Campaign.id)
                          .where(Task.id == candidate)).one()
    if not rate:
        return None
    known = list(s.scalars(select(Task.id).where(Task.campaign_id == cid, Task.expected.is_not(None),
                                                 Task.id.not_in(had)).order_by(Task.id)))
    if not known or rng.random() >= rate:
        return None
    return rng.choice(known)


PAUSED = ("your labeling is paused by the admin: no new tasks until they resume it (your rankings so far "
          "are kept)")


def _check_not_paused(s, labeler_id):
    if s.scalar(select(Labeler.paused_at).where(Labeler.id == labeler_id)) is not None:
        raise Rejected(423, PAUSED)


def ranks_from_groups(groups, completion_ids):
    """Ranks by completion position from groups of completion ids, best group first.

    completion_ids: the task's completion ids in position order. Ranks are dense:
    the first group gets 0, the next 1, and so on; a group of several is a tie."""
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise Rejected(422, "ranking must be a list of groups (lists) of completion ids, best first")
    pos = {cid: i for i, cid in enumerate(completion_ids)}
    ranks = [None] * len(completion_ids)
    seen = 0
    for r, group in enumerate(groups):
        if not group:
            raise Rejected(422, f"rank group {r + 1} is empty")
        for cid in group:
            if isinstance(cid, bool) or not isinstance(cid, int) or cid not in pos:
                raise Rejected(422, f"completion {cid!r} is not one of this task's completions")
            if ranks[pos[cid]] is not None:
                raise Rejected(422, f"completion {cid} appears more than once in the ranking")
            ranks[pos[cid]] = r
            seen += 1
    if seen != len(completion_ids):
        raise Rejected(422, f"the ranking places {seen} completions; this task has {len(completion_ids)}"
                            " and each must be placed exactly once")
    return ranks


def _check_flags(flags):
    if not isinstance(flags, list) or len(flags) > len(FLAGS) or any(f not in FLAGS for f in flags):
        raise Rejected(422, f"flags must be a list drawn from {', '.join(FLAGS)}")
    return sorted(set(flags))


def _assignment(s, labeler_id, task_id):
    a = s.scalar(select(Assignment).where(Assignment.task_id == task_id, Assignment.labeler_id == labeler_id))
    if a is None:
        if s.get(Task, task_id) is None:
            raise Rejected(404, f"there is no task {task_id}")
        raise Rejected(403, f"task {task_id} is not assigned to you")
    if a.status == "done":
        raise Rejected(409, f"you have already submitted a ranking of task {task_id}")
    if a.status == "skipped":
        raise Rejected(409, f"you skipped task {task_id}")
    return a


def _answer(s, a, status):
    """Move the caller's assignment `a` to `status` (done or skipped); returns the status it had.

    A late answer counts: `a` may be open, or expired (another labeler's next_task released it
    when its lease ran out, and may have taken the freed slot and not answered yet). Keeping it
    is right: it is a labeler's finished work, and the task gets at most one ranking more than it
    asked for (for each lease that ran out), which only adds to what agreement can measure.
    Dropping it would tell the labeler their work is out when it could have been kept.

    On PostgreSQL a release can commit between the read of `a` and this update, which then finds
    another status. Then the whole attempt is retried (`retrying`): its fresh read keeps a
    released assignment and refuses one done or skipped (409), so the 409 is never false."""
    was = a.status
    if s.execute(update(Assignment).where(Assignment.id == a.id, Assignment.status == was)
                 .values(status=status)).rowcount != 1:
        raise OperationalError("answer", None, Exception(f"assignment {a.id} changed meanwhile"))  # retried
    return was


def submit(engine, labeler_id, task_id, groups, flags=()):
    """Store a labeler's ranking of their task; returns the ranking's id. Nothing is stored on a Rejected."""
    flags = _check_flags(list(flags))

    def attempt():
        now = time.time()
        with writing(engine) as s:
            a = _assignment(s, labeler_id, task_id)
            _check_not_paused(s, labeler_id)
            ids = list(s.scalars(select(Completion.id).where(Completion.task_id == task_id).order_by(Completion.idx)))
            ranks = ranks_from_groups(groups, ids)
            was = _answer(s, a, "done")
            r = Ranking(assignment_id=a.id, task_id=task_id, labeler_id=labeler_id, ranks=ranks, flags=flags,
                        seconds=now - a.created_at, created_at=now)
            s.add(r)
            s.execute(update(Task).where(Task.id == task_id)
                      .values(n_done=Task.n_done + 1, n_open=Task.n_open - (1 if was == "open" else 0)))
            s.flush()
            return r.id

    return retrying(attempt)


def skip(engine, labeler_id, task_id):
    """Give a task back; this labeler will not be offered it again."""

    def attempt():
        with writing(engine) as s:
            was = _answer(s, _assignment(s, labeler_id, task_id), "skipped")
            s.execute(update(Task).where(Task.id == task_id)
                      .values(n_skipped=Task.n_skipped + 1, n_open=Task.n_open - (1 if was == "open" else 0)))

    retrying(attempt)


def revise(engine, labeler_id, ranking_id, groups, flags=(), last=REVISABLE):
    """Replace a labeler's ranking, one of their own `last` rankings, by a new version; returns its
    number (2 for the first revision; MAX_VERSIONS at most). The version it replaces is kept in
    `ranking_versions`; the `rankings` row takes the new ranks and flags, and created_at (the time of
    the latest version); `seconds` stays the time to the first answer. Checked as `submit` checks.
    Nothing changes on a Rejected."""
    flags = _check_flags(list(flags))

    def attempt():
        now = time.time()
        with writing(engine) as s:
            r = s.scalar(select(Ranking).where(Ranking.id == ranking_id).with_for_update())  # one reviser at a time
            if r is None:
                raise Rejected(404, f"there is no ranking {ranking_id}")
            if r.labeler_id != labeler_id:
                raise Rejected(403, f"ranking {ranking_id} is not yours")
            newer = s.scalar(select(func.count()).select_from(Ranking)
                             .where(Ranking.labeler_id == labeler_id, Ranking.id > ranking_id))
            if newer >= last:
                raise Rejected(409, f"ranking {ranking_id} can no longer be revised: only your last {last} rankings "
                                    f"can be, and you have made {newer} since")
            version = 1 + s.scalar(select(func.count()).select_from(RankingVersion)
                                   .where(RankingVersion.ranking_id == r.id))  # the one being replaced
            if version >= MAX_VERSIONS:
                raise Rejected(409, f"ranking {ranking_id} can no longer be revised: it has {version} versions, "
                                    f"the most a ranking may have")
            ids = list(s.scalars(select(Completion.id).where(Completion.task_id == r.task_id).order_by(Completion.idx)))
            ranks = ranks_from_groups(groups, ids)
            s.add(RankingVersion(ranking_id=r.id, version=version, ranks=list(r.ranks), flags=list(r.flags),
                                 seconds=r.seconds, created_at=r.created_at, replaced_at=now))
            r.ranks, r.flags, r.created_at = ranks, flags, now
            return version + 1

    return retrying(attempt)


def groups_from_ranks(ranks, completion_ids, order):
    """The inverse of ranks_from_groups: groups of completion ids, best first, each group in `order`
    (completion ids as the labeler saw them)."""
    rank_of = dict(zip(completion_ids, ranks))
    return [[cid for cid in order if rank_of[cid] == r] for r in sorted(set(ranks))]


def my_rankings(engine, labeler_id, limit=REVISABLE):
    """A labeler's own rankings, newest first, in the export format plus what their page needs to show
    one again: ranking_id, version, revisable, `shown` (the completions {id, text} in their display
    order) and `groups` (the current ranking as groups of completion ids, best first)."""
    with Session(reading(engine)) as s:
        rows = s.execute(select(Ranking, Assignment.display_order, Task.prompt, Task.messages, Campaign.name,
                                Campaign.evaluation, Labeler.name)
                         .join(Assignment, Ranking.assignment_id == Assignment.id)
                         .join(Task, Ranking.task_id == Task.id).join(Campaign, Task.campaign_id == Campaign.id)
                         .join(Labeler, Ranking.labeler_id == Labeler.id)
                         .where(Ranking.labeler_id == labeler_id).order_by(Ranking.id.desc()).limit(limit)).all()
        comps = {}
        for tid, cid, text in s.execute(select(Completion.task_id, Completion.id, Completion.text)
                                        .where(Completion.task_id.in_({r.task_id for r, *_ in rows}))
                                        .order_by(Completion.task_id, Completion.idx)).all() if rows else []:
            comps.setdefault(tid, []).append((cid, text))
        n_old = dict(s.execute(select(RankingVersion.ranking_id, func.count())
                               .where(RankingVersion.ranking_id.in_([r.id for r, *_ in rows]))
                               .group_by(RankingVersion.ranking_id)).all()) if rows else {}
    out = []
    for i, (r, order, prompt, msgs, camp, ev, lab) in enumerate(rows):
        ids = [cid for cid, _ in comps[r.task_id]]
        text = dict(comps[r.task_id])
        out.append({"prompt": prompt, "messages": conversation(prompt, msgs),
                    "completions": [t for _, t in comps[r.task_id]], "ranks": list(r.ranks), "labeler": lab,
                    "flags": list(r.flags), "campaign": shown_name(camp, ev), "task_id": r.task_id,
                    "seconds": round(r.seconds, 3), "ranking_id": r.id, "version": n_old.get(r.id, 0) + 1,
                    "revisable": i < REVISABLE and n_old.get(r.id, 0) + 1 < MAX_VERSIONS,
                    "shown": [{"id": cid, "text": text[cid]} for cid in order],
                    "groups": groups_from_ranks(r.ranks, ids, order)})
    return out


def progress(engine, labeler_id):
    """What this labeler did, and how many tasks are still there for them."""
    with Session(reading(engine)) as s:
        counts = dict(s.execute(select(Assignment.status, func.count()).where(Assignment.labeler_id == labeler_id)
                                .group_by(Assignment.status)).all())
        scope = s.scalar(select(Labeler.campaign_id).where(Labeler.id == labeler_id))
        had = select(Assignment.task_id).where(Assignment.labeler_id == labeler_id)
        q = (select(func.count()).select_from(Task).join(Campaign, Task.campaign_id == Campaign.id)
             .where(Task.id.not_in(had)))
        if scope is not None:
            q = q.where(Task.campaign_id == scope)
        free = Task.n_open + Task.n_done < Campaign.rankings_per_task
        left = s.scalar(q.where(free))
        if left:  # known-answer tasks dealt beyond their slots count too, so that meeting one counts down as any task
            left += s.scalar(q.where(~free, Task.expected.is_not(None), Campaign.gold_rate > 0))
    return {"done": counts.get("done", 0), "skipped": counts.get("skipped", 0), "open": counts.get("open", 0),
            "left": left}
