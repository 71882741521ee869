"""The one way to write a resource's observed state (``status`` and the columns that go
with it: ``power_state``, ``task_state``, ``observed_generation``, ``conditions``, ...).

Agents and task handlers report concurrently on the same rows. A read-merge-write of
the JSON ``status`` loses updates under PostgreSQL's READ COMMITTED: two writers read
the same status, each merges its own keys, the second commit silently drops the first
writer's keys. :func:`write` closes that window with a row lock taken *before* the
merge: ``SELECT … FOR UPDATE`` re-reads the row as the last committer left it and keeps
every other writer out until this transaction ends, so the patch always lands on the
current status. (SQLite has no row locks; a Cairn write transaction there starts with
``BEGIN IMMEDIATE``, which holds the database's write lock for the whole transaction,
so the same code is safe on both.) A version column with a retry loop would give the
same guarantee; the lock needs no retries and no column on every table.

Rules for callers:

- express the change as a patch of the status (``{"key": value}``), or as a function
  of the status the row holds *now* (``lambda current: {...}``), never as a status you
  read earlier and merged yourself;
- put column changes in ``columns`` and anything derived from the locked row
  (conditions, counters, spec + generation) in ``change``;
- lock several rows in one transaction in a fixed order (by id) to avoid deadlocks.

An event is recorded (in the same transaction, so a committed change always has its
event) only when something changed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from sqlalchemy import inspect
from sqlalchemy.orm import Session

from appliance.db.models import ResourceMixin

Row = TypeVar("Row", bound=ResourceMixin)
StatusPatch = Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]]
Emitter = Callable[[Session, Any, str], Any]
UNTRACKED = frozenset({"updated_at"})  # moves on every flush; not a change of its own


def lock(session: Session, row: ResourceMixin) -> None:
    """Flush pending changes, then re-read ``row`` under a row lock (``FOR UPDATE``):
    from here to the end of the transaction nobody else writes it, and the attributes
    are what the last committed writer left."""
    session.flush()
    session.refresh(row, with_for_update=True)


def _snapshot(row: ResourceMixin) -> dict[str, Any]:
    return {attr.key: copy.deepcopy(getattr(row, attr.key))
            for attr in inspect(type(row)).column_attrs if attr.key not in UNTRACKED}


def write(session: Session, row: Row, patch: StatusPatch | None = None, *, emit: Emitter,
          verb: str = "updated", columns: Mapping[str, Any] | None = None,
          change: Callable[[Row], None] | None = None) -> bool:
    """Lock ``row``, merge ``patch`` into its current status (keys set to the given
    values; a callable patch is computed from the current status), set ``columns``, run
    ``change(row)`` on the locked row, and call ``emit(session, row, verb)`` (which
    records the event) when anything changed. Returns whether something changed."""
    lock(session, row)
    before = _snapshot(row)
    if patch is not None:
        current = dict(row.status or {})
        delta = patch(current) if callable(patch) else patch
        row.status = {**current, **delta}
    for key, value in (columns or {}).items():
        setattr(row, key, value)
    if change is not None:
        change(row)
    if _snapshot(row) == before:
        return False
    emit(session, row, verb)
    return True
