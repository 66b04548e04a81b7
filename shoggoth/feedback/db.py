"""The ranking app's tables and how to reach them: the SQLAlchemy schema, `connect` (which also
brings a database made by an older version up to date, by hand-written migrations), the read and
write transactions and their retry after a lost race, the server's secret, and the helpers every
other storage module shares.

The storage is split by subject, each module on top of this one: `campaigns` (campaigns and their
tasks), `accounts` (labelers, invites, sessions), `assignments` (the labeling loop), `queries`
(reading the rankings back: export, overview), `oversight` (known answers, quality settings,
pausing) and `guidelines`.

These invariants live in the schema, so that they hold for any number of server threads,
processes and simulated labelers at once (the labeling loop's own are in `assignments`):

- A labeler holds at most one assignment per task, UNIQUE(task_id, labeler_id):
  nobody gets the same task twice, even after skipping it.
- A labeler holds at most one open assignment, a partial unique index on
  assignments(labeler_id) WHERE status = 'open' (ONE_OPEN): two `next_task` calls that race
  (on PostgreSQL, SKIP LOCKED sends them to different tasks) cannot both assign;
  the loser's insert fails, its transaction (slot included) rolls back, and its
  retry hands back the winner's task.
- A ranking is stored once per assignment and once per (task, labeler).

SQLite (a file, the default) runs every transaction as BEGIN IMMEDIATE with a
busy timeout; PostgreSQL runs at READ COMMITTED, where a conditional UPDATE
re-checks its WHERE clause after waiting for a row lock.
"""

import random
import re
import secrets
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sqlalchemy import (JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, create_engine,
                        event, false, func, inspect, select, text, update)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column
from sqlalchemy.schema import CreateColumn

from ..errors import DataError

INVITE_TTL = 7 * 86400.0  # an invite link unused this long stops working (accounts; old labelers' links here)


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


IS_OPEN = Assignment.status == "open"  # the condition of an open assignment
# At most one open assignment per labeler (see the module docstring).
ONE_OPEN = Index("uq_assignments_one_open_per_labeler", Assignment.labeler_id, unique=True,
                 postgresql_where=IS_OPEN, sqlite_where=IS_OPEN)


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
        release(s, s.execute(select(Assignment.id, Assignment.task_id).where(IS_OPEN, Assignment.id != oldest)).all())
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


def release(s, assignments):
    """Mark open assignments (id, task_id) expired and free their tasks' slots."""
    for aid, tid in assignments:
        if s.execute(update(Assignment).where(Assignment.id == aid, Assignment.status == "open")
                     .values(status="expired")).rowcount == 1:
            s.execute(update(Task).where(Task.id == tid).values(n_open=Task.n_open - 1))


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


def secret(engine):
    """The server's signing secret (CSRF tokens), made once and kept in the database."""
    with writing(engine) as s:
        row = s.get(Setting, "secret")
        if row is None:
            row = Setting(key="secret", value=secrets.token_hex(32))
            s.add(row)
        return row.value
