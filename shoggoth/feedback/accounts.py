"""Labelers and signing in: a new labeler and their invite link, finding a labeler by name, an
invite traded once for a labeler session, the admin's sessions, who holds a session token, a fresh
invite, and revoking a labeler. Only the hash of a token is stored (`hash_token`), never the token.
"""

import hashlib
import secrets
import time

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..errors import DataError
from .db import INVITE_TTL, IS_OPEN, Assignment, Campaign, Invite, Labeler, Rejected, SignIn, clean_text, reading, release, writing

SESSION_TTL = {"labeler": 30 * 86400.0, "admin": 12 * 3600.0}  # how long a sign-in lasts


def hash_token(token):
    return hashlib.sha256(token.encode()).hexdigest()


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
        release(s, s.execute(select(Assignment.id, Assignment.task_id)
                              .where(Assignment.labeler_id == labeler_id, IS_OPEN)).all())


def _close_invites(s, labeler_id):
    """Mark the labeler's unused invites used (404 for an unknown labeler)."""
    if s.get(Labeler, labeler_id) is None:
        raise Rejected(404, f"no labeler {labeler_id}")
    s.execute(update(Invite).where(Invite.labeler_id == labeler_id, Invite.used_at.is_(None)).values(used_at=time.time()))
