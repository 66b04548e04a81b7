"""Campaigns and their tasks: adding tasks (a campaign is made with its first ones), a round's
settings and progress, a campaign's rankings per task, and finding a campaign by its name.

An evaluation campaign (`shoggoth feedback compare`) is a blind comparison of
models: one answer per model for each prompt, ranked like any task. Which model
wrote a completion is kept in `completions.model` and never leaves the database
towards a labeler; its completions are stored in a fresh random order per task,
so their positions and ids do not follow the models either, and labelers see the
campaign's name as "evaluation" (`shown_name`). Its rankings never feed training: the export
(`queries.export_rows`) leaves them out unless the campaign is named.
"""

import random

from sqlalchemy import Integer, func, select, update
from sqlalchemy.orm import Session

from ..errors import DataError
from .db import Campaign, Completion, Labeler, Ranking, Rejected, Task, clean_text, conversation, last_user_text, reading, writing
from .oversight import dense_ranks

MAX_K = 16  # completions per task, at most
EVALUATION = "evaluation"  # what labelers see as the name of an evaluation campaign (its own may name the models)


def shown_name(name, evaluation):
    """A campaign's name as labelers see it."""
    return EVALUATION if evaluation else name


def add_tasks(engine, campaign, tasks, rankings_per_task=3, source="", settings=None, rng=None, info=None):
    """Store ranking tasks under a campaign (made if new); tasks: dicts with completions, references and
    the conversation they answer: `messages` (a list of {role, content}, system prompt and earlier
    turns included), `prompt` (its last user message; alone: a conversation of that one message) or both.
    `info`: a new training campaign's settings, stored with its tasks in one transaction (a round's).

    With `settings` (its "models": the names compared) it is an evaluation campaign, made once here:
    each task also has `models`, the model of each completion, one completion per model. Their
    completions are stored in a fresh order per task, drawn from `rng` (default: the system's
    randomness), so that neither their positions nor their ids follow the models."""
    if not tasks:
        raise DataError(f"campaign {campaign!r}: no tasks to add")
    ks = {len(t["completions"]) for t in tasks}
    if len(ks) != 1 or not 2 <= min(ks) <= MAX_K:
        raise DataError(f"campaign {campaign!r}: every task needs the same number K of completions, 2 <= K <= {MAX_K}"
                        f" (got {sorted(ks)})")
    k = ks.pop()
    if rankings_per_task < 1:
        raise DataError(f"campaign {campaign!r}: rankings per task must be at least 1")
    evaluation = settings is not None
    if evaluation and any(sorted(t["models"]) != sorted(settings["models"]) for t in tasks):
        raise DataError(f"campaign {campaign!r}: every task needs one completion of each of {settings['models']}")
    rng = rng or random.SystemRandom()
    with writing(engine) as s:
        c = s.scalar(select(Campaign).where(Campaign.name == campaign))
        if c is not None and (evaluation or c.evaluation):
            raise DataError(f"campaign {campaign!r} exists already{' as an evaluation' if c.evaluation else ''}: "
                            "an evaluation campaign is made once, under a name of its own")
        if c is None:
            c = Campaign(name=clean_text(campaign), k=k, rankings_per_task=rankings_per_task, source=clean_text(source),
                         evaluation=evaluation, settings=settings if evaluation else info)
            s.add(c)
            s.flush()
        elif c.k != k:
            raise DataError(f"campaign {campaign!r} has K={c.k} completions per task; these tasks have {k}")
        for i, t in enumerate(tasks):
            prompt, msgs = _stored_conversation(t, f"campaign {campaign!r}, task {i + 1}")
            task = Task(campaign_id=c.id, prompt=prompt, messages=msgs,
                        refs=[clean_text(r) for r in t.get("references") or []], n_open=0, n_done=0, n_skipped=0,
                        expected=dense_ranks(t["expected"], k) if t.get("expected") is not None else None)
            s.add(task)
            s.flush()
            order = list(range(k))
            if evaluation:
                rng.shuffle(order)
            s.add_all(Completion(task_id=task.id, idx=i, text=clean_text(t["completions"][j]),
                                 model=t["models"][j] if evaluation else None) for i, j in enumerate(order))
        return c.id


def _stored_conversation(t, where):
    """(prompt, messages to store) of a task dict with a `prompt`, `messages` (a list of {role,
    content}) or both: messages None where they are the prompt alone."""
    msgs = t.get("messages")
    if msgs is None:
        if not isinstance(t.get("prompt"), str):
            raise DataError(f"{where}: a task needs a 'prompt' string or its 'messages'")
        return clean_text(t["prompt"]), None
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
    msgs = [{"role": clean_text(m["role"]), "content": clean_text(m["content"])} for m in msgs]
    prompt = clean_text(t["prompt"]) if t.get("prompt") is not None else last_user_text(msgs)
    return prompt, None if msgs == conversation(prompt, None) else msgs


def set_round(engine, campaign, info):
    """Merge `info` into a training campaign's settings: `shoggoth rounds` keeps there what the
    admin page shows of a round (its number, the policy it sampled, the reward model's accuracy)."""
    with writing(engine) as s:
        c = s.scalar(select(Campaign).where(Campaign.name == campaign))
        if c is None or c.evaluation:
            raise DataError(f"campaign {campaign!r}: {'an evaluation' if c else 'no such campaign'}, not a round")
        c.settings = {**(c.settings or {}), **info}


def task_counts(s, c):
    """Campaign c's tasks and their rankings: {tasks, done, open, skipped, complete (tasks with all
    their rankings), wanted (tasks x rankings per task)}."""
    tasks, done, open_, skipped, complete = s.execute(
        select(func.count(), func.coalesce(func.sum(Task.n_done), 0), func.coalesce(func.sum(Task.n_open), 0),
               func.coalesce(func.sum(Task.n_skipped), 0),
               func.coalesce(func.sum((Task.n_done >= c.rankings_per_task).cast(Integer)), 0))
        .where(Task.campaign_id == c.id)).one()
    return {"tasks": tasks, "done": int(done), "open": int(open_), "skipped": int(skipped), "complete": int(complete),
            "wanted": tasks * c.rankings_per_task}


def round_progress(engine, campaign):
    """A campaign's rankings so far: task_counts' {tasks, done, wanted, complete, ...}, and labelers
    {name: rankings}, first, last (times of its first and latest ranking), evaluation, settings."""
    with Session(reading(engine)) as s:
        c = s.scalar(select(Campaign).where(Campaign.name == campaign))
        if c is None:
            raise DataError(f"no campaign named {campaign!r}")
        counts = task_counts(s, c)
        per = s.execute(select(Labeler.name, func.count(), func.min(Ranking.created_at), func.max(Ranking.created_at))
                        .join(Labeler, Ranking.labeler_id == Labeler.id).join(Task, Ranking.task_id == Task.id)
                        .where(Task.campaign_id == c.id).group_by(Labeler.name).order_by(Labeler.name)).all()
    return {**counts, "labelers": {name: n for name, n, _, _ in per}, "first": min((f for _, _, f, _ in per), default=None),
            "last": max((t for _, _, _, t in per), default=None), "evaluation": c.evaluation,
            "settings": dict(c.settings or {})}


def set_rankings_per_task(engine, campaign_id, n):
    if not 1 <= n <= 100:
        raise Rejected(422, "rankings per task must be between 1 and 100")
    with writing(engine) as s:
        if s.execute(update(Campaign).where(Campaign.id == campaign_id).values(rankings_per_task=n)).rowcount != 1:
            raise Rejected(404, f"no campaign {campaign_id}")


def campaign_id(engine, name, required=True):
    """The id of the campaign called `name`; None, or with `required` an error, when there is none."""
    with Session(reading(engine)) as s:
        cid = s.scalar(select(Campaign.id).where(Campaign.name == name))
    if cid is None and required:
        raise DataError(f"no campaign named {name!r}")
    return cid
