"""Project-scoped resources: one implementation of list / get / create / update /
delete with tenancy checks, If-Match and events, shared by every kind that lives
in a project (placement groups, VMs, containers, volumes, networks, ...)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.db.models import Project, ScopedMixin
from appliance.errors import Conflict, NotFound
from appliance.services import events, statuses
from appliance.services.auth import project_by_name
from appliance.services.principal import Action, Principal
from appliance.services.resources import check_generation, keyset, page, public

M = TypeVar("M", bound=ScopedMixin)


class ScopedKind(Generic[M]):
    """The generic service for one project-scoped kind."""

    def __init__(self, model: type[M], kind: str, hint: str,
                 extra_status: Callable[[M], dict[str, Any]] | None = None,
                 fixed: dict[str, Any] | None = None,
                 redact: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.model = model
        self.kind = kind
        self.hint = hint  # how to list them, for "not found" messages
        self.extra_status = extra_status
        self.fixed = fixed or {}  # column values that select this kind in a shared table
        self.redact = redact  # what callers who may only read the project get instead

    def shown(self, principal: Principal, row: M, project: str) -> dict[str, Any]:
        data = self.public(row, project)
        if self.redact is not None and not principal.can_project(row.project_id, "write"):
            data = self.redact(data)
        return data

    def _scope(self, query: Any) -> Any:
        for column, value in self.fixed.items():
            query = query.where(getattr(self.model, column) == value)
        return query

    def public(self, row: M, project: str) -> dict[str, Any]:
        extra = self.extra_status(row) if self.extra_status else {}
        return public(row, project, **extra)

    def emit(self, session: Session, row: M, project: str, verb: str) -> dict[str, Any]:
        session.flush()
        data = self.public(row, project)
        events.record(session, self.kind, verb, data, row.project_id)
        return data

    def row(self, session: Session, principal: Principal, project: str, name: str,
            action: Action = "read") -> tuple[M, Project]:
        proj = project_by_name(session, principal, project, action)
        row = session.scalar(self._scope(select(self.model).where(self.model.project_id == proj.id,
                                                                  self.model.name == name)))
        if row is None:
            raise NotFound(f"there is no {self.kind} '{name}' in project '{project}': {self.hint}")
        return row, proj

    def exists(self, session: Session, principal: Principal, project: str, name: str) -> bool:
        proj = project_by_name(session, principal, project)
        return session.scalar(self._scope(select(self.model.id).where(self.model.project_id == proj.id,
                                                                      self.model.name == name))) is not None

    def get(self, session: Session, principal: Principal, project: str, name: str) -> dict[str, Any]:
        row, proj = self.row(session, principal, project, name)
        return self.shown(principal, row, proj.name)

    def list_(self, session: Session, principal: Principal, project: str | None, limit: int,
              cursor: str | None, search: str | None = None,
              **filters: Any) -> tuple[list[dict[str, Any]], str | None]:
        """One project's, or every project the caller can see when ``project`` is None;
        ``search``: only names containing it; ``filters``: column == value."""
        query = self._scope(select(self.model, Project.name).join(Project, Project.id == self.model.project_id))
        if project is not None:
            proj = project_by_name(session, principal, project)
            query = query.where(self.model.project_id == proj.id)
        else:
            visible = principal.readable_project_ids()
            if visible is not None:
                query = query.where(self.model.project_id.in_(visible))
        for column, value in filters.items():
            if value is not None:
                query = query.where(getattr(self.model, column) == value)
        if search:
            query = query.where(self.model.name.contains(search.lower(), autoescape=True))
        rows = list(session.execute(keyset(query, (Project.name, self.model.name, self.model.id),
                                           cursor, limit)))
        rows, nxt = page(rows, limit, lambda r: (r[1], r[0].name, r[0].id))
        return [self.shown(principal, r[0], r[1]) for r in rows], nxt

    def create(self, session: Session, principal: Principal, project: str, name: str,
               spec: dict[str, Any], status: dict[str, Any] | None = None, **columns: Any) -> M:
        proj = project_by_name(session, principal, project, "write")
        exists = session.scalar(self._scope(select(self.model.id).where(self.model.project_id == proj.id,
                                                                        self.model.name == name)))
        if exists:
            raise Conflict(f"a {self.kind} named '{name}' already exists in project '{project}': "
                           "pick another name")
        row = self.model(name=name, project_id=proj.id, spec=spec,  # type: ignore[call-arg]
                         status=status or {}, **self.fixed, **columns)
        session.add(row)
        session.flush()  # a concurrent duplicate raises IntegrityError: the API answers 409
        self.emit(session, row, proj.name, "created")
        return row

    def update_spec(self, session: Session, principal: Principal, project: str, name: str,
                    changes: dict[str, Any], if_match: str | None) -> tuple[M, bool]:
        """Merge ``changes`` into spec; bumps generation when something changed."""
        row, proj = self.row(session, principal, project, name, "write")
        check_generation(row, if_match)
        spec = {**(row.spec or {}), **changes}
        changed = spec != row.spec
        if changed:
            row.spec = spec
            row.generation += 1
            self.emit(session, row, proj.name, "updated")
        return row, changed

    def emit_row(self, session: Session, row: M, verb: str) -> dict[str, Any]:
        """``emit`` for callers that hold the row but not its project's name."""
        project = session.scalar(select(Project.name).where(Project.id == row.project_id)) or ""
        return self.emit(session, row, project, verb)

    def write_status(self, session: Session, row: M, patch: statuses.StatusPatch | None = None, *,
                     columns: dict[str, Any] | None = None, change: Callable[[M], None] | None = None,
                     verb: str = "updated") -> bool:
        """Observed state of one row, through :func:`statuses.write` (row lock, merge, event)."""
        return statuses.write(session, row, patch, emit=self.emit_row, verb=verb, columns=columns, change=change)

    def set_status(self, session: Session, row: M, **status: Any) -> bool:
        return self.write_status(session, row, status)

    def delete(self, session: Session, principal: Principal, project: str, name: str) -> M:
        row, proj = self.row(session, principal, project, name, "write")
        data = self.public(row, proj.name)
        session.delete(row)
        events.record(session, self.kind, "deleted", data, row.project_id)
        return row
