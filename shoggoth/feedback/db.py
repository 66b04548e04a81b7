"""Storage of the ranking app: SQLAlchemy tables and the assignment/submission logic.

The invariants live in the database, so that they hold for any number of
server threads, processes and simulated labelers at once:

- A labeler holds at most one assignment per task, UNIQUE(task_id, labeler_id):
  nobody gets the same task twice, even after skipping it.
- A labeler holds at most one open assignment, a partial unique index on
  assignments(labeler_id) WHERE status = 'open': two `next_task` calls that race
  (on PostgreSQL, SKIP LOCKED sends them to different tasks) cannot both assign;
  the loser's insert fails, its transaction (slot included) rolls back, and its
  retry hands back the winner's task.
- A ranking is stored once per assignment and once per (task, labeler).
- A task's slots are `n_open + n_done < rankings_per_task`; a slot is taken by
  a conditional UPDATE, which the database serialises, so concurrent labelers
  cannot over-assign a task, and an assignment moves open -> done by another
  conditional UPDATE, so two submissions of one task cannot both count; one that finds the
  assignment changed since it read it (its lease released meanwhile) reads it again (`_answer`).
- Every change of a task's counters happens in the transaction that changes
  the assignment it counts.
- A known-answer task (its `expected` order set by the admin) is also dealt
  beyond its slots, at its campaign's `gold_rate`, to labelers who still have
  ordinary work (`_known_answer`): every labeler meets some, unannounced.
  A paused labeler (`paused_at`) gets no task and stores no ranking.

An evaluation campaign (`shoggoth feedback compare`) is a blind comparison of
models: one answer per model for each prompt, ranked like any task. Which model
wrote a completion is kept in `completions.model` and never leaves the database
towards a labeler; its completions are stored in a fresh random order per task,
so their positions and ids do not follow the models either, and labelers see the
campaign's name as "evaluation". Its rankings never feed training: the export
leaves them out unless the campaign is named.

SQLite (a file, the default) runs every transaction as BEGIN IMMEDIATE with a
busy timeout; PostgreSQL runs at READ COMMITTED, where a conditional UPDATE
re-checks its WHERE clause after waiting for a row lock.
"""

import hashlib
import json
import random
import re
import secrets
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sqlalchemy import (JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, create_engine,
                        event, false, func, inspect, select, text, true, update)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column
from sqlalchemy.schema import CreateColumn

from ..errors import DataError

FLAGS = ("all_bad", "unsafe")  # what a labeler may flag a task as
INVITE_TTL = 7 * 86400.0  # an invite link unused this long stops working
SESSION_TTL = {"labeler": 30 * 86400.0, "admin": 12 * 3600.0}  # how long a sign-in lasts
LEASE_S = 3600.0  # an unanswered assignment frees its slot after this long
MAX_K = 16  # completions per task, at most
REVISABLE = 20  # a labeler may revise their own last this many rankings
# A ranking has at most this many versions (its first and 19 revisions); a further revision is refused
# rather than an old version dropped: every version stays, the first answer above all.
MAX_VERSIONS = 20


class Rejected(DataError):
    """A request that cannot be done as asked; `status` is the HTTP status the app answers with."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Base(DeclarativeBase):
    pass


class Campaign(Base):
    __tablename__ = "campaigns"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    k: Mapped[int] = mapped_column(Integer)  # completions per task
    rankings_per_task: Mapped[int] = mapped_column(Integer)  # N: rankings each task collects
    source: Mapped[str] = mapped_column(Text, default="")  # the policy the completions came from
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    # a blind comparison of models (`feedback compare`): never exported for training unless named
    evaluation: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    settings: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # an evaluation's models and sampling settings
    guidelines: Mapped[str | None] = mapped_column(Text, nullable=True)  # the labelers' instructions (Markdown)
    # the share of a labeler's tasks drawn from the known-answer ones (Task.expected), unannounced
    gold_rate: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    # a labeler whose agreement interval lies wholly below this is flagged (None: agreement.FLAG_BELOW)
    flag_below: Mapped[float | None] = mapped_column(Float, nullable=True)


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    prompt: Mapped[str] = mapped_column(Text)  # the last user message of `messages`
    refs: Mapped[list] = mapped_column(JSON, default=list)  # reference answers (simulated labelers use them)
    n_open: Mapped[int] = mapped_column(Integer, default=0)  # assignments handed out, not yet answered
    n_done: Mapped[int] = mapped_column(Integer, default=0)  # rankings stored
    n_skipped: Mapped[int] = mapped_column(Integer, default=0)
    # The conversation the completions answer (system prompt and earlier turns, ending with `prompt`);
    # NULL when it is `prompt` alone, as one user message (every task stored before conversations were kept).
    messages: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    # a known-answer task's expected ranks by completion idx (0 best), set by the admin; never shown to labelers
    expected: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)


class Completion(Base):
    __tablename__ = "completions"
    __table_args__ = (UniqueConstraint("task_id", "idx"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    idx: Mapped[int] = mapped_column(Integer)  # position in the exported `completions` list
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(100), nullable=True)  # who wrote it (evaluations); never shown


class Labeler(Base):
    __tablename__ = "labelers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the invite token
    campaign_id: Mapped[int | None] = mapped_column(ForeignKey("campaigns.id"), nullable=True)  # None: any
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    paused_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # paused by the admin: no new tasks


class Invite(Base):
    """An invite link's token (hashed): traded once for a session, before it expires."""

    __tablename__ = "invites"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class SignIn(Base):
    """A signed-in browser or script: a random session token (hashed), with an expiry. labeler_id
    None is the admin, whose session holds a hash of the admin token it was opened with, so that
    restarting the app with a new admin token ends every admin session."""

    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    labeler_id: Mapped[int | None] = mapped_column(ForeignKey("labelers.id"), nullable=True, index=True)
    admin_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    expires_at: Mapped[float] = mapped_column(Float)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("task_id", "labeler_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    status: Mapped[str] = mapped_column(String(10), index=True)  # open | done | skipped | expired
    display_order: Mapped[list] = mapped_column(JSON)  # completion ids in the order this labeler sees them
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


_is_open = Assignment.status == "open"
# At most one open assignment per labeler (see the module docstring).
ONE_OPEN = Index("uq_assignments_one_open_per_labeler", Assignment.labeler_id, unique=True,
                 postgresql_where=_is_open, sqlite_where=_is_open)


class Ranking(Base):
    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("task_id", "labeler_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    ranks: Mapped[list] = mapped_column(JSON)  # rank of completion idx i; 0 best, ties share a rank
    flags: Mapped[list] = mapped_column(JSON, default=list)
    seconds: Mapped[float] = mapped_column(Float)  # from assignment to submission
    created_at: Mapped[float] = mapped_column(Float)


class RankingVersion(Base):
    """An earlier version of a ranking, kept when its labeler revised it. The `rankings` row always
    holds the latest version (so export, agreement and overview read it unchanged); its earlier
    versions are here, numbered 1 (the first submission), 2, ...; the row's own is one more."""

    __tablename__ = "ranking_versions"
    __table_args__ = (UniqueConstraint("ranking_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ranking_id: Mapped[int] = mapped_column(ForeignKey("rankings.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    ranks: Mapped[list] = mapped_column(JSON)
    flags: Mapped[list] = mapped_column(JSON, default=list)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)  # when this version was stored
    replaced_at: Mapped[float] = mapped_column(Float)  # when the next one replaced it


class Setting(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(50), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class GuidelinesRead(Base):
    """A labeler has read a version of a campaign's guidelines (the first-visit screen shows a version
    once). Kept here, not in a cookie: it follows the labeler to any browser or script, and the admin
    sees who has read the current version."""

    __tablename__ = "guidelines_read"
    __table_args__ = (UniqueConstraint("labeler_id", "campaign_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("labelers.id"), index=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"), index=True)
    version: Mapped[str] = mapped_column(String(64))  # guidelines_version of the text read
    read_at: Mapped[float] = mapped_column(Float)


# ---------------------------------------------------------------- connecting


def normalize_url(db):
    """A SQLAlchemy URL from `--db`: a URL as given, or a file path for SQLite."""
    db = str(db)
    if "://" not in db:
        return f"sqlite:///{Path(db).expanduser().resolve()}"
    for prefix in ("postgresql://", "postgres://"):
        if db.startswith(prefix):
            return "postgresql+psycopg://" + db[len(prefix):]
    return db


def shown_url(db):
    """`--db` as it may be printed or logged: a URL with its password masked (a file path as it is)."""
    db = str(db)
    if "://" not in db:
        return db
    try:
        return make_url(db).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not a URL SQLAlchemy reads: mask what looks like user:password@
        return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", db)


def connect(db, create=True):
    """An Engine on `db` (URL or SQLite path) with the tables created."""
    url = normalize_url(db)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60}, pool_size=20,
                               max_overflow=40)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _):
            dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself
            cur = dbapi_conn.cursor()
            for pragma in ("journal_mode=WAL", "busy_timeout=60000", "foreign_keys=ON", "synchronous=NORMAL"):
                cur.execute(f"PRAGMA {pragma}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            # Writers take the write lock up front (no lock-upgrade deadlocks); readers do not block anyone in WAL.
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("readonly") else "BEGIN IMMEDIATE")

        engine.shoggoth_write_lock = threading.Lock()  # this process's writers queue here, not in busy-waits
    else:
        try:
            engine = create_engine(url, pool_size=20, max_overflow=40, pool_pre_ping=True)
        except Exception as e:  # a malformed URL or a missing driver
            raise DataError(f"--db {shown_url(db)!r}: {str(e).replace(url, shown_url(url))}") from None
    if create:
        try:
            Base.metadata.create_all(engine)
        except OperationalError as e:
            raise DataError(f"--db {shown_url(db)!r}: cannot open the database ({e.orig})") from None
        except DBAPIError as e:  # e.g. a file that is not an SQLite database: sqlite3.DatabaseError
            raise DataError(f"--db {shown_url(db)!r}: not a database this can open ({e.orig})") from None
        _new_columns(engine)
        _invites_of_old_labelers(engine)
        _one_open_per_labeler(engine)
    elif _has_tasks(engine):
        _new_columns(engine)  # an older database read without being opened to write (an export) reads as a new one
    return engine


def _has_tasks(engine):
    """Whether the database holds our tasks table (False where it cannot be read: its first read says why)."""
    try:
        return inspect(engine).has_table(Task.__tablename__)
    except DBAPIError:
        return False


def _new_columns(engine):
    """create_all adds no column to a table that is already there: a database made before a column
    (campaigns.evaluation, .settings and .guidelines, completions.model, tasks.messages) gets it here, empty or at its server
    default. Another process adding it meanwhile is fine."""
    for table in Base.metadata.sorted_tables:
        have = {c["name"] for c in inspect(engine).get_columns(table.name)}
        for col in table.columns:
            if col.name in have:
                continue
            ddl = CreateColumn(col).compile(dialect=engine.dialect)  # name, type, default, NOT NULL
            try:
                with writing(engine) as s:
                    s.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}"))
            except DBAPIError:
                if col.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                    raise


def _one_open_per_labeler(engine):
    """create_all adds no index to a table that is already there: a database made before ONE_OPEN
    gets it here. Open assignments it already held beyond a labeler's oldest are released first, as
    an expired lease is (their slots freed; a late answer still counts), or the index could not be made."""
    if inspect(engine).has_index(Assignment.__tablename__, ONE_OPEN.name):
        return
    other = aliased(Assignment)
    oldest = (select(func.min(other.id)).where(other.labeler_id == Assignment.labeler_id, other.status == "open")
              .scalar_subquery())
    with writing(engine) as s:
        if engine.dialect.name == "postgresql":  # no new open assignment between the release and the index
            s.execute(text("LOCK TABLE assignments IN SHARE ROW EXCLUSIVE MODE"))
        _release(s, s.execute(select(Assignment.id, Assignment.task_id).where(_is_open, Assignment.id != oldest)).all())
        ONE_OPEN.create(s.connection(), checkfirst=True)


def _invites_of_old_labelers(engine):
    """A database made before invites were traded for sessions held the invite's hash on the
    labeler: that link becomes an invite (once, for INVITE_TTL from now), so nobody is locked out."""
    with Session(reading(engine)) as s:
        old = s.execute(select(Labeler.id, Labeler.token_hash).where(
            ~select(Invite.id).where(Invite.labeler_id == Labeler.id).exists())).all()
    if old:
        with writing(engine) as s:
            s.add_all(Invite(token_hash=h, labeler_id=lid, expires_at=time.time() + INVITE_TTL) for lid, h in old)


@contextmanager
def writing(engine):
    """A session in a write transaction, committed at the end (rolled back on an exception)."""
    lock = getattr(engine, "shoggoth_write_lock", None)
    with lock or nullcontext(), Session(engine) as s, s.begin():
        yield s


def reading(engine):
    """The engine for read-only work (on SQLite a plain BEGIN, which does not wait for writers)."""
    return engine.execution_options(readonly=True)


def retrying(fn, attempts=8):
    """Run fn() again after a lost race (a unique-key clash, a deadlock, a serialisation failure)."""
    for i in range(attempts):
        try:
            return fn()
        except (IntegrityError, OperationalError) as e:
            if i == attempts - 1:
                raise Rejected(503, f"the database is busy, try again ({type(e.orig).__name__})") from None
            time.sleep(0.005 * (2 ** i) * random.random())
        except DBAPIError as e:
            if getattr(e.orig, "sqlstate", None) in ("40001", "40P01") and i < attempts - 1:
                continue
            raise


def clean_text(s):
    """Text the database can store: PostgreSQL refuses NUL characters, so they become U+FFFD."""
    return str(s).replace("\x00", "\ufffd")


def conversation(prompt, messages):
    """A task's conversation: its stored messages, or its prompt as one user message (a task of a
    single user message, or stored before conversations were kept)."""
    return [dict(m) for m in messages] if messages else [{"role": "user", "content": prompt}]


def last_user_text(messages):
    """A conversation's last user message (its last message if none is the user's): a task's `prompt`,
    what simulated labelers and the admin's lists read."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])


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


def hash_token(token):
    return hashlib.sha256(token.encode()).hexdigest()


def secret(engine):
    """The server's signing secret (CSRF tokens), made once and kept in the database."""
    with writing(engine) as s:
        row = s.get(Setting, "secret")
        if row is None:
            row = Setting(key="secret", value=secrets.token_hex(32))
            s.add(row)
        return row.value


# ---------------------------------------------------------------- campaigns and labelers


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


def set_round(engine, campaign, info):
    """Merge `info` into a training campaign's settings: `shoggoth rounds` keeps there what the
    admin page shows of a round (its number, the policy it sampled, the reward model's accuracy)."""
    with writing(engine) as s:
        c = s.scalar(select(Campaign).where(Campaign.name == campaign))
        if c is None or c.evaluation:
            raise DataError(f"campaign {campaign!r}: {'an evaluation' if c else 'no such campaign'}, not a round")
        c.settings = {**(c.settings or {}), **info}


def _task_counts(s, c):
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
    """A campaign's rankings so far: _task_counts' {tasks, done, wanted, complete, ...}, and labelers
    {name: rankings}, first, last (times of its first and latest ranking), evaluation, settings."""
    with Session(reading(engine)) as s:
        c = s.scalar(select(Campaign).where(Campaign.name == campaign))
        if c is None:
            raise DataError(f"no campaign named {campaign!r}")
        counts = _task_counts(s, c)
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


def create_labeler(engine, name, campaign_id=None, simulated=False):
    """A new labeler; returns (id, invite token). The token is shown once: only its hash is kept."""
    name = clean_text(name).strip()
    if not 1 <= len(name) <= 100:
        raise Rejected(422, "a labeler's name must have 1 to 100 characters")
    token = secrets.token_urlsafe(24)
    try:
        with writing(engine) as s:
            if campaign_id is not None and s.get(Campaign, campaign_id) is None:
                raise Rejected(404, f"no campaign {campaign_id}")
            # token_hash: a random value nobody holds (sign-in goes through invites and sessions)
            lab = Labeler(name=name, token_hash=hash_token(secrets.token_urlsafe(24)), campaign_id=campaign_id,
                          simulated=simulated)
            s.add(lab)
            s.flush()
            s.add(Invite(token_hash=hash_token(token), labeler_id=lab.id, expires_at=time.time() + INVITE_TTL))
            return lab.id, token
    except IntegrityError:
        raise Rejected(409, f"there is already a labeler named {name!r}") from None


def labeler_id(engine, name, simulated=True):
    """The id of the labeler called `name`, made (with a fresh token) if there is none."""
    with Session(reading(engine)) as s:
        found = s.scalar(select(Labeler.id).where(Labeler.name == name))
    if found is not None:
        return found
    try:
        return create_labeler(engine, name, simulated=simulated)[0]
    except Rejected:  # made meanwhile by someone else
        with Session(reading(engine)) as s:
            return s.scalar(select(Labeler.id).where(Labeler.name == name))


def find_labeler(engine, name):
    """The id of the labeler called `name` (a one-line error if there is none)."""
    with Session(reading(engine)) as s:
        found = s.scalar(select(Labeler.id).where(Labeler.name == name))
    if found is None:
        raise DataError(f"no labeler named {name!r}")
    return found


def labeler_by_token(engine, token):
    """(id, name) of the labeler an unused, unexpired invite token is for, or None."""
    if not token or len(token) > 200:
        return None
    with Session(reading(engine)) as s:
        row = s.execute(select(Labeler.id, Labeler.name).join(Invite, Invite.labeler_id == Labeler.id)
                        .where(Invite.token_hash == hash_token(token), Invite.used_at.is_(None),
                               Invite.expires_at > time.time())).first()
    return tuple(row) if row else None


def new_invite(engine, labeler_id):
    """A fresh invite link token for an existing labeler: their earlier unused links stop working and
    their sessions end (a new link is what the admin sends when one leaked or a device was lost)."""
    token = secrets.token_urlsafe(24)
    with writing(engine) as s:
        _close_invites(s, labeler_id)
        s.execute(SignIn.__table__.delete().where(SignIn.labeler_id == labeler_id))
        s.add(Invite(token_hash=hash_token(token), labeler_id=labeler_id, expires_at=time.time() + INVITE_TTL))
    return token


def trade_invite(engine, token):
    """Trade an invite token, once, for a labeler session: (labeler id, name, session token), or None."""
    if not token or len(token) > 200:
        return None
    now = time.time()
    with writing(engine) as s:
        inv = s.scalar(select(Invite).where(Invite.token_hash == hash_token(token)))
        if inv is None or inv.used_at is not None or inv.expires_at <= now:
            return None
        if s.execute(update(Invite).where(Invite.id == inv.id, Invite.used_at.is_(None))
                     .values(used_at=now)).rowcount != 1:
            return None  # traded meanwhile by another request
        name = s.get(Labeler, inv.labeler_id).name
        session = _new_session(s, inv.labeler_id, None, now)
        return inv.labeler_id, name, session


def _new_session(s, labeler_id, admin_key, now):
    token = secrets.token_urlsafe(32)
    ttl = SESSION_TTL["admin" if labeler_id is None else "labeler"]
    s.add(SignIn(token_hash=hash_token(token), labeler_id=labeler_id, admin_key=admin_key, expires_at=now + ttl))
    return token


def admin_session(engine, admin_token):
    """A new admin session token, tied to the admin token it was opened with."""
    with writing(engine) as s:
        return _new_session(s, None, hash_token(admin_token), time.time())


def session(engine, token, admin_token=None):
    """Who holds a session token: ("labeler", (id, name)), ("admin", None), or None if it is unknown,
    expired, revoked, or an admin session opened with another admin token than admin_token."""
    if not token or len(token) > 200:
        return None
    with Session(reading(engine)) as s:
        row = s.execute(select(SignIn.labeler_id, SignIn.admin_key, SignIn.expires_at)
                        .where(SignIn.token_hash == hash_token(token))).first()
        if row is None or row.expires_at <= time.time():
            return None
        if row.labeler_id is None:
            ok = admin_token is not None and row.admin_key == hash_token(admin_token)
            return ("admin", None) if ok else None
        name = s.scalar(select(Labeler.name).where(Labeler.id == row.labeler_id))
        return ("labeler", (row.labeler_id, name)) if name is not None else None


def end_session(engine, token):
    with writing(engine) as s:
        s.execute(SignIn.__table__.delete().where(SignIn.token_hash == hash_token(token)))


def revoke_labeler(engine, labeler_id):
    """End the labeler's sessions and unused invites at once, and free the slot of the task they hold
    (as an expired lease is: nobody waits an hour for them); their rankings stay."""
    with writing(engine) as s:
        _close_invites(s, labeler_id)
        s.execute(SignIn.__table__.delete().where(SignIn.labeler_id == labeler_id))
        _release(s, s.execute(select(Assignment.id, Assignment.task_id)
                              .where(Assignment.labeler_id == labeler_id, _is_open)).all())


def _close_invites(s, labeler_id):
    """Mark the labeler's unused invites used (404 for an unknown labeler)."""
    if s.get(Labeler, labeler_id) is None:
        raise Rejected(404, f"no labeler {labeler_id}")
    s.execute(update(Invite).where(Invite.labeler_id == labeler_id, Invite.used_at.is_(None)).values(used_at=time.time()))


def campaign_id(engine, name, required=True):
    """The id of the campaign called `name`; None, or with `required` an error, when there is none."""
    with Session(reading(engine)) as s:
        cid = s.scalar(select(Campaign.id).where(Campaign.name == name))
    if cid is None and required:
        raise DataError(f"no campaign named {name!r}")
    return cid


# ---------------------------------------------------------------- the labeling loop


EVALUATION = "evaluation"  # what labelers see as the name of an evaluation campaign (its own may name the models)


def shown_name(name, evaluation):
    """A campaign's name as labelers see it."""
    return EVALUATION if evaluation else name


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
    _release(s, stale)


def _release(s, assignments):
    """Mark open assignments (id, task_id) expired and free their tasks' slots."""
    for aid, tid in assignments:
        if s.execute(update(Assignment).where(Assignment.id == aid, Assignment.status == "open")
                     .values(status="expired")).rowcount == 1:
            s.execute(update(Task).where(Task.id == tid).values(n_open=Task.n_open - 1))


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
                             .where(Assignment.labeler_id == labeler_id, _is_open)
                             .order_by(Assignment.id).limit(1)).first()
            if mine is not None and campaign_id in (None, mine[1]):
                return _task_view(s, mine[0])
            scope = s.scalar(select(Labeler.campaign_id).where(Labeler.id == labeler_id))
            if scope is not None and campaign_id is not None and scope != campaign_id:
                return None
            if mine is not None:  # held in another campaign
                _release(s, [(mine[0].id, mine[0].task_id)])
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


# ---------------------------------------------------------------- reading it back


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
    """Rankings as the records `shoggoth reward` and `dpo` read (data.ranking; the EXPORT_KEYS of
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
                          "evaluation": c.evaluation, "settings": c.settings, **_task_counts(s, c)})
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


# ---------------------------------------------------------------- guidelines


MAX_GUIDELINES = 100_000  # characters of Markdown: a long instruction document with examples


def guidelines_version(markdown):
    """The version of a text of guidelines: labelers read each version once (a change shows them again)."""
    return hashlib.sha256(markdown.encode()).hexdigest()[:16] if markdown else None


def set_guidelines(engine, campaign_id, markdown):
    """Store a campaign's guidelines (Markdown; None or blank clears them); returns their version."""
    markdown = clean_text(markdown or "").strip() or None
    if markdown is not None and len(markdown) > MAX_GUIDELINES:
        raise Rejected(422, f"guidelines of {len(markdown)} characters: at most {MAX_GUIDELINES}")
    with writing(engine) as s:
        if s.execute(update(Campaign).where(Campaign.id == campaign_id).values(guidelines=markdown)).rowcount != 1:
            raise Rejected(404, f"no campaign {campaign_id}")
    return guidelines_version(markdown)


def campaign_guidelines(engine, campaign_id):
    """A campaign's guidelines (Markdown) or None; 404 for an unknown campaign."""
    with Session(reading(engine)) as s:
        row = s.execute(select(Campaign.guidelines).where(Campaign.id == campaign_id)).first()
    if row is None:
        raise Rejected(404, f"no campaign {campaign_id}")
    return row[0]


def labeler_guidelines(engine, labeler_id, campaign_id=None):
    """The guidelines a labeler may read, of the campaigns open to them (their own, or every one when
    they may label any), or only of campaign_id: [{campaign_id, campaign (as labelers see its name),
    markdown, version, read (whether they have read this version)}], oldest campaign first."""
    with Session(reading(engine)) as s:
        scope = s.scalar(select(Labeler.campaign_id).where(Labeler.id == labeler_id))
        q = select(Campaign.id, Campaign.name, Campaign.evaluation, Campaign.guidelines).where(
            Campaign.guidelines.is_not(None)).order_by(Campaign.id)
        if scope is not None:
            q = q.where(Campaign.id == scope)
        if campaign_id is not None:
            q = q.where(Campaign.id == campaign_id)
        read = dict(s.execute(select(GuidelinesRead.campaign_id, GuidelinesRead.version)
                              .where(GuidelinesRead.labeler_id == labeler_id)).all())
        return [{"campaign_id": cid, "campaign": shown_name(name, ev), "markdown": md,
                 "version": guidelines_version(md), "read": read.get(cid) == guidelines_version(md)}
                for cid, name, ev, md in s.execute(q).all()]


def guidelines_of_task(engine, labeler_id, task_id):
    """{campaign_id, version, read} of the guidelines of a task's campaign, or None when it has none."""
    with Session(reading(engine)) as s:
        cid = s.scalar(select(Task.campaign_id).where(Task.id == task_id))
    found = labeler_guidelines(engine, labeler_id, cid) if cid is not None else []
    return {k: found[0][k] for k in ("campaign_id", "version", "read")} if found else None


def read_guidelines(engine, labeler_id, campaign_id, version):
    """Note that the labeler has read `version` of a campaign's guidelines: 404 if they cannot see
    them, 409 if they changed meanwhile (the labeler reads the new ones first)."""
    found = labeler_guidelines(engine, labeler_id, campaign_id)
    if not found:
        raise Rejected(404, f"no guidelines of campaign {campaign_id} for you")
    if found[0]["version"] != version:
        raise Rejected(409, "the guidelines changed meanwhile: read them again")

    def attempt():
        with writing(engine) as s:
            row = s.scalar(select(GuidelinesRead).where(GuidelinesRead.labeler_id == labeler_id,
                                                        GuidelinesRead.campaign_id == campaign_id))
            if row is None:
                s.add(GuidelinesRead(labeler_id=labeler_id, campaign_id=campaign_id, version=version, read_at=time.time()))
            else:
                row.version, row.read_at = version, time.time()

    retrying(attempt)  # two tabs at once: the loser's insert clashes, its retry updates


def guidelines_summary(engine):
    """{campaign id: {characters, readers}} of the campaigns with guidelines: how long they are, and how
    many labelers have read their current version (for the admin page)."""
    with Session(reading(engine)) as s:
        texts = dict(s.execute(select(Campaign.id, Campaign.guidelines).where(Campaign.guidelines.is_not(None))).all())
        reads = s.execute(select(GuidelinesRead.campaign_id, GuidelinesRead.version)).all()
    out = {cid: {"characters": len(md), "readers": 0} for cid, md in texts.items()}
    for cid, version in reads:
        if cid in texts and version == guidelines_version(texts[cid]):
            out[cid]["readers"] += 1
    return out
# ---------------------------------------------------------------- labeler quality


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
        _release(s, s.execute(select(Assignment.id, Assignment.task_id)
                              .where(Assignment.labeler_id == labeler_id, _is_open)).all())
        return lab.paused_at


def quality_settings(engine):
    """{campaign id: {gold_rate, flag_below, known: its known-answer tasks, expected: {task id: ranks}}}
    and {labeler id: when paused} of the paused ones: what the admin's overview adds to D.overview."""
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
